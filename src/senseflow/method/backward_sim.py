"""Backward simulation and the few-step student samplers (spec §7).

Training inputs at anchor a_j come from G's own chain (DMD2-style), so the student learns on the
distribution it will see at inference. Networks enter as callables ``fn(x, level)``; anchors are a
``[K]`` level tensor (``param.anchor_levels``), a_0 being pure noise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from senseflow.core.parameterisation import Parameterisation

__all__ = ["NoiseSource", "X0Fn", "as_x0_fn", "backward_simulate", "student_sample"]

X0Fn = Callable[[Tensor, Tensor], Tensor]
"""``fn(x_t, level) -> x̂0``."""


def as_x0_fn(output_fn: Callable[[Tensor, Tensor], Tensor], param: Parameterisation) -> X0Fn:
    """Wrap a raw-output network ``fn(x_t, level)`` into an x̂0 predictor."""

    def x0_fn(x_t: Tensor, level: Tensor) -> Tensor:
        return param.x0_from_output(x_t, output_fn(x_t, level), level)

    return x0_fn


NoiseSource = torch.Generator | Callable[[Tensor], Tensor] | None
"""Where fresh noise comes from: a torch generator, or a function returning noise shaped like its
argument (the trainer pre-draws noise for the global batch so results do not depend on world size)."""


def _randn_like(x: Tensor, generator: NoiseSource) -> Tensor:
    if callable(generator) and not isinstance(generator, torch.Generator):
        return generator(x)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _level(anchor_levels: Tensor, i: int, n: int, device: torch.device) -> Tensor:
    return anchor_levels[i].to(device).expand(n)


@torch.no_grad()
def backward_simulate(
    student_x0_fn: X0Fn,
    noise: Tensor,
    anchor_levels: Tensor,
    j: int | Tensor,
    param: Parameterisation,
    generator: NoiseSource = None,
    steps: int | None = None,
) -> Tensor:
    """G's own sample at anchor a_j: from ``noise`` at a_0, predict x̂0 and re-noise with fresh ε.

    For l = 0..j−1: x̂0 = G(x, a_l); x ← add_noise(x̂0, ε', a_{l+1}). ``j`` is an int (one anchor per
    rank, as the code) or a long ``[B]`` tensor (per sample; finished samples are held fixed while
    others continue, and fresh noise is still drawn for the whole batch at every step). j = 0 returns
    ``noise``. ``steps`` (>= max j) runs that many generator calls instead of max j, so that ranks
    whose batches need fewer still join every sharded forward; the result does not change. Runs
    without grad.
    """
    B = noise.shape[0]
    K = anchor_levels.shape[0]
    j_t = torch.as_tensor(j, device=noise.device).long().expand(B)
    if bool(((j_t < 0) | (j_t >= K)).any()):
        raise ValueError(f"j must lie in [0, {K - 1}], got {j_t.tolist()}")
    needed = int(j_t.max())
    if steps is None:
        steps = needed
    if not needed <= steps <= K - 1:
        raise ValueError(f"steps must lie in [{needed}, {K - 1}] (max j to K - 1), got {steps}")
    x = noise
    for step in range(steps):
        x0 = student_x0_fn(x, _level(anchor_levels, step, B, noise.device))
        x_next = param.add_noise(x0, _randn_like(x, generator), _level(anchor_levels, step + 1, B, x.device))
        active = (j_t > step).reshape(-1, *([1] * (x.ndim - 1)))
        x = torch.where(active, x_next, x)
    return x


@torch.no_grad()
def student_sample(
    student_output_fn: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor,
    anchor_levels: Tensor,
    param: Parameterisation,
    mode: Literal["renoise", "euler"],
    generator: NoiseSource = None,
) -> Tensor:
    """K-step sample (1 NFE per anchor, CFG-free) starting from ``noise`` at a_0; returns x̂0.

    ``renoise`` ("Ours" rows): x̂0 at each anchor, re-noised with fresh ε to the next anchor; output
    the last x̂0 (the training chain). ``euler`` ("(Euler)" rows): ``param.step_to`` from a_j to
    a_{j+1} with a_K the clean level, so the last step lands on x̂0 (flow Euler / DDIM).
    """
    B = noise.shape[0]
    K = anchor_levels.shape[0]
    if mode not in ("renoise", "euler"):
        raise ValueError(f"mode must be 'renoise' or 'euler', got {mode!r}")
    x = noise
    x0 = noise
    for step in range(K):
        level = _level(anchor_levels, step, B, noise.device)
        out = student_output_fn(x, level)
        last = step == K - 1
        nxt = param.clean_level(B, noise.device) if last else _level(anchor_levels, step + 1, B, x.device)
        if mode == "euler":
            x = param.step_to(x, out, level, nxt)
            x0 = x
        else:
            x0 = param.x0_from_output(x, out, level)
            if not last:
                x = param.add_noise(x0, _randn_like(x, generator), nxt)
    return x0
