"""senseflow.method.gan: time weights at the recipes' anchors (spec §8 table) and hand-computed losses."""

from __future__ import annotations

import pytest
import torch

from senseflow.core import (
    DDPMParameterisation,
    DDPMSchedule,
    FlowParameterisation,
    FlowSchedule,
    ddpm_anchors,
    flow_anchors_from_indices,
    flow_anchors_from_sigmas,
)
from senseflow.method import (
    hinge_d_loss,
    hinge_g_loss,
    nonsaturating_d_loss,
    nonsaturating_g_loss,
    time_weight,
)


def _close(a: torch.Tensor, b: list[float], atol: float) -> None:
    torch.testing.assert_close(a, torch.tensor(b), atol=atol, rtol=0)


def test_alpha_sq_at_flux_anchors() -> None:
    sched = FlowSchedule(mu=1.15, timestep_scale=1.0)
    p = FlowParameterisation(sched, grid="sigma")
    a = p.anchor_levels(flow_anchors_from_sigmas([1.0, 0.904, 0.759, 0.512], sched))
    _close(time_weight("alpha_sq", a, p), [0.0, 0.009, 0.058, 0.238], atol=1e-3)
    torch.testing.assert_close(time_weight("alpha_sq", a, p), (1 - a) ** 2)


def test_sqrt_alphabar_at_sdxl_anchors() -> None:
    sched = DDPMSchedule()
    p = DDPMParameterisation(sched)
    t = p.anchor_levels(ddpm_anchors([999, 749, 499, 249], sched))
    w = time_weight("sqrt_alphabar", t, p)
    _close(w, [0.068, 0.238, 0.527, 0.822], atol=1e-3)
    torch.testing.assert_close(w, sched.alpha_bar(t).sqrt())  # power 1, not ᾱ


def test_mirror_sigma_sq_at_sd35_anchors() -> None:
    sched = FlowSchedule(shift=3.0)
    p = FlowParameterisation(sched)
    a = p.anchor_levels(flow_anchors_from_indices([999, 749, 499, 249], sched))
    w = time_weight("mirror_sigma_sq", a, p)
    _close(w, [0.0, 0.25, 0.56, 0.81], atol=6e-3)
    # The unflipped table read at the anchor index, squared — not (1 - σ_anchor)².
    table = sched.sigma_table()
    torch.testing.assert_close(w, table[torch.tensor([999, 749, 499, 249])] ** 2)
    assert not torch.allclose(w, (1 - a) ** 2, atol=1e-2)


def test_constant_and_unknown() -> None:
    p = DDPMParameterisation(DDPMSchedule())
    w = time_weight("constant", torch.tensor([999, 5]), p)
    assert w.tolist() == [1.0, 1.0] and w.dtype == torch.float32
    with pytest.raises(ValueError, match="time weight"):
        time_weight("sigma", torch.tensor([1]), p)  # type: ignore[arg-type]


def test_hinge_losses_by_hand() -> None:
    real = torch.tensor([[0.5, 2.0], [-1.0, 0.0]])  # ReLU(1 - r): [0.5, 0] ; [2, 1]
    fake = torch.tensor([[-2.0, 0.0], [1.0, 3.0]])  # ReLU(1 + f): [0, 1] ; [2, 4]
    w = torch.tensor([0.5, 2.0])
    # per sample: (0.25 + 0.5) = 0.75 ; (1.5 + 3) = 4.5 -> mean(0.5*0.75, 2*4.5)
    torch.testing.assert_close(hinge_d_loss(real, fake, w), torch.tensor((0.375 + 9.0) / 2))
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor((0.75 + 4.5) / 2))
    # G: mean_b ω_b(-mean D(fake_b)) = mean(0.5 * 1, 2 * -2)
    torch.testing.assert_close(hinge_g_loss(fake, w), torch.tensor((0.5 - 4.0) / 2))


def test_weights_apply_per_sample_on_spatial_logits() -> None:
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(3, 1, 5, 7, generator=g), torch.randn(3, 1, 5, 7, generator=g)
    w = torch.tensor([0.0, 1.0, 0.0])
    torch.testing.assert_close(hinge_d_loss(real, fake, w), hinge_d_loss(real[1:2], fake[1:2]) / 3)
    torch.testing.assert_close(hinge_g_loss(fake, w), -fake[1].mean() / 3)
    with pytest.raises(ValueError, match="weights must have shape"):
        hinge_g_loss(fake, torch.ones(2))


def test_nonsaturating_losses_by_hand() -> None:
    sp = torch.nn.functional.softplus
    real, fake = torch.tensor([[0.0], [2.0]]), torch.tensor([[1.0], [-3.0]])
    d = (
        (sp(torch.tensor(0.0)) + sp(torch.tensor(1.0))) + (sp(torch.tensor(-2.0)) + sp(torch.tensor(-3.0)))
    ) / 2
    torch.testing.assert_close(nonsaturating_d_loss(real, fake), d)
    torch.testing.assert_close(
        nonsaturating_g_loss(fake), (sp(torch.tensor(-1.0)) + sp(torch.tensor(3.0))) / 2
    )
    w = torch.tensor([2.0, 0.0])
    torch.testing.assert_close(nonsaturating_g_loss(fake, w), sp(torch.tensor(-1.0)))
    # softplus(-x) = -log sigmoid(x): the non-saturating GAN loss
    torch.testing.assert_close(nonsaturating_g_loss(fake), -torch.log(torch.sigmoid(fake)).mean())


def test_losses_are_differentiable_float32() -> None:
    fake = torch.randn(2, 4, dtype=torch.bfloat16, requires_grad=True)
    loss = hinge_g_loss(fake, torch.tensor([1.0, 0.5])) + nonsaturating_g_loss(fake)
    assert loss.dtype == torch.float32
    loss.backward()
    assert fake.grad is not None and torch.isfinite(fake.grad.float()).all()
