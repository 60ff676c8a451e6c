"""Streams over a sample index: the order, the image pipeline, bad samples and the latent cache.

**Order.** Each epoch is a permutation of the dataset drawn from (seed, epoch). The global batch of
iteration ``i`` is the global positions ``[i * B * W, (i + 1) * B * W)`` and rank ``r`` takes
``[i * B * W + r * B, ... + B)``; position ``g`` is slot ``g mod N`` of epoch ``g // N``'s
permutation. A batch is thus a pure function of (seed, i, rank, world), and the global batch of an
iteration is the same for any world size with the same global batch size ``B * W``.

**Bad samples.** An image that cannot be decoded in full, or whose short side is below
``data.min_side`` (default: the resolution), is skipped: the position takes the next slot of the
same permutation whose image is good (wrapping around). Whether an image is good depends only on
its file, so the replacement never depends on prefetching or on which process read it first.
Each process warns once per bad file (:class:`DataWarning`, naming it) and counts them in
``skipped``. When no sample is usable at all, one summary warning and one error say so instead, the
error naming ``data.min_side`` (and the short sides seen) when images were refused as too small.

**Identity.** ``kind/<fingerprint>/n<N>/<R>px/<crop>/min<M>/order1``: the index's content hash,
its size, resolution, crop and minimum side; the trailing tag changes if the order ever does.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from senseflow.data.images import BadImage, Crop, load_image, resize_and_crop
from senseflow.data.index import DataWarning, SampleIndex, digest, listing
from senseflow.data.latents import LatentCache, vae_identity
from senseflow.models.batch import Batch

ORDER = "order1"
_ORDER_SALT = 0x5EF1  # keeps the data order's generator apart from other (seed, n) generators
_CROP_SALT = 0xC409


class EpochOrder:
    """Global position -> dataset index, one permutation per epoch (the last two kept)."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, _ORDER_SALT, epoch]).permutation(self.size)
            self._perms[epoch] = perm
            while len(self._perms) > 2:
                self._perms.popitem(last=False)
        return perm

    def candidates(self, position: int):
        """(epoch, dataset index) of ``position``, then of the following slots of its epoch."""
        epoch, slot = divmod(position, self.size)
        perm = self.permutation(epoch)
        for k in range(self.size):
            yield epoch, int(perm[(slot + k) % self.size])


def sample_key(sample_id: str, resolution: int, top_left: tuple[int, int]) -> str:
    """A sample's identity with its crop: ``<id>|<R>px|<top>,<left>``."""
    return f"{sample_id}|{resolution}px|{top_left[0]},{top_left[1]}"


def rank_positions(index: int, batch_size: int, rank: int, world: int) -> range:
    start = (index * world + rank) * batch_size
    return range(start, start + batch_size)


