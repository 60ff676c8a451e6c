"""Z-Image: ``ZImageTransformer2DModel``, a single-stream DiT, with a Qwen3 text encoder and CFG.

Prompts are encoded by ``ZImagePipeline.encode_prompt`` itself (its chat template and hidden layer),
which returns each prompt's valid tokens, a list of variable-length embeddings. They are stored padded
to ``model.max_sequence_length`` (the pipeline's 512 by default) as ``prompt_embeds`` with a 0/1
``prompt_mask``, so the text cache and batching see fixed shapes; ``predict`` hands the network the
list of valid tokens again. The network takes a list of latents with a frame axis ([C, 1, h, w]), is
told 1 − σ (the pipeline's ``(1000 − t) / 1000``) and predicts the negated velocity; ``predict``
negates it back, so the rest of senseflow sees the usual flow-matching prediction.

Sampling follows the pipeline: its own σ grid (``get_default_z_image_sigmas``) and μ
(``calculate_shift``, used when the scheduler shifts dynamically). CFG is the pipeline's
``pos + w (pos − neg)`` with its defaults, ``cfg_normalization`` off and ``cfg_truncation`` 1.0 (which
never truncates: the normalised time stays below 1); recipes have no field for either. In senseflow's
``uncond_plus`` convention that is guidance ``w + 1``, and the unconditional branch is
``model.negative_prompt`` encoded ("" as in the pipeline). Z-Image-Turbo, the distilled model, is
refused unless ``model.allow_distilled_teacher`` (:func:`turbo_signals` says how it is recognised).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import diffusers
import torch
import yaml
from diffusers import ZImageTransformer2DModel
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas
from torch import Tensor, nn

from senseflow.config.common import AnchorsConfig
from senseflow.config.schema import DistillConfig
from senseflow.devices import to_dtype
from senseflow.families.diffusers_folder import DiffusersAdapter, TeacherFolder
from senseflow.models.adapter import FeatureTap
from senseflow.models.batch import Conditioning
from senseflow.models.schedules import flow_schedule_from_config, parameterisation_and_anchors

DEFAULT_MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline's default max_sequence_length
PIPELINE_PATCH = 2  # ZImagePipeline counts image tokens (for μ) in 2x2 latent patches
NO_CFG = 0.0  # ZImagePipeline runs CFG only for guidance_scale > 0
# calculate_shift's arguments by the scheduler config keys the pipeline reads them from (the
# pipeline's fallbacks for absent keys are calculate_shift's own defaults)
SHIFT_KEYS = {
    "base_image_seq_len": "base_seq_len",
    "max_image_seq_len": "max_seq_len",
    "base_shift": "base_shift",
    "max_shift": "max_shift",
}

BASE_MODEL = "Tongyi-MAI/Z-Image"  # the undistilled foundation model (hub id)
TURBO_NAME = "z-image-turbo"  # Tongyi-MAI/Z-Image-Turbo, its distilled 8-step model, lower-cased
# [reported] Z-Image-Turbo's scheduler: static shift 3.0; Z-Image's: static shift 6.0. Transformer,
# text encoder and VAE configs are the same for both, so the scheduler is the folder's only tell.
TURBO_SHIFT = 3.0


def _card_base_models(folder: TeacherFolder) -> list[str]:
    """The ``base_model`` entries of the folder's model card front matter (README.md), if any."""
    card = folder.path / "README.md"
    if not card.is_file():
        return []
    text = card.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return []
    try:
        meta = yaml.safe_load(text.split("---", 2)[1])
    except yaml.YAMLError:
        return []
    value = meta.get("base_model") if isinstance(meta, dict) else None
    values = value if isinstance(value, list) else [value]
    return [str(v) for v in values if v]


def turbo_signals(teacher: str, folder: TeacherFolder) -> list[str]:
    """Why a folder looks like Z-Image-Turbo (or a model made from it); empty when nothing does: the
    hub id or path names it (a hub cache path holds the id), the model card names it as base_model, or
    the scheduler is Turbo's static shift 3 (the only config value in which the two folders differ)."""
    signals = []
    if TURBO_NAME in teacher.lower() or TURBO_NAME in str(folder.path).lower():
        signals.append("the hub id or path names Z-Image-Turbo")
    if any(TURBO_NAME in v.lower() for v in _card_base_models(folder)):
        signals.append("README.md names Z-Image-Turbo as base_model")
    scheduler = folder.config("scheduler")
    if not scheduler.get("use_dynamic_shifting", False) and scheduler.get("shift") == TURBO_SHIFT:
        signals.append(f"the scheduler's static shift {TURBO_SHIFT} is Z-Image-Turbo's (Z-Image's is 6)")
    return signals


