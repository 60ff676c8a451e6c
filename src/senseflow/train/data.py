"""Training data streams. Each returns the *global* batch of an iteration; ranks take their slice.

A stream is a pure function of (seed, iteration), so resuming needs only the iteration counter.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from senseflow.config.schema import DistillConfig


class BatchStream(Protocol):
    def batch(self, index: int) -> tuple[Tensor, list[str]]:
        """Images in [-1, 1] (NCHW) and their prompts for iteration ``index``."""


def build_data(cfg: DistillConfig, global_batch: int) -> BatchStream:
    if cfg.data.kind == "toy":
        from senseflow.toy.data import ShapesBatches

        return ShapesBatches("train", global_batch, seed=cfg.seed, image_size=cfg.data.resolution)
    raise ValueError(f"data.kind: '{cfg.data.kind}' is not available in this version (available: toy)")
