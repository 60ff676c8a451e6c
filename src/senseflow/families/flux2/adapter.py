"""FLUX.2: ``Flux2Transformer2DModel`` on 2x2 patches of ``AutoencoderKLFlux2`` latents.

Two families share this code: ``flux2`` (``Flux2Pipeline``, FLUX.2-dev: Mistral 3 text encoder and a
guidance embedding) and ``flux2_klein`` (``Flux2KleinPipeline``, FLUX.2 klein base: Qwen3 text encoder
and CFG against the empty prompt).

The model space is the pipelines' own ``latents=`` input: the VAE latent cut into 2x2 patches and
normalised by the VAE's batch-norm running statistics, [B, 4C, H/2f, W/2f] for a VAE downsampling by
f. ``predict`` flattens the patch grid into tokens with 4-D position ids (t, h, w, l) and gives the
text tokens (0, 0, 0, l), as the pipelines do. Prompts are encoded by the stock pipeline's own
``encode_prompt`` (its chat template, system message and stack of hidden layers), padded to
``model.max_sequence_length`` and passed without a mask, as the pipelines pass them.

The folder's scheduler gets the pipelines' σ grid linspace(1, 1/N, N) and their μ, which diffusers'
``compute_empirical_mu`` computes from the token count and the step count N. Training needs one
schedule: the pipeline's for as many steps as the student has anchors at the recipe's resolution, so
anchors given in t (linspace(1, 1/K, K)) are exactly the stock pipeline's own K-step walk there.
"""

from __future__ import annotations

from typing import Any

import diffusers
import torch
from diffusers import Flux2Pipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from safetensors import safe_open
from torch import Tensor, nn

from senseflow.config.common import AnchorsConfig
from senseflow.config.schema import DistillConfig
from senseflow.core.flow import FlowSchedule
from senseflow.devices import to_dtype
from senseflow.families.diffusers_folder import DiffusersAdapter, GuidanceFreeStudent, TeacherFolder
from senseflow.models.batch import Conditioning
from senseflow.models.schedules import (
    flow_schedule_from_config,
    parameterisation_and_anchors,
    pipeline_t_grid,
)

DEFAULT_MAX_SEQUENCE_LENGTH = 512  # the max_sequence_length default of both pipelines' encode_prompt
DEFAULT_STEPS = 50  # both pipelines' num_inference_steps default (the training μ without anchors)
NUM_TRAIN_TIMESTEPS = 1000  # FlowMatchEulerDiscreteScheduler's default
VAE_BATCH_NORM_EPS = 1e-4  # AutoencoderKLFlux2's default batch_norm_eps
GUIDANCE_EMBEDDER = "time_guidance_embed.guidance_embedder."
BN_MEAN, BN_VAR = "bn.running_mean", "bn.running_var"  # the VAE's latent statistics (buffers)
# The base models to distil instead of a step-distilled klein (their hub ids).
KLEIN_BASE_MODELS = "black-forest-labs/FLUX.2-klein-base-4B or black-forest-labs/FLUX.2-klein-base-9B"

PIPELINE_FAMILIES = {"Flux2Pipeline": "flux2", "Flux2KleinPipeline": "flux2_klein"}

# The pipelines' layout helpers (static methods, the same in both pipelines)
patchify = Flux2Pipeline._patchify_latents  # [B, C, H, W] -> [B, 4C, H/2, W/2]
unpatchify = Flux2Pipeline._unpatchify_latents
pack = Flux2Pipeline._pack_latents  # [B, C, h, w] -> [B, h*w, C], row-major tokens


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """The exact inverse of :func:`pack` for a grid of height ``h`` and width ``w``."""
    b, _, c = tokens.shape
    return tokens.transpose(1, 2).reshape(b, c, h, w)


