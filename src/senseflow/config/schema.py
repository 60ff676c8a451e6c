"""Typed SenseFlow distillation recipe (pydantic v2).

Every section forbids unknown keys. Defaults exist only where the SenseFlow method spec gives a value
shared by all families (or a project decision); family-specific values (anchors, DMD/fake timestep
distributions, guidance ranges, IDA lambda, ISG and GAN weights, iterations) are required and come from
the recipes in ``configs/``. Section numbers (``§n``) refer to the spec.

Extension points: :func:`register_family` and :func:`register_data_kind` let the model-adapter and data
registries add names without editing this file.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    field_serializer,
    field_validator,
    model_validator,
)

from senseflow.config.loader import field_error, suggest

__all__ = [
    "ANCHOR_UNITS",
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
    "known_data_kinds",
    "known_families",
    "looks_like_local_path",
    "register_data_kind",
    "register_family",
]

# --------------------------------------------------------------------------------------------------
# Registries of names validated as plain strings
# --------------------------------------------------------------------------------------------------

_FAMILIES: dict[str, None] = dict.fromkeys(("toy", "sdxl", "sd3", "flux"))
_DATA_KINDS: dict[str, None] = dict.fromkeys(("toy", "json", "latent_lmdb"))


def register_family(name: str) -> None:
    """Declare a model family key (called by the model-adapter registry for new adapters)."""
    if not name or not isinstance(name, str):
        raise ValueError("family name must be a non-empty string")
    _FAMILIES[name] = None


def known_families() -> tuple[str, ...]:
    """Family keys accepted by ``model.family``: built-ins (toy, sdxl, sd3, flux) plus registered ones."""
    return tuple(_FAMILIES)


def register_data_kind(name: str) -> None:
    """Declare a dataset kind key (called by the data registry for new dataset readers)."""
    if not name or not isinstance(name, str):
        raise ValueError("data kind must be a non-empty string")
    _DATA_KINDS[name] = None


def known_data_kinds() -> tuple[str, ...]:
    """Dataset kinds accepted by ``data.kind``: built-ins (toy, json, latent_lmdb) plus registered ones."""
    return tuple(_DATA_KINDS)


def _check_name(value: str, known: tuple[str, ...], what: str) -> str:
    if value not in known:
        raise ValueError(
            f"unknown {what} {value!r}, expected one of {', '.join(known)}{suggest(value, known)}"
        )
    return value


def looks_like_local_path(value: str) -> bool:
    """True for values meant as local paths: absolute, or starting with '.' or '~'."""
    return value.startswith((".", "~")) or os.path.isabs(value)


def _check_existing_path(value: str, what: str) -> str:
    if not os.path.exists(os.path.expanduser(value)):
        resolved = os.path.abspath(os.path.expanduser(value))
        raise ValueError(f"{what} path {value!r} does not exist (resolved to '{resolved}')")
    return value


# Built-in family rules used by the cross-field checks (unknown/registered families are not checked).
_FAMILY_ANCHOR_UNITS: dict[str, tuple[str, ...]] = {
    "sdxl": ("ddpm_t",),
    "sd3": ("index", "t", "sigma"),
    "flux": ("index", "t", "sigma"),
}
_FAMILY_GUIDANCE_KINDS: dict[str, tuple[str, ...]] = {
    "sdxl": ("cfg",),
    "sd3": ("cfg",),
    "flux": ("embedding", "cfg"),
}
_FAMILY_RESOLUTION_MULTIPLE: dict[str, int] = {"sdxl": 8, "sd3": 16, "flux": 16}

Dtype = Literal["fp32", "bf16", "fp16"]
PositiveInt = Annotated[int, Field(ge=1)]  # reported as "expected a value >= 1"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, validate_assignment=True)


# --------------------------------------------------------------------------------------------------
# Small building blocks
# --------------------------------------------------------------------------------------------------


class GuidanceRange(_Section):
    """Teacher guidance strength drawn uniformly from [min, max] on every call (fixed when min == max).

    A bare number in YAML (``teacher_guidance: 8.0``) means ``{min: 8.0, max: 8.0}``.
    """

    min: NonNegativeFloat = Field(description="Lower end of the uniform guidance draw.")
    max: NonNegativeFloat = Field(description="Upper end of the uniform guidance draw (>= min).")

    @model_validator(mode="before")
    @classmethod
    def _scalar_shorthand(cls, data: Any) -> Any:
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return {"min": data, "max": data}
        if isinstance(data, (list, tuple)) and len(data) == 2:
            return {"min": data[0], "max": data[1]}
        return data

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.min > self.max:
            raise field_error("min", f"must be <= max, got min={self.min} > max={self.max}")
        return self

    @property
    def fixed(self) -> bool:
        """True when the guidance is a constant."""
        return self.min == self.max


class UniformIndexDist(_Section):
    """Uniform integer over [low, high] (inclusive) on the family's 1000-step grid.

    Grid: DDPM t for SDXL; index into the flipped, shifted 1000-entry flow sigma table for SD3.5;
    sigma*1000 for FLUX.
    """

    kind: Literal["uniform_index"] = Field(description="Discriminator: uniform integer grid index.")
    low: NonNegativeInt = Field(le=999, description="Smallest index drawn (inclusive), 0..999.")
    high: NonNegativeInt = Field(le=999, description="Largest index drawn (inclusive), 0..999, >= low.")

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.low > self.high:
            raise field_error("low", f"must be <= high, got low={self.low} > high={self.high}")
        return self


class UniformDist(_Section):
    """Uniform real value in [low, high] within [0, 1] (flow time or sigma)."""

    kind: Literal["uniform"] = Field(description="Discriminator: uniform real value.")
    low: float = Field(ge=0.0, le=1.0, description="Lower end in [0, 1].")
    high: float = Field(ge=0.0, le=1.0, description="Upper end in [0, 1], >= low.")

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.low > self.high:
            raise field_error("low", f"must be <= high, got low={self.low} > high={self.high}")
        return self


class LogitNormalDist(_Section):
    """sigma = sigmoid(N(mean, std)), as diffusers ``compute_density_for_timestep_sampling`` (§3, §4)."""

    kind: Literal["logit_normal"] = Field(description="Discriminator: logit-normal sigma.")
    mean: float = Field(
        default=0.0, description="Mean of the normal before the sigmoid; 0.0 in the code (§3, §4)."
    )
    std: PositiveFloat = Field(
        default=1.0, description="Std of the normal before the sigmoid (> 0); 1.0 in the code."
    )
    apply_shift: bool = Field(
        default=False,
        description=(
            "Pass the drawn sigma through the teacher's timestep shift. False: unshifted, as FLUX's DMD "
            "timesteps in the code; for the fake-score loss this is unknown (§12.4)."
        ),
    )


TimestepDist = Annotated[UniformIndexDist | UniformDist | LogitNormalDist, Field(discriminator="kind")]
"""Timestep distribution, selected by ``kind``: uniform_index | uniform | logit_normal."""


# --------------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------------

ANCHOR_UNITS: dict[str, str] = {
    "index": "integer index 0..999 into the 1000-entry flow sigma table",
    "t": "pre-shift flow time in (0, 1]",
    "sigma": "flow noise level sigma in (0, 1]",
    "ddpm_t": "DDPM integer timestep 0..999",
}


class AnchorsConfig(_Section):
    """The student's anchor timesteps a_0 > a_1 > ... (4 in every recipe, §7)."""

    values: list[float] = Field(
        min_length=1,
        description=(
            "Anchor values, strictly decreasing, in `units`. Recipes: SDXL t {999,749,499,249}; SD3.5 "
            "index {999,749,499,249}; FLUX sigma {1.0,0.904,0.759,0.512} (§7)."
        ),
    )
    units: Literal["index", "t", "sigma", "ddpm_t"] = Field(
        description=(
            "Units of `values`: index (into the 1000-entry flow sigma table), t (pre-shift flow time in "
            "(0,1]), sigma (flow noise level in (0,1]) or ddpm_t (DDPM timestep 0..999) (§7, §11)."
        )
    )

    @model_validator(mode="after")
    def _check(self) -> Self:
        values = self.values
        if self.units in ("index", "ddpm_t"):
            bad = [v for v in values if not float(v).is_integer() or not 0 <= v <= 999]
            if bad:
                raise field_error(
                    "values",
                    f"{_fmt(bad)} outside the range of units '{self.units}' "
                    f"(expected {ANCHOR_UNITS[self.units]})",
                )
            values = [int(v) for v in values]
            object.__setattr__(self, "values", values)  # ints for integer grids (no re-validation)
        else:
            bad = [v for v in values if not (0.0 < v <= 1.0) or math.isnan(v)]
            if bad:
                raise field_error(
                    "values",
                    f"{_fmt(bad)} outside the range of units '{self.units}' "
                    f"(expected {ANCHOR_UNITS[self.units]})",
                )
        for a, b in itertools.pairwise(values):
            if not a > b:
                raise field_error(
                    "values", f"expected strictly decreasing anchors (a_0 > a_1 > ...), got {_fmt(values)}"
                )
        return self

    @field_serializer("values")
    def _ser_values(self, values: list[float]) -> list[float | int]:
        return [int(v) if self.units in ("index", "ddpm_t") else float(v) for v in values]

    @property
    def steps(self) -> int:
        """Number of student steps (anchors)."""
        return len(self.values)

    def grid_values(self) -> list[int] | None:
        """Anchors on the integer 1000-step grid used by ISG margins (None for units 't')."""
        if self.units in ("index", "ddpm_t"):
            return [int(v) for v in self.values]
        if self.units == "sigma":
            return [round(v * 1000) for v in self.values]
        return None


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{int(v)}" if float(v).is_integer() else f"{v:g}" for v in values) + "]"


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
    anchors: AnchorsConfig = Field(description="Student anchor timesteps (§7).")
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
        return value

    @model_validator(mode="after")
    def _family_rules(self) -> Self:
        if self.teacher is None and self.family != "toy":
            raise field_error("teacher", f"required for family '{self.family}' (a local folder or a hub id)")
        allowed = _FAMILY_ANCHOR_UNITS.get(self.family)
        if allowed is not None and self.anchors.units not in allowed:
            raise field_error(
                "anchors.units",
                f"'{self.anchors.units}' does not fit family '{self.family}'; "
                f"expected one of {', '.join(allowed)}",
            )
        return self


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------


