"""``senseflow eval run``: images for every model, the metric panel, JSON records and the table.

Steps: load the prompts and check every model's inputs (a bad prompts file, run folder or image is
refused before anything is written); for the reference (teacher) and each student make or reuse
their images (:mod:`senseflow.eval.images`); optionally a second reference set on shifted seeds (the
FID-T floor); the extra images of the intra-prompt diversity metric (K seeds of the first prompts,
in ``images/diversity/``); load the enabled metrics once (:mod:`senseflow.eval.panel`); score every
model against the reference; write ``<output_dir>/records/<name>.json`` (spec §12),
``<name>.per_image.jsonl``, ``results.md`` (Table 1 layout) and the resolved recipe
``eval_config.yaml``.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

from senseflow.errors import UsageError
from senseflow.eval.config import EvalConfig, ModelEntry
from senseflow.eval.images import DiversityImages, ImageSet, diversity_plan, ensure_images
from senseflow.eval.panel import Panel, diversity_features, load_prompts
from senseflow.eval.record import build_record, markdown_table
from senseflow.eval.sources import ImageSource, build_source
from senseflow.inputs import output_folder
from senseflow.jsonfile import write_json

__all__ = ["EvalResult", "run_eval"]

FLOOR_SUFFIX = "-other-seeds"


class EvalResult:
    def __init__(self, out: Path, records: list[dict[str, Any]], table: Path):
        self.out, self.records, self.table = out, records, table


def _source(entry: ModelEntry, cfg: EvalConfig, count: int) -> ImageSource:
    try:
        source = build_source(entry, cfg.device)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"model {entry.name!r}: {exc}") from None
    source.check(count)
    return source


def _sources(cfg: EvalConfig, count: int) -> dict[str, ImageSource]:
    """Every model's source, those that read files first (cheap checks before any model loads)."""
    entries = [cfg.reference, *cfg.students]
    built = {e.name: _source(e, cfg, count) for e in sorted(entries, key=lambda e: e.kind != "folder")}
    return {e.name: built[e.name] for e in entries}


def _images(
    source: ImageSource,
    cfg: EvalConfig,
    prompts: list[str],
    seeds: list[int],
    progress: bool,
    subfolder: str | None = None,
) -> ImageSet:
    root = Path(cfg.output_dir) / "images"
    return ensure_images(
        source,
        prompts,
        seeds,
        root / subfolder if subfolder else root,
        cfg.quantisation,
        batch_size=source.entry.batch_size,
        progress=progress,
    )


def _diversity_images(
    source: ImageSource, cfg: EvalConfig, prompts: list[str], progress: bool
) -> DiversityImages:
    """The model's K seeds of the first prompts: generated like its other images; a source that only
    reads files reads them from ``<folder>/diversity/`` (same naming, in the order of
    :func:`diversity_plan`), and without that folder the metric is reported missing, with the reason."""
    dc = cfg.metrics.diversity
    texts, seeds, rule = diversity_plan(
        prompts, cfg.seeds.base, dc.seed_offset, dc.prompts, dc.seeds_per_prompt
    )
    count = len(texts) // dc.seeds_per_prompt

    def missing(reason: str) -> DiversityImages:
        return DiversityImages(None, count, dc.seeds_per_prompt, rule, missing=reason)

    if not source.generates:
        folder = getattr(source, "folder", None)
        if folder is None:
            return missing(f"kind {source.entry.kind!r} does not generate images")
        sub = Path(folder) / "diversity"
        if not sub.is_dir():
            return missing(
                f"kind {source.entry.kind!r} reads fixed images and {sub} does not exist: put the "
                f"{len(texts)} diversity images there (00000.png ..., seed k of prompt i at index i * "
                f"{dc.seeds_per_prompt} + k, seeds {rule})"
            )
        try:
            source = build_source(source.entry.model_copy(update={"path": str(sub)}), cfg.device)
            source.check(len(texts))
        except (UsageError, FileNotFoundError) as exc:
            return missing(str(exc))
    images = _images(source, cfg, texts, seeds, progress, subfolder="diversity")
    return DiversityImages(images, count, dc.seeds_per_prompt, rule)