class ImageStream:
    """This rank's (prompt, image) batches of an image index, or cached latents instead of images."""

    def __init__(
        self,
        index: SampleIndex,
        resolution: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        crop: str = "center",
        min_side: int | None = None,
    ):
        if crop not in ("center", "random"):
            raise ValueError(f"data.crop: expected center or random, got {crop!r}")
        self.index, self.resolution, self.batch_size = index, resolution, batch_size
        self.seed, self.rank, self.world, self.crop = seed, rank, world, crop
        self.min_side = resolution if min_side is None else min_side
        self.order = EpochOrder(len(index), seed)
        size = f"n{len(index)}/{resolution}px"
        self.identity = f"{index.kind}/{index.fingerprint()}/{size}/{crop}/min{self.min_side}/{ORDER}"
        self.cache: LatentCache | None = None
        self._bad: set[int] = set()
        self._small: dict[int, int] = {}  # short side of the bad samples refused as too small

    def prompts(self) -> list[str]:
        """Every prompt of the dataset (what ``senseflow cache-text`` encodes)."""
        return [self.index.prompt(i) for i in range(len(self.index))]

    @property
    def skipped(self) -> int:
        """Bad samples this process has met (each counted once)."""
        return len(self._bad)

    def use_latent_cache(self, folder: str) -> None:
        """Read latents from ``folder`` (checked against this stream) instead of decoding images."""
        if self.crop != "center":
            raise ValueError(
                "data.latent_cache: a latent cache holds center crops, so it cannot serve data.crop: random "
                "(set data.crop=center, or drop data.latent_cache)"
            )
        self.cache = LatentCache(folder, self.identity, list(self.index.ids))

    def check_vae(self, adapter) -> None:
        """With a latent cache: refuse it unless it was written with ``adapter``'s VAE."""
        if self.cache is not None:
            self.cache.check_vae(vae_identity(adapter))

    def mark_bad(self, i: int, reason: str | BadImage, warn: bool = True) -> bool:
        """Count sample ``i`` as bad (once) and warn about it unless ``warn`` is false; True when it
        was not bad before."""
        if i in self._bad:
            return False
        self._bad.add(i)
        if isinstance(reason, BadImage) and reason.short_side is not None:
            self._small[i] = reason.short_side
        if warn:
            self.warn_bad(i, reason, stacklevel=4)
        return True

    def none_usable(self, held: list[tuple[int, str | BadImage]], what: str = "") -> ValueError:
        """The error for a dataset without one usable sample, after one summary warning for ``held``
        (the bad samples met, not yet warned about one by one). ``what``: appended to the error."""
        n = len(self.index)
        small = sorted(self._small.values())
        if held:
            examples = [f"{self.index.where(i)}: {reason}" for i, reason in held]
            counts = [f"{len(small)} smaller than data.min_side={self.min_side}"] if small else []
            if len(small) < n:
                counts.append(f"{n - len(small)} unreadable or unusable")
            warnings.warn(
                f"data: skipped all {n} samples ({', '.join(counts)}): {listing(examples, 3)}",
                DataWarning,
                stacklevel=3,
            )
        message = f"data.path: none of the {n} samples has a usable image"
        if small:
            message += (
                f"; {len(small)} of them are smaller than data.min_side={self.min_side} (short sides "
                f"{small[0]} to {small[-1]} px), the likely cause: lower data.min_side (smaller images are "
                "upscaled to data.resolution) or use larger images"
            )
        return ValueError(message + what)

    def key(self, i: int, crop: Crop) -> str:
        return sample_key(self.index.ids[i], self.resolution, crop.top_left)

    def load(self, i: int, epoch: int = 0) -> tuple[torch.Tensor, Crop]:
        """Sample ``i``'s crop as CHW in [-1, 1]; a random crop is drawn from (seed, epoch, i)."""
        random = None if self.crop == "center" else np.random.default_rng([self.seed, _CROP_SALT, epoch, i])
        try:
            source = self.index.read(i)
        except OSError as exc:
            raise BadImage(f"unreadable ({exc})") from None
        return resize_and_crop(load_image(source, self.min_side), self.resolution, random)

    def _pick(self, position: int):
        # Bad samples met here are warned about once a good one is found; if none is, the dataset
        # has no usable sample and one summary stands for them all.
        held: list[tuple[int, str | BadImage]] = []
        try:
            for epoch, i in self.order.candidates(position):
                if i in self._bad:
                    continue
                if self.cache is not None:
                    entry = self.cache.entry(self.index.ids[i])
                    if entry is None:
                        reason = "unusable when the latent cache was written"
                        if self.mark_bad(i, reason, warn=False):
                            held.append((i, reason))
                        continue
                    return i, entry
                try:
                    return i, self.load(i, epoch)
                except BadImage as exc:
                    if self.mark_bad(i, exc, warn=False):
                        held.append((i, exc))
        finally:
            if len(self._bad) < len(self.index):
                for i, reason in held:
                    self.warn_bad(i, reason, stacklevel=5)
        raise self.none_usable(held)

    def warn_bad(self, i: int, reason: str | BadImage, stacklevel: int) -> None:
        warnings.warn(
            f"data: skipped {self.index.where(i)}: {reason}; the next sample of the epoch's order "
            "takes its place",
            DataWarning,
            stacklevel=stacklevel,
        )

    def batch(self, index: int) -> Batch:
        picks = [self._pick(g) for g in rank_positions(index, self.batch_size, self.rank, self.world)]
        ids = [i for i, _ in picks]
        prompts = [self.index.prompt(i) for i in ids]
        if self.cache is not None:
            entries = [e for _, e in picks]
            sizes = [(e[2], e[3]) for e in entries]
            corners = [(e[4], e[5]) for e in entries]
            images, latents = None, self.cache.load(entries)
        else:
            crops = [c for _, (_, c) in picks]
            sizes = [c.original_size for c in crops]
            corners = [c.top_left for c in crops]
            images, latents = torch.stack([im for _, (im, _) in picks]), None
        keys = [sample_key(self.index.ids[i], self.resolution, c) for i, c in zip(ids, corners, strict=True)]
        meta = {
            "original_size": torch.tensor(sizes, dtype=torch.long),
            "crop_top_left": torch.tensor(corners, dtype=torch.long),
        }
        return Batch(prompts=prompts, images=images, latents=latents, meta=meta, keys=keys)


class PromptStream:
    """Prompts-only batches (no image, no latent) from a prompt list, in the same epoch order."""

    def __init__(
        self, source: Path, prompts: list[str], batch_size: int, seed: int = 0, rank: int = 0, world: int = 1
    ):
        self.source, self._prompts = source, prompts
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.order = EpochOrder(len(prompts), seed)
        self.identity = f"prompts/{digest(prompts)}/n{len(prompts)}/{ORDER}"
        self.skipped = 0

    def batch(self, index: int) -> Batch:
        positions = rank_positions(index, self.batch_size, self.rank, self.world)
        ids = [next(self.order.candidates(g))[1] for g in positions]
        return Batch(prompts=[self._prompts[i] for i in ids], keys=[f"{self.source.name}:{i}" for i in ids])

    def prompts(self) -> list[str]:
        return list(self._prompts)


def verify_latent_cache(stream, adapter) -> None:
    """Refuse a stream's latent cache unless it was written with ``adapter``'s VAE (a no-op for
    streams without one)."""
    check = getattr(stream, "check_vae", None)
    if check is not None:
        check(adapter)