class DataConfig(_Section):
    """Training data (§9: LAION-5B subset, aesthetic >= 5.0, short side >= 1024; size unknown, §12.12)."""

    kind: str = Field(
        description=(
            "Dataset reader key: json (SD3.5/FLUX {keys, image_paths, prompts}), latent_lmdb (DMD2's LMDB of "
            "SDXL VAE latents), toy, or one added with register_data_kind()."
        )
    )
    path: str | None = Field(
        default=None,
        description="Dataset file or folder; required for every kind except 'toy'. Not checked here.",
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

    @field_validator("kind")
    @classmethod
    def _kind(cls, value: str) -> str:
        return _check_name(value, known_data_kinds(), "data kind")

    @model_validator(mode="after")
    def _path_required(self) -> Self:
        if self.path is None and self.kind != "toy":
            raise field_error("path", f"required for data kind '{self.kind}'")
        return self


# --------------------------------------------------------------------------------------------------
# method
# --------------------------------------------------------------------------------------------------


class DMDConfig(_Section):
    """DMD2 distribution-matching loss (§3)."""

    timestep_dist: TimestepDist = Field(
        description=(
            "DMD noise level: SDXL uniform_index [20, 980]; SD3.5 uniform_index [20, 980] (shift-3 table); "
            "FLUX logit_normal(0, 1) unshifted (§3)."
        )
    )
    teacher_guidance: GuidanceRange = Field(
        description=(
            "Real-score guidance: SDXL CFG 8; SD3.5 L CFG U(3, 10); SD3.5 M U(2, 8); FLUX embedding U(1, 8) "
            "(§3)."
        )
    )
    guidance_kind: Literal["cfg", "embedding"] = Field(
        default="cfg",
        description=(
            "How the teacher is guided in DMD and ISG: cfg (two passes) or embedding (FLUX.1-dev guidance "
            "embedding, one pass) (§3)."
        ),
    )


class FakeScoreConfig(_Section):
    """Fake-score denoising loss on G's samples (§4); always conditional at guidance 1."""

    timestep_dist: TimestepDist = Field(
        description="Fake-score noise level: SDXL uniform_index [0, 999]; flow logit_normal(0, 1) (§4)."
    )


class IDAConfig(_Section):
    """Implicit Distribution Alignment: phi <- lam*phi + (1-lam)*theta after every G step (§5)."""

    enabled: bool = Field(
        default=True,
        description="Run IDA. Off only in the official SDXL trainer; the paper uses it everywhere (§5, §11).",
    )
    lam: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description=(
            "Interpolation weight lambda in [0, 1]; required when enabled. Code: 0.97 SD3.5 Large and FLUX, "
            "0.98 SD3.5 Medium; SDXL and the paper's value unknown (§5, §12.1-2)."
        ),
    )
    update_dtype: Literal["storage", "fp32"] = Field(
        default="storage",
        description=(
            "Arithmetic dtype of the update: storage (as the code; bf16 can round small updates away) "
            "or fp32 (computed in fp32, then cast back) (§5 Precision)."
        ),
    )

    @model_validator(mode="after")
    def _lam_required(self) -> Self:
        if self.enabled and self.lam is None:
            raise field_error("lam", "required when enabled is true (expected a number in [0, 1], e.g. 0.97)")
        return self


