"""DMD2's distribution-matching loss (spec §3) and the random draws that feed it.

The loss is kept exactly as DMD2 writes it: the normalised x0 difference of the two score networks
is turned into a surrogate MSE whose gradient w.r.t. the generator sample is that difference / N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from senseflow.core.parameterisation import Parameterisation
from senseflow.core.timesteps import sample_logit_normal, sample_uniform_index

if TYPE_CHECKING:
    from senseflow.config.schema import GuidanceRange, TimestepDist

__all__ = ["DMDOutput", "dmd_loss", "draw_guidance", "sample_levels"]


@dataclass(frozen=True)
class DMDOutput:
    """DMD loss, the per-element gradient it injects (before the 1/N of the mean) and detached stats.

    ``stats``: ``grad_norm`` (mean per-sample L2 norm of ``grad``), ``x0_gap`` (mean |x̂0_fake − x̂0_real|)
    and ``normaliser`` (mean of the per-sample ``mean|x − x̂0_real|``); all float32 0-d tensors.
    """

    loss: Tensor
    grad: Tensor
    stats: dict[str, Tensor]


def dmd_loss(x: Tensor, x0_fake: Tensor, x0_real: Tensor) -> DMDOutput:
    """``0.5·MSE(x, sg(x − grad))`` with ``grad = (x̂0_fake − x̂0_real) / mean_{C,H,W}|x − x̂0_real|``.

    ``x`` is G's x̂0 (carries the gradient); the score estimates are treated as constants. Then
    ∂L/∂x = grad / x.numel(), i.e. G is pushed toward x̂0_real and away from x̂0_fake. The per-sample
    normaliser replaces DMD's analytic time weighting. NaN (0/0) becomes 0 and ±inf the largest finite
    float, as ``torch.nan_to_num`` in DMD2. Computed in float32.
    """
    if x.ndim < 2 or x.shape != x0_fake.shape or x.shape != x0_real.shape:
        raise ValueError(
            f"x, x0_fake, x0_real must share one shape [B, ...], got "
            f"{tuple(x.shape)}, {tuple(x0_fake.shape)}, {tuple(x0_real.shape)}"
        )
    dims = tuple(range(1, x.ndim))
    with torch.no_grad():
        xd, fake, real = x.detach().float(), x0_fake.detach().float(), x0_real.detach().float()
        normaliser = (xd - real).abs().mean(dim=dims, keepdim=True)
        grad = torch.nan_to_num((fake - real) / normaliser, nan=0.0)
        stats = {
            "grad_norm": grad.flatten(1).norm(dim=1).mean(),
            "x0_gap": (fake - real).abs().mean(),
            "normaliser": normaliser.mean(),
        }
        target = xd - grad
    loss = 0.5 * F.mse_loss(x.float(), target, reduction="mean")
    return DMDOutput(loss=loss, grad=grad, stats=stats)


def sample_levels(
    dist: TimestepDist,
    n: int,
    param: Parameterisation,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``n`` noise levels drawn from a recipe ``TimestepDist`` (DMD §3, fake score §4).

    ``uniform_index`` draws integer grid positions in [low, high] (DDPM t; SD3.5 index into the
    flipped shift table; FLUX σ·1000, per ``param``'s grid). ``uniform`` and ``logit_normal`` draw a
    fraction u that the parameterisation maps to a level (flow σ = u, shifted only when
    ``apply_shift``; DDPM t = ⌊u·T⌋).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    match dist.kind:
        case "uniform_index":
            idx = sample_uniform_index(n, dist.low, dist.high, generator=generator, device=device)
            return param.level_from_grid(idx)
        case "uniform":
            u = torch.rand(n, generator=generator, device=device)
            return param.level_from_fraction(dist.low + (dist.high - dist.low) * u)
        case "logit_normal":
            u = sample_logit_normal(n, dist.mean, dist.std, generator=generator, device=device)
            return param.level_from_fraction(u, shift=dist.apply_shift)
    raise ValueError(f"unknown timestep distribution kind {dist.kind!r}")


def draw_guidance(
    guidance: GuidanceRange,
    n: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``n`` guidance strengths ~ U[min, max] (float32); a fixed range consumes no random numbers."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if guidance.min == guidance.max:
        return torch.full((n,), float(guidance.min), dtype=torch.float32, device=device)
    u = torch.rand(n, generator=generator, device=device)
    return guidance.min + (guidance.max - guidance.min) * u
