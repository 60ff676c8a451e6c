"""The registries of names a recipe may use: teacher families, data kinds and discriminators.

One entry per name holds everything about it: the recipe rules the schema checks (anchor units,
guidance kinds, resolution multiple, which fields it reads) and the builder that makes it, named
as ``"module:attribute"`` (imported only when a run builds it, so this layer imports nothing above
it) or given as a callable. A name whose builder is ``None`` is *planned*: its recipes validate (so
the official recipes can be read, checked and resolved) and building it stops with one clear
message before anything is loaded. Adding a family is one adapter module and one
:func:`register_family` call; the schema, the trainer and the CLI need no edit.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "DataKindSpec",
    "DiscriminatorSpec",
    "FamilySpec",
    "available",
    "data_kind_spec",
    "discriminator_spec",
    "family_spec",
    "known_data_kinds",
    "known_discriminators",
    "known_families",
    "register_data_kind",
    "register_discriminator",
    "register_family",
    "resolve_builder",
]

Builder = str | Callable[..., Any] | None


@dataclass(frozen=True)
class FamilySpec:
    """A teacher family: its adapter builder and the recipe rules that hold for every recipe of it."""

    kind: ClassVar[str] = "family"
    name: str
    builder: Builder  # (DistillConfig) -> FamilyAdapter
    anchor_units: tuple[str, ...]  # model.anchors.units it understands
    guidance_kinds: tuple[str, ...]  # method.dmd.guidance_kind it implements
    resolution_multiple: int = 1  # data.resolution must be a multiple (VAE factor x patch size)
    needs_teacher: bool = True  # model.teacher is required (else the family ships a default)
    hub: bool = True  # model.teacher may be a hub id with a revision
    data_kinds: tuple[str, ...] | None = None  # data.kind it trains on (None: any)
    recipe: str | None = None  # the shipped recipe tools start from for this family (teacher-sample)
    # optional model.* fields it honours (variant, allow_download, text_cache, max_sequence_length,
    # uncond); the others are refused unless at their default. None: no rule.
    reads: frozenset[str] | None = None
    description: str = ""


@dataclass(frozen=True)
class DataKindSpec:
    """A training-data reader: its stream builder and the ``data`` fields it reads."""

    kind: ClassVar[str] = "data"
    name: str
    builder: Builder  # (DistillConfig, rank, world) -> BatchStream
    reads: frozenset[str] = field(default_factory=frozenset)  # optional data.* fields it honours
    needs_path: bool = True
    prompts_only: bool = False  # batches hold prompts only (no image, no latent)
    description: str = ""


@dataclass(frozen=True)
class DiscriminatorSpec:
    """A discriminator: its builder and the ``method.gan`` fields it reads besides the common ones."""

    kind: ClassVar[str] = "discriminator"
    name: str
    builder: Builder  # (GANConfig, adapter, fake_score) -> Discriminator
    reads: frozenset[str] = field(default_factory=frozenset)
    # (GANConfig) -> an encoder of prompts whose tensors `senseflow cache-text` adds to the text cache
    # as its own group (``group``, ``identity()``, ``encode(prompts)``); None: D needs no text of its own
    text_encoder: Builder = None
    description: str = ""


_FAMILIES: dict[str, FamilySpec] = {}
_DATA_KINDS: dict[str, DataKindSpec] = {}
_DISCRIMINATORS: dict[str, DiscriminatorSpec] = {}


def register_family(spec: FamilySpec | str) -> FamilySpec:
    """Add (or replace) a family. A bare name registers a family without rules or builder."""
    if isinstance(spec, str):
        spec = FamilySpec(spec, builder=None, anchor_units=(), guidance_kinds=())
    if not spec.name or not isinstance(spec.name, str):
        raise ValueError("family name must be a non-empty string")
    _FAMILIES[spec.name] = spec
    return spec


def register_data_kind(spec: DataKindSpec | str) -> DataKindSpec:
    if isinstance(spec, str):  # a name only: it reads a path and may prefetch, like the planned kinds
        spec = DataKindSpec(spec, builder=None, reads=frozenset({"path", "num_workers"}))
    if not spec.name or not isinstance(spec.name, str):
        raise ValueError("data kind must be a non-empty string")
    _DATA_KINDS[spec.name] = spec
    return spec


def register_discriminator(spec: DiscriminatorSpec | str) -> DiscriminatorSpec:
    if isinstance(spec, str):
        spec = DiscriminatorSpec(spec, builder=None)
    if not spec.name or not isinstance(spec.name, str):
        raise ValueError("discriminator name must be a non-empty string")
    _DISCRIMINATORS[spec.name] = spec
    return spec


def known_families() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def known_data_kinds() -> tuple[str, ...]:
    return tuple(_DATA_KINDS)


def known_discriminators() -> tuple[str, ...]:
    return (*_DISCRIMINATORS, "none")


def family_spec(name: str) -> FamilySpec | None:
    return _FAMILIES.get(name)


def data_kind_spec(name: str) -> DataKindSpec | None:
    return _DATA_KINDS.get(name)


def discriminator_spec(name: str) -> DiscriminatorSpec | None:
    return _DISCRIMINATORS.get(name)


def available(kind: str) -> tuple[str, ...]:
    """Names of a registry ('family', 'data', 'discriminator') that this version can build."""
    table = {"family": _FAMILIES, "data": _DATA_KINDS, "discriminator": _DISCRIMINATORS}[kind]
    return tuple(name for name, spec in table.items() if spec.builder is not None)


def resolve_builder(
    spec: FamilySpec | DataKindSpec | DiscriminatorSpec, field_name: str, attribute: str = "builder"
) -> Callable:
    """The spec's builder (or another builder ``attribute``) as a callable; a planned entry gives one
    clear error naming the field."""
    builder = getattr(spec, attribute)
    if builder is None:
        ready = ", ".join(available(spec.kind)) or "none"
        raise ValueError(
            f"{field_name}: '{spec.name}' is a valid recipe value but this version cannot build it yet "
            f"(available: {ready})"
        )
    if callable(builder):
        return builder
    module, _, attribute = builder.partition(":")
    return getattr(importlib.import_module(module), attribute)


# --------------------------------------------------------------------------------------------------
# Built-in entries. SDXL, SD 3.5 and FLUX carry the rules of method spec §2-9.
# --------------------------------------------------------------------------------------------------

FLOW_UNITS = ("t", "sigma", "index")

register_family(
    FamilySpec(
        "toy",
        builder="senseflow.families.toy.adapter:build_toy_adapter",
        anchor_units=FLOW_UNITS,
        guidance_kinds=("cfg",),
        needs_teacher=False,
        hub=False,
        data_kinds=("toy",),
        reads=frozenset({"text_cache"}),
        description="the shapes world's SD3 transformer in pixel space (shipped in the package)",
    )
)
register_family(
    FamilySpec(
        "sdxl",
        builder="senseflow.families.sdxl.adapter:build_sdxl_adapter",
        recipe="sdxl",
        reads=frozenset({"variant", "allow_download", "text_cache", "uncond"}),
        anchor_units=("ddpm_t",),
        guidance_kinds=("cfg",),
        resolution_multiple=8,
        description="StableDiffusionXLPipeline folders: UNet, two CLIP encoders, DDPM schedule",
    )
)
register_family(
    FamilySpec(
        "sd3",
        builder="senseflow.families.sd3.adapter:build_sd3_adapter",
        recipe="sd35_large",
        reads=frozenset({"variant", "allow_download", "text_cache", "uncond"}) | {"max_sequence_length"},
        anchor_units=FLOW_UNITS,
        guidance_kinds=("cfg",),
        resolution_multiple=16,
        description="StableDiffusion3Pipeline folders (SD 3.5 Large/Medium): MMDiT, CLIP-L/G + T5, flow",
    )
)
register_family(
    FamilySpec(
        "flux",
        builder="senseflow.families.flux.adapter:build_flux_adapter",
        recipe="flux_dev",
        reads=frozenset({"variant", "allow_download", "text_cache", "uncond"}) | {"max_sequence_length"},
        anchor_units=FLOW_UNITS,
        guidance_kinds=("embedding", "cfg"),
        resolution_multiple=16,
        description="FluxPipeline folders (FLUX.1-dev): packed latents, guidance embedding, CLIP + T5",
    )
)
# The next teachers encode prompts with one language model through the stock pipeline's own
# encode_prompt (chat templates, hidden-layer choices), variable-length embeddings stored with masks.
_LLM_READS = frozenset({"variant", "allow_download", "text_cache", "max_sequence_length"})
register_family(
    FamilySpec(
        "qwen_image",
        builder="senseflow.families.qwen_image.adapter:build_qwen_image_adapter",
        recipe="qwen_image",
        reads=_LLM_READS | {"negative_prompt"},
        anchor_units=FLOW_UNITS,
        guidance_kinds=("cfg",),
        resolution_multiple=16,
        description="QwenImagePipeline folders: MMDiT, Qwen2.5-VL text encoder, true CFG with renorm",
    )
)
register_family(
    FamilySpec(
        "flux2",
        builder="senseflow.families.flux2.adapter:build_flux2_adapter",
        recipe="flux2_dev",
        reads=_LLM_READS | {"uncond"},
        anchor_units=FLOW_UNITS,
        guidance_kinds=("embedding", "cfg"),
        resolution_multiple=16,
        description="Flux2Pipeline folders (FLUX.2-dev): Mistral 3 text encoder, guidance embedding",
    )
)
register_family(
    FamilySpec(
        "flux2_klein",
        builder="senseflow.families.flux2.adapter:build_flux2_klein_adapter",
        recipe="flux2_klein",
        reads=_LLM_READS | {"allow_distilled_teacher"},
        anchor_units=FLOW_UNITS,
        guidance_kinds=("cfg",),
        resolution_multiple=16,
        description="Flux2KleinPipeline folders (FLUX.2 klein base): Qwen3 text encoder, CFG",
    )
)
register_family(
    FamilySpec(
        "z_image",
        builder="senseflow.families.z_image.adapter:build_z_image_adapter",
        recipe="z_image",
        reads=_LLM_READS | {"negative_prompt", "allow_distilled_teacher"},
        anchor_units=FLOW_UNITS,
        guidance_kinds=("cfg",),
        resolution_multiple=16,
        description="ZImagePipeline folders (Z-Image): single-stream DiT, Qwen3 text encoder, CFG",
    )
)

register_data_kind(
    DataKindSpec(
        "toy",
        builder="senseflow.families.toy.data:build_toy_stream",
        reads=frozenset({"num_workers"}),
        needs_path=False,
        description="rendered (image, prompt) pairs of the shapes world's train split",
    )
)
# Every image kind shares one stream (senseflow.data.streams): order, resize and crop, bad samples,
# SDXL's size/crop metadata and the latent cache, so they read the same optional fields.
_IMAGE_READS = frozenset({"path", "num_workers", "crop", "min_side", "latent_cache"})
_COLUMN_READS = _IMAGE_READS | {"prompt_column", "image_column"}
for _name, _reads, _description in (
    ("json", _IMAGE_READS, "the official SenseFlow JSON {keys, image_paths, prompts}"),
    ("jsonl", _COLUMN_READS, "JSON lines: a prompt and an image path column per row"),
    ("csv", _COLUMN_READS, "CSV with a header: a prompt and an image path column"),
    ("tsv", _COLUMN_READS, "TSV with a header: a prompt and an image path column"),
    ("folder", _IMAGE_READS, "images under a folder, each with a same-stem .txt caption"),
    ("webdataset", _IMAGE_READS, "img2dataset tar shards: a tar, a folder or a {a..b} pattern"),
    ("hf", _COLUMN_READS, "save_to_disk folder, parquet file or glob, parquet folder (train split if named)"),
):
    register_data_kind(
        DataKindSpec(
            _name,
            builder=f"senseflow.data.kinds:build_{_name}_stream",
            reads=_reads,
            description=_description,
        )
    )
register_data_kind(
    DataKindSpec(
        "prompts",
        builder="senseflow.data.kinds:build_prompt_stream",
        reads=frozenset({"path", "num_workers"}),
        prompts_only=True,
        description="a prompt list (.txt, one per line, or a .json list): prompts-only batches",
    )
)
register_data_kind(DataKindSpec("latent_lmdb", None, frozenset({"path", "num_workers"})))

register_discriminator(
    DiscriminatorSpec(
        "toy",
        builder="senseflow.models.discriminators:build_toy_discriminator",
        description="a frozen seeded random conv backbone with projected, text-conditioned heads",
    )
)
register_discriminator(
    DiscriminatorSpec(
        "dmd2_head",
        builder="senseflow.models.discriminators:build_dmd2_head",
        reads=frozenset({"feature_blocks", "head_trains_fake", "head"}),
        description="DMD2's classifier head on the fake score's features",
    )
)
register_discriminator(
    DiscriminatorSpec(
        "vfm",
        builder="senseflow.models.vfm:build_vfm",
        reads=frozenset(
            {
                "backbone",
                "feature_blocks",
                "text_encoder",
                "reference_encoder",
                "input_size",
                "backbone_checkpointing",
            }
        ),
        text_encoder="senseflow.models.vfm:build_vfm_text_encoder",
        description="frozen DINOv2, trained heads conditioned on CLIP text and a reference image (SenseFlow)",
    )
)
