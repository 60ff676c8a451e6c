"""Periodic sample grids from fixed prompts and seeds: one row per seed, one column per prompt."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor, nn

from senseflow.config.schema import DistillConfig
from senseflow.metrics.image_io import quantise
from senseflow.models.adapter import FamilyAdapter
from senseflow.models.sampling import student_images
from senseflow.viz import image_grid, save_image


def save_sample_grid(
    adapter: FamilyAdapter,
    generator: nn.Module,
    anchor_levels: Tensor,
    cfg: DistillConfig,
    path: Path,
    write: bool = True,
) -> Path:
    """Sample the recipe's fixed prompts and seeds (every rank must call this under FSDP2); write if
    ``write``."""
    log = cfg.logging
    prompts, seeds = list(log.sample_prompts), list(log.sample_seeds)
    if not prompts:
        raise ValueError("logging.sample_prompts is empty but logging.sample_every is set")
    all_prompts = [p for _ in seeds for p in prompts]
    all_seeds = [s for s in seeds for _ in prompts]
    images = student_images(
        adapter, generator, anchor_levels, cfg.data.resolution, all_prompts, all_seeds, log.sample_sampler
    )
    if not write:
        return path
    images = quantise(images.cpu(), rule="round")
    return save_image(image_grid(np.asarray(images), ncols=len(prompts)), path)