class ISGConfig(_Section):
    """Intra-Segment Guidance (§6). Disabled when ``weight`` is 0."""

    weight: NonNegativeFloat = Field(
        description=(
            "w_isg (>= 0; 0 disables ISG): FLUX 1.0, SD3.5 Large 1.0, SD3.5 Medium 0.5, SDXL 0.2 (§6)."
        )
    )
    loss: Literal["charbonnier", "l2"] = Field(
        default="charbonnier",
        description="charbonnier (code, mean reduction) or l2 (paper, squared L2) (§6, §11).",
    )
    charbonnier_eps: PositiveFloat = Field(
        default=1e-3, description="Charbonnier eps: mean(sqrt(d^2 + eps^2) - eps); 1e-3 in the code (§6)."
    )
    margin: NonNegativeInt | None = Field(
        default=None,
        description=(
            "t_mid margin m on the 1000-step grid (sigma*1000 for FLUX, table index for SD3.5, DDPM step for "
            "SDXL): t_mid ~ U[a_{j+1}+m, a_j-m]. Code: 20 FLUX/SDXL, 50 SD3.5; 0 approximates the "
            "paper (§6). "
            "Required when weight > 0."
        ),
    )
    teacher_guidance: GuidanceRange | None = Field(
        default=None,
        description=(
            "Teacher guidance for the ISG step: FLUX embedding U(1, 8); SD3.5 Large CFG 5.0; Medium U(2, 4); "
            "SDXL CFG U(3, 15) (§6). Required when weight > 0."
        ),
    )
    sdxl_mode: Literal["official", "ddim"] = Field(
        default="official",
        description=(
            "SDXL only: official (x0 regression as coded) or ddim (teacher-then-student segment, paper) "
            "(§6, §11)."
        ),
    )
    last_segment_end: Literal["zero", "table_index_0"] = Field(
        default="zero",
        description=(
            "End of the last segment (a_4): sigma = 0, or table index 0 (sigma ~ 0.003 for SD3.5). Unknown "
            "(§12.5)."
        ),
    )

    @model_validator(mode="after")
    def _required_when_on(self) -> Self:
        if self.weight > 0:
            if self.margin is None:
                raise field_error("margin", "required when weight > 0 (e.g. 20 for FLUX/SDXL, 50 for SD3.5)")
            if self.teacher_guidance is None:
                raise field_error("teacher_guidance", "required when weight > 0 (a number or {min, max})")
        return self


