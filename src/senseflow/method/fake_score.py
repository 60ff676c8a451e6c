"""Fake-score denoising loss on the generator's samples (spec §4)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from senseflow.core.parameterisation import Parameterisation

__all__ = ["fake_score_loss"]


def fake_score_loss(
    param: Parameterisation, output: Tensor, x0: Tensor, eps: Tensor, level: Tensor
) -> Tensor:
    """``MSE(output, target)`` with the family's own regression target (flow v = ε − x0; DDPM ε or v).

    ``output`` is the fake score's raw prediction at ``param.add_noise(x0, eps, level)``; ``x0`` is
    G's sample and is detached here, so only the fake score learns from this loss. Float32, mean.
    """
    target = param.training_target(x0.detach(), eps, level)
    return F.mse_loss(output.float(), target.float(), reduction="mean")
