"""IDA (spec §5) when the generator and the fake score are two LoRA adapters on one frozen base.

Full-weight IDA is φ ← λ·φ + (1−λ)·θ on every parameter (:func:`senseflow.method.ida.ida_update_`).
With LoRA, the network of a role is W + ΔW with ΔW = s·B·A per adapted module (A: r × in, B: out × r,
s = alpha / r for peft's default scaling), and two variants are offered:

* ``factors``: the same interpolation on A and B separately (cheap; what full-weight IDA does to
  the adapter's parameters). It does **not** interpolate the deltas: with A' = λA_f + (1−λ)A_g and
  B' = λB_f + (1−λ)B_g (equal scalings),

      B'A' − [λB_fA_f + (1−λ)B_gA_g] = −λ(1−λ)·(B_f − B_g)(A_f − A_g),

  second order in how far apart the two adapters are.
* ``products``: the exact interpolation of the deltas, ΔW_f ← λΔW_f + (1−λ)ΔW_g, re-factorised to
  the fake adapter's rank r by a truncated SVD. The mix has rank ≤ 2r in general, so the result is
  exact only when the mixed delta has rank ≤ r; otherwise it is the best rank-r approximation
  (Eckart-Young) and the discarded part is reported as a relative Frobenius norm,
  ‖M − M_r‖_F / ‖M‖_F = sqrt(Σ_{i>r} σ_i²) / sqrt(Σ_i σ_i²), per module and over all modules.
  The SVD of the out × in mix is taken through its factors (two thin QRs and the SVD of a 2r × 2r
  core), so the cost is O((out + in)·r²) per module, never an out × in matrix.

  Re-factorising needs a choice of gauge (any invertible G gives B'G⁻¹·GA' the same product). Here
  A' = c·Q·Vᵀ_r, with Vᵀ_r the mix's top-r right singular vectors, Q the rotation and c the scale
  that bring A' closest to the fake's old A (orthogonal Procrustes), and B' = U_r·Σ_r·Qᵀ / (c·s).
  A keeps the size it was initialised with and B takes the singular values. (A balanced split,
  B' = U_r·Σ_r^½, A' = Σ_r^½·Vᵀ_r, would shrink both factors toward 0 while the delta is small:
  the saddle at which LoRA's gradients vanish.)

Both variants act in place on the fake adapter only; the generator adapter is never written. Both
adapters are found by parameter name in one module (the base holding them), as peft names them:
``<module>.lora_A.<adapter>.weight`` and ``<module>.lora_B.<adapter>.weight``; no import of the
models layer or of peft is needed. λ = 1 leaves the fake adapter exactly as it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from senseflow.method.ida import UpdateDtype, _local

__all__ = [
    "IDA_LORA_VARIANTS",
    "IdaLoraVariant",
    "LoraIdaReport",
    "LoraMix",
    "LoraPair",
    "check_ida_lora_compatible",
    "ida_lora_update_",
    "lora_module_pairs",
    "mix_lora_products",
]

IdaLoraVariant = Literal["factors", "products"]
IDA_LORA_VARIANTS: tuple[str, ...] = ("factors", "products")


@dataclass(frozen=True)
class LoraMix:
    """A rank-r factorisation ``b @ a`` of a mixed delta (divided by the fake's scaling), and the
    squared Frobenius norms of the discarded tail and of the whole mix."""

    a: Tensor
    b: Tensor
    tail_sq: float
    total_sq: float

    @property
    def relative_error(self) -> float:
        """‖M − M_r‖_F / ‖M‖_F (0 for a zero mix)."""
        return math.sqrt(self.tail_sq / self.total_sq) if self.total_sq > 0 else 0.0


@dataclass(frozen=True)
class LoraIdaReport:
    """What one LoRA IDA update did: the variant, how many adapted modules it touched, and the
    truncation error of ``products`` (0 for ``factors``): ``relative_error`` over all modules together
    (sqrt of summed tail energies over sqrt of summed mix energies), ``max_relative_error`` and
    ``worst_module`` for the worst single module, and ``per_module`` errors."""

    variant: str
    modules: int
    relative_error: float = 0.0
    max_relative_error: float = 0.0
    worst_module: str | None = None
    per_module: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class LoraPair:
    """One adapted module: both adapters' A and B (live parameters) and their scalings."""

    module: str
    a_fake: nn.Parameter
    b_fake: nn.Parameter
    a_gen: nn.Parameter
    b_gen: nn.Parameter
    scale_fake: float
    scale_gen: float


def _procrustes_scale_rotation(target: Tensor) -> tuple[Tensor, float]:
    """For ``target`` = A_old·V (r × r): the rotation Q and scale c minimising ‖c·Q·Vᵀ − A_old‖_F."""
    x, sigma, yh = torch.linalg.svd(target)
    return x @ yh, float(sigma.sum()) / target.shape[0]


def mix_lora_products(
    a_fake: Tensor,
    b_fake: Tensor,
    a_gen: Tensor,
    b_gen: Tensor,
    lam: float,
    scale_fake: float = 1.0,
    scale_gen: float = 1.0,
) -> LoraMix:
    """The rank-r factors (r = the fake's rank) of M = λ·s_f·B_f·A_f + (1−λ)·s_g·B_g·A_g, in float32.

    ``a_*``: r × in, ``b_*``: out × r (2-D). Returns ``a`` (r × in) and ``b`` (out × r) with
    s_f·b·a = M_r, the best rank-r approximation of M (equal to M when rank M ≤ r), A's gauge as in
    the module docstring, and the SVD tail and total energies of M.
    """
    r, n_in = a_fake.shape
    n_out = b_fake.shape[0]
    if b_fake.shape != (n_out, r) or a_gen.shape[1] != n_in or b_gen.shape != (n_out, a_gen.shape[0]):
        raise ValueError(
            f"LoRA factor shapes do not fit: A_f {tuple(a_fake.shape)}, B_f {tuple(b_fake.shape)}, "
            f"A_g {tuple(a_gen.shape)}, B_g {tuple(b_gen.shape)}"
        )
    if r > min(n_out, n_in):
        raise ValueError(f"products IDA needs rank {r} <= min(out, in) = {min(n_out, n_in)}")
    if scale_fake <= 0:
        raise ValueError(f"the fake adapter's scaling must be positive, got {scale_fake}")
    f32 = torch.float32
    a_f, b_f, a_g, b_g = (t.detach().to(f32) for t in (a_fake, b_fake, a_gen, b_gen))
    left = torch.cat([b_f * (lam * scale_fake), b_g * ((1.0 - lam) * scale_gen)], dim=1)  # out × 2r
    right = torch.cat([a_f, a_g], dim=0)  # 2r × in
    q_left, r_left = torch.linalg.qr(left)  # out × k, k × 2r
    q_right, r_right = torch.linalg.qr(right.T)  # in × k', k' × 2r
    u_core, sigma, vh_core = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
    u = q_left @ u_core[:, :r]  # out × r
    vh = vh_core[:r] @ q_right.T  # r × in
    s_r = sigma[:r]
    total_sq = float(sigma.square().sum())
    tail_sq = float(sigma[r:].square().sum())
    rotation, scale = _procrustes_scale_rotation(a_f @ vh.T)
    if not scale > 1e-12:  # the old A has no component in the new row space (or is zero)
        rotation = torch.eye(r, dtype=f32, device=a_f.device)
        scale = float(a_f.norm()) / math.sqrt(r) or 1.0
    a_new = scale * (rotation @ vh)
    b_new = (u * s_r) @ rotation.T / (scale * scale_fake)
    return LoraMix(a_new, b_new, tail_sq, total_sq)


def _is_adapter_component(parts: list[str], i: int, name: str) -> bool:
    return parts[i] == name and parts[i - 1].startswith("lora_")


def _adapter_params(base: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Parameters of adapter ``name``: a name component equal to ``name`` right after a ``lora_*`` one."""
    out = {}
    for pname, p in base.named_parameters():
        parts = pname.split(".")
        if any(_is_adapter_component(parts, i, name) for i in range(1, len(parts))):
            out[pname] = p
    return out


def _counterpart(pname: str, fake: str, generator: str) -> str:
    parts = pname.split(".")
    return ".".join(
        generator if i > 0 and _is_adapter_component(parts, i, fake) else part for i, part in enumerate(parts)
    )


def check_ida_lora_compatible(
    base: nn.Module, fake: str = "fake_score", generator: str = "generator", max_listed: int = 5
) -> None:
    """Raise ``ValueError`` unless adapters ``fake`` and ``generator`` of ``base`` exist and have the
    same parameter names (up to the adapter name) and shapes."""
    if fake == generator:
        raise ValueError(f"IDA needs two different adapters, got {fake!r} twice")
    f = _adapter_params(base, fake)
    g = _adapter_params(base, generator)
    if not f or not g:
        absent = [n for n, ps in ((fake, f), (generator, g)) if not ps]
        raise ValueError(f"LoRA IDA: {type(base).__name__} has no LoRA adapter named {absent}")
    mapped = {_counterpart(n, fake, generator): n for n in f}
    missing = sorted(g.keys() - mapped.keys())
    extra = sorted(mapped[n] for n in mapped.keys() - g.keys())
    mismatched = [
        f"{mapped[n]} {tuple(f[mapped[n]].shape)} vs {tuple(g[n].shape)}"
        for n in sorted(mapped.keys() & g.keys())
        if f[mapped[n]].shape != g[n].shape
    ]
    problems = [
        f"{what} ({len(items)}): {', '.join(items[:max_listed])}{' ...' if len(items) > max_listed else ''}"
        for what, items in (
            ("only in the generator adapter", missing),
            ("only in the fake adapter", extra),
            ("shape mismatch, fake vs generator", mismatched),
        )
        if items
    ]
    if problems:
        raise ValueError(
            f"LoRA IDA needs adapters {fake!r} and {generator!r} on the same modules with the same "
            "ranks; " + "; ".join(problems)
        )


def lora_module_pairs(
    base: nn.Module, fake: str = "fake_score", generator: str = "generator"
) -> list[LoraPair]:
    """Per adapted module: both adapters' A and B and their scalings (``module.scaling[name]``, 1
    when the module has none). Raises if the fake adapter has tensors other than A and B (DoRA
    magnitudes, embedding adapters, LoRA biases), which the products variant cannot mix."""
    check_ida_lora_compatible(base, fake, generator)
    pairs: list[LoraPair] = []
    covered: set[str] = set()
    for mname, module in base.named_modules():
        lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict) or not isinstance(lora_b, nn.ModuleDict):
            continue
        if fake not in lora_a or fake not in lora_b:
            continue
        scaling = getattr(module, "scaling", {})
        pairs.append(
            LoraPair(
                mname,
                lora_a[fake].weight,
                lora_b[fake].weight,
                lora_a[generator].weight,
                lora_b[generator].weight,
                float(scaling.get(fake, 1.0)),
                float(scaling.get(generator, 1.0)),
            )
        )
        prefix = f"{mname}." if mname else ""
        covered.update({f"{prefix}lora_A.{fake}.weight", f"{prefix}lora_B.{fake}.weight"})
    others = sorted(_adapter_params(base, fake).keys() - covered)
    if others:
        raise ValueError(
            f"products IDA mixes only LoRA A and B; adapter {fake!r} also has "
            f"{', '.join(others[:5])}{' ...' if len(others) > 5 else ''}"
        )
    return pairs


def _as_matrix_a(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1)  # conv A (r, in, kh, kw) -> r × (in·kh·kw)


def _as_matrix_b(t: Tensor) -> Tensor:
    if t.dim() > 2 and any(s != 1 for s in t.shape[2:]):
        raise ValueError(f"products IDA needs a 1x1 LoRA B, got shape {tuple(t.shape)}")
    return t.reshape(t.shape[0], t.shape[1])  # conv B (out, r, 1, 1) -> out × r


def _check_lam(lam: float, variant: str, update_dtype: str) -> None:
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    if variant not in IDA_LORA_VARIANTS:
        raise ValueError(f"variant must be one of {IDA_LORA_VARIANTS}, got {variant!r}")
    if update_dtype not in ("storage", "fp32"):
        raise ValueError(f"update_dtype must be 'storage' or 'fp32', got {update_dtype!r}")
    if variant == "products" and update_dtype != "fp32":
        raise ValueError(
            "products IDA computes in float32 (an SVD) and rounds once on writing back; "
            "update_dtype='storage' applies to the factors variant only"
        )


def ida_lora_update_(
    base: nn.Module,
    lam: float,
    variant: IdaLoraVariant,
    *,
    fake: str = "fake_score",
    generator: str = "generator",
    update_dtype: UpdateDtype = "fp32",
) -> LoraIdaReport:
    """In place, no grad: pull adapter ``fake`` of ``base`` toward adapter ``generator`` (§5).

    ``factors``: φ ← λφ + (1−λ)θ on every tensor of the fake adapter, with ``update_dtype`` as in
    :func:`~senseflow.method.ida.ida_update_` (``storage``: in the storage dtype; ``fp32``: in float32,
    rounded once). ``products``: ΔW_f ← λΔW_f + (1−λ)ΔW_g per module, re-factorised at the fake's
    rank (see the module docstring); always computed in float32 (``update_dtype`` must be ``fp32``),
    needs whole (unsharded) factors, and reports the truncation error. The generator adapter and the
    optimiser states are not touched. λ = 1 returns without writing anything.
    """
    _check_lam(lam, variant, update_dtype)
    if variant == "factors":
        check_ida_lora_compatible(base, fake, generator)
        params = dict(base.named_parameters())
        fakes = _adapter_params(base, fake)
        modules = sum(1 for n in fakes if f".lora_A.{fake}." in f".{n}")
        if lam == 1.0:
            return LoraIdaReport("factors", modules)
        with torch.no_grad():
            for name, p_fake in fakes.items():
                phi, theta = _local(p_fake), _local(params[_counterpart(name, fake, generator)])
                if update_dtype == "fp32":
                    phi.copy_(phi.float().mul_(lam).add_(theta.float(), alpha=1.0 - lam))
                else:
                    phi.mul_(lam).add_(theta.to(phi.dtype), alpha=1.0 - lam)
        return LoraIdaReport("factors", modules)

    pairs = lora_module_pairs(base, fake, generator)
    if lam == 1.0:
        return LoraIdaReport("products", len(pairs))
    per_module: dict[str, float] = {}
    tail_total = mix_total = 0.0
    with torch.no_grad():
        for pair in pairs:
            tensors = (pair.a_fake, pair.b_fake, pair.a_gen, pair.b_gen)
            if any(_local(t) is not t for t in tensors):
                raise ValueError(
                    f"products IDA needs whole LoRA factors; {pair.module} holds sharded ones (DTensor)"
                )
            mix = mix_lora_products(
                _as_matrix_a(pair.a_fake),
                _as_matrix_b(pair.b_fake),
                _as_matrix_a(pair.a_gen),
                _as_matrix_b(pair.b_gen),
                lam,
                pair.scale_fake,
                pair.scale_gen,
            )
            pair.a_fake.copy_(mix.a.reshape(pair.a_fake.shape))
            pair.b_fake.copy_(mix.b.reshape(pair.b_fake.shape))
            per_module[pair.module] = mix.relative_error
            tail_total += mix.tail_sq
            mix_total += mix.total_sq
    worst = max(per_module, key=per_module.__getitem__) if per_module else None
    return LoraIdaReport(
        "products",
        len(pairs),
        relative_error=math.sqrt(tail_total / mix_total) if mix_total > 0 else 0.0,
        max_relative_error=per_module[worst] if worst is not None else 0.0,
        worst_module=worst,
        per_module=per_module,
    )
