"""FLUX.1-dev: ``FluxTransformer2DModel`` on packed latents, a guidance embedding instead of CFG.

The model space is the unpacked latent [B, C, h, w], like every family's, so the method's maths and
augmentations see images; ``predict`` packs 2x2 patches into tokens, builds ``img_ids`` (row and
column of each token) and zero ``txt_ids`` as ``FluxPipeline`` does, and unpacks the output. The
network sees σ in [0, 1]; the schedule's shift μ follows the number of image tokens when the folder's
scheduler uses dynamic shifting. The conditioning is the pipeline's: CLIP's pooled output and T5's
last hidden states (``model.max_sequence_length``, 512 by default).

The teacher keeps its guidance embedding; the generator and the fake score are built from the same
config with ``guidance_embeds=False`` and the teacher's weights minus the guidance embedder's, each
dropped key recorded by name (``dropped_keys``) and logged.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from torch import Tensor, nn

from senseflow.config.common import AnchorsConfig
from senseflow.config.schema import DistillConfig
from senseflow.devices import to_dtype
from senseflow.families.diffusers_folder import DiffusersAdapter, GuidanceFreeStudent, TeacherFolder
from senseflow.families.flux.single_file import flux_kohya_lora_state_dict, flux_original_state_dict
from senseflow.models.batch import Conditioning
from senseflow.models.schedules import (
    dynamic_shift_mu,
    flow_schedule_from_config,
    parameterisation_and_anchors,
    pipeline_t_grid,
)

DEFAULT_MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default
GUIDANCE_EMBEDDER = "time_text_embed.guidance_embedder."


def pack(x: Tensor) -> Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: 2x2 patches as tokens, in FluxPipeline's order."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """The exact inverse of :func:`pack` for a latent of height ``h`` and width ``w``."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Each token's (0, row, column) for a latent of height ``h`` and width ``w``."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxAdapter(GuidanceFreeStudent, DiffusersAdapter):
    GUIDANCE_EMBEDDER = GUIDANCE_EMBEDDER
    GUIDANCE_DEFAULT = False  # the transformer class's default
    NETWORK = "transformer"
    PIPELINE = "FluxPipeline"
    NETWORK_CLASS = FluxTransformer2DModel
    TEXT_COMPONENTS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    guidance_kind = "embedding"
    DEFAULT_MAX_SEQUENCE_LENGTH = DEFAULT_MAX_SEQUENCE_LENGTH
    SINGLE_FILE_COMPONENTS = ("transformer",)

    def __init__(
        self,
        folder: TeacherFolder,
        anchors: AnchorsConfig | None = None,
        resolution: int = 1024,
        max_sequence_length: int | None = None,
        uncond: str = "folder",
        text_dtype: torch.dtype = torch.float32,
    ):
        super().__init__(folder, text_dtype)
        self.zero_uncond = uncond == "zeros"  # CFG (guidance_kind cfg) only; the pipeline's is ""
        self.scheduler_config = folder.config("scheduler")
        side = resolution // self.vae_scale_factor // 2
        self.schedule = flow_schedule_from_config(self.scheduler_config, side * side, timestep_scale=1.0)
        self.param, self.anchors = parameterisation_and_anchors(self.schedule, anchors)
        self.max_sequence_length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH
        self.dropped_keys: list[str] = []
        # LoRA mode: the generator and fake score share the teacher's guidance embedder and pass this
        # constant (model.lora.student_guidance); None in full fine-tuning, where they have none.
        self.student_guidance: float | None = None

    @property
    def latent_channels(self) -> int:
        return int(self.network_config["in_channels"]) // 4

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae_scale_factor * 2  # whole 2x2 patches
        return 2 * (height // f), 2 * (width // f)

    def text_settings(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}

    def _tokens(self, name: str, prompts: list[str], length: int) -> Tensor:
        return self.text[name](
            prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        ).input_ids.to(self.device)

    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        cfg = self.network_config
        return {
            "prompt_embeds": (self.max_sequence_length, int(cfg["joint_attention_dim"])),
            "pooled": (int(cfg["pooled_projection_dim"]),),
        }

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Conditioning:
        text = self.text
        clip_length = text["tokenizer"].model_max_length
        pooled = text["text_encoder"](self._tokens("tokenizer", prompts, clip_length)).pooler_output
        t5 = text["text_encoder_2"](self._tokens("tokenizer_2", prompts, self.max_sequence_length))[0]
        return Conditioning({"prompt_embeds": t5, "pooled": pooled.to(t5.dtype)})

    def predict(
        self, net: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning, guidance: Tensor | None = None
    ) -> Tensor:
        has_guidance = bool(getattr(net.config, "guidance_embeds", False))
        if has_guidance and guidance is None and self.student_guidance is not None:
            guidance = torch.full((x_t.shape[0],), self.student_guidance, device=x_t.device)
        if has_guidance and guidance is None:
            raise ValueError(
                "this FLUX network has a guidance embedding and needs a guidance value "
                "(method.dmd.guidance_kind 'embedding')"
            )
        if not has_guidance and guidance is not None:
            raise ValueError(
                "this FLUX network has no guidance embedding; use method.dmd.guidance_kind 'cfg'"
            )
        h, w = x_t.shape[-2:]
        embeds = cond.tensors["prompt_embeds"]
        out = net(
            hidden_states=pack(x_t),
            encoder_hidden_states=embeds,
            pooled_projections=cond.tensors["pooled"],
            timestep=self.param.model_timestep(level).to(x_t.dtype),
            img_ids=image_ids(h, w, x_t.device, x_t.dtype),
            txt_ids=torch.zeros(embeds.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
            guidance=None if guidance is None else guidance.float(),
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    # ------------------------------------------------------------------ export

    def student_call_kwargs(self, resolution: int) -> dict[str, Any]:
        kwargs = super().student_call_kwargs(resolution)
        if self.student_guidance is not None:  # a LoRA student on the teacher's guidance embedding
            kwargs["guidance_scale"] = self.student_guidance
        return kwargs

    @torch.no_grad()
    def export_network(self, net: nn.Module) -> nn.Module:
        """A LoRA-mode student runs the teacher's guidance embedder on a constant: its output is a
        constant vector added to the time embedding, folded here into the time embedder's last bias,
        so the exported network has no guidance input (``guidance_embeds=False``) like a fully
        fine-tuned student, and the stock pipeline's guidance_scale cannot change it."""
        if not getattr(net.config, "guidance_embeds", False) or self.student_guidance is None:
            return net
        embed = net.time_text_embed
        # as FluxTransformer2DModel's forward: the guidance in the network's dtype, times 1000, then
        # the sinusoidal projection (so a bf16 network folds the value it ran with)
        g = torch.full((1,), float(self.student_guidance), device=net.device, dtype=net.dtype) * 1000
        constant = embed.guidance_embedder(embed.time_proj(g).to(net.dtype))
        config = {**net.config, "guidance_embeds": False}
        plain = type(net).from_config({k: v for k, v in config.items() if not k.startswith("_")})
        state = {k: v for k, v in net.state_dict().items() if not k.startswith(GUIDANCE_EMBEDDER)}
        bias = "time_text_embed.timestep_embedder.linear_2.bias"
        state[bias] = (state[bias].float() + constant[0].float()).to(state[bias].dtype)
        plain.load_state_dict(state, strict=True)
        return plain.to(net.dtype).eval().requires_grad_(False)

    def single_file_state_dict(self, states: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        """The transformer in Black Forest Labs' layout (``guidance_in`` only if it has the embedder)."""
        return flux_original_state_dict(states["transformer"], self.network_config)

    def kohya_lora_state_dict(self, peft_state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Fused q/k/v and MLP-input LoRAs in BFL names, exact (rank ``3r`` on a fused layer)."""
        return flux_kohya_lora_state_dict(peft_state)

    def sampling_levels(self, steps: int) -> Tensor:
        """FluxPipeline's σ: t = linspace(1, 1/N, N), shifted, then 0."""
        return self.schedule.inference_sigmas(steps, t_values=pipeline_t_grid(steps))

    def timesteps_kwargs(self, steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        cfg = self.scheduler_config
        mu = dynamic_shift_mu(cfg, (latent_shape[-2] // 2) * (latent_shape[-1] // 2))
        sigmas = None if cfg.get("use_flow_sigmas", False) else pipeline_t_grid(steps)
        return {"sigmas": sigmas, "mu": mu}


def build_flux_adapter(cfg: DistillConfig) -> FluxAdapter:
    """The registry's builder for ``model.family: flux``."""
    adapter = FluxAdapter(
        TeacherFolder.from_recipe(cfg.model),
        cfg.model.anchors,
        cfg.data.resolution,
        cfg.model.max_sequence_length,
        cfg.model.uncond,
        to_dtype(cfg.precision.teacher_dtype, "precision.teacher_dtype"),
    )
    if cfg.model.lora is not None:
        adapter.student_guidance = cfg.model.lora.student_guidance
    return adapter
