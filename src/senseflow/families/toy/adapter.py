"""Adapter for the shapes world's teacher: an SD3 transformer in pixel space with CFG.

It is the SD3 family's calling convention (``hidden_states``, ``encoder_hidden_states``,
``pooled_projections``, ``timestep = σ·1000``) with the identity as codec and the toy text
encoder. Every role is an ``SD3Transformer2DModel`` with the teacher's config; generator and fake
score start from the teacher's weights, as SenseFlow initialises both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusers import SD3Transformer2DModel
from torch import Tensor, nn

from senseflow.config.common import AnchorsConfig
from senseflow.config.schema import DistillConfig
from senseflow.core.sampling import CfgConvention
from senseflow.families.toy.folder import resolve_teacher_folder
from senseflow.families.toy.text import PromptEncoder
from senseflow.models.adapter import FamilyAdapter, Role
from senseflow.models.batch import Conditioning
from senseflow.models.build import safetensors_files
from senseflow.models.schedules import load_flow_schedule, parameterisation_and_anchors
from senseflow.models.text_cache import files_identity


class ToyAdapter(FamilyAdapter):
    guidance_kind = "cfg"

    def __init__(
        self,
        teacher: str | Path | None,
        anchors: AnchorsConfig | None = None,
        cfg_convention: CfgConvention = "uncond_plus",
    ):
        self.folder = resolve_teacher_folder(teacher, what="model.teacher:")
        self.schedule = load_flow_schedule(self.folder)
        self.param, self.anchors = parameterisation_and_anchors(self.schedule, anchors)
        self.cfg_convention = cfg_convention
        self._encoder: PromptEncoder | None = None  # loaded on first use; a text-cache run never loads it
        self._device = None
        self._config = dict(SD3Transformer2DModel.load_config(self.folder, subfolder="transformer"))
        self._null: Conditioning | None = None

    @property
    def encoder(self) -> PromptEncoder:
        if self._encoder is None:
            self._encoder = PromptEncoder(self.folder)
            if self._device is not None:
                self._encoder.model.to(self._device)
        return self._encoder

    def to(self, device) -> ToyAdapter:
        self._device = device
        if self._encoder is not None:
            self._encoder.model.to(device)
        if self.text_cache is not None:
            self.text_cache.to(device)
        self._null = None
        return self

    def network_spec(self, role: Role) -> tuple[type[nn.Module], dict[str, Any]]:
        return SD3Transformer2DModel, self._config

    def weight_files(self) -> list[Path]:
        return safetensors_files(self.folder / "transformer")

    def sample_shape(self, resolution: int) -> tuple[int, ...]:
        return (int(self._config["in_channels"]), resolution, resolution)

    def sampling_levels(self, steps: int) -> Tensor:
        return self.schedule.inference_sigmas(steps)

    def text_identity(self) -> dict[str, Any]:
        return {"family": "toy", "files": files_identity(self.folder, ("text_encoder", "tokenizer"))}

    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        cfg = self._config
        text = json.loads((self.folder / "text_encoder" / "config.json").read_text())
        return {
            "tokens": (int(text["max_position_embeddings"]), int(cfg["joint_attention_dim"])),
            "pooled": (int(cfg["pooled_projection_dim"]),),
        }

    def encode_text(self, prompts: list[str]) -> Conditioning:
        tokens, pooled = self.encoder(prompts)
        return Conditioning({"tokens": tokens, "pooled": pooled})

    def null_conditioning(self, n: int) -> Conditioning:
        if self._null is None:
            self._null = self.encode_prompts([""])
        return Conditioning({k: v.expand(n, *v.shape[1:]) for k, v in self._null.tensors.items()})

    def predict(
        self, net: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning, guidance: Tensor | None = None
    ) -> Tensor:
        if guidance is not None:
            raise ValueError("the toy teacher has no guidance embedding; use guidance_kind 'cfg'")
        return net(
            hidden_states=x_t,
            encoder_hidden_states=cond.tensors["tokens"],
            pooled_projections=cond.tensors["pooled"],
            timestep=self.param.model_timestep(level),
            return_dict=False,
        )[0]


def build_toy_adapter(cfg: DistillConfig) -> ToyAdapter:
    """The registry's builder for ``model.family: toy``."""
    return ToyAdapter(cfg.model.teacher, cfg.model.anchors, cfg.model.cfg_convention)
