"""One interface over the two noise families, so the SenseFlow method never branches on the family.

A *level* is a noise level in the family's own units: the flow σ (float tensor ``[B]``) or the DDPM
timestep ``t`` (long tensor ``[B]``, ``-1`` = clean data). The losses in :mod:`senseflow.method` take
levels plus a :class:`Parameterisation`; what the network predicts, how it is told the time and how
a deterministic step is taken are decided here and nowhere else.

The *grid* is the integer 1000-step scale on which the official code writes DMD index ranges, ISG
margins and anchor indices (spec §3, §6, §7): the DDPM step for SDXL; for flow teachers either an
index into the flipped (increasing-σ) training table (``grid="table"``, SD3.5) or ``σ·T``
(``grid="sigma"``, FLUX, whose anchors are literal σ values).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from senseflow.core.ddpm import DDPMSchedule
from senseflow.core.flow import FlowSchedule, add_noise, eps_from_velocity, euler_step, x0_from_velocity
from senseflow.core.timesteps import Anchors

__all__ = ["DDPMParameterisation", "FlowGrid", "FlowParameterisation", "Parameterisation"]

FlowGrid = Literal["table", "sigma"]


class Parameterisation(ABC):
    """Family-independent noise math; ``level`` tensors are σ (flow) or integer t (DDPM)."""

    kind: ClassVar[Literal["flow", "ddpm"]]

    @abstractmethod
    def add_noise(self, x0: Tensor, eps: Tensor, level: Tensor) -> Tensor:
        """``alpha(level)·x0 + sigma(level)·eps``."""

    @abstractmethod
    def x0_from_output(self, x_t: Tensor, output: Tensor, level: Tensor) -> Tensor:
        """Clean-data estimate from the raw network output."""

    @abstractmethod
    def eps_from_output(self, x_t: Tensor, output: Tensor, level: Tensor) -> Tensor:
        """Noise estimate from the raw network output."""

    @abstractmethod
    def training_target(self, x0: Tensor, eps: Tensor, level: Tensor) -> Tensor:
        """What the network regresses at ``add_noise(x0, eps, level)`` (flow v = ε − x0; DDPM ε or v)."""

    def level_from_timestep(self, t: Tensor) -> Tensor:
        """A diffusers scheduler's timestep in this convention (σ = t / T for flows; t for DDPM)."""
        return torch.as_tensor(t)

    @abstractmethod
    def model_timestep(self, level: Tensor) -> Tensor:
        """The timestep value fed to the network."""

    @abstractmethod
    def sigma(self, level: Tensor) -> Tensor:
        """Effective noise std in x_t (flow σ, DDPM √(1−ᾱ)); 0 at the clean level."""

    @abstractmethod
    def alpha(self, level: Tensor) -> Tensor:
        """Signal coefficient of x0 in x_t (flow 1−σ, DDPM √ᾱ); 1 at the clean level."""

    @abstractmethod
    def _deterministic_step(self, x_t: Tensor, output: Tensor, level: Tensor, level_next: Tensor) -> Tensor:
        """The family's own ODE step (flow Euler, DDPM DDIM η = 0)."""

    def step_to(
        self, x_t: Tensor, output: Tensor, level: Tensor, level_next: Tensor, eps: Tensor | None = None
    ) -> Tensor:
        """Deterministic move from ``level`` to ``level_next`` using one network output.

        Without ``eps`` this is flow Euler / DDIM. With ``eps`` the x0 estimate is re-noised with the
        given noise instead of the network's ε̂ (the two coincide when ``eps`` is ε̂).
        """
        if eps is None:
            return self._deterministic_step(x_t, output, level, level_next)
        return self.add_noise(self.x0_from_output(x_t, output, level), eps, level_next)

    @abstractmethod
    def clean_level(self, n: int, device: torch.device | str | None = None) -> Tensor:
        """``n`` copies of the σ = 0 level (a_K, the end of the last segment)."""

    @abstractmethod
    def anchor_levels(self, anchors: Anchors, device: torch.device | str | None = None) -> Tensor:
        """The student's anchors as a ``[K]`` level tensor."""

    @property
    @abstractmethod
    def grid_max(self) -> int:
        """Largest grid value (the grid runs 0..grid_max, 0 = least noise)."""

    @abstractmethod
    def level_from_grid(self, index: Tensor) -> Tensor:
        """Level at integer grid position(s)."""

    @abstractmethod
    def grid_from_level(self, level: Tensor) -> Tensor:
        """Nearest integer grid position (long); the clean level maps to 0."""

    @abstractmethod
    def level_from_fraction(self, u: Tensor, shift: bool = False) -> Tensor:
        """Level for a noise fraction ``u ∈ [0, 1]`` (flow σ = u, optionally shifted; DDPM t = ⌊u·T⌋)."""

    def _check_grid(self, index: Tensor) -> Tensor:
        idx = torch.as_tensor(index)
        if idx.is_floating_point():
            raise TypeError(f"grid positions must be integers, got dtype {idx.dtype}")
        if bool(((idx < 0) | (idx > self.grid_max)).any()):
            raise ValueError(f"grid positions must lie in [0, {self.grid_max}], got {idx.tolist()}")
        return idx

    def mirror_level(self, level: Tensor) -> Tensor:
        """Level at the mirrored grid position ``grid_max − g``.

        With SD3.5's table grid, ``sigma(mirror_level(a))`` is the *unflipped* σ table read at the
        anchor's index, which the official SD3.5 code uses as GAN weight (spec §8.1).
        """
        return self.level_from_grid(self.grid_max - self.grid_from_level(level))


