"""The offline latent cache: what ``senseflow cache-latents`` writes and a stream reads back.

A cache folder holds ``latents-NNNNN.safetensors`` shards (one raw latent per sample, named by a
hash of the sample's key: its identity, resolution and crop) and ``manifest.json``, written last:
the stream identity it was made from, resolution, crop (always center: a random crop differs per
visit), the adapter's VAE identity, each sample's shard, tensor name, original size and crop, and
the samples that were unusable when it was written. A run reads latents instead of images only
after the manifest matches its stream and its teacher's VAE, so a stale cache is an error, never
silently other data.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from senseflow.data.images import BadImage
from senseflow.data.index import listing
from senseflow.jsonfile import write_json
from senseflow.models.text_cache import KIND as TEXT_CACHE

FORMAT = "senseflow-latents/1"
MANIFEST = "manifest.json"
SHARD = "latents-{:05d}.safetensors"
REWRITE = "write it with `senseflow cache-latents RECIPE` (this run's recipe)"


def tensor_name(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def vae_identity(adapter: Any) -> Any:
    """The adapter's VAE identity as JSON gives it back (tuples become lists), ``{}`` when it has none."""
    return json.loads(json.dumps(getattr(adapter, "vae_identity", lambda: {})(), sort_keys=True))


class LatentCache:
    """A cache folder checked against a stream; ``entry(sample_id)`` is None for a sample that was
    unusable when the cache was written."""

    def __init__(self, folder: str | os.PathLike, stream_identity: str, ids: list[str]):
        self.folder = Path(folder).expanduser()
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            raise FileNotFoundError(f"data.latent_cache: {self.folder} holds no {MANIFEST}; {REWRITE}")
        m = json.loads(manifest.read_text())
        if m.get("format") != FORMAT:
            raise ValueError(f"data.latent_cache: {manifest} is not a {FORMAT} manifest; {REWRITE}")
        if m["stream"] != stream_identity:
            raise ValueError(
                f"data.latent_cache: {self.folder} was written for the data {m['stream']}, but this run's "
                f"data are {stream_identity} (other samples, resolution, crop or min_side); {REWRITE}"
            )
        self.manifest = m
        self.shards = [self.folder / s for s in m["shards"]]
        gone = [str(s) for s in self.shards if not s.is_file()]
        if gone:
            raise FileNotFoundError(
                f"data.latent_cache: {len(gone)} shard(s) are missing: {listing(gone)}; {REWRITE}"
            )
        self.entries: dict[str, list] = m["entries"]
        self.skipped = set(m["skipped"])
        absent = [i for i in ids if i not in self.entries and i not in self.skipped]
        if absent:
            raise ValueError(
                f"data.latent_cache: {self.folder} has no entry for {len(absent)} sample(s): "
                f"{listing(absent)}; {REWRITE}"
            )

    def check_vae(self, identity: Any) -> None:
        cached = self.manifest["vae"]
        if cached != identity:
            raise ValueError(
                f"data.latent_cache: {self.folder} holds latents of another VAE ({json.dumps(cached)}) than "
                f"this run's teacher ({json.dumps(identity)}); {REWRITE}"
            )

    def entry(self, sample_id: str) -> list | None:
        return None if sample_id in self.skipped else self.entries[sample_id]

    def load(self, entries: list[list]) -> torch.Tensor:
        """The latents of ``entries`` (from :meth:`entry`), stacked in their order."""
        out: list[torch.Tensor | None] = [None] * len(entries)
        by_shard: dict[int, list[int]] = {}
        for j, e in enumerate(entries):
            by_shard.setdefault(int(e[0]), []).append(j)
        for shard, positions in by_shard.items():
            with safe_open(str(self.shards[shard]), framework="pt") as f:
                for j in positions:
                    out[j] = f.get_tensor(entries[j][1])
        return torch.stack(out)  # type: ignore[arg-type]


def _save_shard(folder: Path, number: int, tensors: dict[str, torch.Tensor]) -> str:
    name = SHARD.format(number)
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    try:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, folder / name)
    finally:
        tmp.unlink(missing_ok=True)
    return name


