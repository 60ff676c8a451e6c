"""Rectified-flow noise schedule used by SD3.5, FLUX and the toy teacher.

Convention (identical to diffusers' ``FlowMatchEulerDiscreteScheduler``)::

    x_σ = (1 - σ) · x0 + σ · ε,      σ ∈ [0, 1],  σ = 1 is pure noise
    v   = dx_σ/dσ = ε - x0           (what the network predicts)

Everything here is plain torch so the distillation losses can call it inside
``torch.compile``-d or autocast regions without pulling in diffusers.  The
conversions are schedule independent (they only need σ); the schedule object
only decides *which* σ values are used (the shift) and how σ is presented to
the network (``timestep_scale``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "FlowSchedule",
    "add_noise",
    "eps_from_velocity",
    "euler_step",
    "expand_like",
    "exponential_time_shift",
    "flux_mu",
    "static_shift",
    "velocity_from",
    "x0_from_velocity",
]

SigmaLike = Tensor | float


def expand_like(sigma: SigmaLike, x: Tensor) -> Tensor:
    """Return ``sigma`` on ``x``'s device/dtype, broadcastable against ``x``.

    A per-sample noise level has shape ``[B]`` while latents are ``[B, C, H, W]``
    (or ``[B, N, D]`` for token models); trailing singleton dims are appended so
    that the same call works for any data rank.  Python floats and 0-d tensors
    broadcast as they are.
    """
    s = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    if s.ndim == 0:
        return s
    if s.ndim != 1 or s.shape[0] != x.shape[0]:
        raise ValueError(f"sigma must be a scalar or have shape [{x.shape[0]}], got {tuple(s.shape)}")
    return s.reshape(-1, *([1] * (x.ndim - 1)))


# --------------------------------------------------------------------------- conversions


def add_noise(x0: Tensor, eps: Tensor, sigma: SigmaLike) -> Tensor:
    """Point on the straight path from data to noise: ``(1 - σ)·x0 + σ·ε``."""
    s = expand_like(sigma, x0)
    return (1.0 - s) * x0 + s * eps


def velocity_from(x0: Tensor, eps: Tensor) -> Tensor:
    """Training target of a flow model: the constant path velocity ``ε - x0``."""
    return eps - x0


def x0_from_velocity(x_t: Tensor, v: Tensor, sigma: SigmaLike) -> Tensor:
    """Clean-data estimate: walk the straight line from ``x_t`` back to σ = 0 (``x_t - σ·v``)."""
    return x_t - expand_like(sigma, x_t) * v


def eps_from_velocity(x_t: Tensor, v: Tensor, sigma: SigmaLike) -> Tensor:
    """Noise estimate: walk the straight line from ``x_t`` forward to σ = 1 (``x_t + (1 - σ)·v``)."""
    return x_t + (1.0 - expand_like(sigma, x_t)) * v


def euler_step(x: Tensor, v: Tensor, sigma: SigmaLike, sigma_next: SigmaLike) -> Tensor:
    """One Euler step of the probability-flow ODE: ``x + (σ_next - σ)·v``.

    Along an exactly straight path (v constant) this is exact for any step size,
    which is why few-step flow students can be trained to hit the teacher's ODE.
    """
    return x + (expand_like(sigma_next, x) - expand_like(sigma, x)) * v


# --------------------------------------------------------------------------- shifts


def static_shift(sigma: Tensor, shift: float) -> Tensor:
    """SD3 shift ``s·σ / (1 + (s - 1)·σ)``: spends more steps at high noise for large images.

    It keeps 0 and 1 fixed and is the same as scaling the signal-to-noise ratio by ``1/s²``.
    """
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def exponential_time_shift(sigma: Tensor, mu: float) -> Tensor:
    """FLUX resolution-dependent shift ``e^μ / (e^μ + 1/σ - 1)``.

    Equal to :func:`static_shift` with ``shift = e^μ``, written in the form used by
    the FLUX reference code (diffusers ``time_shift`` with exponent 1).
    """
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigma - 1.0))


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """μ for :func:`exponential_time_shift`, linear in the number of latent tokens.

    More tokens carry more redundant signal, so the same σ destroys less
    information; FLUX compensates by shifting harder (μ = 1.15 at 4096 tokens,
    i.e. 1024² images).  Values outside ``[base_seq_len, max_seq_len]`` extrapolate.
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


