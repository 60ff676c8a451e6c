"""Hand-off to the official T2I-CompBench scripts: export the layout they read, read back what they write.

The official spatial evaluator needs detectron2 + UniDet, which are not installable here, so it runs on
the user's machine in its own environment. :func:`export_official_layout` writes
``<out>/samples/{prompt}_{idx:06d}.png`` (copies or links of the project's images) plus
``<out>/senseflow_export.json`` (category, index digest, file list). Each official script writes a
``vqa_result.json`` list of ``{"question_id": int, "answer": number or string}``;
:func:`read_official_scores` reads one and :func:`official_category_scores` attaches it to the index.
Where those files are, per script (relative to the folder given to the script as its output path):

* BLIP-VQA: ``annotation_blip/vqa_result.json`` (answers are strings with 4 decimals)
* UniDet 2D spatial: ``labels/annotation_obj_detection_2d/vqa_result.json`` (older revision:
  ``labels/annotation_obj_detection/vqa_result.json``)
* CLIP: ``annotation_clip/vqa_result.json`` (question_id = position in sorted order)
* 3-in-1: ``annotation_3_in_1/vqa_result.json`` (question_id = position)

A run that also dumps raw detections can instead hand them to the pure-Python scorer through
:func:`senseflow.metrics.compbench.spatial.read_detections_jsonl`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

from senseflow.metrics.compbench.layout import CompBenchIndex, official_filename
from senseflow.metrics.compbench.results import CategoryScores, records_from_scores

EXPORT_MANIFEST = "senseflow_export.json"
OFFICIAL_RESULT_PATHS: dict[str, tuple[str, ...]] = {
    "blip_vqa": ("annotation_blip/vqa_result.json",),
    "spatial": (
        "labels/annotation_obj_detection_2d/vqa_result.json",
        "labels/annotation_obj_detection/vqa_result.json",
        "annotation_obj_detection/vqa_result.json",
    ),
    "clip": ("annotation_clip/vqa_result.json",),
    "three_in_one": ("annotation_3_in_1/vqa_result.json",),
}


def export_official_layout(
    index: CompBenchIndex,
    images_dir: str | PathLike,
    out_dir: str | PathLike,
    mode: str = "copy",
    overwrite: bool = False,
) -> Path:
    """Write the official layout for ``index`` under ``out_dir``; returns the ``samples`` folder.

    ``mode``: ``copy``, ``hardlink`` or ``symlink``. Every prompt is checked by
    :func:`~senseflow.metrics.compbench.layout.official_filename` before anything is written.
    """
    if mode not in ("copy", "hardlink", "symlink"):
        raise ValueError(f"unknown export mode {mode!r}")
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    names = [(entry, official_filename(entry.prompt, entry.idx)) for entry in index.entries]
    for entry, _ in names:
        if not (images_dir / entry.image).is_file():
            raise FileNotFoundError(f"image for idx {entry.idx} not found: {images_dir / entry.image}")
    samples = out_dir / "samples"
    if samples.exists() and any(samples.iterdir()) and not overwrite:
        raise FileExistsError(f"{samples} is not empty; pass overwrite=True to replace it")
    if samples.exists() and overwrite:
        shutil.rmtree(samples)
    samples.mkdir(parents=True, exist_ok=True)
    for entry, name in names:
        src, dst = (images_dir / entry.image).resolve(), samples / name
        if mode == "copy":
            shutil.copyfile(src, dst)
        elif mode == "hardlink":
            os.link(src, dst)
        else:
            dst.symlink_to(src)
    manifest = {
        "category": index.category,
        "images_per_prompt": index.images_per_prompt,
        "prompts_sha256": index.prompts_sha256,
        "count": len(names),
        "mode": mode,
        "files": [{"idx": e.idx, "file": n, "image": e.image} for e, n in names],
    }
    (out_dir / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", "utf-8")
    return samples


def find_official_result(outpath: str | PathLike, metric: str) -> Path:
    """The ``vqa_result.json`` an official script wrote under ``outpath`` for ``metric``."""
    if metric not in OFFICIAL_RESULT_PATHS:
        raise ValueError(
            f"unknown official metric {metric!r}; expected one of {sorted(OFFICIAL_RESULT_PATHS)}"
        )
    for rel in OFFICIAL_RESULT_PATHS[metric]:
        path = Path(outpath) / rel
        if path.is_file():
            return path
    tried = ", ".join(OFFICIAL_RESULT_PATHS[metric])
    raise FileNotFoundError(f"no official {metric} result under {outpath} (looked for {tried})")


def read_official_scores(path: str | PathLike) -> dict[int, float]:
    """``{question_id: score}`` from an official ``vqa_result.json`` (string answers are parsed)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{question_id, answer}} records")
    out: dict[int, float] = {}
    for rec in data:
        qid, value = int(rec["question_id"]), float(rec["answer"])
        if qid in out:
            raise ValueError(f"{path}: question_id {qid} appears twice")
        if not math.isfinite(value):
            raise ValueError(f"{path}: non-finite answer for question_id {qid}")
        out[qid] = value
    return out


def official_category_scores(
    index: CompBenchIndex, scores: Mapping[int, float], metric: str, source: str | PathLike | None = None
) -> CategoryScores:
    """Attach official per-image scores (keyed by question_id = idx) to ``index``."""
    records = records_from_scores(index, metric, scores)
    info = {"source": "official", "file": None if source is None else str(source)}
    return CategoryScores(index.category, metric, records, info)
