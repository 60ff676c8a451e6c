"""Random training timesteps and the fixed anchor grid of a K-step student.

The student is only ever evaluated at a handful of noise levels (its *anchors*),
while the teacher/fake-score networks are trained at random levels.  Keeping
both here, in one place and in one representation, is what guarantees that the
student, the teacher and the samplers agree on which σ "step 2 of 4" means.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from senseflow.core.ddpm import DDPMSchedule
from senseflow.core.flow import FlowSchedule

__all__ = [
    "Anchors",
    "ddpm_anchors",
    "flow_anchors_from_indices",
    "flow_anchors_from_sigmas",
    "flow_anchors_from_t",
    "sample_logit_normal",
    "sample_uniform_index",
]

# --------------------------------------------------------------------------- sampling


def sample_logit_normal(
    n: int,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``n`` values ``sigmoid(N(mean, std))`` in (0, 1), float32.

    SD3's training density: it concentrates samples at mid noise where the flow
    target is hardest, and never returns exactly 0 or 1.  Draws the same random
    numbers as diffusers' ``compute_density_for_timestep_sampling("logit_normal")``.
    """
    u = torch.normal(mean=mean, std=std, size=(n,), generator=generator, device=device)
    return torch.sigmoid(u)


def sample_uniform_index(
    n: int,
    low: int,
    high: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``n`` integers drawn uniformly from ``[low, high]`` (both inclusive), int64.

    Inclusive bounds because callers think in table indices ("from 20 to 999"),
    unlike :func:`torch.randint` whose upper bound is exclusive.
    """
    if high < low:
        raise ValueError(f"need low <= high, got low={low}, high={high}")
    return torch.randint(low, high + 1, (n,), generator=generator, device=device)


# --------------------------------------------------------------------------- anchors


@dataclass(frozen=True)
class Anchors:
    """The K noise levels a few-step student starts each of its steps from.

    Attributes:
        kind: ``"flow"`` (σ is the flow noise level) or ``"ddpm"`` (σ is √(1 - ᾱ_t)).
        timesteps: what the network is fed at each anchor, in step order.
        sigmas: the matching noise std, strictly decreasing; comparable across kinds.
    """

    kind: Literal["flow", "ddpm"]
    timesteps: tuple[float, ...]
    sigmas: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.timesteps) != len(self.sigmas):
            raise ValueError(f"{len(self.timesteps)} timesteps but {len(self.sigmas)} sigmas")
        _check_decreasing("sigmas", self.sigmas)

    def __len__(self) -> int:
        return len(self.sigmas)

    def timesteps_tensor(self, device: torch.device | str | None = None) -> Tensor:
        """Timesteps as a tensor: int64 for DDPM (UNet embeds integer t), float32 for flow."""
        dtype = torch.long if self.kind == "ddpm" else torch.float32
        return torch.tensor(self.timesteps, dtype=dtype, device=device)

    def sigmas_tensor(self, device: torch.device | str | None = None) -> Tensor:
        """Noise levels as a float32 tensor."""
        return torch.tensor(self.sigmas, dtype=torch.float32, device=device)


def _check_decreasing(name: str, values: Sequence[float]) -> None:
    if len(values) == 0:
        raise ValueError(f"{name} must not be empty")
    for i in range(len(values) - 1):
        if not values[i] > values[i + 1]:
            raise ValueError(f"{name} must be strictly decreasing, got {list(values)} (position {i + 1})")


def _check_range(name: str, values: Sequence[float], low: float, high: float, low_open: bool) -> None:
    for v in values:
        if not ((low < v) if low_open else (low <= v)) or not v <= high:
            bracket = "(" if low_open else "["
            raise ValueError(f"{name} must lie in {bracket}{low}, {high}], got {v} in {list(values)}")


def _check_ints(name: str, values: Sequence[int] | Tensor) -> list[int]:
    if isinstance(values, Tensor):
        if values.is_floating_point():
            raise ValueError(f"{name} must be integers, got a {values.dtype} tensor")
        values = values.tolist()
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"{name} must be integers, got {v!r} in {list(values)}")
    return [int(v) for v in values]


def _flow_anchors(sigmas: Tensor, schedule: FlowSchedule) -> Anchors:
    sig = sigmas.to(torch.float32)
    return Anchors(
        kind="flow",
        timesteps=tuple(schedule.model_timestep(sig).tolist()),
        sigmas=tuple(sig.tolist()),
    )


def flow_anchors_from_t(t_grid: Sequence[float], schedule: FlowSchedule) -> Anchors:
    """Anchors from unshifted times, e.g. ``(1, .75, .5, .25)``, passed through the schedule's shift.

    SD3.5 (shift 3) gives σ = (1, .9, .75, .5); FLUX at μ = 1.15 gives (1, .9045, .7595, .5128).
    """
    t_grid = [float(t) for t in t_grid]
    _check_decreasing("t_grid", t_grid)
    _check_range("t_grid", t_grid, 0.0, 1.0, low_open=True)
    return _flow_anchors(schedule.shift_sigma(torch.tensor(t_grid, dtype=torch.float64)), schedule)


def flow_anchors_from_indices(indices: Sequence[int] | Tensor, schedule: FlowSchedule) -> Anchors:
    """Anchors from indices into the *increasing*-σ training table (index T-1 is σ = 1).

    The official SD3.5 distillation code indexes ``sigma_table().flip(0)``, so
    index ``i`` here is ``sigma_table()[T - 1 - i]``; e.g. 999 → 1.0, 749 → shift(0.75).
    """
    idx = _check_ints("indices", indices)
    T = schedule.num_train_timesteps
    _check_decreasing("indices", idx)
    _check_range("indices", idx, 0, T - 1, low_open=False)
    table = schedule.sigma_table().flip(0)
    return _flow_anchors(table[torch.tensor(idx)], schedule)


def flow_anchors_from_sigmas(sigmas: Sequence[float], schedule: FlowSchedule | None = None) -> Anchors:
    """Anchors from literal noise levels, e.g. FLUX's hard-coded ``(1.0, 0.904, 0.759, 0.512)``.

    ``schedule`` only supplies ``timestep_scale`` for the model timesteps; pass the
    teacher's schedule (``timestep_scale=1`` for FLUX).  Without it the SD3
    convention ``σ·1000`` (a default :class:`FlowSchedule`) is used.
    """
    values = [float(s) for s in sigmas]
    _check_decreasing("sigmas", values)
    _check_range("sigmas", values, 0.0, 1.0, low_open=True)
    return _flow_anchors(torch.tensor(values, dtype=torch.float64), schedule or FlowSchedule())


def ddpm_anchors(ts: Sequence[int] | Tensor, schedule: DDPMSchedule) -> Anchors:
    """Anchors at integer DDPM timesteps, e.g. SDXL's ``(999, 749, 499, 249)``.

    σ is the effective noise std √(1 - ᾱ_t) ≈ (0.998, 0.971, 0.850, 0.570) for SDXL.
    """
    steps = _check_ints("ts", ts)
    T = schedule.num_train_timesteps
    _check_decreasing("ts", steps)
    _check_range("ts", steps, 0, T - 1, low_open=False)
    sig = schedule.effective_sigma(torch.tensor(steps))
    return Anchors(kind="ddpm", timesteps=tuple(float(s) for s in steps), sigmas=tuple(sig.tolist()))
