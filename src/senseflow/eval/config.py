"""The evaluation recipe of ``senseflow eval run``: prompts, seeds, models and the metric panel.

One YAML file (examples in ``configs/eval/``) names the prompt set, the reference model (the teacher,
whose images FID-T compares against), any number of students, and which metrics to compute with
which weights. Every protocol choice of the evaluation spec is a field here and is copied into the
result record, so two records can be compared field by field.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, model_validator

from senseflow.config.common import (
    Device,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    Seed,
    StrictModel,
)

__all__ = [
    "DiversityConfig",
    "EvalConfig",
    "FidConfig",
    "MetricsConfig",
    "ModelEntry",
    "PrecisionRecallConfig",
    "PromptsConfig",
]


#: The quantisation rules of :mod:`senseflow.metrics.image_io` (``QUANTISATION_RULES``), named here so
#: that reading a recipe imports no array library; a test keeps the two equal.
QUANTISATION = ("truncate", "round")


class _Section(StrictModel):
    """Unknown keys, booleans for numbers, NaN and +-inf are refused (see senseflow.config.common)."""


class PromptsConfig(_Section):
    """Where the prompts come from. Third-party prompt lists are read from the user's files."""

    kind: Literal["toy", "tsv", "lines"] = Field(
        description="toy: sampled from the shapes world's grammar; tsv: 'image_id<TAB>caption' rows as "
        "written by 'senseflow eval build-prompts coco5k'; lines: one prompt per line."
    )
    path: str | None = Field(None, description="The prompt file (tsv and lines).")
    limit: PositiveInt | None = Field(None, description="Use only the first N prompts (quick runs).")
    name: str | None = Field(None, description="Label of the set in the record (default: file stem / 'toy').")
    toy_splits: list[Literal["train", "val", "test", "heldout"]] = Field(
        default_factory=lambda: ["train", "test", "heldout"], description="toy: grammar splits to sample."
    )
    toy_per_split: PositiveInt = Field(50, description="toy: prompts per split.")
    toy_seed: Seed = Field(0, description="toy: seed of the prompt draw (>= 0).")

    @model_validator(mode="after")
    def _path_needed(self) -> Self:
        if self.kind in ("tsv", "lines") and not self.path:
            raise ValueError(f"prompts.path is required for prompts.kind={self.kind!r}")
        return self


class SeedsConfig(_Section):
    """Image ``i`` of a model uses seed ``base + i`` (the same seeds for every model)."""

    base: Seed = Field(0, description="Seed of the first prompt (>= 0).")
    scheme: Literal["base+index"] = "base+index"


class ModelEntry(_Section):
    """A model to evaluate: how its images are made (``kind``) and with which sampler settings."""

    name: str = Field(description="Row label in the table; also names its image folder.")
    kind: str = Field(
        description="Image source (see senseflow.eval.sources): teacher (any family's teacher, from a "
        "distillation recipe), toy_teacher, student (a senseflow run) or folder (images generated "
        "elsewhere, named <index>.png in prompt order)."
    )
    path: str | None = Field(
        None,
        description="teacher: distillation recipe (a path or a shipped name); toy_teacher: teacher folder "
        "(null: the shipped one); student: run folder; folder: image folder.",
    )
    checkpoint: str | None = Field(None, description="student: checkpoint folder (default: the newest).")
    sampler: str | None = Field(None, description="student: renoise | euler; teachers: their own sampler.")
    steps: PositiveInt | None = Field(None, description="Teacher sampling steps (default: the teacher's).")
    guidance: NonNegativeFloat | None = Field(
        None, description="Teacher guidance, >= 0 (default: the teacher's)."
    )
    batch_size: PositiveInt = Field(32, description="Images generated per forward batch.")

    @model_validator(mode="after")
    def _name_is_a_folder_name(self) -> Self:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"model name {self.name!r} must be a plain folder name (no '/', not hidden)")
        return self


class FidConfig(_Section):
    """FID-T and Patch FID-T with an Inception extractor loaded from a file (spec §4)."""

    enabled: bool = False
    patch: bool = Field(True, description="Also compute Patch FID-T (centre 299x299 crop; images >= 299).")
    preset: Literal["clean299", "dmd2_whole"] = Field("clean299", description="Whole-image preprocessing.")
    extractor: str | None = Field(
        None, description="Explicit Inception file; default: the manifest entry 'weights_name'."
    )
    weights_name: Literal["fid.inception", "fid.inception_fid_helper"] = "fid.inception"
    batch_size: PositiveInt = 32
    num_workers: NonNegativeInt = Field(0, description="DataLoader workers decoding and resizing images.")