@dataclass(frozen=True)
class FlowParameterisation(Parameterisation):
    """Rectified flow (SD3.5, FLUX, toy): level = σ, the network predicts v = ε − x0."""

    schedule: FlowSchedule
    grid: FlowGrid = "table"
    _table_inc: Tensor = field(init=False, repr=False, compare=False)
    kind: ClassVar[Literal["flow", "ddpm"]] = "flow"

    def __post_init__(self) -> None:
        if self.grid not in ("table", "sigma"):
            raise ValueError(f"grid must be 'table' or 'sigma', got {self.grid!r}")
        object.__setattr__(self, "_table_inc", self.schedule.sigma_table().flip(0))

    def add_noise(self, x0: Tensor, eps: Tensor, level: Tensor) -> Tensor:
        return add_noise(x0, eps, level)

    def x0_from_output(self, x_t: Tensor, output: Tensor, level: Tensor) -> Tensor:
        return x0_from_velocity(x_t, output, level)

    def eps_from_output(self, x_t: Tensor, output: Tensor, level: Tensor) -> Tensor:
        return eps_from_velocity(x_t, output, level)

    def training_target(self, x0: Tensor, eps: Tensor, level: Tensor) -> Tensor:
        return eps - x0

    def model_timestep(self, level: Tensor) -> Tensor:
        return self.schedule.model_timestep(level)

    def level_from_timestep(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t) / self.schedule.num_train_timesteps

    def sigma(self, level: Tensor) -> Tensor:
        return torch.as_tensor(level)

    def alpha(self, level: Tensor) -> Tensor:
        return 1.0 - torch.as_tensor(level)

    def _deterministic_step(self, x_t: Tensor, output: Tensor, level: Tensor, level_next: Tensor) -> Tensor:
        return euler_step(x_t, output, level, level_next)

    def clean_level(self, n: int, device: torch.device | str | None = None) -> Tensor:
        return torch.zeros(n, dtype=torch.float32, device=device)

    def anchor_levels(self, anchors: Anchors, device: torch.device | str | None = None) -> Tensor:
        if anchors.kind != self.kind:
            raise ValueError(f"flow parameterisation needs flow anchors, got kind {anchors.kind!r}")
        return anchors.sigmas_tensor(device)

    @property
    def grid_max(self) -> int:
        T = self.schedule.num_train_timesteps
        return T if self.grid == "sigma" else T - 1

    def level_from_grid(self, index: Tensor) -> Tensor:
        idx = self._check_grid(index)
        if self.grid == "sigma":
            return idx.to(torch.float32) / self.schedule.num_train_timesteps
        return self._table_inc.to(idx.device)[idx]

    def grid_from_level(self, level: Tensor) -> Tensor:
        sig = torch.as_tensor(level, dtype=torch.float32)
        if self.grid == "sigma":
            return torch.round(sig * self.schedule.num_train_timesteps).long()
        table = self._table_inc.to(sig.device)
        return (table - sig.unsqueeze(-1)).abs().argmin(dim=-1)

    def level_from_fraction(self, u: Tensor, shift: bool = False) -> Tensor:
        u = torch.as_tensor(u, dtype=torch.float32)
        return self.schedule.shift_sigma(u).to(torch.float32) if shift else u


@dataclass(frozen=True)
class DDPMParameterisation(Parameterisation):
    """Variance-preserving DDPM (SDXL): level = integer t, output ε or v per the schedule."""

    schedule: DDPMSchedule
    kind: ClassVar[Literal["flow", "ddpm"]] = "ddpm"

    def add_noise(self, x0: Tensor, eps: Tensor, level: Tensor) -> Tensor:
        return self.schedule.add_noise(x0, eps, level)

    def x0_from_output(self, x_t: Tensor, output: Tensor, level: Tensor) -> Tensor:
        return self.schedule.x0_from_output(x_t, output, level)

    def eps_from_output(self, x_t: Tensor, output: Tensor, level: Tensor) -> Tensor:
        return self.schedule.eps_from_output(x_t, output, level)

    def training_target(self, x0: Tensor, eps: Tensor, level: Tensor) -> Tensor:
        return self.schedule.target(x0, eps, level)

    def model_timestep(self, level: Tensor) -> Tensor:
        return torch.as_tensor(level)

    def sigma(self, level: Tensor) -> Tensor:
        return self.schedule.effective_sigma(level)

    def alpha(self, level: Tensor) -> Tensor:
        return self.schedule.alpha_bar(level).sqrt()

    def _deterministic_step(self, x_t: Tensor, output: Tensor, level: Tensor, level_next: Tensor) -> Tensor:
        x0, eps = self.schedule.x0_eps_from_output(x_t, output, level)
        return self.schedule.ddim_step(x_t, x0, eps, level, level_next)

    def clean_level(self, n: int, device: torch.device | str | None = None) -> Tensor:
        return torch.full((n,), -1, dtype=torch.long, device=device)

    def anchor_levels(self, anchors: Anchors, device: torch.device | str | None = None) -> Tensor:
        if anchors.kind != self.kind:
            raise ValueError(f"DDPM parameterisation needs DDPM anchors, got kind {anchors.kind!r}")
        return anchors.timesteps_tensor(device)

    @property
    def grid_max(self) -> int:
        return self.schedule.num_train_timesteps - 1

    def level_from_grid(self, index: Tensor) -> Tensor:
        idx = self._check_grid(index)
        return idx.long()

    def grid_from_level(self, level: Tensor) -> Tensor:
        return torch.as_tensor(level).long().clamp(min=0)

    def level_from_fraction(self, u: Tensor, shift: bool = False) -> Tensor:
        if shift:
            raise ValueError("DDPM schedules have no timestep shift; use apply_shift=false")
        T = self.schedule.num_train_timesteps
        return (torch.as_tensor(u, dtype=torch.float64) * T).floor().long().clamp(0, T - 1)
