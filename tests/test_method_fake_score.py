"""senseflow.method.fake_score against the hand formulas of spec §4."""

from __future__ import annotations

import torch

from senseflow.core import DDPMParameterisation, DDPMSchedule, FlowParameterisation, FlowSchedule
from senseflow.method import fake_score_loss


def _data() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))


def test_flow_target_is_velocity() -> None:
    out, x0, eps = _data()
    sig = torch.tensor([0.3, 0.8])
    loss = fake_score_loss(FlowParameterisation(FlowSchedule()), out, x0, eps, sig)
    torch.testing.assert_close(loss, ((out - (eps - x0)) ** 2).mean())


def test_ddpm_eps_and_v_targets() -> None:
    out, x0, eps = _data()
    t = torch.tensor([10, 900])
    loss = fake_score_loss(DDPMParameterisation(DDPMSchedule()), out, x0, eps, t)
    torch.testing.assert_close(loss, ((out - eps) ** 2).mean())
    sched = DDPMSchedule(prediction_type="v_prediction")
    a = sched.alpha_bar(t).reshape(-1, 1, 1, 1)
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    loss_v = fake_score_loss(DDPMParameterisation(sched), out, x0, eps, t)
    torch.testing.assert_close(loss_v, ((out - v) ** 2).mean())


def test_gradient_reaches_the_output_only() -> None:
    out, x0, eps = _data()
    out.requires_grad_(True)
    x0.requires_grad_(True)
    fake_score_loss(FlowParameterisation(FlowSchedule()), out, x0, eps, torch.tensor([0.5, 0.5])).backward()
    assert out.grad is not None and x0.grad is None