def check_replaceable(folder: Path) -> None:
    """Refuse to write a latent cache into ``folder`` when its ``manifest.json`` is not a latent
    cache's (a text cache, say): writing would delete it."""
    manifest = folder / MANIFEST
    if not manifest.exists():
        return
    try:
        m = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        held = f"a {MANIFEST} that is not readable JSON ({exc})"
    else:
        if isinstance(m, dict) and m.get("format") == FORMAT:
            return
        fields = m if isinstance(m, dict) else {}
        if fields.get("kind") == TEXT_CACHE:
            held = "a text cache (written by `senseflow cache-text`)"
        else:
            held = (
                f"a {MANIFEST} of something else (format {fields.get('format')!r}, kind "
                f"{fields.get('kind')!r}; a latent cache's format is {FORMAT!r})"
            )
    raise ValueError(
        f"cache-latents: {folder} holds {held}, which writing a latent cache there would destroy; "
        "choose another folder (--out DIR or data.latent_cache=DIR)"
    )


def write_latent_cache(
    stream: Any,
    encode: Callable[[torch.Tensor], torch.Tensor],
    vae: Any,
    out: str | os.PathLike,
    batch_size: int = 8,
    shard_size: int = 1000,
    log: Callable[[str], None] = print,
) -> Path:
    """Encode every sample of ``stream`` (an image stream with ``crop: center``) with ``encode``
    (pixels in [-1, 1], NCHW -> raw latents) into ``out``; returns the manifest's path.

    The old manifest is removed first and the new one written last, each shard under a temporary
    name then renamed, so an interrupted run leaves no cache that a training run would accept. A
    folder whose manifest is not a latent cache's (a text cache) is refused before anything is
    touched. A sample id met again (the same image with another caption) is encoded once.
    """
    folder = Path(out).expanduser()
    check_replaceable(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    index = stream.index
    entries: dict[str, list] = {}
    skipped: list[str] = []
    shards: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    pending: list[tuple[str, str, torch.Tensor, Any]] = []
    shape: list[int] = []
    started = time.monotonic()

    def encode_pending() -> None:
        nonlocal shape
        if not pending:
            return
        with torch.no_grad():
            latents = encode(torch.stack([p[2] for p in pending])).detach().float().cpu()
        shape = list(latents.shape[1:])
        for (sample_id, key, _, crop), latent in zip(pending, latents, strict=True):
            name = tensor_name(key)
            tensors[name] = latent.contiguous()
            entries[sample_id] = [len(shards), name, *crop.original_size, *crop.top_left]
        pending.clear()
        if len(tensors) >= shard_size:
            save_shard()

    def save_shard() -> None:
        if tensors:
            shards.append(_save_shard(folder, len(shards), tensors))
            tensors.clear()
            log(f"{len(entries)}/{len(index)} samples cached ({time.monotonic() - started:.0f} s)")

    held: list[tuple[int, BadImage]] = []  # bad samples met before the first good one: warned later
    seen: set[str] = set()
    for i in range(len(index)):
        sample_id = index.ids[i]
        if sample_id in seen:  # the same image listed again (another caption): its latent is cached
            continue
        seen.add(sample_id)
        try:
            image, crop = stream.load(i)
        except BadImage as exc:
            if pending or entries:
                stream.mark_bad(i, exc)
            elif stream.mark_bad(i, exc, warn=False):
                held.append((i, exc))
            skipped.append(sample_id)
            continue
        for j, exc in held:
            stream.warn_bad(j, exc, stacklevel=3)
        held.clear()
        pending.append((sample_id, stream.key(i, crop), image, crop))
        if len(pending) == batch_size:
            encode_pending()
    encode_pending()
    save_shard()
    if not entries:
        raise stream.none_usable(held, "; nothing was cached")
    for stale in folder.glob(SHARD.replace("{:05d}", "*")):
        if stale.name not in shards:
            stale.unlink()
    return write_json(
        folder / MANIFEST,
        {
            "format": FORMAT,
            "stream": stream.identity,
            "kind": index.kind,
            "resolution": stream.resolution,
            "crop": stream.crop,
            "min_side": stream.min_side,
            "vae": vae,
            "samples": len(entries),
            "latent_shape": shape,
            "shards": shards,
            "entries": entries,
            "skipped": skipped,
        },
        indent=None,
    )
