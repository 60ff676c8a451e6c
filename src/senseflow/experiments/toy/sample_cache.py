"""Stored teacher samples, so the demo does not re-sample the 50-step teacher on every run.

The teacher's 50-step samples of the demo's prompts and seeds are a fixed property of the shipped
teacher (like the reference statistics FID tools ship for a dataset), and sampling them is most of
the demo's evaluation time on a CPU. A cache file maps (prompt, seed) to the uint8 image for one
teacher (its transformer's SHA-256), step count and guidance. Before any stored image is used, a
few of them are sampled again, compared and timed (the time per image a report can quote for this
machine); a cache of another teacher or setting, or one that does not match, is ignored with a
message.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from senseflow.metrics.shapes.quality import Generator

__all__ = ["SampleCache"]

#: Largest mean and largest single absolute difference (0-255) of a re-sampled check image: the
#: same weights on another CPU differ in the last float bits, which may move a pixel by a level or two.
CHECK_MEAN_DIFF = 1.0
CHECK_MAX_DIFF = 32


class SampleCache:
    """Images by (prompt, seed) for one generator ``key``; :meth:`wrap` serves hits and samples misses."""

    def __init__(
        self,
        key: dict,
        images: dict[tuple[str, int], np.ndarray],
        source: Path | None = None,
        check_seconds_per_image: float | None = None,
        checked: int = 0,
    ):
        self.key, self.images, self.source = key, images, source
        self.check_seconds_per_image = check_seconds_per_image  # re-sampling the check images, per image
        self.checked = checked  # how many stored images were sampled again and compared
        self.misses = 0

    @classmethod
    def open(cls, paths: Sequence[Path], key: dict, generate: Generator, check: int = 4) -> SampleCache:
        """The first file of ``paths`` with this ``key`` whose first ``check`` (>= 1) images, sampled
        again, match; an empty cache when none does. Keys compare as JSON (sorted keys)."""
        if check < 1:
            raise ValueError(f"check must be >= 1, got {check}")
        wanted = json.dumps(key, sort_keys=True)
        for path in paths:
            if not path.is_file():
                continue
            with np.load(path, allow_pickle=False) as f:
                if json.loads(str(f["key"])) != json.loads(wanted):
                    print(f"sample cache {path}: another teacher or setting, not used", flush=True)
                    continue
                prompts, seeds, images = [str(p) for p in f["prompts"]], f["seeds"].tolist(), f["images"]
            start = time.perf_counter()
            fresh = generate(prompts[:check], seeds[:check])
            seconds = (time.perf_counter() - start) / len(fresh)
            diff = np.abs(fresh.astype(np.int16) - images[:check].astype(np.int16))
            if diff.mean() > CHECK_MEAN_DIFF or diff.max() > CHECK_MAX_DIFF:
                print(
                    f"sample cache {path}: {check} re-sampled images differ (mean {diff.mean():.2f}, max "
                    f"{diff.max()} levels), not used",
                    flush=True,
                )
                continue
            print(
                f"sample cache {path}: {len(prompts)} images; {check} re-sampled match (mean diff "
                f"{diff.mean():.3f}, max {diff.max()} levels)",
                flush=True,
            )
            stored = dict(zip(zip(prompts, seeds, strict=True), images, strict=True))
            return cls(key, stored, path, seconds, len(fresh))
        return cls(key, {})

    def wrap(self, generate: Generator) -> Generator:
        """``generate`` with every stored image served from the cache; new samples are added to it."""

        def cached(prompts: list[str], seeds: list[int]) -> np.ndarray:
            pairs = list(zip(prompts, seeds, strict=True))
            todo = [i for i, k in enumerate(pairs) if k not in self.images and k not in pairs[:i]]
            if todo:
                fresh = generate([prompts[i] for i in todo], [seeds[i] for i in todo])
                self.misses += len(todo)
                for i, image in zip(todo, fresh, strict=True):
                    self.images[(prompts[i], seeds[i])] = image
            return np.stack([self.images[k] for k in zip(prompts, seeds, strict=True)])

        return cached

    def save(self, path: Path) -> None:
        """Write the cache (atomically: a temporary file renamed over ``path``)."""
        keys = list(self.images)
        if not keys:
            raise ValueError(f"nothing to save to {path}: the sample cache is empty")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial.npz")
        np.savez_compressed(
            tmp,
            key=np.array(json.dumps(self.key, sort_keys=True)),
            prompts=np.array([p for p, _ in keys]),
            seeds=np.array([s for _, s in keys], dtype=np.int64),
            images=np.stack([self.images[k] for k in keys]),
        )
        tmp.replace(path)