class Flux2FamilyAdapter(DiffusersAdapter):
    """What FLUX.2-dev and klein share: codec, network call, schedule and prompt encoding."""

    NETWORK = "transformer"
    NETWORK_CLASS = Flux2Transformer2DModel
    TEXT_COMPONENTS = (("tokenizer", "text_encoder"),)
    DEFAULT_MAX_SEQUENCE_LENGTH = DEFAULT_MAX_SEQUENCE_LENGTH

    def __init__(
        self,
        folder: TeacherFolder,
        anchors: AnchorsConfig | None = None,
        resolution: int = 1024,
        max_sequence_length: int | None = None,
        text_dtype: torch.dtype = torch.float32,
    ):
        super().__init__(folder, text_dtype)
        kind = folder.index.get("_class_name")
        if kind in PIPELINE_FAMILIES and kind != self.PIPELINE:
            raise ValueError(
                f"model.teacher: {folder.path} is a {kind} folder, which model.family "
                f"'{PIPELINE_FAMILIES[kind]}' reads; this family reads {self.PIPELINE} folders"
            )
        self.scheduler_config = folder.config("scheduler")
        self.resolution = resolution
        self.max_sequence_length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH
        h, w = self.latent_size(resolution, resolution)
        if self.scheduler_config.get("use_dynamic_shifting", False):
            steps = len(anchors.values) if anchors is not None else DEFAULT_STEPS
            mu = compute_empirical_mu(h * w, steps)
            num_train = int(self.scheduler_config.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS))
            self.schedule = FlowSchedule(num_train_timesteps=num_train, mu=mu, timestep_scale=1.0)
        else:  # a static shift: the scheduler ignores the pipeline's μ
            self.schedule = flow_schedule_from_config(self.scheduler_config, timestep_scale=1.0)
        self.param, self.anchors = parameterisation_and_anchors(self.schedule, anchors)
        self._bn: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------ codec

    @property
    def latent_channels(self) -> int:
        """Channels of the model space: the 2x2 patches of the VAE latent."""
        return int(self.network_config["in_channels"])

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae_scale_factor * 2  # whole 2x2 patches, as the pipelines round
        return height // f, width // f

    def raw_latent_shape(self, resolution: int) -> tuple[int, ...]:
        """The VAE latent before its 2x2 patches: [C, H/f, W/f]."""
        h, w = self.latent_size(resolution, resolution)
        return int(self.vae_config["latent_channels"]), 2 * h, 2 * w

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE's batch-norm mean and std (√(var + eps)), read from its weight file, not the VAE."""
        if self._bn is None:
            found: dict[str, Tensor] = {}
            for path in self.folder.weight_files("vae"):
                with safe_open(str(path), "pt") as f:
                    names = set(f.keys())
                    found.update({k: f.get_tensor(k).float() for k in (BN_MEAN, BN_VAR) if k in names})
            if len(found) != 2:
                raise ValueError(
                    f"model.teacher: {self.folder.path / 'vae'} has no {BN_MEAN} / {BN_VAR}; an "
                    "AutoencoderKLFlux2 keeps its latent statistics there"
                )
            eps = float(self.vae_config.get("batch_norm_eps", VAE_BATCH_NORM_EPS))
            self._bn = found[BN_MEAN], torch.sqrt(found[BN_VAR] + eps)
        mean, std = (t.to(like.device, like.dtype).view(1, -1, 1, 1) for t in self._bn)
        return mean, std

    def to_model(self, latents: Tensor) -> Tensor:
        z = patchify(latents)
        mean, std = self._stats(z)
        return (z - mean) / std

    def decode_model(self, x: Tensor) -> Tensor:
        mean, std = self._stats(x.float())
        return self.run_decoder(unpatchify(x.float() * std + mean))

    # ------------------------------------------------------------------ conditioning

    def text_settings(self) -> dict[str, Any]:
        # the stock encode_prompt decides the encodings: its version is part of their identity
        return {"max_sequence_length": self.max_sequence_length, "diffusers": diffusers.__version__}

    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"prompt_embeds": (self.max_sequence_length, int(self.network_config["joint_attention_dim"]))}

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Conditioning:
        pipe = self.stock_text_pipeline()
        embeds, _ = pipe.encode_prompt(
            list(prompts), device=self.device, max_sequence_length=self.max_sequence_length
        )
        return Conditioning({"prompt_embeds": embeds})

    # ------------------------------------------------------------------ the network call

    def guidance_input(self, net: nn.Module, guidance: Tensor | None, x_t: Tensor) -> Tensor | None:
        """The network's ``guidance`` argument (families with a guidance embedding override this)."""
        if guidance is not None:
            raise ValueError(f"{self.PIPELINE} guides by CFG; use method.dmd.guidance_kind 'cfg'")
        return None

    def predict(
        self, net: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning, guidance: Tensor | None = None
    ) -> Tensor:
        g = self.guidance_input(net, guidance, x_t)
        h, w = x_t.shape[-2:]
        embeds = cond.tensors["prompt_embeds"]
        img_ids = Flux2Pipeline._prepare_latent_ids(x_t[:1])[0].to(x_t.device)
        txt_ids = Flux2Pipeline._prepare_text_ids(embeds[:1])[0].to(x_t.device)
        out = net(
            hidden_states=pack(x_t),
            encoder_hidden_states=embeds,
            timestep=self.param.model_timestep(level).to(x_t.dtype),
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=g,
            return_dict=False,
        )[0]
        return unpack(out, h, w)

    # ------------------------------------------------------------------ the folder's sampler

    def timesteps_kwargs(self, steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        """What both pipelines pass to ``set_timesteps``: their σ grid (unless the scheduler uses flow
        sigmas) and μ for the token count and the step count."""
        sigmas = pipeline_t_grid(steps)
        if self.scheduler_config.get("use_flow_sigmas", False):
            sigmas = None
        mu = compute_empirical_mu(image_seq_len=latent_shape[-2] * latent_shape[-1], num_steps=steps)
        return {"sigmas": sigmas, "mu": mu}

    def sampling_levels(self, steps: int) -> Tensor:
        """The folder's scheduler's σ for an N-step call at the recipe's resolution, then 0."""
        scheduler = self.load_scheduler()
        scheduler.set_timesteps(steps, **self.timesteps_kwargs(steps, self.sample_shape(self.resolution)))
        return scheduler.sigmas.float()


class Flux2Adapter(GuidanceFreeStudent, Flux2FamilyAdapter):
    """FLUX.2-dev: the teacher keeps its guidance embedding; the generator and fake score are built
    without it (``guidance_embeds=False``, its weights dropped and named in ``dropped_keys``)."""

    GUIDANCE_EMBEDDER = GUIDANCE_EMBEDDER
    GUIDANCE_DEFAULT = True  # the transformer class's default

    PIPELINE = "Flux2Pipeline"
    guidance_kind = "embedding"

    def __init__(self, folder: TeacherFolder, *args: Any, uncond: str = "folder", **kwargs: Any):
        super().__init__(folder, *args, **kwargs)
        self.zero_uncond = uncond == "zeros"  # CFG only (a recipe's choice); the pipeline has none
        self.dropped_keys: list[str] = []
        # LoRA mode: the generator and fake score share the teacher's guidance embedder and pass this
        # constant (model.lora.student_guidance); None in full fine-tuning, where they have none.
        self.student_guidance: float | None = None

    def guidance_input(self, net: nn.Module, guidance: Tensor | None, x_t: Tensor) -> Tensor | None:
        has_guidance = bool(getattr(net.config, "guidance_embeds", False))
        if has_guidance and guidance is None and self.student_guidance is not None:
            guidance = torch.full((x_t.shape[0],), self.student_guidance)
        if has_guidance and guidance is None:
            raise ValueError(
                "this FLUX.2 network has a guidance embedding and needs a guidance value "
                "(method.dmd.guidance_kind 'embedding')"
            )
        if not has_guidance and guidance is not None:
            raise ValueError(
                "this FLUX.2 network has no guidance embedding; use method.dmd.guidance_kind 'cfg'"
            )
        return None if guidance is None else guidance.to(x_t.device, torch.float32)

    def student_call_kwargs(self, resolution: int) -> dict[str, Any]:
        """A LoRA student keeps the teacher's guidance embedder and ran it on ``student_guidance``: the
        stock call passes that value. FLUX.2's time and guidance embedders have no bias to fold the
        constant into (FLUX.1's export does that), so the exported network keeps the embedder."""
        kwargs = super().student_call_kwargs(resolution)
        if self.student_guidance is not None:
            kwargs["guidance_scale"] = self.student_guidance
        return kwargs


class Flux2KleinAdapter(Flux2FamilyAdapter):
    """FLUX.2 klein base: no guidance embedding, CFG against the encoded empty prompt."""

    PIPELINE = "Flux2KleinPipeline"
    guidance_kind = "cfg"

    def __init__(self, folder: TeacherFolder, *args: Any, allow_distilled: bool = False, **kwargs: Any):
        super().__init__(folder, *args, **kwargs)
        self.distilled = bool(folder.pipeline_flag("is_distilled", False))
        self.check_not_distilled(allow_distilled, KLEIN_BASE_MODELS, self.distilled)

    def folder_guidance_kind(self) -> str:
        return "none" if self.distilled else "cfg"  # the pipeline skips CFG for distilled folders


def _common(cfg: DistillConfig) -> tuple[TeacherFolder, tuple[Any, ...], dict[str, Any]]:
    args = (cfg.model.anchors, cfg.data.resolution, cfg.model.max_sequence_length)
    dtype = to_dtype(cfg.precision.teacher_dtype, "precision.teacher_dtype")
    return TeacherFolder.from_recipe(cfg.model), args, {"text_dtype": dtype}


def build_flux2_adapter(cfg: DistillConfig) -> Flux2Adapter:
    """The registry's builder for ``model.family: flux2``."""
    folder, args, kwargs = _common(cfg)
    adapter = Flux2Adapter(folder, *args, uncond=cfg.model.uncond, **kwargs)
    if cfg.model.lora is not None:
        adapter.student_guidance = cfg.model.lora.student_guidance
    return adapter


def build_flux2_klein_adapter(cfg: DistillConfig) -> Flux2KleinAdapter:
    """The registry's builder for ``model.family: flux2_klein``."""
    folder, args, kwargs = _common(cfg)
    return Flux2KleinAdapter(folder, *args, allow_distilled=cfg.model.allow_distilled_teacher, **kwargs)
