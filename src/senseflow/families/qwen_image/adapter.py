"""Qwen-Image: ``QwenImageTransformer2DModel`` on packed latents, a Qwen2.5-VL text encoder, true CFG.

The model space is the unpacked latent [B, C, h, w] as for FLUX; ``predict`` packs 2x2 patches into
tokens (FLUX's order), states the token grid as ``img_shapes`` and passes σ as the timestep, as
``QwenImagePipeline`` does (it divides the scheduler's t by 1000).

Prompts are encoded by the stock pipeline's own ``encode_prompt`` (its chat template, the template
tokens it drops, the last hidden layer), so training conditions the teacher exactly as inference
does. The encodings vary in length: they are stored zero-padded to ``model.max_sequence_length``
(the pipeline's 512 by default) as ``prompt_embeds`` with a 0/1 ``prompt_mask``, so the text cache
and batched CFG see fixed shapes; ``predict`` cuts them to the batch's longest prompt and passes the
mask (None when every token is valid, as the pipeline does).

Guidance is the pipeline's true CFG: the unconditional branch is ``model.negative_prompt`` encoded
(the stock pipeline guides only when one is given; the recipe uses " " as the model card does;
without one, training's CFG falls back to the empty prompt), and
the combined prediction is rescaled per token to the conditional branch's norm over the packed
channels. The VAE is a video autoencoder: raw latents keep its one-frame [B, C, 1, h, w] layout, and
``to_model`` drops the frame axis and applies the per-channel statistics (there is no scaling factor).

The last transformer block's text-stream outputs feed nothing, so those parameters never get a
gradient (the trainer gives them a zero one, so their optimiser state exists for resuming, and DDP
looks for unused parameters: ``has_unused_parameters``).
"""

from __future__ import annotations

import hashlib
from typing import Any

import diffusers
import torch
from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
from torch import Tensor, nn

from senseflow.config.common import AnchorsConfig
from senseflow.config.schema import DistillConfig
from senseflow.devices import to_dtype
from senseflow.families.diffusers_folder import DiffusersAdapter, TeacherFolder
from senseflow.families.flux.adapter import pack, unpack
from senseflow.models.batch import Conditioning
from senseflow.models.schedules import (
    dynamic_shift_mu,
    flow_schedule_from_config,
    parameterisation_and_anchors,
    pipeline_t_grid,
)

DEFAULT_MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline.__call__'s default
PIPELINE_MAX_SEQUENCE_LENGTH = 1024  # QwenImagePipeline.check_inputs refuses longer
# The text-to-image base model's transformer settings that QwenImagePipeline's call relies on; other
# values belong to the edit, layered or guidance-distilled variants (their own pipelines, or none).
BASE_NETWORK_SETTINGS = {
    "guidance_embeds": False,
    "zero_cond_t": False,
    "use_additional_t_cond": False,
    "use_layer3d_rope": False,
}
FRAME_AXIS = 2  # the VAE's [B, C, T, H, W] layout: images are one frame


