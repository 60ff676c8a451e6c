"""The model card (``README.md``) of an export: the hub's YAML metadata, then how to run it.

The front matter carries what the hub indexes (``base_model``, ``pipeline_tag``, ``library_name``,
``license`` carried from the teacher's own card, tags); the body gives the few lines of stock code
that load the export, the exact inference settings (steps, guidance, scheduler, anchors), the
training that produced it, the evaluation table when there is one and a sample grid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from senseflow.export.schedulers import StockSampler

LICENSE_KEYS = ("license", "license_name", "license_link")


def front_matter(text: str) -> dict[str, Any]:
    """The YAML block between the leading ``---`` lines of a card ({} when there is none)."""
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    data = yaml.safe_load(text[3:end])
    return data if isinstance(data, dict) else {}


def teacher_card_fields(teacher_folder: Path) -> dict[str, Any]:
    """License (and the teacher's own base model) from the teacher folder's card, when it has one."""
    card = Path(teacher_folder) / "README.md"
    meta = front_matter(card.read_text(encoding="utf-8", errors="replace")) if card.is_file() else {}
    return {k: meta[k] for k in LICENSE_KEYS if k in meta}


def hub_id(teacher: str) -> str | None:
    """``teacher`` when it names a hub repository (``org/name``) rather than a local folder."""
    parts = teacher.split("/")
    return teacher if len(parts) == 2 and all(parts) and not Path(teacher).exists() else None


def call_text(kwargs: dict[str, Any]) -> str:
    """Keyword arguments as Python source, one per line."""
    return "".join(f"    {k}={v!r},\n" for k, v in kwargs.items())


@dataclass
class CardInfo:
    title: str
    fmt: str  # diffusers | lora | single-file
    teacher: str  # the recipe's model.teacher
    teacher_folder: Path
    pipeline_class: str
    sampler: StockSampler
    call_kwargs: dict[str, Any]  # what the pipeline call needs besides the prompt
    load_code: str  # the lines that build `pipe`
    recipe_name: str
    step: int
    checkpoint_sha256: str
    dtype: str
    notes: list[str] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    eval_table: str | None = None
    samples: str | None = None  # the sample grid's file name in the folder


def model_card(info: CardInfo) -> str:
    meta: dict[str, Any] = {}
    base = hub_id(info.teacher)
    if base:
        meta["base_model"] = base
    meta.update({"pipeline_tag": "text-to-image", "library_name": "diffusers"})
    licence = teacher_card_fields(info.teacher_folder)
    meta.update(licence or {"license": "other"})
    meta["tags"] = ["senseflow", "distillation", "few-step", "text-to-image", info.pipeline_class]
    if info.fmt == "lora":
        meta["tags"].append("lora")
    head = "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n"
    steps = info.sampler.steps
    lines = [
        f"# {info.title}",
        "",
        f"A {steps}-step student of `{info.teacher}` distilled with senseflow (SenseFlow: distribution "
        "matching with implicit distribution alignment, intra-segment guidance and a discriminator). "
        f"This is the `{info.fmt}` export.",
        "",
        "## Use it",
        "",
        "```python",
        "import torch",
        info.load_code.rstrip(),
        "image = pipe(",
        '    "a photo of a cat sitting on a red sofa",',
        f"    num_inference_steps={steps},",
        call_text(info.call_kwargs).rstrip("\n"),
        ").images[0]",
        "```",
        "",
        "## Inference settings",
        "",
        "| setting | value |",
        "|---|---|",
        f"| steps | {steps} |",
        f"| scheduler | `{info.sampler.class_name}` ({_mode(info.sampler)}) |",
        f"| anchors ({info.sampler.units}) | {_numbers(info.sampler.anchors)} |",
        f"| plain call walks | {_numbers(info.sampler.default_walk)} (max difference "
        f"{info.sampler.deviation:.2g}) |",
        f"| exact call adds | {_call(info.sampler)} |",
        "| guidance | none: the student is CFG-free (the call above turns the pipeline's guidance off) |",
        f"| weights dtype | {info.dtype} |",
        "",
        *[f"- {note}" for note in info.notes],
        "",
        "## Training",
        "",
        f"Recipe `{info.recipe_name}`, checkpoint of iteration {info.step} (generator sha256 "
        f"`{info.checkpoint_sha256[:16]}`).",
        "",
        "```json",
        json.dumps(info.training, indent=2),
        "```",
        "",
        "## Evaluation",
        "",
        info.eval_table.strip()
        if info.eval_table
        else "Not evaluated (run `senseflow eval`, then export with `--eval`).",
        "",
    ]
    if info.samples:
        lines += ["## Samples", "", f"![samples]({info.samples})", ""]
    return head + "\n".join(lines)


def _mode(sampler: StockSampler) -> str:
    stochastic = sampler.config.get("stochastic_sampling") or sampler.class_name == "LCMScheduler"
    return "x̂0 then fresh noise at each anchor" if stochastic else "deterministic steps"


def _numbers(values: list[float]) -> str:
    return ", ".join(f"{v:.6g}" for v in values)


def _call(sampler: StockSampler) -> str:
    if not sampler.call:
        return "nothing: the plain call walks the anchors"
    return ", ".join(f"`{k}={[round(v, 8) for v in vs]}`" for k, vs in sampler.call.items())
