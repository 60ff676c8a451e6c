"""SD 3.5 (Large and Medium): ``SD3Transformer2DModel``, rectified flow on the folder's shifted schedule.

The conditioning is what ``StableDiffusion3Pipeline.encode_prompt`` builds: the two CLIP encoders'
penultimate hidden states concatenated, zero-padded to the T5 width and followed by the T5 tokens
(``model.max_sequence_length``, the pipeline's 256 by default; zeros when the folder has no T5),
and the two CLIP projections concatenated as the pooled vector. CFG's unconditional branch is the
encoded empty prompt, as the pipeline does without a negative prompt. The network sees σ·1000.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from torch import Tensor, nn

from senseflow.config.common import AnchorsConfig
from senseflow.config.schema import DistillConfig
from senseflow.devices import to_dtype
from senseflow.families.diffusers_folder import CLIP_MAX_LENGTH, DiffusersAdapter, TeacherFolder
from senseflow.families.sd3.single_file import sd3_original_state_dict
from senseflow.models.batch import Conditioning
from senseflow.models.schedules import (
    dynamic_shift_mu,
    flow_schedule_from_config,
    parameterisation_and_anchors,
)

DEFAULT_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default
SD3_MAX_SHIFT = 1.16  # the SD3 pipeline's fallback max_shift for dynamic shifting


class SD3Adapter(DiffusersAdapter):
    NETWORK = "transformer"
    PIPELINE = "StableDiffusion3Pipeline"
    NETWORK_CLASS = SD3Transformer2DModel
    TEXT_COMPONENTS = (
        ("tokenizer", "text_encoder"),
        ("tokenizer_2", "text_encoder_2"),
        ("tokenizer_3", "text_encoder_3"),
    )
    guidance_kind = "cfg"
    DEFAULT_MAX_SEQUENCE_LENGTH = DEFAULT_MAX_SEQUENCE_LENGTH
    SINGLE_FILE_COMPONENTS = ("transformer",)

    def __init__(
        self,
        folder: TeacherFolder,
        anchors: AnchorsConfig | None = None,
        resolution: int = 1024,
        max_sequence_length: int | None = None,
        uncond: Literal["folder", "zeros", "empty_prompt"] = "folder",
        text_dtype: torch.dtype = torch.float32,
    ):
        super().__init__(folder, text_dtype)
        self.scheduler_config = folder.config("scheduler")
        side = resolution // self.vae_scale_factor // self.patch_size
        self.schedule = flow_schedule_from_config(self.scheduler_config, side * side, timestep_scale=1000.0)
        self.param, self.anchors = parameterisation_and_anchors(self.schedule, anchors)
        self.max_sequence_length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH
        self.zero_uncond = uncond == "zeros"

    @property
    def patch_size(self) -> int:
        return int(self.network_config.get("patch_size", 2))

    def text_settings(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length, "clip_layer": "penultimate"}

    def _tokens(self, name: str, prompts: list[str], length: int) -> Tensor:
        tokenizer = self.text[name]
        return tokenizer(
            prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)

    @torch.no_grad()
    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        cfg = self.network_config
        length = self.folder.token_length("tokenizer", CLIP_MAX_LENGTH) + self.max_sequence_length
        return {
            "prompt_embeds": (length, int(cfg["joint_attention_dim"])),
            "pooled": (int(cfg["pooled_projection_dim"]),),
        }

    def encode_text(self, prompts: list[str]) -> Conditioning:
        text = self.text
        clip_length = text["tokenizer"].model_max_length if "tokenizer" in text else CLIP_MAX_LENGTH
        hidden, pooled = [], []
        for tokenizer_name, encoder_name in self.TEXT_COMPONENTS[:2]:
            out = text[encoder_name](
                self._tokens(tokenizer_name, prompts, clip_length), output_hidden_states=True
            )
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        clip = torch.cat(hidden, dim=-1)
        if "text_encoder_3" in text:
            t5 = text["text_encoder_3"](self._tokens("tokenizer_3", prompts, self.max_sequence_length))[0]
        else:
            width = int(self.network_config["joint_attention_dim"])
            t5 = clip.new_zeros(len(prompts), self.max_sequence_length, width)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Conditioning(
            {
                "prompt_embeds": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
                "pooled": torch.cat(pooled, dim=-1),
            }
        )

    def predict(
        self, net: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning, guidance: Tensor | None = None
    ) -> Tensor:
        if guidance is not None:
            raise ValueError("SD 3.5 has no guidance embedding; use method.dmd.guidance_kind 'cfg'")
        return net(
            hidden_states=x_t,
            encoder_hidden_states=cond.tensors["prompt_embeds"],
            pooled_projections=cond.tensors["pooled"],
            timestep=self.param.model_timestep(level),
            return_dict=False,
        )[0]

    def single_file_state_dict(self, states: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        """The transformer in Stability AI's layout (``model.diffusion_model.`` keys)."""
        return sd3_original_state_dict(states["transformer"], self.network_config)

    def sampling_levels(self, steps: int) -> Tensor:
        return self.schedule.inference_sigmas(steps)

    def timesteps_kwargs(self, steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        cfg = self.scheduler_config
        if not cfg.get("use_dynamic_shifting", False):
            return {}
        seq_len = (latent_shape[-2] // self.patch_size) * (latent_shape[-1] // self.patch_size)
        mu = dynamic_shift_mu(cfg, seq_len, max_shift=SD3_MAX_SHIFT)
        return {"mu": mu}


def build_sd3_adapter(cfg: DistillConfig) -> SD3Adapter:
    """The registry's builder for ``model.family: sd3``."""
    return SD3Adapter(
        TeacherFolder.from_recipe(cfg.model),
        cfg.model.anchors,
        cfg.data.resolution,
        cfg.model.max_sequence_length,
        cfg.model.uncond,
        to_dtype(cfg.precision.teacher_dtype, "precision.teacher_dtype"),
    )
