"""Periodic sample grids from fixed prompts and seeds: one row per seed, one column per prompt."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from senseflow.metrics.image_io import quantise
from senseflow.student import few_step_sample
from senseflow.viz import image_grid, save_image

if TYPE_CHECKING:
    from senseflow.train.trainer import Distiller


def save_sample_grid(distiller: Distiller, path: Path, write: bool = True) -> Path:
    """Sample the fixed prompts and seeds (every rank must call this under FSDP2); write if ``write``."""
    log = distiller.cfg.logging
    prompts, seeds = list(log.sample_prompts), list(log.sample_seeds)
    if not prompts:
        raise ValueError("logging.sample_prompts is empty but logging.sample_every is set")
    all_prompts = [p for _ in seeds for p in prompts]
    all_seeds = [s for s in seeds for _ in prompts]
    shape = distiller.adapter.sample_shape(distiller.cfg.data.resolution)
    images = few_step_sample(
        distiller.adapter,
        distiller.generator,
        distiller.anchor_levels,
        shape,
        all_prompts,
        all_seeds,
        log.sample_sampler,
    )
    if not write:
        return path
    images = quantise(images.cpu(), rule="round")
    return save_image(image_grid(np.asarray(images), ncols=len(prompts)), path)