class GANConfig(_Section):
    """Adversarial term (§8)."""

    type: Literal["vfm", "dmd2_head", "toy", "none"] = Field(
        default="vfm",
        description=(
            "vfm: frozen DINOv2 + trained heads, hinge loss (SenseFlow, §8.1); dmd2_head: classifier on "
            "the fake score's bottleneck, non-saturating loss (vanilla DMD2, §8.2); "
            "toy: small test discriminator; none: off."
        ),
    )
    weight: NonNegativeFloat | None = Field(
        default=None,
        description=(
            "w_gan on L_adv in G's loss: FLUX 2.0, SD3.5 0.1, SDXL 0.5 (§8.1); DMD2 5e-3 (§8.2). "
            "Required unless type is none."
        ),
    )
    disc_weight: NonNegativeFloat = Field(
        default=1.0,
        description=(
            "Weight on the discriminator loss: 1.0 for the VFM hinge loss (§8.1); DMD2 classifier 1e-2 "
            "(§8.2)."
        ),
    )
    time_weight: Literal["alpha_sq", "mirror_sigma_sq", "sqrt_alphabar", "constant"] | None = Field(
        default=None,
        description=(
            "Per-sample weight omega at the anchor: alpha_sq (FLUX code, paper), "
            "mirror_sigma_sq (SD3.5 code), sqrt_alphabar (SDXL code), constant (1; DMD2) (§8.1). "
            "Required for type vfm."
        ),
    )
    reference_encoder: Literal["dinov2", "clip"] = Field(
        default="dinov2",
        description="Encoder of D's reference image: dinov2 (code, paper v2) or clip (paper v1) (§8.1).",
    )
    backbone: str = Field(
        default="vit_large_patch14_dinov2.lvd142m",
        description=(
            "timm name of the frozen VFM backbone; ViT-L/14 DINOv2 in the code, ViT-B best FID-T (§8.1)."
        ),
    )
    feature_blocks: list[NonNegativeInt] = Field(
        default_factory=lambda: [2, 5, 8, 10, 14, 19, 23],
        description=(
            "Backbone blocks hooked for the heads (plus the patch embedding); code values for ViT-L (§8.1)."
        ),
    )
    text_encoder: str = Field(
        default="openai/clip-vit-large-patch14",
        description=(
            "CLIP text model for D's 768-d text embedding; the code's model is unknown (§8.1, §12.9)."
        ),
    )
    diffaug: list[Literal["color", "translation", "cutout"]] = Field(
        default_factory=lambda: ["color", "translation", "cutout"],
        description="DiffAugment policy applied to D's input image only (§8.1); parameters unknown (§12.14).",
    )

    @model_validator(mode="after")
    def _required(self) -> Self:
        if self.type != "none" and self.weight is None:
            raise field_error("weight", f"required when type is '{self.type}' (a number >= 0)")
        if self.type == "vfm" and self.time_weight is None:
            raise field_error(
                "time_weight",
                "required when type is 'vfm' (alpha_sq, mirror_sigma_sq, sqrt_alphabar or constant)",
            )
        return self


