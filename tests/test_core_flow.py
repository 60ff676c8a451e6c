"""senseflow.core.flow against diffusers' FlowMatchEulerDiscreteScheduler and closed forms."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from senseflow.core import (
    FlowSchedule,
    add_noise,
    eps_from_velocity,
    euler_step,
    expand_like,
    exponential_time_shift,
    flux_mu,
    static_shift,
    velocity_from,
    x0_from_velocity,
)


def _data(seed: int = 0, shape: tuple[int, ...] = (3, 4, 5, 6)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# --------------------------------------------------------------------------- tables vs diffusers


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5])
def test_sigma_table_is_diffusers_init_table(shift: float) -> None:
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift).sigmas
    ours = FlowSchedule(shift=shift).sigma_table()
    assert ours.shape == (1000,) and ours.dtype == torch.float32
    assert torch.equal(ours, ref)
    assert ours[0] == 1.0 and bool((ours[1:] < ours[:-1]).all())


def test_sigma_at_index_indexes_decreasing_table() -> None:
    sched = FlowSchedule(shift=3.0)
    table = sched.sigma_table()
    assert sched.sigma_at_index(0) == 1.0
    assert torch.equal(sched.sigma_at_index(torch.tensor([0, 250, 999])), table[[0, 250, 999]])


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 4, 28])
def test_inference_sigmas_match_set_timesteps(shift: float, n: int) -> None:
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(n)
    ours = FlowSchedule(shift=shift).inference_sigmas(n)
    assert ours.shape == (n + 1,) and ours[-1] == 0.0
    assert torch.equal(ours, ref.sigmas)


@pytest.mark.parametrize("image_seq_len", [256, 1024, 4096])
@pytest.mark.parametrize("n", [4, 28])
def test_dynamic_shift_matches_set_timesteps_with_mu(image_seq_len: int, n: int) -> None:
    mu = flux_mu(image_seq_len)
    sched = FlowSchedule(mu=mu, timestep_scale=1.0)
    ref = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    ref.set_timesteps(n, mu=mu)
    assert torch.equal(sched.inference_sigmas(n), ref.sigmas)
    # The FLUX pipeline passes its own unshifted grid linspace(1, 1/n, n).
    t_values = np.linspace(1.0, 1.0 / n, n)
    ref.set_timesteps(sigmas=t_values, mu=mu)
    # diffusers shifts custom sigmas in float32, we shift in float64: 1 ulp apart at most.
    torch.testing.assert_close(sched.inference_sigmas(n, t_values), ref.sigmas, rtol=0, atol=1.2e-7)


def test_flux_mu_matches_diffusers_calculate_shift() -> None:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for seq_len in (64, 256, 1024, 2345, 4096, 8192):
        assert flux_mu(seq_len) == pytest.approx(calculate_shift(seq_len), abs=1e-12)
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)


def test_exponential_shift_is_static_shift_with_exp_mu() -> None:
    t = torch.linspace(0.01, 1.0, 50, dtype=torch.float64)
    for mu in (0.0, 0.5, 1.15):
        torch.testing.assert_close(exponential_time_shift(t, mu), static_shift(t, math.exp(mu)))
    assert torch.equal(static_shift(t, 1.0), t)


def test_add_noise_matches_scale_noise() -> None:
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0, eps = _data(1)
    idx = torch.tensor([0, 400, 999])
    ours = add_noise(x0, eps, FlowSchedule(shift=3.0).sigma_at_index(idx))
    torch.testing.assert_close(ours, ref.scale_noise(x0, ref.timesteps[idx], eps), rtol=0, atol=1e-6)


@pytest.mark.parametrize(("shift", "n"), [(3.0, 8), (1.0, 5)])
def test_euler_loop_matches_scheduler_step(shift: float, n: int) -> None:
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(n)
    sched = FlowSchedule(shift=shift)
    sigmas = sched.inference_sigmas(n)
    x_ref, _ = _data(2)
    x_ours = x_ref.clone()
    for i, t in enumerate(ref.timesteps):
        v_ref = torch.tanh(x_ref) + t / 1000  # any deterministic "network" of (x, t)
        x_ref = ref.step(v_ref, t, x_ref).prev_sample
        v_ours = torch.tanh(x_ours) + sched.model_timestep(sigmas[i]) / 1000
        x_ours = euler_step(x_ours, v_ours, sigmas[i], sigmas[i + 1])
    torch.testing.assert_close(x_ours, x_ref, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- closed forms


def test_round_trips_between_x0_eps_and_velocity() -> None:
    x0, eps = _data(3)
    sigma = torch.tensor([0.0, 0.3, 0.999])
    x_t = add_noise(x0, eps, sigma)
    v = velocity_from(x0, eps)
    torch.testing.assert_close(x0_from_velocity(x_t, v, sigma), x0, rtol=0, atol=1e-6)
    torch.testing.assert_close(eps_from_velocity(x_t, v, sigma), eps, rtol=0, atol=1e-6)
    # Scalar σ broadcasts too; σ = 1 is pure noise.
    torch.testing.assert_close(add_noise(x0, eps, 1.0), eps)
    torch.testing.assert_close(x0_from_velocity(add_noise(x0, eps, 0.5), v, 0.5), x0, rtol=0, atol=1e-6)


def test_euler_with_oracle_velocity_recovers_x0_exactly() -> None:
    """On a straight path the true velocity is constant, so Euler is exact for any grid."""
    x0, eps = _data(4)
    v = velocity_from(x0, eps)
    for sigmas in (FlowSchedule(shift=3.0).inference_sigmas(4), torch.tensor([1.0, 0.0])):
        x = eps.clone()
        for s, s_next in itertools.pairwise(sigmas):
            x = euler_step(x, v, s, s_next)
        torch.testing.assert_close(x, x0, rtol=0, atol=1e-5)


def test_expand_like_shapes_and_errors() -> None:
    x = torch.zeros(2, 3, 4, dtype=torch.float64)
    s = expand_like(torch.tensor([0.1, 0.2]), x)
    assert s.shape == (2, 1, 1) and s.dtype == torch.float64
    assert expand_like(0.5, x).shape == ()
    with pytest.raises(ValueError, match="shape"):
        expand_like(torch.tensor([0.1, 0.2, 0.3]), x)


def test_model_timestep_convention_and_validation() -> None:
    assert FlowSchedule().model_timestep(0.75).item() == pytest.approx(750.0)
    assert FlowSchedule(timestep_scale=1.0).model_timestep(torch.tensor([0.75])).item() == 0.75
    with pytest.raises(ValueError, match="shift"):
        FlowSchedule(shift=3.0, mu=1.15)
    with pytest.raises(ValueError, match="shift"):
        FlowSchedule(shift=0.0)
    with pytest.raises(ValueError, match="num_steps"):
        FlowSchedule().inference_sigmas(0)
    with pytest.raises(ValueError, match="t_values"):
        FlowSchedule().inference_sigmas(3, [1.0, 0.5])
