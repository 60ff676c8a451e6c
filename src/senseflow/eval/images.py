"""The image store of ``senseflow eval``: one PNG per (model, prompt), generated once and reused.

A model's images live in ``<output_dir>/images/<name>-<key>/`` where ``key`` hashes everything that
determines them (the source's identity, the prompts, the seeds and the quantisation rule), so a
changed checkpoint or sampler gets a new folder and an unchanged one is reused; an interrupted
generation continues with the missing files. The folder also holds ``index.jsonl`` (index, prompt,
seed, file) for re-aggregation, and ``meta.json`` with the key.

The extra images of the intra-prompt diversity metric (``K`` seeds for each of the first ``P``
prompts, :func:`diversity_plan`) are stored the same way under ``<output_dir>/images/diversity/``;
:class:`DiversityImages` carries them, or the reason they are missing, to the panel.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from senseflow.eval.sources import ImageSource
from senseflow.jsonfile import write_json
from senseflow.metrics.image_io import load_rgb, quantise, save_png

__all__ = ["DiversityImages", "ImageSet", "diversity_plan", "ensure_images", "prompts_sha256"]

IMAGES_SCHEMA = "senseflow.eval.images/1"


def prompts_sha256(prompts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


@dataclass(frozen=True)
class ImageSet:
    """The stored images of one model: files in prompt order, with their prompts and seeds."""

    name: str
    folder: Path
    files: list[Path]
    prompts: list[str]
    seeds: list[int]
    identity: dict[str, Any]
    key: dict[str, Any]
    generated: int  # images made in this call (0: everything was cached)

    def load(self, indices: Sequence[int] | None = None) -> np.ndarray:
        """uint8 NHWC images (all, or those at ``indices``)."""
        picks = range(len(self.files)) if indices is None else indices
        return np.stack([load_rgb(self.files[i]) for i in picks])


@dataclass(frozen=True)
class DiversityImages:
    """The ``seeds_per_prompt`` images of each of ``prompts`` prompts (prompt-major: image
    ``i * seeds_per_prompt + k`` is seed ``k`` of prompt ``i``), or ``missing``: why there are none."""

    images: ImageSet | None
    prompts: int
    seeds_per_prompt: int
    seed_rule: str
    missing: str | None = None


def diversity_plan(
    prompts: Sequence[str], base: int, offset: int, count: int, per_prompt: int
) -> tuple[list[str], list[int], str]:
    """(prompts, seeds, rule) of the diversity images: each of the first ``count`` prompts
    ``per_prompt`` times, seed ``base + offset + i * per_prompt + k`` for seed ``k`` of prompt ``i``."""
    if per_prompt < 2:
        raise ValueError(f"diversity needs at least 2 seeds per prompt, got {per_prompt}")
    count = min(count, len(prompts))
    rows = [(i, k) for i in range(count) for k in range(per_prompt)]
    rule = f"{base} + {offset} + prompt * {per_prompt} + k"
    return [prompts[i] for i, _ in rows], [base + offset + i * per_prompt + k for i, k in rows], rule


def _key(source: ImageSource, prompts: Sequence[str], seeds: Sequence[int], quantisation: str) -> dict:
    return {
        "schema": IMAGES_SCHEMA,
        "model": source.identity(),
        "prompts_sha256": prompts_sha256(prompts),
        "seeds_sha256": hashlib.sha256(",".join(map(str, seeds)).encode()).hexdigest(),
        "count": len(prompts),
        "quantisation": quantisation,
    }


def ensure_images(
    source: ImageSource,
    prompts: Sequence[str],
    seeds: Sequence[int],
    root: str | Path,
    quantisation: str,
    batch_size: int = 32,
    progress: bool = True,
) -> ImageSet:
    """Generate the missing images of ``source`` under ``root`` (see the module doc) and list them all."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    name = source.entry.name
    key = _key(source, prompts, seeds, quantisation)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(root) / f"{name}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "meta.json", {"name": name, "key": key})
    files = [folder / f"{i:05d}.png" for i in range(len(prompts))]
    missing = [i for i, f in enumerate(files) if not f.is_file()]

    bar = None
    if progress and missing:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(missing), desc=f"images {name}", unit="img")
    if source.generates:
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            images = quantise(
                source.generate([prompts[i] for i in chunk], [seeds[i] for i in chunk]), quantisation
            )
            for i, image in zip(chunk, images, strict=True):
                save_png(files[i], image)
            if bar is not None:
                bar.update(len(chunk))
    else:
        for i in missing:
            save_png(files[i], source.existing_image(i))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    rows = [
        {"index": i, "prompt": p, "seed": s, "file": f.name}
        for i, (p, s, f) in enumerate(zip(prompts, seeds, files, strict=True))
    ]
    (folder / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ImageSet(
        name=name,
        folder=folder,
        files=files,
        prompts=list(prompts),
        seeds=list(seeds),
        identity=key["model"],
        key=key,
        generated=len(missing),
    )