class MethodConfig(_Section):
    """The SenseFlow training iteration (§2-8)."""

    ttur_ratio: PositiveInt = Field(
        default=5,
        description=(
            "TTUR period k (>= 1): G steps when n mod k = 0. Code: 5 (SDXL, SD3.5 L, FLUX, DMD2), "
            "10 SD3.5 M (§2)."
        ),
    )
    backward_sim_prob: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Probability of backward simulation for G's input; 0.5 in the code (§2, §7).",
    )
    randomness: Literal["per_rank", "per_sample"] = Field(
        default="per_rank",
        description=(
            "Scope of the anchor, backward-simulation and t_mid draws: per_rank (code, batch 1) "
            "or per_sample (a project choice at batch > 1) (§12.15)."
        ),
    )
    dmd: DMDConfig = Field(description="DMD loss (§3).")
    fake: FakeScoreConfig = Field(description="Fake-score loss (§4).")
    ida: IDAConfig = Field(description="IDA (§5).")
    isg: ISGConfig = Field(description="ISG (§6).")
    gan: GANConfig = Field(description="Discriminator (§8).")


# --------------------------------------------------------------------------------------------------
# optim, schedule, precision, parallel, logging, checkpoint
# --------------------------------------------------------------------------------------------------


class OptimizerConfig(_Section):
    """One network's optimizer. Defaults: AdamW (0.9, 0.999), eps 1e-8, wd 0, LR 1e-6, clip 1.0 (§9)."""

    name: Literal["adamw", "adamw8bit"] = Field(
        default="adamw", description="adamw (torch; SDXL) or adamw8bit (bitsandbytes; SD3.5, FLUX) (§9)."
    )
    lr: PositiveFloat = Field(
        default=1e-6, description="Learning rate (> 0); 1e-6 for every network in the code (§9)."
    )
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        default=(0.9, 0.999),
        description="Adam betas, each in [0, 1); (0.9, 0.999) in the code and paper (§9).",
    )
    eps: PositiveFloat = Field(default=1e-8, description="Adam epsilon (> 0); 1e-8 in the code (§9).")
    weight_decay: NonNegativeFloat = Field(
        default=0.0, description="Decoupled weight decay (>= 0); 0 in the code (§9)."
    )
    clip_grad: PositiveFloat | None = Field(
        default=1.0,
        description="Max gradient norm (> 0), or null for no clipping; 1.0 in the code, 10 in DMD2 (§9).",
    )


