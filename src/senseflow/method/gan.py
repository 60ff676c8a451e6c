"""Adversarial losses and their per-sample time weights (spec §8).

ω_b, taken at the sample's anchor a_j, lets DMD dominate at high noise and the GAN at low noise.
Every weight is read off the parameterisation (σ, α, mirrored level), so no family branch is needed.
Logits have shape ``[B, ...]`` (all heads' spatial logits concatenated); they are averaged per sample,
then the weighted mean over the batch is taken, exactly as §8.1 writes L_D and L_adv.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from senseflow.core.parameterisation import Parameterisation

__all__ = [
    "GAN_LOSSES",
    "TimeWeight",
    "hinge_d_loss",
    "hinge_g_loss",
    "nonsaturating_d_loss",
    "nonsaturating_g_loss",
    "time_weight",
]

TimeWeight = Literal["alpha_sq", "mirror_sigma_sq", "sqrt_alphabar", "constant"]


def time_weight(kind: TimeWeight, level: Tensor, param: Parameterisation) -> Tensor:
    """Per-sample GAN weight ω at ``level`` (float32, shape of ``level``).

    * ``alpha_sq``: α² = (1−σ)² for flow (FLUX code, paper); ᾱ for DDPM.
    * ``mirror_sigma_sq``: σ(mirror_level(a))², the *unflipped* σ table read at the anchor's grid
      index (SD3.5 code): for index i, ``sigma_table()[i]²`` rather than ``(1 − sigma_table()[T-1-i])²``.
    * ``sqrt_alphabar``: α itself, √ᾱ_t for DDPM (SDXL code, power 1); 1−σ for flow.
    * ``constant``: 1 (DMD2).
    """
    match kind:
        case "alpha_sq":
            return param.alpha(level).float() ** 2
        case "mirror_sigma_sq":
            return param.sigma(param.mirror_level(level)).float() ** 2
        case "sqrt_alphabar":
            return param.alpha(level).float()
        case "constant":
            return torch.ones_like(param.sigma(level), dtype=torch.float32)
    raise ValueError(
        f"time weight must be alpha_sq, mirror_sigma_sq, sqrt_alphabar or constant, got {kind!r}"
    )


def _per_sample(values: Tensor) -> Tensor:
    return values.float().reshape(values.shape[0], -1).mean(dim=1)


def _weighted_mean(per_sample: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return per_sample.mean()
    w = torch.as_tensor(weights, dtype=torch.float32, device=per_sample.device)
    if w.shape != per_sample.shape:
        raise ValueError(f"weights must have shape {tuple(per_sample.shape)}, got {tuple(w.shape)}")
    return (w * per_sample).mean()


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor, weights: Tensor | None = None) -> Tensor:
    """L_D = mean_b ω_b[mean ReLU(1 − D(real_b)) + mean ReLU(1 + D(fake_b))] (ω = 1 when None)."""
    per_sample = _per_sample(F.relu(1.0 - real_logits.float())) + _per_sample(
        F.relu(1.0 + fake_logits.float())
    )
    return _weighted_mean(per_sample, weights)


def hinge_g_loss(fake_logits: Tensor, weights: Tensor | None = None) -> Tensor:
    """L_adv = mean_b ω_b(−mean D(fake_b))."""
    return _weighted_mean(-_per_sample(fake_logits), weights)


def nonsaturating_d_loss(real_logits: Tensor, fake_logits: Tensor, weights: Tensor | None = None) -> Tensor:
    """DMD2's classifier loss (§8.2): mean_b ω_b[mean softplus(−D(real_b)) + mean softplus(D(fake_b))]."""
    per_sample = _per_sample(F.softplus(-real_logits.float())) + _per_sample(F.softplus(fake_logits.float()))
    return _weighted_mean(per_sample, weights)


def nonsaturating_g_loss(fake_logits: Tensor, weights: Tensor | None = None) -> Tensor:
    """DMD2's generator loss (§8.2): mean_b ω_b·mean softplus(−D(fake_b))."""
    return _weighted_mean(_per_sample(F.softplus(-fake_logits.float())), weights)


# The losses a discriminator declares it is trained with: (generator loss, discriminator loss).
GAN_LOSSES = {
    "hinge": (hinge_g_loss, hinge_d_loss),
    "nonsaturating": (nonsaturating_g_loss, nonsaturating_d_loss),
}
