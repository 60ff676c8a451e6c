"""senseflow.method.ida: closed form, buffers, edge λ, bf16 rounding, errors and DTensor shards."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from senseflow.method import check_ida_compatible, ida_update_


class Tiny(nn.Module):
    def __init__(self, width: int = 3, extra: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(width, 4)
        self.norm = nn.BatchNorm1d(4)
        if extra:
            self.guidance = nn.Linear(2, 2)


def _pair(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Tiny, Tiny]:
    torch.manual_seed(seed)
    fake, gen = Tiny().to(dtype), Tiny().to(dtype)
    gen.norm.running_mean.fill_(5.0)
    return fake, gen


def test_closed_form_and_buffers_untouched() -> None:
    fake, gen = _pair()
    before = copy.deepcopy(fake.state_dict())
    ida_update_(fake, gen, 0.97, "storage")
    for name, p in fake.named_parameters():
        expect = 0.97 * before[name] + 0.03 * dict(gen.named_parameters())[name].detach()
        torch.testing.assert_close(p.detach(), expect)
        assert p.requires_grad
    for name, b in fake.named_buffers():
        assert torch.equal(b, before[name])  # running stats / counters are not interpolated
    assert fake.norm.running_mean.abs().max() == 0


@pytest.mark.parametrize("mode", ["storage", "fp32"])
def test_lambda_one_is_noop_and_zero_copies(mode: str) -> None:
    fake, gen = _pair(1)
    before = copy.deepcopy(fake.state_dict())
    ida_update_(fake, gen, 1.0, mode)
    assert all(torch.equal(v, before[k]) for k, v in fake.state_dict().items())
    ida_update_(fake, gen, 0.0, mode)
    for (_, p), (_, q) in zip(fake.named_parameters(), gen.named_parameters(), strict=True):
        assert torch.equal(p, q)


def test_bf16_storage_rounding_vs_fp32_mode() -> None:
    g = torch.Generator().manual_seed(0)
    phi0 = torch.randn(4096, generator=g).bfloat16()
    theta = (phi0.float() + 0.05 * torch.randn(4096, generator=g)).bfloat16()  # θ ≈ φ
    lam = 0.97
    exact = lam * phi0.double() + (1 - lam) * theta.double()
    results = {}
    for mode in ("storage", "fp32"):
        fake, gen = nn.Linear(4096, 1, bias=False).bfloat16(), nn.Linear(4096, 1, bias=False).bfloat16()
        with torch.no_grad():
            fake.weight.copy_(phi0[None])
            gen.weight.copy_(theta[None])
        ida_update_(fake, gen, lam, mode)
        results[mode] = fake.weight.detach()[0]
        assert fake.weight.dtype == torch.bfloat16
    # storage: two bf16 roundings (mul_ then add_); fp32: one rounding of the fp32 result.
    assert torch.equal(results["storage"], phi0.mul(lam).add(theta, alpha=1 - lam))
    assert torch.equal(results["fp32"], (lam * phi0.float() + (1 - lam) * theta.float()).bfloat16())
    assert not torch.equal(results["storage"], results["fp32"])
    err = {k: (v.double() - exact).abs().mean().item() for k, v in results.items()}
    assert err["fp32"] < err["storage"]


def test_incompatible_modules_raise_clear_error() -> None:
    fake, gen = Tiny(width=3, extra=True), Tiny(width=5)
    with pytest.raises(ValueError, match="identical architectures") as info:
        check_ida_compatible(fake, gen)
    msg = str(info.value)
    assert "only in the fake score (2): guidance.bias, guidance.weight" in msg
    assert "shape mismatch" in msg and "lin.weight (4, 3) vs (4, 5)" in msg
    with pytest.raises(ValueError, match="missing from the fake score"):
        check_ida_compatible(Tiny(), Tiny(extra=True))
    check_ida_compatible(Tiny(), Tiny())  # same architecture passes
    with pytest.raises(ValueError, match="generator has no parameter"):
        ida_update_(Tiny(extra=True), Tiny(), 0.5, "storage")
    with pytest.raises(ValueError, match="local shapes differ"):
        ida_update_(Tiny(width=3), Tiny(width=5), 0.5, "storage")
    with pytest.raises(ValueError, match="lam must lie"):
        ida_update_(Tiny(), Tiny(), 1.5, "storage")
    with pytest.raises(ValueError, match="update_dtype"):
        ida_update_(Tiny(), Tiny(), 0.5, "fp16")  # type: ignore[arg-type]


def test_listing_is_truncated() -> None:
    fake = nn.Sequential(*[nn.Linear(1, 1) for _ in range(6)])
    with pytest.raises(ValueError, match=r"\(12\): .*\(\+7 more\)"):
        check_ida_compatible(fake, nn.Sequential())


def test_fsdp2_sharded_parameters_update_local_shards() -> None:
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        fake, gen = nn.Linear(3, 4), nn.Linear(3, 4)
        expect = {
            n: 0.9 * p.detach().clone() + 0.1 * dict(gen.named_parameters())[n].detach()
            for n, p in fake.named_parameters()
        }
        fully_shard(fake, mesh=mesh)
        fully_shard(gen, mesh=mesh)
        assert isinstance(fake.weight, DTensor)
        check_ida_compatible(fake, gen)
        ida_update_(fake, gen, 0.9, "fp32")
        for name, p in fake.named_parameters():
            torch.testing.assert_close(p.to_local().detach(), expect[name])
        x = torch.randn(2, 3)
        torch.testing.assert_close(fake(x), x @ expect["weight"].T + expect["bias"])
    finally:
        dist.destroy_process_group()