class OptimConfig(_Section):
    """Optimizers of G, the fake score and the discriminator heads, and the LR warm-up."""

    generator: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Generator G optimizer.")
    fake: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Fake-score optimizer.")
    discriminator: OptimizerConfig = Field(
        default_factory=OptimizerConfig,
        description=(
            "Discriminator-head optimizer (for gan.type dmd2_head the head trains with the fake score)."
        ),
    )
    warmup_steps: NonNegativeInt = Field(
        default=500, description="Linear LR warm-up steps (>= 0); 500 in the code (§9)."
    )
    warmup_start_factor: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description=(
            "LR at the start of warm-up as a fraction of the LR. The code starts at the maximum (1.0), "
            "so its 500-step warm-up is a constant LR (§9)."
        ),
    )


class ScheduleConfig(_Section):
    """Training length."""

    iterations: PositiveInt = Field(
        description=(
            "Training iterations (>= 1): SDXL 18k, SD3.5 Large 27k, FLUX 12k [reported]; SD3.5 Medium "
            "unknown (§9)."
        )
    )


class PrecisionConfig(_Section):
    """Numeric precision (§9)."""

    param_dtype: Dtype = Field(
        default="fp32",
        description="Storage dtype of G and the fake score: fp32 (SDXL, SD3.5) or bf16 (FLUX) (§9).",
    )
    autocast_dtype: Dtype = Field(
        default="bf16", description="Autocast compute dtype (fp32 = no autocast); bf16 in the code (§9)."
    )
    teacher_dtype: Dtype = Field(
        default="bf16", description="Dtype of the frozen real score; bf16 in the code (§1, §9)."
    )
    tf32: bool = Field(default=True, description="Allow TF32 matmuls; on in the code (§9).")


