"""The toy teacher's recipe (``recipe.yaml`` in its folder): architecture, training and sampling defaults.

It lives with the family because a teacher folder carries it: sampling the teacher reads its
``sampling`` section, and ``senseflow toy train-teacher`` writes it.
"""

from __future__ import annotations

from pydantic import Field

from senseflow.config.common import FiniteFloat, NonNegativeInt, Seed, StrictModel


class _Strict(StrictModel):
    """Unknown keys, NaN, infinities and booleans for numbers refused, as in the training recipes."""


class TeacherArch(_Strict):
    """SD3Transformer2DModel hyperparameters (pixel space, 3 channels)."""

    patch_size: NonNegativeInt = Field(2, ge=1, description="Patch size; 32x32 images give (32/p)^2 tokens.")
    num_layers: NonNegativeInt = Field(4, ge=1, description="Number of joint transformer blocks.")
    num_attention_heads: NonNegativeInt = Field(4, ge=1, description="Attention heads.")
    attention_head_dim: NonNegativeInt = Field(
        24, ge=1, description="Width of one head; hidden = heads x head_dim."
    )


class TextArch(_Strict):
    """The frozen seeded text encoder (see senseflow.families.toy.text)."""

    hidden_size: NonNegativeInt = Field(64, ge=8)
    num_layers: NonNegativeInt = Field(2, ge=1)
    num_heads: NonNegativeInt = Field(4, ge=1)
    max_length: NonNegativeInt = Field(
        16, ge=4, description="Token sequence length (longest prompt is 14 tokens)."
    )
    seed: Seed = Field(0, description="Seed of the encoder's random initialisation.")


class TeacherTraining(_Strict):
    init_from: str | None = Field(
        None, description="A teacher folder whose transformer weights start the training (fine-tuning)."
    )
    steps: NonNegativeInt = Field(4000, ge=1)
    batch_size: NonNegativeInt = Field(32, ge=1)
    lr: FiniteFloat = Field(5e-4, gt=0)
    min_lr_ratio: FiniteFloat = Field(0.1, ge=0, le=1, description="Cosine decay ends at lr * min_lr_ratio.")
    warmup_steps: NonNegativeInt = Field(200, ge=0)
    weight_decay: FiniteFloat = Field(0.0, ge=0)
    betas: tuple[FiniteFloat, FiniteFloat] = (0.9, 0.999)
    grad_clip: FiniteFloat = Field(1.0, gt=0)
    ema_decay: FiniteFloat = Field(0.999, ge=0, lt=1, description="EMA of weights; the EMA is what ships.")
    cond_dropout: FiniteFloat = Field(
        0.1, ge=0, le=1, description="Probability of training on the empty prompt."
    )
    single_object_fraction: FiniteFloat = Field(
        0.2, ge=0, le=1, description="Share of one-object scenes in a batch (they are 36 of 2,733 prompts)."
    )
    timestep_mean: FiniteFloat = Field(0.0, description="Logit-normal mean of sigma (SD3 uses 0).")
    timestep_std: FiniteFloat = Field(1.0, gt=0, description="Logit-normal std of sigma (SD3 uses 1).")
    log_every: NonNegativeInt = Field(50, ge=1)
    save_every: NonNegativeInt = Field(
        0,
        ge=0,
        description="Also write the EMA transformer every this many steps (0: only at the end), so a long "
        "run stopped early keeps its last save.",
    )


class SamplingDefaults(_Strict):
    """How the teacher is sampled when a command is not told otherwise (chosen by a guidance sweep)."""

    steps: NonNegativeInt = Field(50, ge=1, description="Euler steps of the reference teacher sampler.")
    guidance: FiniteFloat = Field(3.0, ge=0, description="Classifier-free guidance scale (u + w(c - u)).")


class ToyTeacherConfig(_Strict):
    """Recipe of ``senseflow toy train-teacher``."""

    seed: Seed = 0
    shift: FiniteFloat = Field(1.0, gt=0, description="Flow shift of the teacher's scheduler (1: none).")
    arch: TeacherArch = TeacherArch()
    text: TextArch = TextArch()
    train: TeacherTraining = TeacherTraining()
    sampling: SamplingDefaults = SamplingDefaults()
