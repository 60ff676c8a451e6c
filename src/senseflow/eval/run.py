"""``senseflow eval run``: images for every model, the metric panel, JSON records and the table.

Steps: load the prompts; for the reference (teacher) and each student make or reuse their images
(:mod:`senseflow.eval.images`); optionally a second reference set on shifted seeds (the FID-T floor);
load the enabled metrics once (:mod:`senseflow.eval.panel`); score every model against the
reference; write ``<output_dir>/records/<name>.json`` (spec §12), ``<name>.per_image.jsonl``,
``results.md`` (Table 1 layout) and the resolved recipe ``eval_config.yaml``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from senseflow.eval.config import EvalConfig, ModelEntry
from senseflow.eval.images import ImageSet, ensure_images
from senseflow.eval.panel import Panel, load_prompts
from senseflow.eval.record import build_record, markdown_table
from senseflow.eval.sources import build_source

__all__ = ["EvalResult", "run_eval"]

FLOOR_SUFFIX = "-other-seeds"


class EvalResult:
    def __init__(self, out: Path, records: list[dict[str, Any]], table: Path):
        self.out, self.records, self.table = out, records, table


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def _images(
    entry: ModelEntry, cfg: EvalConfig, prompts: list[str], seeds: list[int], progress: bool
) -> ImageSet:
    try:
        source = build_source(entry, cfg.device)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"model {entry.name!r}: {exc}") from None
    return ensure_images(
        source,
        prompts,
        seeds,
        Path(cfg.output_dir) / "images",
        cfg.quantisation,
        batch_size=entry.batch_size,
        progress=progress,
    )


def run_eval(cfg: EvalConfig, progress: bool = True) -> EvalResult:
    from senseflow.config.loader import dump_config

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_config.yaml").write_text(dump_config(cfg))
    prompt_set = load_prompts(cfg)
    prompts = prompt_set.prompts
    seeds = [cfg.seeds.base + i for i in range(len(prompts))]

    start = time.perf_counter()
    reference = _images(cfg.reference, cfg, prompts, seeds, progress)
    sets: list[tuple[ImageSet, ImageSet | None]] = [(reference, None)]
    if cfg.reference_floor_seed_offset is not None:
        floor_entry = cfg.reference.model_copy(update={"name": cfg.reference.name + FLOOR_SUFFIX})
        shifted = [s + cfg.reference_floor_seed_offset for s in seeds]
        sets.append((_images(floor_entry, cfg, prompts, shifted, progress), reference))
    for student in cfg.students:
        sets.append((_images(student, cfg, prompts, seeds, progress), reference))
    generation_s = time.perf_counter() - start

    panel = Panel.load(cfg, out / "cache", progress=progress)
    records = []
    for images, ref in sets:
        t0 = time.perf_counter()
        metrics, per_image = panel.score(images, ref)
        record = build_record(cfg, images, ref, prompt_set.info, metrics, panel.weights, cfg.device)
        record["timing"] = {"scoring_seconds": time.perf_counter() - t0, "generated_images": images.generated}
        _write_json(out / "records" / f"{images.name}.json", record)
        (out / "records" / f"{images.name}.per_image.jsonl").write_text(
            "".join(json.dumps(row) + "\n" for row in per_image)
        )
        records.append(record)
    table = out / "results.md"
    table.write_text(_markdown(cfg, prompt_set.info, records, generation_s))
    return EvalResult(out, records, table)


def _markdown(cfg: EvalConfig, prompts: dict[str, Any], records: list[dict[str, Any]], gen_s: float) -> str:
    lines = [
        f"# {cfg.name}",
        "",
        f"Prompts: {prompts['set']} ({prompts['count']} prompts, sha256 {prompts['prompts_sha256'][:12]}), "
        f"seeds {cfg.seeds.scheme} from {cfg.seeds.base}, one image per prompt, "
        f"quantisation `{cfg.quantisation}`, PNG. FID-T is measured against `{cfg.reference.name}`; "
        "its own FID cells are '--'.",
    ]
    if cfg.reference_floor_seed_offset is not None:
        lines.append(
            f"`{cfg.reference.name}{FLOOR_SUFFIX}` is the reference on seeds shifted by "
            f"{cfg.reference_floor_seed_offset}: its FID-T is the floor at this N."
        )
    lines += [
        "",
        markdown_table(records),
        f"Image generation took {gen_s:.1f} s in this call "
        "(0 when every image was cached). Records: `records/<model>.json`.",
        "",
    ]
    return "\n".join(lines)
