"""Tiny teacher folders of the real families and short distillation recipes on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from senseflow.config import load_config

RECIPES = {
    "sdxl": "sdxl",
    "sd3": "sd35_large",
    "flux": "flux_dev",
    "qwen_image": "qwen_image",
    "flux2": "flux2_dev",
    "flux2_klein": "flux2_klein",
    "z_image": "z_image",
}
RESOLUTION = 64
# Text length of the tiny folders' prompts: 8 tokens, except where the tiny tokenizer spells the
# pipeline's chat template (most of it kept) in more tokens than the real one, so the prompt starts later.
TEXT_LENGTH = {"qwen_image": 160}

# What a CPU test changes in a shipped recipe: tiny sizes, float32, adamw (the SD 3.5 / FLUX recipes'
# 8-bit AdamW needs bitsandbytes and a GPU), the DMD2 head (the VFM discriminator is not built yet).
SMALL = [
    "schedule.iterations=2",
    f"data.resolution={RESOLUTION}",
    "data.batch_size=2",
    "data.num_workers=0",
    "logging.every=1",
    "logging.sample_every=null",
    "logging.sample_prompts=[a red cat]",
    "logging.sample_seeds=[0]",
    "precision.teacher_dtype=fp32",
    "precision.autocast_dtype=fp32",
    "precision.param_dtype=fp32",
    "parallel.strategy=none",
    "parallel.gradient_checkpointing=false",
    "parallel.device=cpu",
    "method.ttur_ratio=2",
    "method.randomness=per_sample",
    "method.gan.type=dmd2_head",
    "optim.generator.name=adamw",
    "optim.fake.name=adamw",
    "optim.discriminator.name=adamw",
    "optim.warmup_steps=0",
]


def write_image_dataset(folder: Path, n: int = 6) -> Path:
    """``n`` random RGB images of a non-square size and the official JSON index over them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths, prompts = [], []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        paths.append(f"{i}.png")
        prompts.append(f"a photo of thing number {i}")
    index = folder / "train.json"
    index.write_text(
        json.dumps({"keys": [str(i) for i in range(n)], "image_paths": paths, "prompts": prompts})
    )
    return index


def family_cfg(family: str, teacher: Path, data: Path, out: Path, *extra: str, recipe: str | None = None):
    """The family's shipped recipe (or ``recipe``) on a tiny folder and dataset."""
    more = [] if family == "sdxl" else [f"model.max_sequence_length={TEXT_LENGTH.get(family, 8)}"]
    return load_config(
        recipe or RECIPES[family],
        [f"model.teacher={teacher}", f"data.path={data}", f"output_dir={out}", *SMALL, *more, *extra],
    )
