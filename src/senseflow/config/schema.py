"""Typed SenseFlow distillation recipe (pydantic v2).

Every section forbids unknown keys. Defaults exist only where the SenseFlow method spec gives a value
shared by all families (or a project decision); family-specific values (anchors, DMD/fake timestep
distributions, guidance ranges, IDA lambda, ISG and GAN weights, iterations) are required and come from
the recipes in ``configs/``. Section numbers (``§n``) refer to the spec.

Extension points: the registries of :mod:`~senseflow.config.registry` (families with their recipe rules,
data kinds, discriminators) add names and rules without editing this file.

The sections live in submodules: :mod:`~senseflow.config.common` (base class, guidance, timestep
distributions, anchors), :mod:`~senseflow.config.method` (``method``) and :mod:`~senseflow.config.runtime`
(optim, schedule, precision, parallel, logging, checkpoint, health), :mod:`~senseflow.config.lora`
(``model.lora``). This module holds ``model``,
``data`` and the root :class:`DistillConfig`, and re-exports every section.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Literal, Self

from pydantic import BaseModel, Field, field_validator, model_validator

from senseflow.config.common import (
    ANCHOR_UNITS,
    AnchorsConfig,
    GuidanceRange,
    LogitNormalDist,
    NonNegativeInt,
    PositiveInt,
    Seed,
    TimestepDist,
    UniformDist,
    UniformIndexDist,
    _check_existing_path,
    _Section,
    looks_like_local_path,
)
from senseflow.config.errors import field_error, suggest
from senseflow.config.lora import LORA_TARGET_MODULES, LoraConfig
from senseflow.config.method import (
    DMDConfig,
    FakeScoreConfig,
    GANConfig,
    IDAConfig,
    ISGConfig,
    MethodConfig,
)
from senseflow.config.registry import (
    data_kind_spec,
    family_spec,
    known_data_kinds,
    known_families,
)
from senseflow.config.runtime import (
    CheckpointConfig,
    Dtype,
    HealthConfig,
    LoggingConfig,
    OptimConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
    ScheduleConfig,
)

__all__ = [
    "ANCHOR_UNITS",
    "LORA_TARGET_MODULES",
    "AnchorsConfig",
    "CheckpointConfig",
    "DMDConfig",
    "DataConfig",
    "DistillConfig",
    "Dtype",
    "FakeScoreConfig",
    "GANConfig",
    "GuidanceRange",
    "IDAConfig",
    "ISGConfig",
    "LoggingConfig",
    "LogitNormalDist",
    "LoraConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "ScheduleConfig",
    "TimestepDist",
    "UniformDist",
    "UniformIndexDist",
    "looks_like_local_path",
]


def _check_name(value: str, known: tuple[str, ...], what: str) -> str:
    if value not in known:
        raise ValueError(
            f"unknown {what} {value!r}, expected one of {', '.join(known)}{suggest(value, known)}"
        )
    return value


def unread_fields_set(section: BaseModel, reads: frozenset[str], always: frozenset[str]) -> list[str]:
    """Fields of ``section`` that differ from their default although nothing will read them."""
    out = []
    for name, info in type(section).model_fields.items():
        if name in reads or name in always:
            continue
        if getattr(section, name) != info.get_default(call_default_factory=True):
            out.append(name)
    return out


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------


class ModelConfig(_Section):
    """Teacher and student parameterisation."""

    family: str = Field(
        description="Model-adapter registry key (toy, sdxl, sd3, flux, or one added with register_family())."
    )
    teacher: str | None = Field(
        default=None,
        description=(
            "Teacher weights: a local diffusers folder or a hub id (e.g. stabilityai/stable-diffusion-3.5-"
            "large). Values that look local (absolute, or starting with '.' or '~') must exist (relative to "
            "the working directory). Required except for family 'toy'. G and the fake score are initialised "
            "from it (§1)."
        ),
    )
    revision: str | None = Field(
        default=None, description="Hub revision (branch, tag or commit) of the teacher."
    )
    variant: str | None = Field(
        default=None,
        description=(
            "Weight-file variant of the teacher folder (e.g. fp16: the *.fp16.safetensors weight files)."
        ),
    )
    allow_download: bool = Field(
        default=False,
        description=(
            "Let a hub id be downloaded into the hub cache. False (default): a hub id must already be in "
            "the local cache, so a run never downloads behind the user's back."
        ),
    )
    text_cache: str = Field(
        default="live",
        description=(
            "Where prompt encodings come from: 'live' (the text encoders run in the training process; small "
            "runs and tests) or the folder `senseflow cache-text` wrote (the text encoders are not loaded)."
        ),
    )
    max_sequence_length: PositiveInt | None = Field(
        default=None,
        description=(
            "Token length of the T5 prompt encoding (SD 3.5, FLUX); None: the stock pipeline's default "
            "(256 for SD 3.5, 512 for FLUX.1-dev)."
        ),
    )
    uncond: Literal["folder", "zeros", "empty_prompt"] = Field(
        default="folder",
        description=(
            "CFG's unconditional branch: 'folder' builds it as the stock pipeline does (SDXL: zeros when the "
            "folder's force_zeros_for_empty_prompt is set, else the encoded empty prompt; SD 3.5: the empty "
            "prompt), or force 'zeros' / 'empty_prompt'."
        ),
    )
    negative_prompt: str | None = Field(
        default=None,
        description=(
            "The prompt CFG's unconditional branch encodes, as the stock pipeline's negative_prompt (Qwen-"
            "Image's true CFG runs only with one; its model card uses ' '). None: the branch 'uncond' "
            "says. Families that read it list it in their registry entry."
        ),
    )
    allow_distilled_teacher: bool = Field(
        default=False,
        description=(
            "Accept a teacher folder that is itself a few-step distillation (FLUX.2 klein's distilled "
            "models, Z-Image-Turbo). False (default): such a folder is refused with the base model to use, "
            "since distilling a distilled model's few-step sampler is rarely what is meant."
        ),
    )
    anchors: AnchorsConfig = Field(description="Student anchor timesteps (§7).")
    lora: LoraConfig | None = Field(
        default=None,
        description=(
            "LoRA mode (rank, alpha, target_modules, init, ida): the teacher held once with two adapters; "
            "null trains the generator and the fake score in full (project default)."
        ),
    )
    decode_chunk: PositiveInt = Field(
        default=8,
        description=(
            "Samples the codec decodes at once (>= 1): a VAE decode at 1024 px is memory-bound, so lower it "
            "to save memory; no effect on results (project default)."
        ),
    )
    cfg_convention: Literal["uncond_plus", "cond_plus"] = Field(
        default="uncond_plus",
        description=(
            "CFG formula: uncond_plus = x_u + w(x_c - x_u) (project assumption) or "
            "cond_plus = x_c + w(x_c - x_u) (reported for DMD2, i.e. w+1 in ours). "
            "Unknown for the official code (§12.7)."
        ),
    )

    @field_validator("family")
    @classmethod
    def _family(cls, value: str) -> str:
        return _check_name(value, known_families(), "model family")

    @field_validator("teacher")
    @classmethod
    def _teacher(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not value:
            raise ValueError("expected a local folder or a hub id, got an empty string")
        if looks_like_local_path(value):
            _check_existing_path(value, "local teacher")
            if not os.path.isdir(os.path.expanduser(value)):
                raise ValueError(
                    f"expected a teacher folder (a diffusers pipeline folder), got the file {value!r}"
                )
        return value

    @model_validator(mode="after")
    def _family_rules(self) -> Self:
        spec = family_spec(self.family)
        if spec is None:
            return self
        if self.teacher is None and spec.needs_teacher:
            raise field_error("teacher", f"required for family '{self.family}' (a local folder or a hub id)")
        if self.revision is not None and not spec.hub:
            raise field_error(
                "revision", f"family '{self.family}' loads a local folder and has no hub revision; remove it"
            )
        if spec.reads is not None:
            optional = frozenset(
                {"variant", "allow_download", "text_cache", "max_sequence_length", "uncond"}
                | {"negative_prompt", "allow_distilled_teacher"}
            )
            unread = unread_fields_set(self, spec.reads, frozenset(type(self).model_fields) - optional)
            if unread:
                raise field_error(
                    unread[0],
                    f"family '{self.family}' does not read it; remove it (it reads: "
                    f"{', '.join(sorted(spec.reads)) or 'none of the optional model fields'})",
                )
        if spec.anchor_units and self.anchors.units not in spec.anchor_units:
            raise field_error(
                "anchors.units",
                f"'{self.anchors.units}' does not fit family '{self.family}'; "
                f"expected one of {', '.join(spec.anchor_units)}",
            )
        return self


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


class DataConfig(_Section):
    """Training data (§9: LAION-5B subset, aesthetic >= 5.0, short side >= 1024; size unknown, §12.12)."""

    kind: str = Field(
        description=(
            "Dataset reader key: json (SD3.5/FLUX {keys, image_paths, prompts}), jsonl, csv, tsv, folder "
            "(images with .txt captions), webdataset (img2dataset tar shards), hf (datasets folder or "
            "parquet), prompts (a prompt list: prompts-only batches, needs method.backward_sim_prob 1 and "
            "no discriminator), latent_lmdb (DMD2's LMDB of SDXL VAE latents; planned), toy, or one added "
            "with register_data_kind()."
        )
    )
    path: str | None = Field(
        default=None,
        description="Dataset file or folder; required by kinds that read files (not by 'toy').",
    )
    resolution: PositiveInt = Field(
        default=1024, description="Training image side in pixels; 1024 in every recipe (§9)."
    )
    batch_size: PositiveInt = Field(
        default=1, description="Batch per GPU (>= 1); 1 in the code (§2, §9), 2 in vanilla DMD2."
    )
    num_workers: NonNegativeInt = Field(
        default=4, description="DataLoader worker processes (project default)."
    )
    prompt_column: str = Field(
        default="prompt", description="Caption column of jsonl / csv / tsv / hf datasets."
    )
    image_column: str = Field(
        default="image",
        description=(
            "Image column of jsonl / csv / tsv (a path, relative to the file) and hf datasets (an image "
            "feature or bytes)."
        ),
    )
    crop: Literal["center", "random"] = Field(
        default="center",
        description=(
            "How an image resized to the resolution on its short side is cropped square: center, or at a "
            "position drawn from (seed, sample) (deterministic, so resume and rank count agree)."
        ),
    )
    min_side: PositiveInt | None = Field(
        default=None,
        description="Images whose short side is below this are skipped and counted; None: data.resolution.",
    )
    latent_cache: str | None = Field(
        default=None,
        description=(
            "Folder `senseflow cache-latents` wrote: batches carry its VAE latents instead of images when "
            "the cache matches the data, resolution, crop and the teacher's VAE (checked at start-up)."
        ),
    )

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        return _check_name(value, known_data_kinds(), "data kind")

    @model_validator(mode="after")
    def _kind_rules(self) -> Self:
        spec = data_kind_spec(self.kind)
        if spec is None:
            return self
        if self.path is None and spec.needs_path:
            raise field_error("path", f"required for data kind '{self.kind}'")
        unread = unread_fields_set(self, spec.reads, frozenset({"kind", "resolution", "batch_size"}))
        if unread:
            raise field_error(
                unread[0],
                f"data kind '{self.kind}' does not read it; remove it (it reads: "
                f"{', '.join(sorted(spec.reads)) or 'no optional field'})",
            )
        return self


# --------------------------------------------------------------------------------------------------
# root
# --------------------------------------------------------------------------------------------------


class DistillConfig(_Section):
    """A complete SenseFlow distillation run."""

    name: str = Field(
        default="senseflow", min_length=1, description="Run name; also the default output folder name."
    )
    seed: Seed = Field(default=71801, description="Global random seed (>= 0); 71801 in the code (§9).")
    output_dir: str = Field(
        default="", description="Run folder for checkpoints, logs and samples; defaults to runs/<name>."
    )
    model: ModelConfig = Field(description="Teacher, family and anchors.")
    data: DataConfig = Field(description="Training data.")
    method: MethodConfig = Field(description="SenseFlow losses and their schedule.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizers and warm-up.")
    schedule: ScheduleConfig = Field(description="Training length.")
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig, description="Numeric precision.")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="Distribution strategy.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logging and samples.")
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Checkpoints and resume."
    )
    health: HealthConfig = Field(default_factory=HealthConfig, description="Health signals and alarms.")

    @model_validator(mode="before")
    @classmethod
    def _default_output_dir(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("output_dir"):
            data = dict(data)
            name = data.get("name") or "senseflow"
            data["output_dir"] = os.path.join("runs", str(name))
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> Self:
        family = self.model.family
        spec = family_spec(family)
        if spec is not None:
            guidance = self.method.dmd.guidance_kind
            if spec.guidance_kinds and guidance not in spec.guidance_kinds:
                raise field_error(
                    "method.dmd.guidance_kind",
                    f"'{guidance}' does not fit family '{family}'; expected one of "
                    f"{', '.join(spec.guidance_kinds)}",
                )
            if self.data.resolution % spec.resolution_multiple:
                raise field_error(
                    "data.resolution",
                    f"expected a multiple of {spec.resolution_multiple} for family '{family}', "
                    f"got {self.data.resolution}",
                )
            if spec.data_kinds is not None and self.data.kind not in spec.data_kinds:
                raise field_error(
                    "data.kind",
                    f"'{self.data.kind}' does not fit family '{family}'; expected one of "
                    f"{', '.join(spec.data_kinds)}",
                )
        if self.model.lora is not None:
            if self.parallel.strategy == "fsdp":
                raise field_error(
                    "model.lora",
                    "LoRA mode holds the frozen base whole on every rank; use parallel.strategy none or ddp",
                )
            if self.method.gan.type == "dmd2_head":
                raise field_error(
                    "method.gan.type",
                    "dmd2_head reads the fake score's blocks, which LoRA mode shares with the teacher and "
                    "the generator; use another discriminator or none with model.lora",
                )
        data_spec = data_kind_spec(self.data.kind)
        if data_spec is not None and data_spec.prompts_only:
            # No real image: every generator input must be backward-simulated and nothing may need one.
            clash = []
            if self.method.backward_sim_prob < 1:
                clash.append(f"method.backward_sim_prob is {self.method.backward_sim_prob} (needs 1.0)")
            if self.method.gan.type != "none":
                clash.append(f"method.gan.type is '{self.method.gan.type}' (needs none)")
            if clash:
                raise field_error(
                    "data.kind",
                    f"'{self.data.kind}' gives prompts only, no real image, but {' and '.join(clash)}",
                )
        isg = self.method.isg
        grid = self.model.anchors.grid_values()
        if isg.weight > 0 and isg.margin is not None and grid is not None:
            # t_mid ~ U[a_{j+1} + m, a_j - m], lower end 0 for the last segment (§6): every segment must be
            # at least 2m wide (the last one at least m).
            widths = [(a - b) // 2 for a, b in itertools.pairwise(grid)] + [grid[-1]]
            limit = min(widths)
            if isg.margin > limit:
                raise field_error(
                    "method.isg.margin",
                    f"{isg.margin} is too large for the anchor spacing {grid} (1000-step grid): some segment "
                    f"leaves no room for t_mid; expected margin <= {limit}",
                )
        return self
