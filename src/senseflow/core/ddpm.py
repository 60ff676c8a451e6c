"""Discrete variance-preserving (DDPM) schedule used by SDXL.

Convention (identical to diffusers' ``DDPMScheduler`` / ``DDIMScheduler``)::

    x_t = √ᾱ_t · x0 + √(1 - ᾱ_t) · ε,        t ∈ {0, ..., T-1},  ᾱ decreasing in t
    v_t = √ᾱ_t · ε  - √(1 - ᾱ_t) · x0        (the "v_prediction" target)

Timestep ``t = -1`` is accepted everywhere and means clean data (ᾱ = 1).  That is
what DDIM's ``set_alpha_to_one=True`` does for the last step and lets a sampler
write ``ddim_step(..., t_prev=-1)`` to land exactly on the x0 estimate.

The ᾱ table is built in float32 with the same operations as diffusers so that
a student trained here sees bit-identical noise levels to the SDXL pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from senseflow.core.flow import expand_like

__all__ = ["BetaSchedule", "DDPMSchedule", "PredictionType"]

BetaSchedule = Literal["scaled_linear", "linear"]
PredictionType = Literal["epsilon", "v_prediction"]
TimestepLike = int | Tensor


@dataclass(frozen=True)
class DDPMSchedule:
    """ᾱ table plus the conversions between x0, ε, v and the network output.

    Args:
        num_train_timesteps: T, length of the table.
        beta_start, beta_end: first and last β.
        beta_schedule: ``"scaled_linear"`` (β = linspace(√β₀, √β₁, T)², SD/SDXL) or ``"linear"``.
        prediction_type: what the network outputs, ``"epsilon"`` (SDXL base) or ``"v_prediction"``.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: BetaSchedule = "scaled_linear"
    prediction_type: PredictionType = "epsilon"
    alphas_cumprod: Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        T = self.num_train_timesteps
        if T < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {T}")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=torch.float32) ** 2
        elif self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float32)
        else:
            raise ValueError(f"beta_schedule must be 'scaled_linear' or 'linear', got {self.beta_schedule!r}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type must be 'epsilon' or 'v_prediction', got {self.prediction_type!r}"
            )
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - betas, dim=0))

    # ----------------------------------------------------------------------- noise levels

    def alpha_bar(self, t: TimestepLike) -> Tensor:
        """ᾱ_t for integer timestep(s) ``t`` (scalar or ``[B]``); ``t = -1`` gives 1."""
        t = torch.as_tensor(t)
        if t.is_floating_point():
            raise TypeError(f"DDPM timesteps must be integers, got dtype {t.dtype}")
        T = self.num_train_timesteps
        if bool(((t < -1) | (t >= T)).any()):
            raise ValueError(f"timesteps must lie in [-1, {T - 1}], got {t.tolist()}")
        table = self.alphas_cumprod.to(t.device)
        return torch.where(t < 0, torch.ones_like(table[0]), table[t.clamp(min=0)])

    def effective_sigma(self, t: TimestepLike) -> Tensor:
        """√(1 - ᾱ_t): the noise std in x_t, comparable to the flow σ when choosing anchors."""
        return (1.0 - self.alpha_bar(t)).sqrt()

    def ve_sigma(self, t: TimestepLike) -> Tensor:
        """Noise-to-signal ratio √((1 - ᾱ_t) / ᾱ_t), the σ of Karras/Euler samplers (x_t/√ᾱ = x0 + σ·ε)."""
        a = self.alpha_bar(t)
        return ((1.0 - a) / a).sqrt()

    def _coeffs(self, t: TimestepLike, like: Tensor) -> tuple[Tensor, Tensor]:
        a = self.alpha_bar(t)
        return expand_like(a.sqrt(), like), expand_like((1.0 - a).sqrt(), like)

    # ----------------------------------------------------------------------- forward process

    def add_noise(self, x0: Tensor, eps: Tensor, t: TimestepLike) -> Tensor:
        """Sample of q(x_t | x0) for the given noise: ``√ᾱ·x0 + √(1-ᾱ)·ε``."""
        sa, so = self._coeffs(t, x0)
        return sa * x0 + so * eps

    def velocity(self, x0: Tensor, eps: Tensor, t: TimestepLike) -> Tensor:
        """The v-prediction target ``√ᾱ·ε - √(1-ᾱ)·x0``."""
        sa, so = self._coeffs(t, x0)
        return sa * eps - so * x0

    def target(self, x0: Tensor, eps: Tensor, t: TimestepLike) -> Tensor:
        """What the network should output at (x0, ε, t) given ``prediction_type``."""
        return eps if self.prediction_type == "epsilon" else self.velocity(x0, eps, t)

    # ----------------------------------------------------------------------- model output

    def x0_eps_from_output(self, x_t: Tensor, model_output: Tensor, t: TimestepLike) -> tuple[Tensor, Tensor]:
        """Decode the network output into ``(x0_hat, eps_hat)``.

        Both are returned together because the DMD score difference needs ε or x0
        depending on the loss, and DDIM needs both; decoding once keeps them consistent.
        """
        sa, so = self._coeffs(t, x_t)
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (x_t - so * eps) / sa
        else:  # v_prediction: rotate (x_t, v) back into (x0, ε); no division, exact at any t.
            x0 = sa * x_t - so * model_output
            eps = sa * model_output + so * x_t
        return x0, eps

    def x0_from_output(self, x_t: Tensor, model_output: Tensor, t: TimestepLike) -> Tensor:
        """Clean-data estimate from the network output (see :meth:`x0_eps_from_output`)."""
        return self.x0_eps_from_output(x_t, model_output, t)[0]

    def eps_from_output(self, x_t: Tensor, model_output: Tensor, t: TimestepLike) -> Tensor:
        """Noise estimate from the network output (see :meth:`x0_eps_from_output`)."""
        return self.x0_eps_from_output(x_t, model_output, t)[1]

    # ----------------------------------------------------------------------- sampling

    def ddim_step(
        self, x_t: Tensor, x0_hat: Tensor, eps_hat: Tensor, t: TimestepLike, t_prev: TimestepLike
    ) -> Tensor:
        """Deterministic (η = 0) DDIM update from ``t`` to ``t_prev <= t``.

        ``x_{t_prev} = √ᾱ_prev · x0_hat + √(1 - ᾱ_prev) · eps_hat``: re-noise the current
        estimates to the lower level.  With η = 0 the result does not depend on ``x_t``
        itself; it is taken (with ``t``) so the call reads like any sampler step and so
        that a step in the wrong direction is caught.  ``t_prev = -1`` returns ``x0_hat``;
        ``t_prev = t`` re-projects onto the same level (DDIM's last step without
        ``set_alpha_to_one``).
        """
        if bool((torch.as_tensor(t_prev) > torch.as_tensor(t)).any()):
            raise ValueError(f"ddim_step needs t_prev <= t, got t={t}, t_prev={t_prev}")
        sa, so = self._coeffs(t_prev, x_t)
        return sa * x0_hat + so * eps_hat
