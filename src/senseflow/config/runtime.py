"""Run-time sections: optimizers, schedule, precision, parallelism, logging, checkpoints and health."""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from senseflow.config.common import (
    Device,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    Seed,
    UnitInterval,
    _check_existing_path,
    _Section,
)
from senseflow.config.errors import field_error

__all__ = [
    "CheckpointConfig",
    "Dtype",
    "HealthConfig",
    "LoggingConfig",
    "OptimConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "ScheduleConfig",
]

Dtype = Literal["fp32", "bf16", "fp16"]


# --------------------------------------------------------------------------------------------------
# optim, schedule, precision, parallel, logging, checkpoint, health
# --------------------------------------------------------------------------------------------------


class OptimizerConfig(_Section):
    """One network's optimizer. Defaults: AdamW (0.9, 0.999), eps 1e-8, wd 0, LR 1e-6, clip 1.0 (§9)."""

    name: Literal["adamw", "adamw8bit"] = Field(
        default="adamw", description="adamw (torch; SDXL) or adamw8bit (bitsandbytes; SD3.5, FLUX) (§9)."
    )
    lr: PositiveFloat = Field(
        default=1e-6, description="Learning rate (> 0); 1e-6 for every network in the code (§9)."
    )
    betas: tuple[UnitInterval, UnitInterval] = Field(
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
        default=500,
        description=(
            "Linear LR warm-up iterations (>= 0); 500 in the code (§9). Every optimiser's LR at 0-based "
            "iteration n is lr * (start + (1 - start) * n / warmup_steps) before it, lr after: counted "
            "in iterations (the official schedulers step every iteration), not in a network's updates."
        ),
    )
    warmup_start_factor: Probability = Field(
        default=1.0,
        description=(
            "LR at the start of warm-up as a fraction of the LR (start, in [0, 1]). SDXL's and SD 3.5's "
            "configs start at the maximum (1.0: a constant LR); FLUX's goes from 5e-6 to 1e-5 (0.5) (§9)."
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
        description=(
            "Storage dtype of G and the fake score: fp32 (SDXL, SD3.5) or bf16 (FLUX) (§9). bf16 means no "
            "float32 master weights (as the FLUX code): updates below bf16's resolution are lost. "
            "Discriminator heads stay float32."
        ),
    )
    autocast_dtype: Dtype = Field(
        default="bf16", description="Autocast compute dtype (fp32 = no autocast); bf16 in the code (§9)."
    )
    teacher_dtype: Dtype = Field(
        default="bf16", description="Dtype of the frozen real score; bf16 in the code (§1, §9)."
    )
    tf32: bool = Field(default=True, description="Allow TF32 matmuls; on in the code (§9).")
    vae_dtype: Literal["fp32", "bf16"] = Field(
        default="fp32",
        description=(
            "Compute dtype of the VAE decoder (D's pixel inputs, sample grids, image statistics): fp32 as "
            "the official code decodes D's inputs for every family (SDXL and SD3.5 keep an fp32 VAE; "
            "FLUX stores it in bf16 and decodes under fp32 autocast), or bf16 autocast to halve the "
            "decoder's activations at 1024 px. The encoder always runs in fp32, so latent caches do not "
            "depend on it (§9, §13)."
        ),
    )
    fsdp_param_dtype: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description=(
            "Under FSDP2, the dtype parameters are gathered in for forward and backward "
            "(MixedPrecisionPolicy.param_dtype): bf16 halves the all-gather and the gathered copy; auto "
            "takes autocast_dtype when that is bf16, else the storage dtype. The master weights stay in "
            "param_dtype (project default)."
        ),
    )
    reduce_dtype: Literal["fp32", "bf16"] = Field(
        default="fp32",
        description=(
            "Under FSDP2, the dtype gradients are reduced in across ranks "
            "(MixedPrecisionPolicy.reduce_dtype); "
            "fp32 keeps the sum exact to float32 (project default)."
        ),
    )


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
        default=False,
        description=(
            "Gradient checkpointing on G, fake and real; the code also checkpoints the VAE, which this "
            "version does not (the toy family has none) (§9)."
        ),
    )
    replicate_degree: PositiveInt = Field(
        default=1,
        description=(
            "With strategy fsdp: replica groups of a 2-D mesh (HSDP). 1 shards over every rank; R > 1 "
            "replicates across R groups (typically nodes) and shards within each group of world/R ranks, so "
            "all-gathers stay inside a node (project default)."
        ),
    )
    load: Literal["sharded", "rank0"] = Field(
        default="sharded",
        description=(
            "How sharded networks get the teacher's weights: sharded (each rank reads only the slices of its "
            "own shards from the safetensors files) or rank0 (rank 0 reads everything and scatters it; "
            "a fall-back for file systems where every rank cannot read the teacher) (project default)."
        ),
    )
    cpu_offload: list[Literal["teacher", "generator", "fake_score"]] = Field(
        default_factory=list,
        description=(
            "With strategy fsdp: networks whose shards (and, for trained ones, gradients and optimiser "
            "states) live in CPU memory between uses (FSDP2's CPUOffloadPolicy); slower, frees GPU memory "
            "(project default: none)."
        ),
    )
    compile: bool = Field(
        default=False,
        description=(
            "torch.compile each shard unit (block) of the three networks; same losses to tolerance, faster "
            "on GPUs after the first iterations (project default)."
        ),
    )
    timeout_minutes: PositiveFloat = Field(
        default=30.0,
        le=1_000_000,
        description=(
            "Process-group timeout in minutes (> 0, at most 1e6): a collective waiting longer (a rank died "
            "or hangs) ends the job with an error instead of hanging; raise it when checkpoints take "
            "longer to write (project default)."
        ),
    )
    device: Device = Field(
        default="auto",
        description=(
            "auto (this rank's GPU, LOCAL_RANK, when CUDA is available, else the CPU), cpu, cuda or cuda:N "
            "(project default)."
        ),
    )

    @model_validator(mode="after")
    def _sharding_fields(self) -> Self:
        if self.strategy != "fsdp":
            if self.replicate_degree != 1:
                raise field_error("replicate_degree", "HSDP needs strategy fsdp; remove it or set fsdp")
            if self.cpu_offload:
                raise field_error("cpu_offload", "offloads FSDP2 shards; it needs strategy fsdp")
        return self


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
    sample_seeds: list[Seed] = Field(
        default_factory=lambda: [0], description="Seeds for the sample grid (each >= 0)."
    )
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
    format: Literal["dcp", "safetensors"] = Field(
        default="dcp",
        description=(
            "dcp: torch.distributed.checkpoint, every rank writes its own shards in parallel, loadable at "
            "any world size and strategy; safetensors: whole weights gathered and written by rank 0 (one "
            "file per network; fine for small models). Both resume either way (project default)."
        ),
    )
    async_save: bool = Field(
        default=False,
        description=(
            "With format dcp: write the checkpoint in a background thread while training goes on (the "
            "states are staged to CPU memory first; the next save waits for the previous one) "
            "(project default)."
        ),
    )
    verify: Literal["sha256", "size"] = Field(
        default="sha256",
        description=(
            "What each checkpoint's manifest records of its files, and resume and generate check: their "
            "size and SHA-256 (catches a flipped byte; hashing reads the checkpoint once more after "
            "writing it) or only their size (for checkpoints of hundreds of GB) (project default)."
        ),
    )
    resume: str | None = Field(
        default=None,
        description=(
            "null (a new run), 'latest' (the newest good checkpoint in output_dir; an error without one), "
            "'auto' (the same, or a new run when there is none: requeued jobs) or an existing "
            "checkpoint path."
        ),
    )

    @field_validator("resume")
    @classmethod
    def _resume(cls, value: str | None) -> str | None:
        if value is None or value in ("latest", "auto"):
            return value
        if not value.strip():
            raise ValueError("expected null, 'latest', 'auto' or a checkpoint path, got an empty string")
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
    saturation_level: PositiveFloat = Field(
        default=0.98, le=1.0, description="|pixel| at or above this (in (0, 1]) counts as saturated."
    )
