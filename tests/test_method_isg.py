"""senseflow.method.isg: segment targets with oracle flows, losses, t_mid bounds, gradient paths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from senseflow.core import (
    DDPMParameterisation,
    DDPMSchedule,
    FlowParameterisation,
    FlowSchedule,
    Parameterisation,
    flow_anchors_from_indices,
    flow_anchors_from_sigmas,
)
from senseflow.method import isg_loss, isg_targets, isg_x0_targets, sample_t_mid

B = 2


def _levels(*values: float) -> list[torch.Tensor]:
    return [torch.full((B,), v) for v in values]


def test_constant_velocity_target_equals_direct_exactly() -> None:
    p = FlowParameterisation(FlowSchedule())
    x_in = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    v = torch.tensor([[0.25, 1.0], [-2.0, 0.5]])

    def field(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        return v.expand_as(x)

    s_j, s_next, s_mid = _levels(0.75, 0.5, 0.625)  # dyadic: every product is exact
    out = isg_targets(x_in, s_j, s_next, s_mid, field, field, field(x_in, s_j), p)
    assert torch.equal(out.x_target, out.x_direct)
    assert torch.equal(out.x_mid, x_in - 0.125 * v)
    assert torch.equal(isg_loss(out.x_direct, out.x_target, "charbonnier", 1e-3), torch.tensor(0.0))


def _point_mass_oracle(param: Parameterisation, x0: torch.Tensor):
    """Exact network output for a data distribution concentrated at x0 (straight flow / exact ε)."""

    def fn(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        a = param.alpha(level).reshape(-1, *([1] * (x.ndim - 1)))
        s = param.sigma(level).reshape(-1, *([1] * (x.ndim - 1)))
        eps = (x - a * x0) / s
        return param.training_target(x0.expand_as(x), eps, level)

    return fn


@pytest.mark.parametrize(
    ("param", "levels"),
    [
        (
            FlowParameterisation(FlowSchedule(shift=3.0)),
            (torch.tensor([0.9, 0.9]), torch.tensor([0.75, 0.75])),
        ),
        (DDPMParameterisation(DDPMSchedule()), (torch.tensor([749, 749]), torch.tensor([499, 499]))),
    ],
)
def test_exact_oracle_gives_zero_isg_loss(param: Parameterisation, levels: tuple[torch.Tensor, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, 3, 4, 4, generator=g, dtype=torch.float64)
    x_in = param.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), levels[0])
    fn = _point_mass_oracle(param, x0)
    level_mid = param.level_from_grid(sample_t_mid(levels[0], levels[1], 20, param, generator=g))
    out = isg_targets(x_in, levels[0], levels[1], level_mid, fn, fn, fn(x_in, levels[0]), param)
    torch.testing.assert_close(out.x_target, out.x_direct)
    assert isg_loss(out.x_direct, out.x_target, "l2", None) < 1e-20


def test_losses_against_hand_values() -> None:
    x = torch.tensor([[4.0, 0.0], [-4.0, 1.0]])
    target = torch.zeros(2, 2)
    # charbonnier with eps 3: sqrt(16 + 9) - 3 = 2; sqrt(0 + 9) - 3 = 0; sqrt(1 + 9) - 3.
    expect = (2 + 0 + 2 + (10**0.5 - 3)) / 4
    torch.testing.assert_close(isg_loss(x, target, "charbonnier", 3.0), torch.tensor(expect))
    torch.testing.assert_close(isg_loss(x, target, "l2", None), torch.tensor((16 + 0 + 16 + 1) / 4))
    small = torch.tensor([[1e-2]])
    c = isg_loss(small, torch.zeros(1, 1), "charbonnier", 1e-3)
    torch.testing.assert_close(c, torch.tensor((1e-4 + 1e-6) ** 0.5 - 1e-3))
    with pytest.raises(ValueError, match="eps > 0"):
        isg_loss(x, target, "charbonnier", None)
    with pytest.raises(ValueError, match="loss kind"):
        isg_loss(x, target, "l1", 1.0)  # type: ignore[arg-type]


def _check_bounds(
    param: Parameterisation, anchors: torch.Tensor, margin: int, expect: list[tuple[int, int]]
) -> None:
    g = torch.Generator().manual_seed(0)
    ends = torch.cat([anchors, param.clean_level(1)])
    for j, (lo, hi) in enumerate(expect):
        t = sample_t_mid(ends[j].expand(4000), ends[j + 1].expand(4000), margin, param, generator=g)
        assert t.dtype == torch.long
        assert t.min().item() == lo and t.max().item() == hi  # inclusive ends, both reached
        assert abs(t.float().mean().item() - (lo + hi) / 2) < (hi - lo) * 0.05 + 0.5


def test_t_mid_margin_bounds_in_each_unit() -> None:
    sd3 = FlowSchedule(shift=3.0)
    p = FlowParameterisation(sd3)
    _check_bounds(
        p,
        p.anchor_levels(flow_anchors_from_indices([999, 749, 499, 249], sd3)),
        50,
        [(799, 949), (549, 699), (299, 449), (50, 199)],
    )
    flux = FlowSchedule(mu=1.15, timestep_scale=1.0)
    pf = FlowParameterisation(flux, grid="sigma")
    anchors = pf.anchor_levels(flow_anchors_from_sigmas([1.0, 0.904, 0.759, 0.512], flux))
    _check_bounds(pf, anchors, 20, [(924, 980), (779, 884), (532, 739), (20, 492)])
    pd = DDPMParameterisation(DDPMSchedule())
    _check_bounds(pd, torch.tensor([999, 749, 499, 249]), 20, [(769, 979), (519, 729), (269, 479), (20, 229)])
    # the table_index_0 end of the last segment gives the same lower end 0 + m
    t = sample_t_mid(torch.tensor([249]), pd.level_from_grid(torch.tensor([0])), 20, pd)
    assert 20 <= t.item() <= 229


def test_t_mid_shared_and_errors() -> None:
    pd = DDPMParameterisation(DDPMSchedule())
    g = torch.Generator().manual_seed(3)
    t = sample_t_mid(torch.full((8,), 999), torch.full((8,), 749), 20, pd, generator=g, shared=True)
    assert t.unique().numel() == 1
    assert sample_t_mid(torch.tensor([100]), torch.tensor([98]), 1, pd).item() == 99
    with pytest.raises(ValueError, match="no room"):
        sample_t_mid(torch.tensor([100]), torch.tensor([90]), 6, pd)
    with pytest.raises(ValueError, match="margin"):
        sample_t_mid(torch.tensor([100]), torch.tensor([90]), -1, pd)


def test_gradient_flows_only_through_direct_path() -> None:
    torch.manual_seed(0)
    p = FlowParameterisation(FlowSchedule())
    student, teacher = nn.Linear(6, 6), nn.Linear(6, 6)
    x_in = torch.randn(B, 6)
    s_j, s_next, s_mid = _levels(0.9, 0.6, 0.7)
    out_in = student(x_in)
    out = isg_targets(x_in, s_j, s_next, s_mid, lambda x, _: teacher(x), lambda x, _: student(x), out_in, p)
    assert out.x_direct.requires_grad and not out.x_target.requires_grad and not out.x_mid.requires_grad
    isg_loss(out.x_direct, out.x_target, "charbonnier", 1e-3).backward()
    assert all(q.grad is None for q in teacher.parameters())
    # Same gradient as differentiating the direct path alone against a constant target.
    grads = [q.grad.clone() for q in student.parameters()]
    student.zero_grad()
    x_dir = x_in + (s_next - s_j)[:, None] * student(x_in)
    isg_loss(x_dir, out.x_target.clone(), "charbonnier", 1e-3).backward()
    for a, b in zip(grads, (q.grad for q in student.parameters()), strict=True):
        torch.testing.assert_close(a, b)


def test_official_sdxl_variant_is_scaled_x0_regression() -> None:
    sched = DDPMSchedule()
    p = DDPMParameterisation(sched)
    g = torch.Generator().manual_seed(1)
    x_in, out_t, out_g, eps = (torch.randn(B, 4, 3, 3, generator=g) for _ in range(4))
    out_g.requires_grad_(True)
    t_j, t_next = torch.tensor([749, 499]), torch.tensor([499, 249])
    res = isg_x0_targets(x_in, t_j, t_next, lambda x, _: out_t, out_g, p)
    assert res.x_mid is None and res.x_direct.requires_grad and not res.x_target.requires_grad
    # As coded: re-noise both x0 estimates with one shared ε; the ε terms cancel in the difference.
    x0_t, x0_g = p.x0_from_output(x_in, out_t, t_j), p.x0_from_output(x_in, out_g, t_j)
    coded = p.add_noise(x0_g, eps, t_next) - p.add_noise(x0_t, eps, t_next)
    torch.testing.assert_close(res.x_direct - res.x_target, coded, atol=1e-5, rtol=1e-5)
    scale = sched.alpha_bar(t_next).sqrt().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(res.x_direct - res.x_target, scale * (x0_g - x0_t))


def test_segment_ends_choose_the_end_of_the_last_segment() -> None:
    """``zero`` ends at the clean level; ``table_index_0`` at the training grid's first entry, which for a
    shift-3 flow is the smallest σ of diffusers' training table (3·0.001 / (1 + 2·0.001))."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from senseflow.method import segment_ends

    flow = FlowParameterisation(FlowSchedule(shift=3.0), grid="table")
    anchors = torch.tensor([1.0, 0.6])
    assert segment_ends(anchors, flow, "zero").tolist() == pytest.approx([1.0, 0.6, 0.0])
    end = segment_ends(anchors, flow, "table_index_0")[-1]
    diffusers_min = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).sigmas.min()
    assert float(end) == pytest.approx(float(diffusers_min), rel=1e-6)
    assert float(end) == pytest.approx(0.003 / 1.002, rel=1e-6)
    ddpm = DDPMParameterisation(DDPMSchedule())
    steps = torch.tensor([999, 499])
    assert segment_ends(steps, ddpm, "zero").tolist() == [999, 499, -1]
    assert segment_ends(steps, ddpm, "table_index_0").tolist() == [999, 499, 0]
    with pytest.raises(ValueError, match=r"method\.isg\.last_segment_end"):
        segment_ends(anchors, flow, "one")