def run_eval(cfg: EvalConfig, progress: bool = True) -> EvalResult:
    from senseflow.config.loader import dump_config
    from senseflow.devices import resolve_device

    # `auto` becomes the device it means here, so sources, metrics and the record name a real one
    cfg = cfg.model_copy(update={"device": str(resolve_device(cfg.device, "device"))})
    out = output_folder(cfg.output_dir, "output_dir")
    prompt_set = load_prompts(cfg)
    prompts = prompt_set.prompts
    seeds = [cfg.seeds.base + i for i in range(len(prompts))]

    start = time.perf_counter()
    sources = _sources(cfg, len(prompts))  # every input checked before the first file is written
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_config.yaml").write_text(dump_config(cfg))
    reference = _images(sources[cfg.reference.name], cfg, prompts, seeds, progress)
    sets: list[tuple[ImageSet, ImageSet | None]] = [(reference, None)]
    if cfg.reference_floor_seed_offset is not None:
        floor = copy.copy(sources[cfg.reference.name])
        floor.entry = cfg.reference.model_copy(update={"name": cfg.reference.name + FLOOR_SUFFIX})
        shifted = [s + cfg.reference_floor_seed_offset for s in seeds]
        sets.append((_images(floor, cfg, prompts, shifted, progress), reference))
    for student in cfg.students:
        sets.append((_images(sources[student.name], cfg, prompts, seeds, progress), reference))
    diversity: dict[str, DiversityImages] = {}
    if diversity_features(cfg):
        diversity = {name: _diversity_images(src, cfg, prompts, progress) for name, src in sources.items()}
    generation_s = time.perf_counter() - start

    panel = Panel.load(cfg, out / "cache", progress=progress)
    records = []
    for images, ref in sets:
        t0 = time.perf_counter()
        div = diversity.get(images.name)  # none for the FID-T floor set (the reference on other seeds)
        metrics, per_image = panel.score(images, ref, div)
        record = build_record(cfg, images, ref, prompt_set.info, metrics, panel.weights, cfg.device)
        record["timing"] = {
            "scoring_seconds": time.perf_counter() - t0,
            "generated_images": images.generated,
            "generated_diversity_images": div.images.generated if div and div.images else 0,
        }
        write_json(out / "records" / f"{images.name}.json", record)
        (out / "records" / f"{images.name}.per_image.jsonl").write_text(
            "".join(json.dumps(row) + "\n" for row in per_image)
        )
        records.append(record)
    compbench_rows = (
        _compbench(cfg, sources, records, out, progress) if cfg.metrics.compbench.enabled else None
    )
    table = out / "results.md"
    table.write_text(_markdown(cfg, prompt_set.info, records, generation_s, compbench_rows))
    return EvalResult(out, records, table)


def _compbench(
    cfg: EvalConfig, sources: dict[str, ImageSource], records: list[dict], out: Path, progress: bool
):
    """T2I-CompBench for the reference and every student; adds ``metrics.compbench`` to their records."""
    from senseflow.eval.compbench import CompBenchRunner

    runner = CompBenchRunner(cfg, progress=progress)
    rows = {}
    for record in records:
        name = record["model"]["name"]
        if name not in sources:  # the FID-T floor set is not a model of its own
            continue
        block, rows[name], per_image = runner.evaluate(sources[name])
        record["metrics"]["compbench"] = block
        write_json(out / "records" / f"{name}.json", record)
        (out / "records" / f"{name}.compbench.jsonl").write_text(
            "".join(json.dumps(row) + "\n" for row in per_image)
        )
    return rows


def _markdown(
    cfg: EvalConfig,
    prompts: dict[str, Any],
    records: list[dict[str, Any]],
    gen_s: float,
    compbench_rows: dict[str, dict[str, float | None]] | None = None,
) -> str:
    lines = [
        f"# {cfg.name}",
        "",
        f"Prompts: {prompts['set']} ({prompts['count']} prompts, sha256 {prompts['prompts_sha256'][:12]}), "
        f"seeds {cfg.seeds.scheme} from {cfg.seeds.base}, one image per prompt, "
        f"quantisation `{cfg.quantisation}`, PNG. FID-T is measured against `{cfg.reference.name}`; "
        "its own FID cells are '--'.",
    ]
    pr, dc = cfg.metrics.precision_recall, cfg.metrics.diversity
    if pr.enabled and (cfg.metrics.fid.enabled or cfg.toy_metrics):
        lines.append(
            f"Precision and recall: k-NN manifolds (Kynkäänniemi et al. 2019, k = {pr.k}) on the FID-T "
            f"features, against `{cfg.reference.name}` ('--' on its own row: 1 by construction)."
        )
    if diversity_features(cfg):
        lines.append(
            f"Diversity: mean pairwise feature distance among {dc.seeds_per_prompt} seeds of each of the "
            f"first {min(dc.prompts, prompts['count'])} prompts (seeds from {cfg.seeds.base} + "
            f"{dc.seed_offset}); '--': not computed (the record's `missing` says why)."
        )
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
    if compbench_rows is not None:
        from senseflow.metrics.compbench.report import markdown_table as table2

        cb = cfg.metrics.compbench
        lines += [
            "## T2I-CompBench",
            "",
            f"{cb.images_per_prompt} images per prompt, seeds {cfg.seeds.scheme} from {cfg.seeds.base}; "
            f"evaluator: {cb.evaluator_version}. '--': not computed (spatial and complex need detections; "
            "see the record's `missing`).",
            "",
            table2(compbench_rows),
        ]
    return "\n".join(lines)
