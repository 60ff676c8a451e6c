"""senseflow.method.dmd: DMD2 loss (closed form, autograd, direction) and the level/guidance draws."""

from __future__ import annotations

import pytest
import torch

from senseflow.config.schema import GuidanceRange, LogitNormalDist, UniformDist, UniformIndexDist
from senseflow.core import DDPMParameterisation, DDPMSchedule, FlowParameterisation, FlowSchedule
from senseflow.method import dmd_loss, draw_guidance, sample_levels


def _triplet(seed: int = 0, shape: tuple[int, ...] = (3, 4, 6, 6)) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g) for _ in range(3))


def test_autograd_gradient_is_grad_over_n() -> None:
    x, fake, real = _triplet()
    x = x.requires_grad_(True)
    out = dmd_loss(x, fake, real)
    out.loss.backward()
    torch.testing.assert_close(x.grad, out.grad / x.numel())
    norm = (x.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(out.grad, (fake - real) / norm)
    torch.testing.assert_close(out.loss, 0.5 * (out.grad**2).mean())


def test_direction_moves_toward_real_and_away_from_fake() -> None:
    _, fake, real = _triplet(1)
    # G's sample sits where the fake score says G's distribution is (the fake score tracks G).
    x = (fake + 1e-3 * torch.randn_like(fake)).requires_grad_(True)
    dmd_loss(x, fake, real).loss.backward()
    step = x.detach() - 10.0 * x.grad  # a small step along -dL/dx (|dL/dx| ~ 1/N)

    def dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a - b).flatten(1).norm(dim=1)

    assert (dist(step, real) < dist(x.detach(), real)).all()
    assert (dist(step, fake) > dist(x.detach(), fake)).all()
    # Per sample the step is a positive multiple of (x0_real - x0_fake).
    moved = (step - x.detach()).flatten(1)
    cos = torch.nn.functional.cosine_similarity(moved, (real - fake).flatten(1), dim=1)
    torch.testing.assert_close(cos, torch.ones(3))
    # When x0_fake = x0_real the generator has nothing to learn.
    x2 = x.detach().clone().requires_grad_(True)
    same = dmd_loss(x2, real, real)
    same.loss.backward()
    assert same.loss.item() == 0.0 and torch.count_nonzero(x2.grad) == 0


def test_hand_computed_tiny_example() -> None:
    x = torch.tensor([[[[1.0, 3.0]]], [[[0.0, 0.0]]]], requires_grad=True)  # [2, 1, 1, 2]
    real = torch.tensor([[[[0.0, 1.0]]], [[[1.0, -1.0]]]])
    fake = torch.tensor([[[[2.0, 1.0]]], [[[1.0, 1.0]]]])
    out = dmd_loss(x, fake, real)
    # Sample 0: normaliser mean(|1|,|2|) = 1.5, grad = (2, 0)/1.5; sample 1: mean(1, 1) = 1, grad = (0, 2).
    expect = torch.tensor([[[[4 / 3, 0.0]]], [[[0.0, 2.0]]]])
    torch.testing.assert_close(out.grad, expect)
    torch.testing.assert_close(out.loss, torch.tensor(0.5 * (16 / 9 + 4) / 4))
    torch.testing.assert_close(out.stats["x0_gap"], torch.tensor((2 + 0 + 0 + 2) / 4))
    torch.testing.assert_close(out.stats["normaliser"], torch.tensor(1.25))
    torch.testing.assert_close(out.stats["grad_norm"], torch.tensor((4 / 3 + 2) / 2))
    assert all(v.ndim == 0 and not v.requires_grad for v in out.stats.values())


def test_nan_becomes_zero() -> None:
    x = torch.ones(2, 1, 2, 2, requires_grad=True)
    real = x.detach().clone()
    real[1] = 0.0
    fake = real.clone()  # sample 0: 0/0 -> NaN -> 0
    fake[1] = 0.5
    out = dmd_loss(x, fake, real)
    assert torch.isfinite(out.grad).all() and torch.isfinite(out.loss)
    assert torch.count_nonzero(out.grad[0]) == 0
    torch.testing.assert_close(out.grad[1], torch.full((1, 2, 2), 0.5))
    out.loss.backward()
    assert torch.isfinite(x.grad).all()


def test_loss_is_float32_for_bf16_inputs_and_shape_check() -> None:
    x, fake, real = (t.bfloat16() for t in _triplet(2))
    out = dmd_loss(x, fake, real)
    assert out.loss.dtype == torch.float32 and out.grad.dtype == torch.float32
    with pytest.raises(ValueError, match="share one shape"):
        dmd_loss(x, fake[:1], real)


# --------------------------------------------------------------------------- draws


def test_uniform_index_levels() -> None:
    g = torch.Generator().manual_seed(0)
    dist = UniformIndexDist(kind="uniform_index", low=20, high=980)
    t = sample_levels(dist, 20000, DDPMParameterisation(DDPMSchedule()), generator=g)
    assert t.dtype == torch.long and t.min() == 20 and t.max() == 980
    assert abs(t.float().mean().item() - 500) < 5
    sched = FlowSchedule(shift=3.0)
    sig = sample_levels(dist, 20000, FlowParameterisation(sched), generator=g)
    table = sched.sigma_table()
    assert sig.dtype == torch.float32
    assert sig.min() == table[999 - 20] and sig.max() == table[999 - 980]  # flipped-table indices
    flux = sample_levels(dist, 1000, FlowParameterisation(sched, grid="sigma"), generator=g)
    assert flux.min() >= 0.02 and flux.max() <= 0.98
    torch.testing.assert_close(flux * 1000, (flux * 1000).round())


def test_uniform_and_logit_normal_levels() -> None:
    g = torch.Generator().manual_seed(1)
    fp = FlowParameterisation(FlowSchedule(shift=3.0))
    u = sample_levels(UniformDist(kind="uniform", low=0.2, high=0.6), 20000, fp, generator=g)
    assert u.min() >= 0.2 and u.max() <= 0.6 and abs(u.mean().item() - 0.4) < 0.01
    ln = LogitNormalDist(kind="logit_normal")
    s = sample_levels(ln, 20000, fp, generator=torch.Generator().manual_seed(2))
    logit = torch.log(s / (1 - s))
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1) < 0.03
    # Same draws as core.sample_logit_normal; apply_shift passes them through the teacher shift.
    shifted = sample_levels(
        LogitNormalDist(kind="logit_normal", apply_shift=True),
        20000,
        fp,
        generator=torch.Generator().manual_seed(2),
    )
    torch.testing.assert_close(shifted, 3 * s / (1 + 2 * s))
    t = sample_levels(ln, 1000, DDPMParameterisation(DDPMSchedule()), generator=g)
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999


def test_draw_guidance() -> None:
    g = torch.Generator().manual_seed(0)
    fixed = draw_guidance(GuidanceRange(min=8.0, max=8.0), 5, generator=g)
    assert fixed.tolist() == [8.0] * 5 and fixed.dtype == torch.float32
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(0).get_state())  # no draw consumed
    w = draw_guidance(GuidanceRange(min=3.0, max=10.0), 20000, generator=g)
    assert w.min() >= 3.0 and w.max() <= 10.0 and abs(w.mean().item() - 6.5) < 0.05
    with pytest.raises(ValueError, match="n must be"):
        draw_guidance(GuidanceRange(min=1.0, max=2.0), 0)
