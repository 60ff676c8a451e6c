"""The student's denoiser as plain diffusers weights, and as a LoRA on the teacher.

* :func:`student_network`: one ordinary diffusers network holding the student: the generator of a
  full fine-tune, or, in LoRA mode, the teacher's network with the generator's adapter merged.
* :func:`lora_factors`: the generator's adapter of a LoRA-mode run as (down, up) pairs with peft's
  ``alpha / rank`` scaling folded into ``up``, so a loader that assumes ``alpha = rank`` (diffusers
  without adapter metadata, ComfyUI without ``.alpha``) reproduces the student exactly.
* :func:`extract_lora`: a full fine-tune's change of every target linear layer, truncated to rank r
  by SVD (ΔW ≈ up @ down), with the relative error of the truncation and the share of the change
  that lies outside the LoRA's layers (biases, norms, other layers), which a LoRA cannot carry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from senseflow.models.build import TeacherWeights
from senseflow.models.lora import LoraRole, lora_layers, matching_modules

LoraFactors = dict[str, tuple[Tensor, Tensor]]  # module name -> (down [r, in], up [out, r])


def _adapted(base: nn.Module, adapter: str | None) -> list[tuple[str, nn.Module]]:
    """The (name, layer) pairs of ``base`` that carry ``adapter``."""
    layers = {id(m) for m in lora_layers(base)}
    return [
        (name, m)
        for name, m in base.named_modules()
        if id(m) in layers and adapter is not None and adapter in getattr(m, "lora_A", {})
    ]


def _merged_state(role: LoraRole) -> dict[str, Tensor]:
    """The base's own tensors (peft's ``base_layer`` renamed away) plus the role's adapter delta."""
    base = role.base
    deltas: dict[str, Tensor] = {}
    for name, module in _adapted(base, role.adapter):
        deltas[f"{name}.weight"] = module.get_delta_weight(role.adapter)
    state: dict[str, Tensor] = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key or ".lora_magnitude_vector" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        state[plain] = value.detach().clone()
        if plain in deltas:
            state[plain] = (value.float() + deltas[plain].float()).to(value.dtype)
    return state


def student_network(generator: nn.Module) -> nn.Module:
    """The student as a plain diffusers network (a LoRA-mode generator merged into a copy of its base)."""
    if not isinstance(generator, LoraRole):
        return generator
    base = generator.base
    plain = type(base).from_config(base.config)
    plain.load_state_dict(_merged_state(generator), strict=True)
    return plain.to(generator.storage_dtype).eval().requires_grad_(False)


def lora_factors(generator: LoraRole) -> LoraFactors:
    """The generator adapter's (down, up) per module, peft's scaling folded into ``up``."""
    out: LoraFactors = {}
    for name, module in _adapted(generator.base, generator.adapter):
        down = module.lora_A[generator.adapter].weight.detach().float()
        up = module.lora_B[generator.adapter].weight.detach().float() * module.scaling[generator.adapter]
        out[name] = (down.contiguous(), up.contiguous())
    if not out:
        raise ValueError(f"the generator has no LoRA adapter {generator.adapter!r} on any layer")
    return out


def peft_state_dict(factors: LoraFactors, dtype: torch.dtype) -> dict[str, Tensor]:
    """``factors`` in peft's key layout (``<module>.lora_A.weight`` / ``.lora_B.weight``)."""
    state = {}
    for name, (down, up) in factors.items():
        state[f"{name}.lora_A.weight"] = down.to(dtype).contiguous()
        state[f"{name}.lora_B.weight"] = up.to(dtype).contiguous()
    return state


@dataclass(frozen=True)
class Extraction:
    """A LoRA extracted from a full fine-tune, and how much of the change it carries."""

    factors: LoraFactors
    rank: int
    relative_error: float  # ||ΔW - up @ down|| / ||ΔW|| over the LoRA's layers
    outside_share: float  # ||Δ of every other tensor|| / ||Δ of all tensors||
    outside_tensors: list[str]  # the other tensors that changed
    unmatched: list[str]  # student tensors absent from the teacher (e.g. none) or of another shape


def extract_lora(
    student: nn.Module, teacher: TeacherWeights, rank: int, target_modules: Sequence[str]
) -> Extraction:
    """SVD of (student - teacher) for each linear layer ``target_modules`` selects, truncated to ``rank``."""
    if rank < 1:
        raise ValueError(f"--rank must be a positive integer, got {rank}")
    names = set(teacher.names())
    state = {k: v.detach() for k, v in student.state_dict().items()}
    targets = [
        n
        for n in matching_modules(student, target_modules)
        if isinstance(student.get_submodule(n), nn.Linear)
    ]
    if not targets:
        raise ValueError(f"no linear layer of {type(student).__name__} matches {list(target_modules)}")
    factors: LoraFactors = {}
    err2 = total2 = 0.0
    for name in targets:
        key = f"{name}.weight"
        delta = state[key].float() - teacher.read(key).float()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.numel())
        up, down = u[:, :r] * s[:r], vh[:r]
        factors[name] = (down.contiguous(), up.contiguous())
        err2 += float((delta - up @ down).square().sum())
        total2 += float(delta.square().sum())
    in_lora = {f"{n}.weight" for n in targets}
    outside2, outside, unmatched = 0.0, [], []
    for key, value in state.items():
        if key in in_lora:
            continue
        if key not in names or tuple(teacher.read(key).shape) != tuple(value.shape):
            unmatched.append(key)
            continue
        change = float((value.float() - teacher.read(key).float()).square().sum())
        if change > 0:
            outside.append(key)
            outside2 += change
    return Extraction(
        factors,
        rank,
        relative_error=(err2 / total2) ** 0.5 if total2 > 0 else 0.0,
        outside_share=(outside2 / (outside2 + total2)) ** 0.5 if outside2 + total2 > 0 else 0.0,
        outside_tensors=outside,
        unmatched=unmatched,
    )


def factors_delta(factors: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """Each module's weight change ``up @ down`` (for checks and reports)."""
    return {f"{name}.weight": up @ down for name, (down, up) in factors.items()}
