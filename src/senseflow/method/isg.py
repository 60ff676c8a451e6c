"""Intra-Segment Guidance (spec §6): teach G's one-jump segment a_j → a_{j+1} the teacher's curvature.

The teacher takes one step from a_j to a random t_mid inside the segment and G (no grad) finishes it;
G's direct jump is regressed onto that target. Networks enter as ``fn(x, level) -> raw output`` (the
callable applies ``param.model_timestep``, conditioning and guidance itself); the family's step rule
comes from :meth:`Parameterisation.step_to`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from senseflow.core.flow import expand_like
from senseflow.core.parameterisation import Parameterisation

__all__ = ["ISGTargets", "OutputFn", "isg_loss", "isg_targets", "isg_x0_targets", "sample_t_mid"]

OutputFn = Callable[[Tensor, Tensor], Tensor]
"""A network as ``fn(x_t, level) -> raw output`` (v for flow, ε or v for DDPM)."""


class ISGTargets(NamedTuple):
    """``x_target`` (no grad), ``x_direct`` (carries G's grad) and the teacher's ``x_mid`` (if any)."""

    x_target: Tensor
    x_direct: Tensor
    x_mid: Tensor | None


def segment_ends(
    anchor_levels: Tensor, param: Parameterisation, last_end: Literal["zero", "table_index_0"] = "zero"
) -> Tensor:
    """Levels a_0 .. a_{K-1} and the end of the last segment, [K + 1].

    ``zero``: the clean level (σ = 0, t = 0); ``table_index_0``: the first entry of the training grid
    (σ = 1/1000 for an unshifted flow table, ᾱ_0 for DDPM), where some code ends the last segment.
    """
    if last_end == "zero":
        end = param.clean_level(1, anchor_levels.device)
    elif last_end == "table_index_0":
        end = param.level_from_grid(torch.zeros(1, dtype=torch.long, device=anchor_levels.device))
    else:
        raise ValueError(f"method.isg.last_segment_end: expected 'zero' or 'table_index_0', got {last_end!r}")
    return torch.cat([anchor_levels, end.to(anchor_levels)])


def sample_t_mid(
    level_start: Tensor,
    level_end: Tensor,
    margin: int,
    param: Parameterisation,
    generator: torch.Generator | None = None,
    shared: bool = False,
) -> Tensor:
    """Integer grid position t_mid ~ U[g(a_{j+1}) + m, g(a_j) − m] (both inclusive), long ``[B]``.

    g is ``param.grid_from_level``: FLUX σ·1000, SD3.5 index into the flipped table, DDPM steps.
    The clean level maps to 0, giving the lower end 0 for the last segment. Convert with
    ``param.level_from_grid``. ``shared=True`` uses one uniform draw for the whole batch (the code's
    one t_mid per rank, §12.15).
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    hi = param.grid_from_level(level_start) - margin
    lo = param.grid_from_level(level_end).to(hi.device) + margin
    if bool((lo > hi).any()):
        raise ValueError(
            f"ISG margin {margin} leaves no room for t_mid between grid positions "
            f"{(lo - margin).tolist()} and {(hi + margin).tolist()}"
        )
    u = torch.rand(1 if shared else hi.numel(), generator=generator, device=hi.device, dtype=torch.float64)
    offset = torch.minimum((u * (hi - lo + 1)).floor().long(), hi - lo)
    return lo + offset


def isg_loss(
    x_direct: Tensor, x_target: Tensor, kind: Literal["charbonnier", "l2"], eps: float | None
) -> Tensor:
    """ρ(x_direct − sg(x_target)), mean over all elements, float32.

    ``charbonnier``: mean(√(d² + eps²) − eps) (code). ``l2``: mean(d²) (paper's squared L2; its
    reduction is unknown, §12.6, we take the mean so w_isg keeps the code's scale); ``eps`` unused.
    """
    d = x_direct.float() - x_target.detach().float()
    if kind == "charbonnier":
        if eps is None or eps <= 0:
            raise ValueError(f"charbonnier needs eps > 0, got {eps}")
        return (torch.sqrt(d * d + eps * eps) - eps).mean()
    if kind == "l2":
        return (d * d).mean()
    raise ValueError(f"ISG loss kind must be 'charbonnier' or 'l2', got {kind!r}")


def isg_targets(
    x_in: Tensor,
    level_j: Tensor,
    level_next: Tensor,
    level_mid: Tensor,
    teacher_output_fn: OutputFn,
    student_output_fn: OutputFn,
    student_output_at_in: Tensor,
    param: Parameterisation,
) -> ISGTargets:
    """Segment targets of §6 (flow families; also SDXL ``sdxl_mode=ddim`` through DDIM steps).

    x_mid = step(x_in, T(x_in, a_j), a_j → t_mid) and x_tar = step(x_mid, G(x_mid, t_mid), t_mid →
    a_{j+1}), both without grad; x_dir = step(x_in, G(x_in, a_j), a_j → a_{j+1}) reuses the DMD
    forward output and carries its gradient.
    """
    with torch.no_grad():
        x_mid = param.step_to(x_in, teacher_output_fn(x_in, level_j), level_j, level_mid)
        x_target = param.step_to(x_mid, student_output_fn(x_mid, level_mid), level_mid, level_next)
    x_direct = param.step_to(x_in, student_output_at_in, level_j, level_next)
    return ISGTargets(x_target=x_target, x_direct=x_direct, x_mid=x_mid)


def isg_x0_targets(
    x_in: Tensor,
    level_j: Tensor,
    level_next: Tensor,
    teacher_output_fn: OutputFn,
    student_output_at_in: Tensor,
    param: Parameterisation,
) -> ISGTargets:
    """The official SDXL variant (``sdxl_mode=official``), reduced to what survives of it.

    As coded, target and direct path re-noise the teacher's resp. G's x̂0 at a_j to a_{j+1} with the
    same noise, which cancels in the difference: x_tar = α(a_{j+1})·x̂0_T(x_in), x_dir =
    α(a_{j+1})·x̂0_G(x_in). t_mid and the extra G forward at x_mid play no role, so they are skipped.
    """
    scale = param.alpha(level_next)
    with torch.no_grad():
        x0_teacher = param.x0_from_output(x_in, teacher_output_fn(x_in, level_j), level_j)
        x_target = expand_like(scale, x0_teacher) * x0_teacher
    x0_student = param.x0_from_output(x_in, student_output_at_in, level_j)
    x_direct = expand_like(scale, x0_student) * x0_student
    return ISGTargets(x_target=x_target, x_direct=x_direct, x_mid=None)