# --------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class FlowSchedule:
    """Which noise levels a flow teacher uses and how it wants to be told about them.

    Args:
        num_train_timesteps: size of the discrete training table (1000 for every teacher we use).
        shift: static SD3 shift (3.0 for SD3.5 at 1024², 1.0 = no shift).
        mu: if set, use the FLUX exponential shift with this μ instead of ``shift``
            (see :func:`flux_mu`); the two are mutually exclusive.
        timestep_scale: the network is fed ``σ · timestep_scale``; 1000 for SD3
            (diffusers' ``scheduler.timesteps``), 1 for FLUX (its pipeline divides by 1000).
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    mu: float | None = None
    timestep_scale: float = 1000.0

    def __post_init__(self) -> None:
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")
        if self.mu is not None and self.shift != 1.0:
            raise ValueError(f"give either shift ({self.shift}) or mu ({self.mu}), not both")
        if self.timestep_scale <= 0:
            raise ValueError(f"timestep_scale must be positive, got {self.timestep_scale}")

    def shift_sigma(self, t: Tensor) -> Tensor:
        """Map an unshifted time ``t ∈ (0, 1]`` to the teacher's noise level σ."""
        if self.mu is not None:
            return exponential_time_shift(t, self.mu)
        return static_shift(t, self.shift)

    def model_timestep(self, sigma: SigmaLike) -> Tensor:
        """The timestep value the teacher network expects for noise level σ."""
        return torch.as_tensor(sigma) * self.timestep_scale

    def sigma_table(self) -> Tensor:
        """The ``num_train_timesteps`` training σ values in *decreasing* order (float32).

        Bit-identical to ``FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift).sigmas``
        right after construction: ``t = (T, T-1, ..., 1) / T`` then shifted, so index 0 is
        σ = 1 and the last entry is ``shift(1/T)``, never 0.  With ``mu`` set the table is
        shifted with the exponential shift (diffusers leaves it unshifted in that mode).
        """
        T = self.num_train_timesteps
        # linspace in float64 then cast, exactly as numpy's float32 linspace does.
        t = torch.linspace(1, T, T, dtype=torch.float64).to(torch.float32).flip(0) / T
        return self.shift_sigma(t)

    def sigma_at_index(self, idx: int | Tensor) -> Tensor:
        """``sigma_table()[idx]`` (decreasing-σ indexing, as in diffusers)."""
        return self.sigma_table()[torch.as_tensor(idx, dtype=torch.long)]

    def inference_sigmas(self, num_steps: int, t_values: Sequence[float] | Tensor | None = None) -> Tensor:
        """``num_steps + 1`` decreasing σ values (terminal 0 appended) for Euler sampling.

        With ``t_values=None`` this reproduces ``FlowMatchEulerDiscreteScheduler.set_timesteps(n)``
        (``mu=`` passed when ``self.mu`` is set): ``t`` is spaced linearly between the
        end points of diffusers' construction-time table (unshifted when ``mu`` is set, as in
        diffusers' dynamic mode) and then shifted.  Note that for the
        static shift that table is already shifted, so its low end ``shift(1/T)`` is shifted a
        second time; we keep that quirk so teacher samples match the diffusers pipelines.

        The FLUX pipeline instead passes ``t_values = linspace(1, 1/n, n)``; any such
        unshifted, decreasing ``t_values`` are shifted and closed with σ = 0.
        """
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if t_values is None:
            T = self.num_train_timesteps
            ends = torch.tensor([1.0, 1.0 / T], dtype=torch.float32)  # ends of the unshifted table
            if self.mu is None:
                ends = static_shift(ends, self.shift)
            t_max, t_min = ends.tolist()
            t = torch.linspace(t_max * T, t_min * T, num_steps, dtype=torch.float64) / T
        else:
            t = torch.as_tensor(t_values, dtype=torch.float64)
            if t.shape != (num_steps,):
                raise ValueError(f"t_values must have shape ({num_steps},), got {tuple(t.shape)}")
        sigmas = self.shift_sigma(t).to(torch.float32)
        return torch.cat([sigmas, sigmas.new_zeros(1)])
