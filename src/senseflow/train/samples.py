"""Periodic sample grids from fixed prompts and seeds: one row per seed, one column per prompt."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from senseflow.method import student_sample
from senseflow.sampling import seeded_noise
from senseflow.toy.evaluator import to_uint8
from senseflow.viz import image_grid, save_image

if TYPE_CHECKING:
    from senseflow.train.trainer import Distiller


@torch.no_grad()
def student_images(distiller: Distiller, prompts: list[str], seeds: list[int], mode: str) -> torch.Tensor:
    """Decoded 4-step student samples in [-1, 1], one per (prompt, seed) pair."""
    adapter = distiller.adapter
    cond = adapter.encode_prompts(prompts)
    noise = seeded_noise(adapter.sample_shape(distiller.cfg.data.resolution), seeds)
    fn = lambda x, level: adapter.predict(distiller.generator, x, level, cond)  # noqa: E731
    gen = torch.Generator().manual_seed(int(seeds[0]))
    x0 = student_sample(fn, noise, distiller.anchor_levels, adapter.param, mode, generator=gen)
    return adapter.decode(x0).clamp(-1, 1)


def save_sample_grid(distiller: Distiller, path: Path) -> Path:
    log = distiller.cfg.logging
    prompts, seeds = list(log.sample_prompts), list(log.sample_seeds)
    if not prompts:
        raise ValueError("logging.sample_prompts is empty but logging.sample_every is set")
    all_prompts = [p for _ in seeds for p in prompts]
    all_seeds = [s for s in seeds for _ in prompts]
    images = to_uint8(student_images(distiller, all_prompts, all_seeds, log.sample_sampler))
    return save_image(image_grid(np.asarray(images), ncols=len(prompts)), path)
