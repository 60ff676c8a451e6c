"""IDA between two LoRA adapters of one base (method/ida_lora.py): the factors mix and the exact mix
of the products, against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from senseflow.method.ida_lora import (
    check_ida_lora_compatible,
    ida_lora_update_,
    mix_lora_products,
)
from senseflow.models.lora import LoraRole, LoraSettings, attach_lora
from tests.test_lora import perturb_


def small_base(rank: int = 4, conv: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 9)]
    if conv:
        layers = [nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3)]
    base = nn.Sequential(*layers)
    attach_lora(base, LoraSettings(rank=rank, alpha=2 * rank, target_modules=("0", "2")))
    return base


def adapter_tensors(base, name):
    named = LoraRole(base, name).named_parameters()
    return {n.replace(f".{name}.", ".ADAPTER."): p.detach().clone() for n, p in named}


def deltas(base, name) -> dict[str, torch.Tensor]:
    """ΔW = scaling·B·A per adapted module (conv factors flattened)."""
    out = {}
    for mname, m in base.named_modules():
        if hasattr(m, "lora_A") and name in m.lora_A:
            a = m.lora_A[name].weight.detach().double()
            b = m.lora_B[name].weight.detach().double()
            out[mname] = m.scaling[name] * b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
    return out


def test_factors_is_the_elementwise_mix_and_its_product_error_has_a_closed_form():
    base = small_base()
    perturb_(LoraRole(base, "generator").parameters(), seed=1, scale=0.3)
    perturb_(LoraRole(base, "fake_score").parameters(), seed=2, scale=0.3)
    f0, g0 = adapter_tensors(base, "fake_score"), adapter_tensors(base, "generator")
    df0, dg0 = deltas(base, "fake_score"), deltas(base, "generator")
    lam = 0.9
    report = ida_lora_update_(base, lam, "factors")
    assert (report.variant, report.modules, report.relative_error) == ("factors", 2, 0.0)
    f1 = adapter_tensors(base, "fake_score")
    for k in f0:
        torch.testing.assert_close(f1[k], lam * f0[k] + (1 - lam) * g0[k])
    assert all(torch.equal(v, g0[k]) for k, v in adapter_tensors(base, "generator").items())
    # B'A' - [λ B_f A_f + (1-λ) B_g A_g] = -λ(1-λ)(B_f - B_g)(A_f - A_g), times the scaling
    df1 = deltas(base, "fake_score")
    for mname in df0:
        a_key, b_key = f"{mname}.lora_A.ADAPTER.weight", f"{mname}.lora_B.ADAPTER.weight"
        diff_b = (f0[b_key] - g0[b_key]).double()
        diff_a = (f0[a_key] - g0[a_key]).double()
        closed = -lam * (1 - lam) * 2.0 * diff_b @ diff_a  # scaling alpha / r = 2
        torch.testing.assert_close(df1[mname] - (lam * df0[mname] + (1 - lam) * dg0[mname]), closed)


def test_factors_in_storage_dtype_matches_ida_update():
    base = small_base().to(torch.bfloat16)
    perturb_(LoraRole(base, "generator").parameters(), seed=1)
    f0, g0 = adapter_tensors(base, "fake_score"), adapter_tensors(base, "generator")
    ida_lora_update_(base, 0.97, "factors", update_dtype="storage")
    for k, v in adapter_tensors(base, "fake_score").items():
        assert torch.equal(v, f0[k].mul(0.97).add(g0[k], alpha=0.03))


def _low_rank(out: int, inner: int, rank: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(out, rank, generator=g) @ torch.randn(rank, inner, generator=g)


def test_products_is_exact_when_the_mix_has_rank_at_most_r():
    g = torch.Generator().manual_seed(0)
    r, n_out, n_in, lam = 4, 20, 16, 0.97
    # B_f and B_g of rank 2 each: the mix λ B_f A_f + (1-λ) B_g A_g has rank <= 4 = r
    b_f, b_g = _low_rank(n_out, r, 2, g), _low_rank(n_out, r, 2, g)
    a_f, a_g = torch.randn(r, n_in, generator=g), torch.randn(r, n_in, generator=g)
    mix = mix_lora_products(a_f, b_f, a_g, b_g, lam, scale_fake=0.5, scale_gen=0.5)
    target = lam * 0.5 * b_f @ a_f + (1 - lam) * 0.5 * b_g @ a_g
    torch.testing.assert_close(0.5 * mix.b @ mix.a, target, rtol=1e-5, atol=1e-6)
    assert mix.relative_error < 1e-5 and mix.a.shape == (r, n_in) and mix.b.shape == (n_out, r)
    # same row space (A_g = A_f): rank <= r whatever the B's, with different scalings
    b_f, b_g = torch.randn(n_out, r, generator=g), torch.randn(n_out, r, generator=g)
    mix = mix_lora_products(a_f, b_f, a_f, b_g, 0.7, scale_fake=2.0, scale_gen=0.25)
    torch.testing.assert_close(2.0 * mix.b @ mix.a, 0.7 * 2.0 * b_f @ a_f + 0.3 * 0.25 * b_g @ a_f)
    assert mix.relative_error < 1e-5


def test_products_truncation_error_is_the_svd_tail_energy():
    g = torch.Generator().manual_seed(1)
    r, n_out, n_in, lam = 3, 14, 11, 0.8
    a_f, a_g = torch.randn(r, n_in, generator=g), torch.randn(r, n_in, generator=g)
    b_f, b_g = torch.randn(n_out, r, generator=g), torch.randn(n_out, r, generator=g)
    mix = mix_lora_products(a_f, b_f, a_g, b_g, lam)
    a_f64, a_g64, b_f64, b_g64 = (t.double() for t in (a_f, a_g, b_f, b_g))
    full = lam * b_f64 @ a_f64 + (1 - lam) * b_g64 @ a_g64
    sv = torch.linalg.svdvals(full)
    assert int((sv > 1e-8 * sv[0]).sum()) == 2 * r  # a full rank-2r mix
    expected = math.sqrt(float(sv[r:].square().sum() / sv.square().sum()))
    assert expected > 1e-3
    assert mix.relative_error == pytest.approx(expected, rel=1e-4)
    u, s, vh = torch.linalg.svd(full)
    best = (u[:, :r] * s[:r]) @ vh[:r]  # Eckart-Young
    torch.testing.assert_close((mix.b @ mix.a).double(), best, rtol=1e-4, atol=1e-5)


def test_products_on_modules_mixes_every_delta_and_reports_the_totals():
    for conv in (False, True):
        base = small_base(rank=2, conv=conv)
        perturb_(LoraRole(base, "generator").parameters(), seed=3, scale=0.5)
        perturb_(LoraRole(base, "fake_score").parameters(), seed=4, scale=0.5)
        df0, dg0 = deltas(base, "fake_score"), deltas(base, "generator")
        g0 = adapter_tensors(base, "generator")
        report = ida_lora_update_(base, 0.97, "products")
        assert report.variant == "products" and report.modules == 2
        df1 = deltas(base, "fake_score")
        tails = totals = 0.0
        for mname, d in df1.items():
            mixed = 0.97 * df0[mname] + 0.03 * dg0[mname]
            sv = torch.linalg.svdvals(mixed)
            tail, total = float(sv[2:].square().sum()), float(sv.square().sum())
            tails, totals = tails + tail, totals + total
            assert report.per_module[mname] == pytest.approx(math.sqrt(tail / total), rel=1e-3, abs=1e-6)
            u, s, vh = torch.linalg.svd(mixed)
            torch.testing.assert_close(d, (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-4, atol=1e-5)
        assert report.relative_error == pytest.approx(math.sqrt(tails / totals), rel=1e-3)
        assert report.max_relative_error == max(report.per_module.values()) > 0
        assert all(torch.equal(v, g0[k]) for k, v in adapter_tensors(base, "generator").items())


def test_products_keeps_the_scale_of_a_when_the_delta_is_small():
    """With B zero the delta is tiny, yet A is not shrunk toward the zero saddle."""
    base = small_base(rank=4)
    perturb_([p for n, p in base.named_parameters() if "lora_B.generator" in n], seed=6, scale=1e-3)
    a_before = {n: p.norm().item() for n, p in base.named_parameters() if "lora_A.fake_score" in n}
    ida_lora_update_(base, 0.97, "products")
    for n, p in base.named_parameters():
        if n in a_before:
            assert p.norm().item() == pytest.approx(a_before[n], rel=0.3)


@pytest.mark.parametrize("variant", ["factors", "products"])
def test_lambda_one_leaves_the_fake_unchanged(variant):
    base = small_base()
    perturb_(LoraRole(base, "generator").parameters(), seed=7)
    perturb_(LoraRole(base, "fake_score").parameters(), seed=8)
    f0, g0 = adapter_tensors(base, "fake_score"), adapter_tensors(base, "generator")
    ida_lora_update_(base, 1.0, variant)
    assert all(torch.equal(v, f0[k]) for k, v in adapter_tensors(base, "fake_score").items())
    ida_lora_update_(base, 0.0, variant)  # λ = 0: the fake becomes the generator (products: its delta)
    assert all(torch.equal(v, g0[k]) for k, v in adapter_tensors(base, "generator").items())
    df, dg = deltas(base, "fake_score"), deltas(base, "generator")
    for k in df:
        torch.testing.assert_close(df[k], dg[k], rtol=1e-5, atol=1e-6)


def test_ida_lora_refuses_what_it_cannot_do():
    base = small_base()
    with pytest.raises(ValueError, match="update_dtype='storage' applies to the factors variant only"):
        ida_lora_update_(base, 0.97, "products", update_dtype="storage")
    with pytest.raises(ValueError, match="variant must be one of"):
        ida_lora_update_(base, 0.97, "deltas")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lam must lie in"):
        ida_lora_update_(base, 1.5, "factors")
    with pytest.raises(ValueError, match="no LoRA adapter named"):
        ida_lora_update_(base, 0.97, "factors", generator="student")
    other = nn.Sequential(nn.Linear(12, 10))
    attach_lora(other, LoraSettings(rank=2, target_modules=("0",)), names=("generator",))
    attach_lora(other, LoraSettings(rank=3, target_modules=("0",)), names=("fake_score",))
    with pytest.raises(ValueError, match="shape mismatch"):
        check_ida_lora_compatible(other)
