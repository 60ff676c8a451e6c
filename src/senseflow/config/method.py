"""The ``method`` section: DMD, fake score, IDA, ISG and GAN settings (§2-8 of the spec)."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from senseflow.config.common import (
    GuidanceRange,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    TimestepDist,
    _Section,
)
from senseflow.config.errors import field_error, suggest
from senseflow.config.registry import discriminator_spec, known_discriminators

__all__ = [
    "DMDConfig",
    "FakeScoreConfig",
    "GANConfig",
    "IDAConfig",
    "ISGConfig",
    "MethodConfig",
]

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
    lam: Probability | None = Field(
        default=None,
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
        le=999,
        description=(
            "t_mid margin m on the 1000-step grid (sigma*1000 for FLUX, table index for SD3.5, DDPM step for "
            "SDXL): t_mid ~ U[a_{j+1}+m, a_j-m], 0..999. Code: 20 FLUX/SDXL, 50 SD3.5; 0 approximates "
            "the paper (§6). Required when weight > 0."
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

    type: str = Field(
        default="vfm",
        description=(
            "Discriminator registry key: vfm: frozen DINOv2 + trained heads, hinge loss (SenseFlow, §8.1); "
            "dmd2_head: classifier on the fake score's features, non-saturating loss (vanilla DMD2, §8.2); "
            "toy: small test discriminator; none: off; or one added with register_discriminator()."
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
        default="facebook/dinov2-large",
        description=(
            "The frozen VFM backbone: a DINOv2 folder (transformers Dinov2Model) or a hub id in the local "
            "hub cache. ViT-L/14 in the code; ViT-B best FID-T in the paper's ablation (§8.1)."
        ),
    )
    input_size: PositiveInt | None = Field(
        default=None,
        description=(
            "Side the VFM backbone sees: None = the image as it is (the code: 1024 px gives a 73x73 grid "
            "for patch 14), or a fixed side the image is area-resized to (less memory; docs/design.md)."
        ),
    )
    backbone_checkpointing: bool = Field(
        default=True,
        description="Recompute the VFM backbone's blocks in the backward pass (the code does; saves memory).",
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
            "CLIP model (folder or cached hub id) for D's text embedding: projected text features, "
            "L2-normalised; the code's open_clip ViT-L-14 'openai' has these weights (§13)."
        ),
    )
    real_pixels: Literal["images", "decoded_latents"] = Field(
        default="images",
        description=(
            "What a pixel-space D sees as the real (and reference) image: the batch's images, or the "
            "VAE decode (fp32) of the batch's latents, as the official SDXL trainer feeds D from its "
            "latent dataset. A batch of cached latents is always decoded (§13)."
        ),
    )
    official_grad_leak: bool = Field(
        default=False,
        description=(
            "Reproduce the official code's quirk: the generator's adversarial gradients are left in D's "
            "heads' .grad and added to D's next update (§13). False: D's update sees only D's loss."
        ),
    )
    diffaug: list[Literal["color", "translation", "cutout"]] = Field(
        default_factory=lambda: ["color", "translation", "cutout"],
        description="DiffAugment policy applied to D's input image only, real and fake drawn apart (§8.1).",
    )
    diffaug_translation: Probability = Field(
        default=0.125,
        description="DiffAugment's largest shift as a fraction of the side: 1/8 in the code and paper (§13).",
    )
    diffaug_cutout: Probability = Field(
        default=0.2,
        description="DiffAugment's cutout side as a fraction of the image side: 0.2 in the code (§13).",
    )
    head: Literal["mlp", "conv"] = Field(
        default="mlp",
        description=(
            "dmd2_head only: the classifier. mlp: LayerNorm and two Linear+SiLU layers on the block's "
            "tokens, a mean over tokens, a Linear to one logit (any block of any family). conv: DMD2's "
            "own head on a UNet's feature map (the official DMD2-SDXL baseline): convolutions of kernel "
            "4 and strides 2, 2, 2, 4 with GroupNorm(32) and SiLU, then a 1x1 convolution, made for "
            "the 32x32 bottleneck of a 1024 px SDXL UNet; a map of another size is resized to 32x32 first."
        ),
    )
    head_trains_fake: bool = Field(
        default=True,
        description=(
            "dmd2_head only: D's loss also trains the fake score the head reads (in DMD2 the head is part "
            "of the fake network, so fake loss + classifier loss take one update) [derived, §8.2]; false "
            "keeps the fake score's weights out of D's loss (the head alone learns)."
        ),
    )

    @field_validator("type")
    @classmethod
    def _type(cls, value: str) -> str:
        known = known_discriminators()
        if value not in known:
            raise ValueError(
                f"unknown discriminator {value!r}, expected one of {', '.join(known)}{suggest(value, known)}"
            )
        return value

    @model_validator(mode="after")
    def _required(self) -> Self:
        if self.type != "none" and self.weight is None:
            raise field_error("weight", f"required when type is '{self.type}' (a number >= 0)")
        if self.type == "vfm" and self.time_weight is None:
            raise field_error(
                "time_weight",
                "required when type is 'vfm' (alpha_sq, mirror_sigma_sq, sqrt_alphabar or constant)",
            )
        spec = discriminator_spec(self.type)
        reads = spec.reads if spec is not None else frozenset()
        defaults = {
            n: type(self).model_fields[n].get_default(call_default_factory=True)
            for n in _DISCRIMINATOR_FIELDS
        }
        for name in sorted(_DISCRIMINATOR_FIELDS - reads):
            if getattr(self, name) != defaults[name]:
                which = (
                    f"it reads {', '.join(sorted(reads))}"
                    if reads
                    else "it reads no discriminator-specific field"
                )
                raise field_error(name, f"not read by discriminator '{self.type}'; remove it ({which})")
        if self.official_grad_leak and (
            self.type == "none" or (self.type == "dmd2_head" and self.head_trains_fake)
        ):
            raise field_error(
                "official_grad_leak",
                "needs a discriminator with its own update (not with type none, nor with the DMD2 head "
                "sharing the fake score's update)",
            )
        blocks = self.feature_blocks
        if self.type == "dmd2_head" and blocks != defaults["feature_blocks"] and len(blocks) != 1:
            raise field_error(
                "feature_blocks",
                f"the DMD2 head reads one block; expected one index such as [5], got {blocks} "
                "(leave it out for the middle block)",
            )
        return self


# Fields that only some discriminators read (each declares which in its registry entry).
_DISCRIMINATOR_FIELDS = frozenset(
    {
        "backbone",
        "feature_blocks",
        "text_encoder",
        "reference_encoder",
        "head_trains_fake",
        "head",
        "input_size",
        "backbone_checkpointing",
    }
)


class MethodConfig(_Section):
    """The SenseFlow training iteration (§2-8)."""

    ttur_ratio: PositiveInt = Field(
        default=5,
        description=(
            "TTUR period k (>= 1): G steps when n mod k = 0. Code: 5 (SDXL, SD3.5 L, FLUX, DMD2), "
            "10 SD3.5 M (§2)."
        ),
    )
    ttur_generator_turn: Literal["period_end", "period_start"] = Field(
        default="period_end",
        description=(
            "Which iteration of each TTUR period updates G: period_end = iterations k-1, 2k-1, ... "
            "(0-based), after k-1 fake-score updates, as the official trainers (their iteration count "
            "starts at 1 and G steps when it is a multiple of k); period_start = 0, k, 2k, ... (G "
            "before the fake score has trained; earlier senseflow versions, kept by the toy recipe)."
        ),
    )
    backward_sim_prob: Probability = Field(
        default=0.5,
        description="Probability of backward simulation for G's input; 0.5 in the code (§2, §7).",
    )
    randomness: Literal["global", "per_rank", "per_sample"] = Field(
        default="global",
        description=(
            "Scope of an iteration's draws. global (the official trainers, whose ranks share one "
            "identically seeded generator): one anchor, one backward-simulation switch and one t_mid for "
            "the whole global batch, and the DMD and fake-score levels drawn for one rank's batch and "
            "repeated on every rank; noises and guidance scales stay per sample. per_rank: anchor, switch "
            "and t_mid once per rank. per_sample: everything per sample, so a run is the same on any "
            "number of ranks (docs/design.md, 'One iteration's randomness') (§12.15, §13)."
        ),
    )
    first_anchor_input: Literal["noise", "add_noise"] = Field(
        default="noise",
        description=(
            "G's input at an anchor on the noisiest grid level (DDPM t = T-1, flow sigma = 1) when it is "
            "not simulated: noise = the drawn noise itself (the official SDXL and DMD2 trainers' "
            "pure-noise mask), add_noise = the schedule's forward noising of the real sample, which keeps "
            "sqrt(alpha_bar_999) ~ 0.07 of it on SDXL. The two are identical for flow teachers (§7, §13)."
        ),
    )
    dmd: DMDConfig = Field(description="DMD loss (§3).")
    fake: FakeScoreConfig = Field(description="Fake-score loss (§4).")
    ida: IDAConfig = Field(description="IDA (§5).")
    isg: ISGConfig = Field(description="ISG (§6).")
    gan: GANConfig = Field(description="Discriminator (§8).")
