"""``model.lora``: LoRA mode's recipe section (project)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from senseflow.config.common import PositiveFloat, PositiveInt, UnitInterval, _Section

__all__ = ["LORA_TARGET_MODULES", "LoraConfig"]

LORA_TARGET_MODULES = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
]


class LoraConfig(_Section):
    """LoRA mode (project): the teacher's weights are held once, in a frozen base; the generator and
    the fake score are two LoRA adapters on it and the teacher is the base with adapters disabled."""

    rank: PositiveInt = Field(default=64, description="Rank r of both adapters (>= 1) (project default).")
    alpha: PositiveFloat | None = Field(
        default=None,
        description="LoRA alpha (> 0); the delta is (alpha / r)·B·A. null: alpha = rank (project default).",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_TARGET_MODULES),
        min_length=1,
        description=(
            "Module names the adapters wrap, matched as peft matches them (a full name or its last parts): "
            "the attention projections of the UNet's, SD3's and FLUX's blocks by default."
        ),
    )
    init: Literal["default", "gaussian", "orthogonal"] = Field(
        default="default",
        description=(
            "Adapter initialisation, B·A = 0 at the start (both roles start as the teacher): default "
            "(peft's: A as nn.Linear, B zero), gaussian (A normal, B zero), orthogonal (even rank)."
        ),
    )
    dropout: UnitInterval = Field(default=0.0, description="LoRA dropout on the adapters' input, in [0, 1).")
    ida: Literal["products", "factors"] = Field(
        default="products",
        description=(
            "IDA between the adapters: products mixes the deltas B·A exactly and re-factorises them at "
            "rank r (truncation error logged as ida_lora_error); factors mixes A and B separately "
            "(cheaper, not the mix of the products). docs/results/lora_ida.md measures both."
        ),
    )
    student_guidance: PositiveFloat = Field(
        default=1.0,
        description=(
            "Teachers with a guidance input (FLUX.1-dev's embedding): the value the generator and fake score "
            "pass, since in LoRA mode they share the teacher's guidance embedder (1: unguided) (project)."
        ),
    )
