"""senseflow.core.parameterisation: round trips and equivalence with the core flow/DDPM functions."""

from __future__ import annotations

import pytest
import torch

from senseflow.core import (
    DDPMParameterisation,
    DDPMSchedule,
    FlowParameterisation,
    FlowSchedule,
    Parameterisation,
    add_noise,
    ddpm_anchors,
    eps_from_velocity,
    euler_step,
    flow_anchors_from_indices,
    flow_anchors_from_sigmas,
    x0_from_velocity,
)

B = 4


def _data(seed: int = 0, shape: tuple[int, ...] = (B, 3, 5, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(
        shape, generator=g, dtype=torch.float64
    )


def _params() -> list[tuple[Parameterisation, torch.Tensor]]:
    return [
        (FlowParameterisation(FlowSchedule(shift=3.0)), torch.tensor([1.0, 0.9, 0.42, 0.003])),
        (DDPMParameterisation(DDPMSchedule()), torch.tensor([999, 749, 300, 0])),
        (DDPMParameterisation(DDPMSchedule(prediction_type="v_prediction")), torch.tensor([999, 500, 20, 1])),
    ]


@pytest.mark.parametrize(("param", "level"), _params())
def test_round_trip_and_coefficients(param: Parameterisation, level: torch.Tensor) -> None:
    x0, eps = _data()
    x_t = param.add_noise(x0, eps, level)
    target = param.training_target(x0, eps, level)
    torch.testing.assert_close(param.x0_from_output(x_t, target, level), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(param.eps_from_output(x_t, target, level), eps, atol=1e-4, rtol=1e-4)
    a, s = param.alpha(level), param.sigma(level)
    expect = a.reshape(-1, 1, 1, 1) * x0 + s.reshape(-1, 1, 1, 1) * eps
    torch.testing.assert_close(x_t, expect.to(x_t.dtype))


def test_flow_matches_core_functions() -> None:
    sched = FlowSchedule(shift=3.0)
    p = FlowParameterisation(sched)
    x0, eps = _data(1)
    v = torch.randn_like(x0)
    sig = torch.tensor([0.95, 0.5, 0.2, 0.01], dtype=torch.float64)
    assert torch.equal(p.add_noise(x0, eps, sig), add_noise(x0, eps, sig))
    assert torch.equal(p.training_target(x0, eps, sig), eps - x0)
    assert torch.equal(p.x0_from_output(x0, v, sig), x0_from_velocity(x0, v, sig))
    assert torch.equal(p.eps_from_output(x0, v, sig), eps_from_velocity(x0, v, sig))
    assert torch.equal(p.sigma(sig), sig) and torch.equal(p.alpha(sig), 1 - sig)
    torch.testing.assert_close(p.model_timestep(sig), sig * 1000)
    flux = FlowParameterisation(FlowSchedule(mu=1.15, timestep_scale=1.0), grid="sigma")
    assert torch.equal(flux.model_timestep(sig), sig)


def test_flow_step_is_euler_and_eps_variant() -> None:
    p = FlowParameterisation(FlowSchedule())
    x, v = _data(2)
    s, s_next = torch.tensor([0.9] * B, dtype=torch.float64), torch.tensor([0.6] * B, dtype=torch.float64)
    assert torch.equal(p.step_to(x, v, s, s_next), euler_step(x, v, s, s_next))
    # With ε̂ passed explicitly the re-noised step is the same point (DDIM == Euler for flows).
    eps_hat = p.eps_from_output(x, v, s)
    torch.testing.assert_close(p.step_to(x, v, s, s_next, eps=eps_hat), euler_step(x, v, s, s_next))
    # Stepping to σ = 0 lands on x̂0.
    torch.testing.assert_close(p.step_to(x, v, s, p.clean_level(B).double()), p.x0_from_output(x, v, s))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_matches_schedule_and_ddim(prediction_type: str) -> None:
    sched = DDPMSchedule(prediction_type=prediction_type)
    p = DDPMParameterisation(sched)
    x, out = _data(3)
    x, out = x.float(), out.float()
    t, t_prev = torch.tensor([999, 700, 400, 100]), torch.tensor([749, 500, 100, -1])
    assert torch.equal(p.add_noise(x, out, t), sched.add_noise(x, out, t))
    assert torch.equal(p.training_target(x, out, t), sched.target(x, out, t))
    x0, eps = sched.x0_eps_from_output(x, out, t)
    assert torch.equal(p.step_to(x, out, t, t_prev), sched.ddim_step(x, x0, eps, t, t_prev))
    assert torch.equal(p.model_timestep(t), t)
    torch.testing.assert_close(p.sigma(t), sched.effective_sigma(t))
    torch.testing.assert_close(p.alpha(t), sched.alpha_bar(t).sqrt())
    torch.testing.assert_close(p.alpha(t) ** 2 + p.sigma(t) ** 2, torch.ones(B))
    e2 = torch.randn_like(x)
    torch.testing.assert_close(p.step_to(x, out, t, t_prev, eps=e2), sched.ddim_step(x, x0, e2, t, t_prev))
    with pytest.raises(ValueError, match="t_prev <= t"):
        p.step_to(x, out, t_prev.clamp(min=0), t)


def test_clean_levels_and_anchor_levels() -> None:
    fp = FlowParameterisation(FlowSchedule(shift=3.0))
    dp = DDPMParameterisation(DDPMSchedule())
    assert fp.clean_level(3).tolist() == [0.0] * 3 and fp.clean_level(3).dtype == torch.float32
    assert dp.clean_level(3).tolist() == [-1] * 3 and dp.clean_level(3).dtype == torch.long
    assert torch.equal(dp.alpha(dp.clean_level(2)), torch.ones(2)) and torch.equal(
        dp.sigma(dp.clean_level(2)), torch.zeros(2)
    )
    fa = flow_anchors_from_indices([999, 749, 499, 249], FlowSchedule(shift=3.0))
    da = ddpm_anchors([999, 749, 499, 249], DDPMSchedule())
    torch.testing.assert_close(fp.anchor_levels(fa), torch.tensor([1.0, 0.9, 0.75, 0.5]))
    assert dp.anchor_levels(da).tolist() == [999, 749, 499, 249] and dp.anchor_levels(da).dtype == torch.long
    with pytest.raises(ValueError, match="DDPM anchors"):
        dp.anchor_levels(fa)
    with pytest.raises(ValueError, match="flow anchors"):
        fp.anchor_levels(da)


def test_grid_conventions() -> None:
    sched = FlowSchedule(shift=3.0)
    table = FlowParameterisation(sched)
    idx = torch.tensor([999, 749, 499, 249, 20, 0])
    # Index i means the flipped table (as flow_anchors_from_indices): sigma_table()[T-1-i].
    assert torch.equal(table.level_from_grid(idx), sched.sigma_table()[999 - idx])
    assert torch.equal(table.grid_from_level(table.level_from_grid(idx)), idx)
    assert table.grid_from_level(torch.tensor(0.0)).item() == 0  # the clean level maps to 0
    assert table.grid_max == 999
    sig = FlowParameterisation(FlowSchedule(mu=1.15, timestep_scale=1.0), grid="sigma")
    anchors = sig.anchor_levels(
        flow_anchors_from_sigmas([1.0, 0.904, 0.759, 0.512], FlowSchedule(timestep_scale=1.0))
    )
    assert sig.grid_from_level(anchors).tolist() == [1000, 904, 759, 512] and sig.grid_max == 1000
    torch.testing.assert_close(sig.level_from_grid(torch.tensor([500, 20])), torch.tensor([0.5, 0.02]))
    dp = DDPMParameterisation(DDPMSchedule())
    assert dp.grid_from_level(torch.tensor([999, -1])).tolist() == [999, 0]
    assert torch.equal(dp.level_from_grid(idx), idx)
    # mirror: grid_max - g
    assert dp.mirror_level(torch.tensor([999, 249])).tolist() == [0, 750]
    assert torch.equal(table.mirror_level(table.level_from_grid(idx)), sched.sigma_table()[idx])
    for p in (table, dp):
        with pytest.raises(ValueError, match="grid positions"):
            p.level_from_grid(torch.tensor([1000]))
        with pytest.raises(TypeError, match="integers"):
            p.level_from_grid(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="grid must be"):
        FlowParameterisation(sched, grid="index")  # type: ignore[arg-type]


def test_level_from_fraction() -> None:
    u = torch.tensor([0.0, 0.25, 0.5, 0.999999])
    fp = FlowParameterisation(FlowSchedule(shift=3.0))
    assert torch.equal(fp.level_from_fraction(u), u)
    torch.testing.assert_close(fp.level_from_fraction(u, shift=True), 3 * u / (1 + 2 * u))
    dp = DDPMParameterisation(DDPMSchedule())
    assert dp.level_from_fraction(u).tolist() == [0, 250, 500, 999]
    assert dp.level_from_fraction(torch.tensor([1.0])).tolist() == [999]
    with pytest.raises(ValueError, match="no timestep shift"):
        dp.level_from_fraction(u, shift=True)
