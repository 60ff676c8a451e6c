"""The student as a complete diffusers pipeline folder that ``DiffusionPipeline.from_pretrained`` loads.

The folder is the teacher's pipeline (its text encoders, tokenizers and VAE, re-saved without weight
variants in the chosen dtype) with two components replaced: the denoiser by the student's weights,
and the scheduler by a stock scheduler configured to walk the student's anchors
(:mod:`senseflow.export.schedulers`). Beside the pipeline, ``senseflow/recipe.yaml`` (the run's recipe
with its anchors written out as explicit σ or timesteps) and ``senseflow/export.json`` let
``senseflow generate`` and ``senseflow eval`` load the folder as a student again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline
from torch import nn

from senseflow.config.common import AnchorsConfig
from senseflow.config.loader import save_resolved
from senseflow.config.schema import DistillConfig
from senseflow.core.timesteps import Anchors
from senseflow.export.schedulers import Mode, StockSampler, stock_sampler
from senseflow.families.diffusers_folder import DiffusersAdapter
from senseflow.models.adapter import FamilyAdapter
from senseflow.student import EXPORT_DIR, EXPORT_META, EXPORT_RECIPE


def diffusers_adapter(adapter: FamilyAdapter, what: str) -> DiffusersAdapter:
    """The adapter of a family with a stock diffusers pipeline, or one clear error."""
    if not isinstance(adapter, DiffusersAdapter):
        raise ValueError(
            f"{what}: model.family of this run has no stock diffusers pipeline "
            f"({type(adapter).__name__}); export needs an sdxl, sd3 or flux run"
        )
    if adapter.anchors is None:
        raise ValueError(f"{what}: the run's recipe has no model.anchors, so there is no few-step student")
    return adapter


def sampler_for(adapter: DiffusersAdapter, mode: Mode, resolution: int) -> StockSampler:
    """The stock scheduler walking the student's anchors with the pipeline's own set_timesteps arguments."""
    shape = (1, *adapter.sample_shape(resolution))
    return stock_sampler(
        adapter.anchors,
        adapter.folder.config("scheduler"),
        mode,
        lambda steps: adapter.timesteps_kwargs(steps, shape),
    )


def explicit_anchors(anchors: Anchors) -> AnchorsConfig:
    """Anchors in units that do not depend on the scheduler config they were resolved with."""
    if anchors.kind == "ddpm":
        return AnchorsConfig(values=[int(t) for t in anchors.timesteps], units="ddpm_t")
    return AnchorsConfig(values=[float(s) for s in anchors.sigmas], units="sigma")


def exported_recipe(cfg: DistillConfig, anchors: Anchors) -> DistillConfig:
    """The recipe a loader of the exported folder needs: explicit anchors, no LoRA (merged)."""
    model = cfg.model.model_copy(update={"anchors": explicit_anchors(anchors), "lora": None})
    return cfg.model_copy(update={"model": model})


def write_pipeline_folder(
    adapter: DiffusersAdapter,
    network: nn.Module,
    sampler: StockSampler,
    out: Path,
    dtype: torch.dtype,
) -> None:
    """The teacher's pipeline with ``network`` as denoiser and ``sampler``'s scheduler, saved to ``out``."""
    folder = adapter.folder
    components: dict[str, Any] = {adapter.NETWORK: network.to(dtype), "scheduler": sampler.scheduler()}
    pipe = DiffusionPipeline.from_pretrained(folder.path, variant=folder.variant, dtype=dtype, **components)
    pipe.save_pretrained(out, safe_serialization=True)


def write_senseflow_files(out: Path, cfg: DistillConfig, anchors: Anchors, manifest: dict[str, Any]) -> None:
    """``senseflow/recipe.yaml`` and ``senseflow/export.json`` (written last: the folder is complete)."""
    own = out / EXPORT_DIR  # the files `Student.from_export` reads
    own.mkdir(parents=True, exist_ok=True)
    save_resolved(exported_recipe(cfg, anchors), own / EXPORT_RECIPE, header="exported student's recipe")
    (own / EXPORT_META).write_text(json.dumps(manifest, indent=2) + "\n")