class QwenImageAdapter(DiffusersAdapter):
    NETWORK = "transformer"
    PIPELINE = "QwenImagePipeline"
    NETWORK_CLASS = QwenImageTransformer2DModel
    TEXT_COMPONENTS = (("tokenizer", "text_encoder"),)
    guidance_kind = "cfg"
    DEFAULT_MAX_SEQUENCE_LENGTH = DEFAULT_MAX_SEQUENCE_LENGTH
    has_unused_parameters = True  # the last block's text-stream outputs (DDP must look for them)

    def __init__(
        self,
        folder: TeacherFolder,
        anchors: AnchorsConfig | None = None,
        resolution: int = 1024,
        max_sequence_length: int | None = None,
        negative_prompt: str | None = None,
        text_dtype: torch.dtype = torch.float32,
    ):
        super().__init__(folder, text_dtype)
        kind = folder.index.get("_class_name") or self.PIPELINE
        if kind != self.PIPELINE and kind.startswith("QwenImage"):  # e.g. QwenImageEditPipeline
            raise ValueError(
                f"model.teacher: {folder.path} is a {kind} folder (another Qwen-Image task, with its own "
                f"components); qwen_image reads {self.PIPELINE} folders of the text-to-image model"
            )
        for key, expected in BASE_NETWORK_SETTINGS.items():
            if self.network_config.get(key, expected) != expected:
                raise ValueError(
                    f"model.teacher: {folder.path}/{self.NETWORK}/config.json has {key}: "
                    f"{self.network_config[key]}, a Qwen-Image variant (edit, layered or guidance-distilled) "
                    f"that {self.PIPELINE} does not run; qwen_image reads the text-to-image model ({key}: "
                    f"{expected})"
                )
        self.max_sequence_length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH
        if self.max_sequence_length > PIPELINE_MAX_SEQUENCE_LENGTH:
            raise ValueError(
                f"model.max_sequence_length: {self.max_sequence_length} is more than the "
                f"{PIPELINE_MAX_SEQUENCE_LENGTH} tokens {self.PIPELINE} accepts"
            )
        self.negative_prompt = negative_prompt
        self.scheduler_config = folder.config("scheduler")
        shift_type = self.scheduler_config.get("time_shift_type", "exponential")
        if self.scheduler_config.get("use_dynamic_shifting", False) and shift_type != "exponential":
            raise ValueError(
                f"model.teacher: {folder.path}/scheduler has time_shift_type '{shift_type}'; the training "
                "schedule implements the exponential shift only"
            )
        self.resolution = resolution
        h, w = self.latent_size(resolution, resolution)
        self.schedule = flow_schedule_from_config(
            self.scheduler_config, (h // 2) * (w // 2), timestep_scale=1.0
        )
        self.param, self.anchors = parameterisation_and_anchors(self.schedule, anchors)

    # ------------------------------------------------------------------ codec (a one-frame video VAE)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae_config["temperal_downsample"])  # as QwenImagePipeline computes it

    @property
    def latent_channels(self) -> int:
        return int(self.network_config["in_channels"]) // 4  # as QwenImagePipeline: 2x2 packing

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae_scale_factor * 2  # whole 2x2 patches, as the pipeline's prepare_latents
        return 2 * (height // f), 2 * (width // f)

    def raw_latent_shape(self, resolution: int) -> tuple[int, ...]:
        return (self.latent_channels, 1, *self.latent_size(resolution, resolution))

    def encode_pixels(self, images: Tensor) -> Tensor:
        """The posterior's mean of the one-frame video: raw latents keep the VAE's [B, C, 1, h, w]."""
        vae = self.vae
        with torch.autocast(self.device.type, enabled=False):
            return vae.encode(images.to(self.device, torch.float32).unsqueeze(FRAME_AXIS)).latent_dist.mode()

    def to_model(self, latents: Tensor) -> Tensor:
        if latents.ndim != 5:
            raise ValueError(
                f"Qwen-Image raw latents are the VAE's one-frame [B, C, 1, h, w], got {tuple(latents.shape)}"
            )
        z = latents.select(FRAME_AXIS, 0)
        mean, std = self._latent_stats(z)
        return (z - mean) / std

    def decode_model(self, x: Tensor) -> Tensor:
        z = x.float()
        mean, std = self._latent_stats(z)
        return self.run_decoder(z * std + mean)

    def _decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z.unsqueeze(FRAME_AXIS), return_dict=False)[0].select(FRAME_AXIS, 0)

    # ------------------------------------------------------------------ text

    def text_settings(self) -> dict[str, Any]:
        """The length, and the stock pipeline's template and dropped tokens (a diffusers release that
        changes them changes the encodings)."""
        bare = QwenImagePipeline(
            scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None
        )
        template = bare.prompt_template_encode.encode("utf-8")
        return {
            "max_sequence_length": self.max_sequence_length,
            "diffusers": diffusers.__version__,  # its encode_prompt decides the encoding (layer, lengths)
            "template_sha256": hashlib.sha256(template).hexdigest()[:16],
            "template_drop": bare.prompt_template_encode_start_idx,
        }

    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        width = int(self.network_config["joint_attention_dim"])
        return {
            "prompt_embeds": (self.max_sequence_length, width),
            "prompt_mask": (self.max_sequence_length,),
        }

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Conditioning:
        """``QwenImagePipeline.encode_prompt``, zero-padded to ``max_sequence_length`` with its mask."""
        pipe = self.stock_text_pipeline()
        embeds, mask = pipe.encode_prompt(
            list(prompts), device=self.device, max_sequence_length=self.max_sequence_length
        )
        if mask is None:  # the pipeline's way of saying every token is valid
            return Conditioning.padded_prompts(list(embeds), self.max_sequence_length)
        valid = [e[m.bool()] for e, m in zip(embeds, mask, strict=True)]
        return Conditioning.padded_prompts(valid, self.max_sequence_length)

    # ------------------------------------------------------------------ the network call and guidance

    def predict(
        self, net: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning, guidance: Tensor | None = None
    ) -> Tensor:
        if guidance is not None:
            raise ValueError("Qwen-Image has no guidance embedding; use method.dmd.guidance_kind 'cfg'")
        if not cond.tensors["prompt_mask"].is_meta:  # the memory planner traces at the full length
            cond = cond.trimmed("prompt_mask", ("prompt_embeds",))
        embeds, mask = cond.tensors["prompt_embeds"], cond.tensors["prompt_mask"]
        if not mask.is_meta and bool(mask.all()):
            mask = None
        h, w = x_t.shape[-2:]
        out = net(
            hidden_states=pack(x_t),
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            timestep=self.param.model_timestep(level).to(x_t.dtype),
            img_shapes=[[(1, h // 2, w // 2)]] * x_t.shape[0],
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    def folder_guidance_kind(self) -> str:
        # QwenImagePipeline runs true CFG only when it is given a negative prompt
        return "cfg" if self.negative_prompt is not None else "none"

    def combine_guidance(self, cond: Tensor, uncond: Tensor, scale: Tensor) -> Tensor:
        """CFG, then each token's prediction rescaled to the conditional one's norm over its packed
        channels (the 2x2 patch's channels), as QwenImagePipeline does."""
        combined = pack(super().combine_guidance(cond, uncond, scale))
        packed = pack(cond)
        ratio = packed.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True)
        return unpack(combined * ratio, *cond.shape[-2:])

    # ------------------------------------------------------------------ the folder's sampler

    def timesteps_kwargs(self, steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        """QwenImagePipeline's arguments: σ = linspace(1, 1/N, N) and μ from the packed token count
        (ignored by a scheduler without dynamic shifting)."""
        mu = dynamic_shift_mu(self.scheduler_config, (latent_shape[-2] // 2) * (latent_shape[-1] // 2))
        return {"sigmas": pipeline_t_grid(steps), "mu": mu}

    def sampling_levels(self, steps: int) -> Tensor:
        """The σ the folder's scheduler walks in N steps at the recipe's resolution (its shift, and
        its stretch to a terminal σ when the config has one), then 0."""
        scheduler = self.load_scheduler()
        shape = (1, *self.sample_shape(self.resolution))
        scheduler.set_timesteps(steps, **self.timesteps_kwargs(steps, shape))
        return scheduler.sigmas.float().cpu()

    # ------------------------------------------------------------------ export

    def student_call_kwargs(self, resolution: int) -> dict[str, Any]:
        """Size, no true CFG (no negative prompt, true_cfg_scale 1), the trained text length; the
        pipeline's guidance_scale is for guidance-distilled models and is left out."""
        kwargs = super().student_call_kwargs(resolution)
        kwargs.pop("guidance_scale", None)
        return {**kwargs, "true_cfg_scale": 1.0}


def build_qwen_image_adapter(cfg: DistillConfig) -> QwenImageAdapter:
    """The registry's builder for ``model.family: qwen_image``."""
    return QwenImageAdapter(
        TeacherFolder.from_recipe(cfg.model),
        cfg.model.anchors,
        cfg.data.resolution,
        cfg.model.max_sequence_length,
        cfg.model.negative_prompt,
        to_dtype(cfg.precision.teacher_dtype, "precision.teacher_dtype"),
    )
