"""Adapter for the shapes world's teacher: an SD3 transformer in pixel space with CFG.

It is the SD3 family's calling convention (``hidden_states``, ``encoder_hidden_states``,
``pooled_projections``, ``timestep = σ·1000``) with the identity as autoencoder and the toy text
encoder; generator and fake score are deep copies of the teacher, as SenseFlow initialises both
from the teacher's weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from torch import Tensor, nn

from senseflow.config.schema import AnchorsConfig
from senseflow.core.flow import FlowSchedule
from senseflow.core.parameterisation import FlowParameterisation
from senseflow.core.timesteps import (
    Anchors,
    flow_anchors_from_indices,
    flow_anchors_from_sigmas,
    flow_anchors_from_t,
)
from senseflow.models.adapter import Conditioning, FamilyAdapter, Networks
from senseflow.sampling import CfgConvention
from senseflow.toy.pipeline import load_flow_schedule, resolve_teacher_folder
from senseflow.toy.text import PromptEncoder


def flow_anchors(cfg: AnchorsConfig, schedule: FlowSchedule) -> Anchors:
    """Anchors of a flow teacher from a recipe: pre-shift t, σ, or indices into the flipped table."""
    if cfg.units == "t":
        return flow_anchors_from_t(cfg.values, schedule)
    if cfg.units == "sigma":
        return flow_anchors_from_sigmas(cfg.values, schedule)
    if cfg.units == "index":
        return flow_anchors_from_indices([int(v) for v in cfg.values], schedule)
    raise ValueError(f"model.anchors.units {cfg.units!r} is not a flow unit (t, sigma or index)")


class ToyAdapter(FamilyAdapter):
    guidance_kind = "cfg"

    def __init__(self, teacher: str | Path | None, anchors: AnchorsConfig, cfg_convention: CfgConvention):
        self.folder = resolve_teacher_folder(teacher, what="model.teacher:")
        self.schedule = load_flow_schedule(self.folder)
        self.param = FlowParameterisation(
            self.schedule, grid="sigma" if anchors.units == "sigma" else "table"
        )
        self.anchors = flow_anchors(anchors, self.schedule)
        self.cfg_convention = cfg_convention
        self.encoder = PromptEncoder(self.folder)
        self._null: Conditioning | None = None

    def to(self, device: torch.device) -> ToyAdapter:
        self.encoder.model.to(device)
        self._null = None
        return self

    def _load(self, dtype: torch.dtype) -> nn.Module:
        return SD3Transformer2DModel.from_pretrained(self.folder, subfolder="transformer", torch_dtype=dtype)

    def build_networks(
        self, teacher_dtype: torch.dtype = torch.float32, train_dtype: torch.dtype = torch.float32
    ) -> Networks:
        teacher = self._load(teacher_dtype).eval().requires_grad_(False)
        generator = self._load(train_dtype).train().requires_grad_(True)
        fake_score = self._load(train_dtype).train().requires_grad_(True)
        return Networks(teacher=teacher, generator=generator, fake_score=fake_score)

    def build_generator(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        return self._load(dtype)

    def sample_shape(self, resolution: int) -> tuple[int, ...]:
        return (3, resolution, resolution)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
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