class ClipScoreConfig(_Section):
    enabled: bool = False
    path: str | None = Field(None, description="Explicit weights (folder or file); default: manifest entry.")
    weights_name: str = "clip.vit_g14.hf"
    tokenizer: str | None = Field(None, description="Tokenizer folder or bpe_simple_vocab_16e6.txt.gz.")
    backbone: str = "ViT-g-14"
    pretrained: str | None = "laion2b_s12b_b42k"
    prefix: str | None = Field("A photo depicts ", description="DMD2's text prefix; null to disable.")
    pre_resize: Literal["square_crop+lanczos256", "none"] = "square_crop+lanczos256"


class HpsConfig(_Section):
    enabled: bool = False
    version: Literal["v2.0", "v2.1"] | None = Field(None, description="Required when enabled (no default).")
    path: str | None = None
    tokenizer: str | None = None
    antialias: bool = Field(True, description="Antialiasing of the tensor resize to 224 (recorded).")
    vision_heads: PositiveInt | None = Field(
        None, description="Override of the ViT-H-14 head count (open_clip files)."
    )
    text_heads: PositiveInt | None = Field(
        None, description="Override of the text head count (open_clip files)."
    )

    @model_validator(mode="after")
    def _version_required(self) -> Self:
        if self.enabled and self.version is None:
            raise ValueError("metrics.hpsv2.version is required when HPSv2 is enabled: 'v2.0' or 'v2.1'")
        return self


class PickScoreConfig(_Section):
    enabled: bool = False
    path: str | None = None
    processor: str | None = Field(None, description="Processor folder; default: manifest entry.")


class ImageRewardConfig(_Section):
    enabled: bool = False
    path: str | None = None
    med_config: str | None = None
    tokenizer: str | None = Field(None, description="bert-base-uncased tokenizer folder.")
    vision_heads: PositiveInt | None = Field(
        None, description="ViT heads (default: width / 64, i.e. 16 for ViT-L)."
    )


class ToyMetricsConfig(_Section):
    """The shapes world's own panel: rule-based attribute accuracy and FID-T on its seeded features."""

    enabled: bool | None = Field(None, description="Default: on exactly when prompts.kind is 'toy'.")


class CompBenchConfig(_Section):
    """T2I-CompBench (paper Table 2): images per prompt from the same sources, scored per category.

    Spatial (and so complex) needs detections: either ``detections_dir/<model>/<category>.jsonl``
    (any detector, pure-Python scoring) or the official UniDet script's output written into the
    exported layout ``<output_dir>/compbench/official/<model>/<category>/`` (read back on the next run).
    """

    enabled: bool = False
    prompts_dir: str | None = Field(
        None, description="Output folder of 'senseflow eval build-prompts compbench' (lists + sidecar)."
    )
    categories: list[Literal["color", "shape", "texture", "spatial", "non_spatial", "complex"]] = Field(
        default_factory=lambda: ["color", "shape", "texture", "spatial", "non_spatial", "complex"]
    )
    images_per_prompt: PositiveInt = Field(10, description="The official 3-in-1 assumes 10.")
    limit_prompts: PositiveInt | None = Field(None, description="First N prompts per category (quick runs).")
    blip_vqa: str | None = Field(None, description="BLIP-VQA folder; default: manifest compbench.blip_vqa.")
    blip_tokenizer: str | None = Field(None, description="BERT vocab folder/file; default: the BLIP folder.")
    clip: str | None = Field(
        None, description="CLIP ViT-B/32 folder; default: manifest compbench.clip_vit_b32."
    )
    detections_dir: str | None = Field(None, description="<dir>/<model>/<category>.jsonl detections.")
    detector: str = Field(
        "unidet-official", description="Recorded name of the detector behind the detections."
    )
    export_official: bool = Field(
        True, description="Write the official file layout (symlinks) for external runs."
    )
    evaluator_version: str = Field("T2I-CompBench NeurIPS 2023 (re-implemented)", description="Recorded.")
    np_num: PositiveInt = 8
    exclude_chunks: list[str] = Field(default_factory=lambda: ["top", "the side", "the left", "the right"])
    round4: bool = True
    vqa_image_size: PositiveInt = Field(480, ge=16, description="Side BLIP-VQA sees (>= 16).")
    batch_size: PositiveInt = 32

    @model_validator(mode="after")
    def _prompts_needed(self) -> Self:
        if self.enabled and not self.prompts_dir:
            raise ValueError("metrics.compbench.prompts_dir is required when T2I-CompBench is enabled")
        return self


