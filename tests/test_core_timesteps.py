"""senseflow.core.timesteps: training-time sampling and student anchor grids."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

from senseflow.core import (
    Anchors,
    DDPMSchedule,
    FlowSchedule,
    ddpm_anchors,
    flow_anchors_from_indices,
    flow_anchors_from_sigmas,
    flow_anchors_from_t,
    flux_mu,
    sample_logit_normal,
    sample_uniform_index,
)

T_GRID = (1.0, 0.75, 0.5, 0.25)

# --------------------------------------------------------------------------- sampling


def test_logit_normal_draws_same_numbers_as_diffusers() -> None:
    ours = sample_logit_normal(64, 0.3, 1.2, generator=torch.Generator().manual_seed(7))
    ref = compute_density_for_timestep_sampling(
        "logit_normal", 64, logit_mean=0.3, logit_std=1.2, generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(ours, ref)


def test_logit_normal_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    s = sample_logit_normal(200_000, generator=g)
    assert s.dtype == torch.float32 and bool(((s > 0) & (s < 1)).all())
    assert s.mean().item() == pytest.approx(0.5, abs=3e-3)  # symmetric around 1/2 for mean 0
    assert s.median().item() == pytest.approx(0.5, abs=5e-3)
    shifted = sample_logit_normal(200_000, mean=1.0, std=0.5, generator=g)
    # sigmoid is monotone, so the median maps through it exactly.
    assert shifted.median().item() == pytest.approx(1 / (1 + math.exp(-1.0)), abs=5e-3)


def test_uniform_index_is_inclusive() -> None:
    g = torch.Generator().manual_seed(0)
    idx = sample_uniform_index(5000, 20, 25, generator=g)
    assert idx.dtype == torch.long
    assert set(idx.tolist()) == set(range(20, 26))
    assert torch.equal(sample_uniform_index(3, 999, 999), torch.full((3,), 999))
    with pytest.raises(ValueError, match="low <= high"):
        sample_uniform_index(3, 5, 4)


# --------------------------------------------------------------------------- anchors: spec numbers


def test_sd35_anchors_from_t_shift3() -> None:
    a = flow_anchors_from_t(T_GRID, FlowSchedule(shift=3.0))
    assert a.kind == "flow" and len(a) == 4
    assert a.sigmas == pytest.approx((1.0, 0.90, 0.75, 0.50), abs=1e-6)
    assert a.timesteps == pytest.approx((1000.0, 900.0, 750.0, 500.0), abs=1e-3)


def test_flux_anchors_from_t_mu_4096_tokens() -> None:
    sched = FlowSchedule(mu=flux_mu(4096), timestep_scale=1.0)
    a = flow_anchors_from_t(T_GRID, sched)
    assert a.sigmas == pytest.approx((1.0, 0.9045, 0.7595, 0.5128), abs=1e-4)
    assert a.timesteps == a.sigmas  # FLUX is fed σ itself


def test_indices_into_flipped_table_match_t_grid() -> None:
    sched = FlowSchedule(shift=3.0)
    a = flow_anchors_from_indices((999, 749, 499, 249), sched)
    assert a.sigmas[0] == 1.0
    assert a.sigmas == pytest.approx(flow_anchors_from_t(T_GRID, sched).sigmas, abs=1e-6)
    table = sched.sigma_table()
    assert a.sigmas[1] == table[999 - 749].item()
    assert flow_anchors_from_indices(torch.tensor([999, 0]), sched).sigmas == (1.0, table[999].item())


def test_anchors_from_literal_sigmas() -> None:
    flux = FlowSchedule(mu=1.15, timestep_scale=1.0)
    a = flow_anchors_from_sigmas((1.0, 0.904, 0.759, 0.512), flux)
    assert a.sigmas == pytest.approx((1.0, 0.904, 0.759, 0.512), abs=1e-7)
    assert a.timesteps == a.sigmas
    assert flow_anchors_from_sigmas((1.0, 0.5)).timesteps == (1000.0, 500.0)


def test_sdxl_ddpm_anchors() -> None:
    a = ddpm_anchors((999, 749, 499, 249), DDPMSchedule())
    assert a.kind == "ddpm" and a.timesteps == (999.0, 749.0, 499.0, 249.0)
    assert a.sigmas == pytest.approx((0.998, 0.971, 0.850, 0.570), abs=1e-3)
    assert torch.equal(a.timesteps_tensor(), torch.tensor([999, 749, 499, 249]))
    assert a.sigmas_tensor().dtype == torch.float32


def test_anchor_tensors_and_immutability() -> None:
    a = flow_anchors_from_t(T_GRID, FlowSchedule(shift=3.0))
    assert a.timesteps_tensor().dtype == torch.float32
    torch.testing.assert_close(a.sigmas_tensor(), torch.tensor([1.0, 0.9, 0.75, 0.5]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.sigmas = (1.0,)  # type: ignore[misc]


# --------------------------------------------------------------------------- anchors: validation


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: flow_anchors_from_t((1.0, 0.5, 0.75), FlowSchedule()), "t_grid must be strictly decreasing"),
        (lambda: flow_anchors_from_t((1.0, 0.5, 0.5), FlowSchedule()), "strictly decreasing"),
        (lambda: flow_anchors_from_t((1.5, 0.5), FlowSchedule()), r"t_grid must lie in \(0.0, 1.0\]"),
        (lambda: flow_anchors_from_t((1.0, 0.0), FlowSchedule()), "t_grid must lie in"),
        (lambda: flow_anchors_from_t((), FlowSchedule()), "t_grid must not be empty"),
        (lambda: flow_anchors_from_indices((1000, 500), FlowSchedule()), r"indices must lie in \[0, 999\]"),
        (lambda: flow_anchors_from_indices((999, 499.5), FlowSchedule()), "indices must be integers"),
        (lambda: flow_anchors_from_indices(torch.tensor([1.0]), FlowSchedule()), "indices must be integers"),
        (
            lambda: flow_anchors_from_indices((249, 999), FlowSchedule()),
            "indices must be strictly decreasing",
        ),
        (lambda: flow_anchors_from_sigmas((1.0, 0.0)), r"sigmas must lie in \(0.0, 1.0\]"),
        (lambda: flow_anchors_from_sigmas((0.5, 0.9)), "sigmas must be strictly decreasing"),
        (lambda: ddpm_anchors((999, 1000), DDPMSchedule()), "ts must be strictly decreasing"),
        (lambda: ddpm_anchors((1000, 999), DDPMSchedule()), r"ts must lie in \[0, 999\]"),
        (lambda: ddpm_anchors((999, -1), DDPMSchedule()), "ts must lie in"),
        (lambda: Anchors("flow", (1.0,), (1.0, 0.5)), "1 timesteps but 2 sigmas"),
    ],
)
def test_invalid_anchors_raise(build, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()