class ZImageAdapter(DiffusersAdapter):
    NETWORK = "transformer"
    PIPELINE = "ZImagePipeline"
    NETWORK_CLASS = ZImageTransformer2DModel
    TEXT_COMPONENTS = (("tokenizer", "text_encoder"),)
    guidance_kind = "cfg"
    DEFAULT_MAX_SEQUENCE_LENGTH = DEFAULT_MAX_SEQUENCE_LENGTH
    # the single-stream blocks, and the refiners that run on the image and the caption tokens first
    SHARD_UNIT_ATTRIBUTES = ("noise_refiner", "context_refiner", "layers")

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
        self.scheduler_config = folder.config("scheduler")
        side = resolution // self.vae_scale_factor // PIPELINE_PATCH
        self.schedule = flow_schedule_from_config(self.scheduler_config, side * side)
        self.param, self.anchors = parameterisation_and_anchors(self.schedule, anchors)
        self.max_sequence_length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH
        self.negative_prompt = negative_prompt

    @property
    def latent_channels(self) -> int:
        return int(self.network_config["in_channels"])

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        f = self.vae_scale_factor * PIPELINE_PATCH  # as ZImagePipeline.prepare_latents rounds
        return PIPELINE_PATCH * (height // f), PIPELINE_PATCH * (width // f)

    # ------------------------------------------------------------------ text

    def text_settings(self) -> dict[str, Any]:
        # the template and layer choice are diffusers' code: a new version may encode differently
        return {
            "max_sequence_length": self.max_sequence_length,
            "encoder": f"{self.PIPELINE}.encode_prompt",
            "diffusers": diffusers.__version__,
        }

    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        width = int(self.network_config["cap_feat_dim"])
        return {
            "prompt_embeds": (self.max_sequence_length, width),
            "prompt_mask": (self.max_sequence_length,),
        }

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Conditioning:
        """The pipeline's own encoding (a list of each prompt's valid tokens), stored padded."""
        pipe = self.stock_text_pipeline()
        embeds, _ = pipe.encode_prompt(
            list(prompts),  # a copy: the pipeline writes the templated prompts into the list it gets
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning.padded_prompts(embeds, self.max_sequence_length)

    # ------------------------------------------------------------------ the network call

    def predict(
        self, net: nn.Module, x_t: Tensor, level: Tensor, cond: Conditioning, guidance: Tensor | None = None
    ) -> Tensor:
        if guidance is not None:
            raise ValueError("Z-Image has no guidance embedding; use method.dmd.guidance_kind 'cfg'")
        embeds, mask = cond.tensors["prompt_embeds"], cond.tensors["prompt_mask"]
        if mask.is_meta:  # the memory planner: every position counts, the longest prompt
            captions = list(embeds.unbind(0))
        else:
            captions = [e[m.bool()] for e, m in zip(embeds, mask, strict=True)]
        latents = list(x_t.unsqueeze(2).unbind(0))  # [C, 1, h, w] each: one frame
        out = net(latents, 1.0 - level, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def feature_taps(self, net: nn.Module) -> Sequence[FeatureTap]:
        """The main single-stream blocks at the model width. Their sequence is the image's patches
        first, then the caption and padding to the batch's longest: a head reads the patches only,
        so a sample's features do not depend on the other captions in its batch."""
        width = int(net.config["dim"])
        patch = int(net.config["all_patch_size"][0])

        def image_tokens(x_t: Tensor) -> int:
            return (x_t.shape[-2] // patch) * (x_t.shape[-1] // patch)

        return [FeatureTap(block, width, image_tokens) for block in net.layers]

    # ------------------------------------------------------------------ the folder's sampler

    def sampling_levels(self, steps: int) -> Tensor:
        """ZImagePipeline's σ: its default grid, shifted, then 0."""
        return self.schedule.inference_sigmas(steps, t_values=get_default_z_image_sigmas(steps))

    def timesteps_kwargs(self, steps: int, latent_shape: tuple[int, ...]) -> dict[str, Any]:
        """What ZImagePipeline passes to ``set_timesteps``: its σ grid and μ for the image tokens."""
        tokens = (latent_shape[-2] // PIPELINE_PATCH) * (latent_shape[-1] // PIPELINE_PATCH)
        cfg = self.scheduler_config
        mu = calculate_shift(tokens, **{arg: cfg[key] for key, arg in SHIFT_KEYS.items() if key in cfg})
        return {"sigmas": get_default_z_image_sigmas(steps), "mu": mu}

    # ------------------------------------------------------------------ export

    def student_call_kwargs(self, resolution: int) -> dict[str, Any]:
        return {**super().student_call_kwargs(resolution), "guidance_scale": NO_CFG}


def build_z_image_adapter(cfg: DistillConfig) -> ZImageAdapter:
    """The registry's builder for ``model.family: z_image``."""
    adapter = ZImageAdapter(
        TeacherFolder.from_recipe(cfg.model),
        cfg.model.anchors,
        cfg.data.resolution,
        cfg.model.max_sequence_length,
        cfg.model.negative_prompt,
        to_dtype(cfg.precision.teacher_dtype, "precision.teacher_dtype"),
    )
    signals = turbo_signals(cfg.model.teacher, adapter.folder)
    try:
        adapter.check_not_distilled(cfg.model.allow_distilled_teacher, BASE_MODEL, bool(signals))
    except ValueError as exc:
        raise ValueError(f"{exc} (recognised as Z-Image-Turbo: {'; '.join(signals)})") from None
    return adapter
