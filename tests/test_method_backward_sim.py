"""senseflow.method.backward_sim: the re-noising chain and the renoise / euler student samplers."""

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
)
from senseflow.method import as_x0_fn, backward_simulate, student_sample

SHAPE = (3, 2, 4, 4)


def _params() -> list[tuple[Parameterisation, torch.Tensor]]:
    sd3 = FlowSchedule(shift=3.0)
    flow = FlowParameterisation(sd3)
    return [
        (flow, flow.anchor_levels(flow_anchors_from_indices([999, 749, 499, 249], sd3))),
        (DDPMParameterisation(DDPMSchedule()), torch.tensor([999, 749, 499, 249])),
    ]


def _fixed_x0(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("param", "anchors"), _params())
@pytest.mark.parametrize("j", [0, 1, 2, 3])
def test_fixed_student_gives_add_noise_at_a_j(param: Parameterisation, anchors: torch.Tensor, j: int) -> None:
    x0 = _fixed_x0()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    calls: list[torch.Tensor] = []

    def student(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        calls.append(level.clone())
        return x0

    x = backward_simulate(student, noise, anchors, j, param, generator=torch.Generator().manual_seed(7))
    if j == 0:
        assert x is noise and not calls
        return
    replay = torch.Generator().manual_seed(7)
    eps = [torch.randn(SHAPE, generator=replay) for _ in range(j)][-1]
    assert torch.equal(x, param.add_noise(x0, eps, anchors[j].expand(SHAPE[0])))
    assert [c.tolist() for c in calls] == [[anchors[i].item()] * SHAPE[0] for i in range(j)]


def test_per_sample_j_and_bounds() -> None:
    param, anchors = _params()[0]
    x0, noise = _fixed_x0(), _fixed_x0(1)
    j = torch.tensor([0, 2, 3])
    x = backward_simulate(
        lambda x, _: x0, noise, anchors, j, param, generator=torch.Generator().manual_seed(5)
    )
    replay = torch.Generator().manual_seed(5)
    eps = [torch.randn(SHAPE, generator=replay) for _ in range(3)]
    assert torch.equal(x[0], noise[0])
    assert torch.equal(x[1], param.add_noise(x0, eps[1], anchors[2].expand(3))[1])
    assert torch.equal(x[2], param.add_noise(x0, eps[2], anchors[3].expand(3))[2])
    with pytest.raises(ValueError, match="j must lie"):
        backward_simulate(lambda x, _: x0, noise, anchors, 4, param)


def test_no_grad_is_recorded() -> None:
    param, anchors = _params()[0]
    net = nn.Conv2d(2, 2, 1)
    x0_fn = as_x0_fn(lambda x, level: net(x), param)
    x = backward_simulate(x0_fn, _fixed_x0(), anchors, 3, param)
    y = student_sample(lambda x, level: net(x), _fixed_x0(), anchors, param, "renoise")
    assert not x.requires_grad and not y.requires_grad and x.grad_fn is None


@pytest.mark.parametrize(("param", "anchors"), _params())
def test_renoise_with_oracle_returns_x0(param: Parameterisation, anchors: torch.Tensor) -> None:
    x0 = _fixed_x0(2)

    def oracle(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:  # output whose x̂0 is exactly x0
        a = param.alpha(level).reshape(-1, 1, 1, 1)
        s = param.sigma(level).reshape(-1, 1, 1, 1)
        return param.training_target(x0, (x - a * x0) / s, level)

    out = student_sample(
        oracle, _fixed_x0(3), anchors, param, "renoise", generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)
    out_e = student_sample(oracle, _fixed_x0(3), anchors, param, "euler")
    torch.testing.assert_close(out_e, x0, atol=1e-4, rtol=1e-4)


def test_euler_with_linear_flow_oracle_follows_the_straight_line() -> None:
    param, anchors = _params()[0]
    x0, noise = _fixed_x0(4), _fixed_x0(5)
    seen: list[torch.Tensor] = []

    def linear_flow(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        # The straight path from noise to x0 has constant velocity ε − x0; check we stay on it.
        seen.append(x - param.add_noise(x0, noise, level))
        return noise - x0

    out = student_sample(linear_flow, noise, anchors, param, "euler")
    torch.testing.assert_close(out, x0, atol=1e-6, rtol=1e-6)
    assert len(seen) == 4 and max(d.abs().max().item() for d in seen) < 1e-6
    with pytest.raises(ValueError, match="mode"):
        student_sample(linear_flow, noise, anchors, param, "ddpm")  # type: ignore[arg-type]


def test_renoise_draws_fresh_noise_between_steps() -> None:
    param, anchors = _params()[1]
    noise = _fixed_x0(7)
    inputs: list[torch.Tensor] = []

    def student(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        inputs.append(x)
        return torch.zeros_like(x)  # ε̂ = 0, so x̂0 = x / √ᾱ

    student_sample(student, noise, anchors, param, "renoise", generator=torch.Generator().manual_seed(9))
    replay = torch.Generator().manual_seed(9)
    assert torch.equal(inputs[0], noise)
    for step in range(1, 4):
        eps = torch.randn(SHAPE, generator=replay)
        x0_prev = param.x0_from_output(inputs[step - 1], torch.zeros(SHAPE), anchors[step - 1].expand(3))
        assert torch.equal(inputs[step], param.add_noise(x0_prev, eps, anchors[step].expand(3)))
