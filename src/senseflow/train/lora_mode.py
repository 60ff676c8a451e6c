"""LoRA mode in the trainer: one frozen base holds the teacher's weights, the generator and the fake
score are two adapters on it (``model.lora``), and IDA mixes the adapters.

The loop sees three networks as in full fine-tuning: :class:`~senseflow.models.lora.LoraRole` views
of the one base (the teacher's with adapters disabled), whose parameters, state dicts and
checkpoints are their adapter's tensors only. The base never changes and is never saved.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from senseflow.config.schema import DistillConfig
from senseflow.method import check_ida_lora_compatible, ida_lora_update_
from senseflow.method.ida_lora import lora_module_pairs
from senseflow.models.adapter import FamilyAdapter, Role
from senseflow.models.build import build_roles
from senseflow.models.lora import LoraRole, LoraSettings, attach_lora
from senseflow.models.lora_checkpoint import enable_lora_gradient_checkpointing

ADAPTERS = ("generator", "fake_score")


def lora_settings(cfg: DistillConfig) -> LoraSettings:
    lora = cfg.model.lora
    if lora is None:
        raise ValueError("model.lora is not set: this run is not in LoRA mode")
    return LoraSettings(
        rank=lora.rank,
        alpha=float(lora.alpha if lora.alpha is not None else lora.rank),
        target_modules=tuple(lora.target_modules),
        init=lora.init,
        dropout=lora.dropout,
        seed=cfg.seed,
    )


def build_lora_roles(
    adapter: FamilyAdapter,
    cfg: DistillConfig,
    teacher_dtype: torch.dtype,
    adapter_dtype: torch.dtype,
    device: torch.device,
    prepare: Callable[[nn.Module, Role], nn.Module] | None = None,
    adapters: tuple[str, ...] = ADAPTERS,
) -> dict[str, nn.Module]:
    """The base built from the teacher's files once (in ``teacher_dtype``), ``adapters`` attached (in
    ``adapter_dtype``), and one view per role: the teacher (no adapter) and each adapter's."""
    base = build_roles(adapter, ("teacher",), teacher_dtype, teacher_dtype, device, prepare=prepare)[
        "teacher"
    ]
    attach_lora(base, lora_settings(cfg), adapters, adapter_dtype=adapter_dtype)
    base.to(device)
    if cfg.parallel.gradient_checkpointing:
        enable_lora_gradient_checkpointing(base)  # recomputes with the adapter of each block's forward
    return {"teacher": LoraRole(base, None), **{name: LoraRole(base, name) for name in adapters}}


class LoraIda:
    """IDA between the two adapters of one base (``model.lora.ida``: products or factors)."""

    def __init__(self, generator: LoraRole, fake: LoraRole, variant: str, lam: float):
        if generator.base is not fake.base:
            raise ValueError("LoRA IDA needs the generator and the fake score on one base")
        self.base, self.variant, self.lam = generator.base, variant, lam
        check_ida_lora_compatible(self.base, fake.adapter, generator.adapter)
        self.fake_name, self.generator_name = fake.adapter, generator.adapter
        if variant == "products":  # the re-factorisation keeps rank r, which needs r <= min(out, in)
            for pair in lora_module_pairs(self.base, self.fake_name, self.generator_name):
                rank, width = pair.a_fake.shape[0], min(pair.a_fake[0].numel(), pair.b_fake.shape[0])
                if rank > width:
                    raise ValueError(
                        f"model.lora.rank {rank} exceeds {pair.module}'s smaller side {width}: the products "
                        "IDA cannot keep that rank; lower the rank or use model.lora.ida factors"
                    )

    def __call__(self) -> dict[str, float]:
        """Apply one update; returns what to log (the products variant's truncation error)."""
        report = ida_lora_update_(
            self.base, self.lam, self.variant, fake=self.fake_name, generator=self.generator_name
        )
        return {"ida_lora_error": report.relative_error} if self.variant == "products" else {}
