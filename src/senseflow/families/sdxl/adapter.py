"""SDXL: ``UNet2DConditionModel``, ε (or v) prediction on the folder's DDPM schedule, two CLIP encoders.

The conditioning is what ``StableDiffusionXLPipeline.encode_prompt`` builds: both encoders'
penultimate hidden states concatenated, and the pooled (projected) output of the second. The UNet's
micro-conditioning ``time_ids`` are (original size, crop top-left, target size) of the image the
latent decodes to, as the pipeline sets them by default. CFG's unconditional branch is zeros when
the folder's ``force_zeros_for_empty_prompt`` is set (SDXL base), else the encoded empty prompt;
``model.uncond`` can force either.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor, nn

from senseflow.config.common import AnchorsConfig
from senseflow.config.schema import DistillConfig
from senseflow.devices import to_dtype
from senseflow.families.diffusers_folder import CLIP_MAX_LENGTH, DiffusersAdapter, TeacherFolder
from senseflow.families.sdxl.single_file import sdxl_checkpoint_state_dict, sdxl_kohya_lora_state_dict
from senseflow.models.batch import Conditioning
from senseflow.models.schedules import load_ddpm_schedule, parameterisation_and_anchors


class SDXLAdapter(DiffusersAdapter):
    NETWORK = "unet"
    PIPELINE = "StableDiffusionXLPipeline"
    NETWORK_CLASS = UNet2DConditionModel
    TEXT_COMPONENTS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    guidance_kind = "cfg"
    SINGLE_FILE_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")

    def __init__(
        self,
        folder: TeacherFolder,
        anchors: AnchorsConfig | None = None,
        uncond: Literal["folder", "zeros", "empty_prompt"] = "folder",
        text_dtype: torch.dtype = torch.float32,
    ):
        super().__init__(folder, text_dtype)
        self.schedule = load_ddpm_schedule(folder.path)
        self.param, self.anchors = parameterisation_and_anchors(self.schedule, anchors)
        folder_zeros = bool(folder.pipeline_flag("force_zeros_for_empty_prompt", True))
        self.zero_uncond = uncond == "zeros" or (uncond == "folder" and folder_zeros)

    def text_settings(self) -> dict[str, Any]:
        return {"layer": "penultimate"}

    @torch.no_grad()
    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        cfg = self.network_config
        pooled = int(cfg["projection_class_embeddings_input_dim"]) - 6 * int(cfg["addition_time_embed_dim"])
        length = self.folder.token_length("tokenizer", CLIP_MAX_LENGTH)
        return {"prompt_embeds": (length, int(cfg["cross_attention_dim"])), "pooled": (pooled,)}

    def encode_text(self, prompts: list[str]) -> Conditioning:
        text, hidden, pooled = self.text, [], None
        for tokenizer_name, encoder_name in self.TEXT_COMPONENTS:
            if encoder_name not in text:
                continue
            tokenizer = text[tokenizer_name]
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            out = text[encoder_name](ids, output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the projected output of CLIPTextModelWithProjection
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        if pooled is None:
            raise ValueError(f"teacher folder {self.folder.path}: no text encoder gives a pooled projection")
        return Conditioning({"prompt_embeds": torch.cat(hidden, dim=-1), "pooled": pooled})

    def predict(
        self, net: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning, guidance: Tensor | None = None
    ) -> Tensor:
        if guidance is not None:
            raise ValueError("SDXL has no guidance embedding; use method.dmd.guidance_kind 'cfg'")
        embeds = cond.tensors["prompt_embeds"]
        height, width = (side * self.vae_scale_factor for side in x_t.shape[-2:])
        time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=embeds.dtype, device=x_t.device)
        return net(
            x_t,
            self.param.model_timestep(level),
            encoder_hidden_states=embeds,
            added_cond_kwargs={
                "text_embeds": cond.tensors["pooled"],
                "time_ids": time_ids.expand(len(x_t), 6),
            },
            return_dict=False,
        )[0]

    def single_file_state_dict(self, states: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        """The whole SDXL checkpoint in Stability AI's layout (UNet, VAE, CLIP-L, OpenCLIP bigG)."""
        folder = self.folder
        return sdxl_checkpoint_state_dict(
            states["unet"],
            self.network_config,
            states.get("vae"),
            self.vae_config if "vae" in states else None,
            states.get("text_encoder"),
            states.get("text_encoder_2"),
            folder.config("text_encoder_2") if "text_encoder_2" in states else None,
        )

    def kohya_lora_state_dict(self, peft_state: dict[str, Tensor]) -> dict[str, Tensor]:
        """``lora_unet_<diffusers module path>`` keys with down / up / alpha (= rank: scale 1)."""
        return sdxl_kohya_lora_state_dict(peft_state)

    def sampling_levels(self, steps: int) -> Tensor:
        """The folder's scheduler timesteps (its spacing and offset), then the clean level."""
        scheduler = self.load_scheduler()
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps.round().long()
        return torch.cat([timesteps, self.param.clean_level(1)])


def build_sdxl_adapter(cfg: DistillConfig) -> SDXLAdapter:
    """The registry's builder for ``model.family: sdxl``."""
    return SDXLAdapter(
        TeacherFolder.from_recipe(cfg.model),
        cfg.model.anchors,
        cfg.model.uncond,
        to_dtype(cfg.precision.teacher_dtype, "precision.teacher_dtype"),
    )