class PrecisionRecallConfig(_Section):
    """Kynkäänniemi et al. (2019) k-NN precision and recall of every model against the reference, on the
    features FID-T already extracts (Inception pool features; the toy features in the shapes world)."""

    enabled: bool = Field(
        True, description="Computed wherever FID-T is (metrics.fid or the toy panel); false to skip."
    )
    k: PositiveInt = Field(3, description="k of the k-nearest-neighbour radii (the paper's default: 3).")
    chunk_size: PositiveInt = Field(
        1024, description="Rows per block of the distance computation (memory: chunk_size x N doubles)."
    )


class DiversityConfig(_Section):
    """Intra-prompt diversity: for each of the first ``prompts`` prompts, ``seeds_per_prompt`` extra
    images (seed ``seeds.base + seed_offset + prompt * seeds_per_prompt + k``) in their own folder
    ``images/diversity/``; the mean pairwise feature distance of each prompt's images, averaged."""

    enabled: bool = Field(
        True,
        description="Computed wherever a feature is available (Inception with metrics.fid, else CLIP image "
        "embeddings with metrics.clip_score; the toy features with the toy panel); false to skip.",
    )
    prompts: PositiveInt = Field(
        16, description="The first N prompts of the set (fewer if the set is smaller)."
    )
    seeds_per_prompt: PositiveInt = Field(4, ge=2, description="Images (seeds) per prompt, >= 2.")
    seed_offset: Seed = Field(
        2_000_000, description="Shift of the diversity seeds from the main images' seeds (>= 0)."
    )


class MetricsConfig(_Section):
    fid: FidConfig = Field(default_factory=FidConfig)
    precision_recall: PrecisionRecallConfig = Field(default_factory=PrecisionRecallConfig)
    diversity: DiversityConfig = Field(default_factory=DiversityConfig)
    clip_score: ClipScoreConfig = Field(default_factory=ClipScoreConfig)
    hpsv2: HpsConfig = Field(default_factory=HpsConfig)
    pickscore: PickScoreConfig = Field(default_factory=PickScoreConfig)
    imagereward: ImageRewardConfig = Field(default_factory=ImageRewardConfig)
    toy: ToyMetricsConfig = Field(default_factory=ToyMetricsConfig)
    compbench: CompBenchConfig = Field(default_factory=CompBenchConfig)
    batch_size: PositiveInt = Field(16, description="Image-text pairs per scorer forward.")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class EvalConfig(_Section):
    name: str = "eval"
    output_dir: str = Field(description="Images, feature caches, records and the table go here.")
    prompts: PromptsConfig
    seeds: SeedsConfig = Field(default_factory=SeedsConfig)
    quantisation: Literal["truncate", "round"] = Field(
        "truncate", description=f"One rule for every image writer ({', '.join(QUANTISATION)})."
    )
    reference: ModelEntry = Field(description="The teacher: FID-T compares every student with its images.")
    reference_floor_seed_offset: PositiveInt | None = Field(
        None,
        description="If set (>= 1), the reference also samples the prompts with seeds shifted by this "
        "offset; their FID-T to the reference is the floor of FID-T at this N.",
    )
    students: list[ModelEntry] = Field(default_factory=list)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    weights_root: str | None = Field(None, description="Metric weights root (else $SENSEFLOW_EVAL_WEIGHTS).")
    device: Device = Field("cpu", description="Device for generation and scoring: auto, cpu, cuda or cuda:N.")

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        names = [self.reference.name, *(s.name for s in self.students)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        return self

    @property
    def toy_metrics(self) -> bool:
        enabled = self.metrics.toy.enabled
        return self.prompts.kind == "toy" if enabled is None else enabled
