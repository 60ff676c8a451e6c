"""Implicit Distribution Alignment (spec §5): pull the fake score's weights toward the generator's.

After every generator step, φ ← λφ + (1−λ)θ over matching named parameters keeps the fake score from
lagging behind G. Both networks start from the teacher and must share architecture *and* sharding
plan: the update touches only local shards (FSDP2 ``DTensor.to_local()``), so it needs no communication.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

__all__ = ["check_ida_compatible", "ida_update_"]

UpdateDtype = Literal["storage", "fp32"]


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor parameter (a view of its storage), or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _listing(names: list[str], max_listed: int) -> str:
    shown = ", ".join(names[:max_listed])
    return shown + (f", ... (+{len(names) - max_listed} more)" if len(names) > max_listed else "")


def check_ida_compatible(fake: nn.Module, generator: nn.Module, max_listed: int = 5) -> None:
    """Raise ``ValueError`` unless both modules have the same parameter names and (local) shapes.

    The message lists the first ``max_listed`` offending names per category, so a wrong network
    (e.g. a FLUX fake score that kept the guidance embedding, §11.2) is obvious at start-up.
    """
    f = dict(fake.named_parameters())
    g = dict(generator.named_parameters())
    missing = sorted(g.keys() - f.keys())
    extra = sorted(f.keys() - g.keys())
    mismatched = [
        f"{n} {tuple(_local(f[n]).shape)} vs {tuple(_local(g[n]).shape)}"
        for n in sorted(f.keys() & g.keys())
        if f[n].shape != g[n].shape or _local(f[n]).shape != _local(g[n]).shape
    ]
    problems = []
    if missing:
        problems.append(f"missing from the fake score ({len(missing)}): {_listing(missing, max_listed)}")
    if extra:
        problems.append(f"only in the fake score ({len(extra)}): {_listing(extra, max_listed)}")
    if mismatched:
        problems.append(
            f"shape mismatch, fake vs generator ({len(mismatched)}): {_listing(mismatched, max_listed)}"
        )
    if problems:
        raise ValueError(
            "IDA needs the fake score and the generator to have identical architectures "
            "(same parameter names and shapes, same sharding plan); " + "; ".join(problems)
        )


def ida_update_(fake: nn.Module, generator: nn.Module, lam: float, update_dtype: UpdateDtype) -> None:
    """In place, no grad: ``φ ← λ·φ + (1−λ)·θ`` for every named parameter of ``fake`` (not buffers).

    ``update_dtype="storage"`` computes in the fake's storage dtype (``mul_`` then ``add_``), as the
    official code; with bf16 storage the small (1−λ)(θ−φ) can round away. ``"fp32"`` computes in
    float32 and rounds once when writing back. The fake optimizer state is not touched.
    """
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    if update_dtype not in ("storage", "fp32"):
        raise ValueError(f"update_dtype must be 'storage' or 'fp32', got {update_dtype!r}")
    gen = dict(generator.named_parameters())
    with torch.no_grad():
        for name, p_fake in fake.named_parameters():
            p_gen = gen.get(name)
            if p_gen is None:
                raise ValueError(f"IDA: generator has no parameter {name!r}; see check_ida_compatible")
            phi, theta = _local(p_fake), _local(p_gen)
            if phi.shape != theta.shape:
                raise ValueError(
                    f"IDA: local shapes differ for {name!r}: {tuple(phi.shape)} vs {tuple(theta.shape)}"
                )
            if update_dtype == "fp32":
                phi.copy_(phi.float().mul_(lam).add_(theta.float(), alpha=1.0 - lam))
            else:
                phi.mul_(lam).add_(theta.to(phi.dtype), alpha=1.0 - lam)
