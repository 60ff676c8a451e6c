"""``grad_ratio``: the ratio of two losses' gradient norms with respect to G's output, against closed
forms, and that it leaves parameter gradients alone."""

from __future__ import annotations

import math

import pytest
import torch

from senseflow.method.isg import isg_loss
from senseflow.train.step import grad_ratio

torch.set_num_threads(1)


def test_closed_form_linear_over_quadratic():
    gen = torch.Generator().manual_seed(0)
    wrt = torch.randn(4, 5, generator=gen, dtype=torch.float64).requires_grad_()
    term = (3 * wrt).sum()  # gradient 3 everywhere: norm 3 sqrt(n)
    reference = 0.5 * (wrt**2).sum()  # gradient wrt: norm ||wrt||
    expected = 3 * math.sqrt(wrt.numel()) / wrt.detach().norm().item()
    assert grad_ratio(term, reference, wrt) == pytest.approx(expected, rel=1e-6)
    # and the other way round
    assert grad_ratio(reference, term, wrt) == pytest.approx(1 / expected, rel=1e-6)
    assert wrt.grad is None  # gradients are returned, not accumulated into the leaf


def test_scaled_term_scales_ratio():
    wrt = torch.tensor([1.0, -2.0, 2.0], requires_grad=True)  # norm 3
    loss = (wrt**2).sum()  # gradient 2 wrt, norm 6
    assert grad_ratio(5 * loss, loss, wrt) == pytest.approx(5.0, rel=1e-6)
    assert grad_ratio(wrt.sum(), loss, wrt) == pytest.approx(math.sqrt(3) / 6, rel=1e-6)


def test_nan_without_graph():
    wrt = torch.randn(3)
    loss = (wrt**2).sum()
    assert math.isnan(grad_ratio(loss, loss, wrt))


def test_nan_when_a_loss_does_not_depend_on_wrt():
    wrt = torch.randn(3, requires_grad=True)
    other = torch.randn(3, requires_grad=True)
    assert math.isnan(grad_ratio((other**2).sum(), (wrt**2).sum(), wrt))
    assert math.isnan(grad_ratio((wrt**2).sum(), (other**2).sum(), wrt))


def test_parameter_gradients_untouched_and_graph_kept():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    out = lin(x)
    target = torch.randn(5, 3)
    term = ((out - target) ** 2).mean()
    reference = out.abs().sum()
    ratio = grad_ratio(term, reference, out)
    assert lin.weight.grad is None and lin.bias.grad is None
    # hand value: d term/d out = 2 (out - target) / numel, d reference/d out = sign(out)
    d = (out - target).detach()
    expected = (2 * d / d.numel()).norm() / out.detach().sign().norm()
    assert ratio == pytest.approx(expected.item(), rel=1e-5)
    # the graph survives: the caller's backward still reaches the parameters
    (term + reference).backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


def test_charbonnier_over_l2_matches_sign_over_twice_residual():
    gen = torch.Generator().manual_seed(1)
    target = torch.randn(2, 3, 4, 4, generator=gen)
    # residuals of magnitude 0.1 .. 1, both signs: all far above eps
    mag = 0.1 + 0.9 * torch.rand(target.shape, generator=gen)
    sign = torch.where(torch.rand(target.shape, generator=gen) < 0.5, -1.0, 1.0)
    out = (target + sign * mag).requires_grad_()
    x_direct = out  # the identity step
    charb = isg_loss(x_direct, target, "charbonnier", 1e-6)
    l2 = isg_loss(x_direct, target, "l2", None)
    d = (out - target).detach()
    # mean reductions cancel: |sign(d)| / |2 d|
    expected = d.sign().norm().item() / (2 * d).norm().item()
    assert d.abs().min() > 0.05
    assert grad_ratio(charb, l2, out) == pytest.approx(expected, rel=1e-3)
    # the target is detached inside isg_loss, so only out carries gradient
    assert grad_ratio(l2, l2, out) == pytest.approx(1.0, rel=1e-6)


def test_charbonnier_gradient_saturates_where_l2_grows():
    target = torch.zeros(8)
    small = torch.full((8,), 0.5, requires_grad=True)
    large = torch.full((8,), 5.0, requires_grad=True)
    r_small = grad_ratio(
        isg_loss(small, target, "charbonnier", 1e-6), isg_loss(small, target, "l2", None), small
    )
    r_large = grad_ratio(
        isg_loss(large, target, "charbonnier", 1e-6), isg_loss(large, target, "l2", None), large
    )
    assert r_small == pytest.approx(1 / (2 * 0.5), rel=1e-4)
    assert r_large == pytest.approx(1 / (2 * 5.0), rel=1e-4)