class ParallelConfig(_Section):
    """Distribution strategy. IDA needs G and the fake score to share one sharding plan (§5)."""

    strategy: Literal["none", "ddp", "fsdp"] = Field(
        default="none",
        description=(
            "none (single process), ddp, or fsdp (FULL_SHARD for G and the guidance model, D in DDP; code) "
            "(§9)."
        ),
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Gradient checkpointing on G, fake, real and VAE; on in the code (§9)."
    )


class LoggingConfig(_Section):
    """Scalars, TensorBoard and sample grids."""

    every: PositiveInt = Field(default=10, description="Log scalars every N iterations (project default).")
    tensorboard: bool = Field(default=True, description="Write TensorBoard event files under output_dir.")
    sample_every: PositiveInt | None = Field(
        default=500, description="Render sample images every N iterations; null disables (project default)."
    )
    sample_prompts: list[str] = Field(
        default_factory=lambda: [
            "a photo of a red fox sitting in a snowy forest, golden hour",
            "an astronaut riding a horse on the moon, detailed illustration",
        ],
        description="Prompts rendered at every sample_every (one image per prompt and seed).",
    )
    sample_seeds: list[int] = Field(default_factory=lambda: [0], description="Seeds for the sample grid.")
    sample_sampler: Literal["renoise", "euler"] = Field(
        default="renoise",
        description=(
            "Sampler for the sample grid: renoise (training chain, 'Ours') or euler ('(Euler)' rows) (§7)."
        ),
    )


class CheckpointConfig(_Section):
    """Checkpointing and resume."""

    every: PositiveInt = Field(
        default=3000, description="Save every N iterations (>= 1); 3000 in the code (§9)."
    )
    keep_last: PositiveInt = Field(default=3, description="Number of most recent checkpoints kept (>= 1).")
    resume: str | None = Field(
        default=None,
        description=(
            "null (fresh start), 'latest' (newest checkpoint in output_dir, if any) or an existing "
            "checkpoint path."
        ),
    )

    @field_validator("resume")
    @classmethod
    def _resume(cls, value: str | None) -> str | None:
        if value is None or value == "latest":
            return value
        if not value.strip():
            raise ValueError("expected null, 'latest' or a checkpoint path, got an empty string")
        return _check_existing_path(value, "resume checkpoint")


class HealthConfig(_Section):
    """Training-health alarms (project defaults; no peer ships them)."""

    nan_patience: PositiveInt = Field(
        default=5,
        description="Abort after this many consecutive iterations with a non-finite loss (each is skipped).",
    )
    collapse_std: NonNegativeFloat = Field(
        default=0.02,
        description=(
            "Warn of collapse when the generated batch's per-pixel std across samples, averaged, falls "
            "below this (images in [-1, 1]): near-identical outputs for different prompts and noise."
        ),
    )
    saturation_level: float = Field(
        default=0.98, gt=0.0, le=1.0, description="|pixel| at or above this counts as saturated."
    )


# --------------------------------------------------------------------------------------------------
# root
# --------------------------------------------------------------------------------------------------


class DistillConfig(_Section):
    """A complete SenseFlow distillation run."""

    name: str = Field(
        default="senseflow", min_length=1, description="Run name; also the default output folder name."
    )
    seed: NonNegativeInt = Field(default=71801, description="Global random seed; 71801 in the code (§9).")
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
        kinds = _FAMILY_GUIDANCE_KINDS.get(family)
        if kinds is not None and self.method.dmd.guidance_kind not in kinds:
            raise field_error(
                "method.dmd.guidance_kind",
                f"'{self.method.dmd.guidance_kind}' does not fit family '{family}'; "
                f"expected one of {', '.join(kinds)}",
            )
        multiple = _FAMILY_RESOLUTION_MULTIPLE.get(family)
        if multiple is not None and self.data.resolution % multiple:
            raise field_error(
                "data.resolution",
                f"expected a multiple of {multiple} for family '{family}', got {self.data.resolution}",
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
