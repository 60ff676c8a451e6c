"""Health signals: image statistics, a collapse alarm and the non-finite-loss guard.

Black, static or saturated outputs and oscillating fake-score losses are the most common failure
reports of DMD-style training; these signals make them visible in the log from the first steps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from senseflow.config.schema import HealthConfig
from senseflow.errors import SenseflowError


class TrainingDiverged(SenseflowError, RuntimeError):
    """Raised after too many consecutive non-finite losses."""


@torch.no_grad()
def image_stats(images: Tensor, cfg: HealthConfig) -> dict[str, float]:
    """Mean, std, saturated fraction and cross-sample std of decoded images in [-1, 1]."""
    x = images.detach().float()
    across = x.std(dim=0).mean().item() if x.shape[0] > 1 else float("nan")
    return {
        "image_mean": x.mean().item(),
        "image_std": x.std().item(),
        "image_saturated": (x.abs() >= cfg.saturation_level).float().mean().item(),
        "image_std_across_samples": across,
    }


def collapse_alarm(stats: dict[str, float], cfg: HealthConfig) -> str | None:
    """A message when the batch's images are near-identical (NaN std means batch 1: no verdict).

    Iterations without image statistics (decoding is skipped between logging iterations) give none."""
    across = stats.get("image_std_across_samples", math.nan)
    if not math.isnan(across) and across < cfg.collapse_std:
        return (
            f"possible collapse: generated images barely differ across the batch "
            f"(std across samples {across:.4f} < health.collapse_std {cfg.collapse_std})"
        )
    return None


def non_finite(losses: dict[str, Tensor]) -> list[str]:
    """Names of the losses holding NaN or inf."""
    return [name for name, v in losses.items() if not bool(torch.isfinite(v).all())]


class NonFiniteGuard:
    """Counts consecutive iterations with a non-finite loss; the trainer skips those updates."""

    def __init__(self, patience: int):
        self.patience = patience
        self.consecutive = 0
        self.total = 0

    def end_iteration(self, bad: list[str], iteration: int) -> None:
        """Record one iteration's non-finite losses; raise TrainingDiverged past ``patience``."""
        if not bad:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.patience:
            raise TrainingDiverged(
                f"iteration {iteration}: non-finite {', '.join(bad)} for {self.consecutive} consecutive "
                f"iterations (health.nan_patience = {self.patience}); lower the learning rates or check the "
                "data and the teacher's precision. The last checkpoint is intact."
            )

    def state_dict(self) -> dict:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive, self.total = state["consecutive"], state["total"]
