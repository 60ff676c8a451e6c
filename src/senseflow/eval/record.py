"""The result record of ``senseflow eval`` (one JSON per model, spec §12) and its markdown table.

The table follows the paper's Table 1: one row per model (the reference first, its FID columns shown
as "--"), columns FID-T, Patch FID-T, CLIP, HPSv2, PickScore and ImageReward; columns of metrics that
were not computed are left out. Precision, recall and intra-prompt diversity follow the FID columns.
The shapes world adds its own columns (FID-T, precision, recall and diversity on its features, the
layout diversity and the rule-based accuracies) in the same layout.
"""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from senseflow.eval.config import EvalConfig
from senseflow.eval.images import ImageSet

__all__ = ["RECORD_SCHEMA", "build_record", "markdown_table", "software"]

RECORD_SCHEMA = "senseflow.eval/1"
_PACKAGES = ("torch", "transformers", "diffusers", "pillow", "numpy", "scipy")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def software() -> dict[str, Any]:
    versions: dict[str, Any] = {"python": platform.python_version()}
    for name in ("senseflow", *_PACKAGES):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["senseflow_commit"] = _git_commit()
    return versions


def _model_block(images: ImageSet, cfg: EvalConfig) -> dict[str, Any]:
    ident = images.identity
    return {
        "name": images.name,
        "kind": ident.get("kind"),
        "checkpoint_sha256": ident.get("checkpoint_sha256"),
        "sampler": ident.get("sampler"),
        "steps": ident.get("steps"),
        "nfe": ident.get("nfe"),
        "guidance": ident.get("guidance"),
        "seed_scheme": cfg.seeds.scheme,
        "seed_base": images.seeds[0] if images.seeds else cfg.seeds.base,
        "resolution": ident.get("resolution"),
        "images": str(images.folder),
    }


def build_record(
    cfg: EvalConfig,
    images: ImageSet,
    reference: ImageSet | None,
    prompts_info: dict[str, Any],
    metrics: dict[str, Any],
    weights: dict[str, Any],
    device: str,
) -> dict[str, Any]:
    """The spec §12 record: every protocol field, None where not applicable."""
    ref = None
    if reference is not None:
        ident = reference.identity
        ref = {
            "kind": "teacher",
            "name": reference.name,
            "run_id": ident.get("checkpoint_sha256"),
            "sampler": ident.get("sampler"),
            "nfe": ident.get("nfe"),
            "guidance": ident.get("guidance"),
            "seed_base": reference.seeds[0] if reference.seeds else None,
        }
    return {
        "schema": RECORD_SCHEMA,
        "model": _model_block(images, cfg),
        "reference": ref,
        "prompts": prompts_info,
        "images": {"quantisation": cfg.quantisation, "format": "png", "per_prompt": 1},
        "metrics": metrics,
        "weights": weights,
        "software": software(),
        "device": device,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


# ------------------------------------------------------------------------------------------ table


def _value(block: Any, *keys: str) -> float | None:
    for k in keys:
        if not isinstance(block, dict):
            return None
        block = block.get(k)
    return block if isinstance(block, (int, float)) else None


def _block(block: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        if not isinstance(block, dict):
            return None
        block = block.get(k)
    return block


def _fmt(v: float | None, digits: int, percent: bool = False) -> str:
    if v is None:
        return "--"
    return f"{100 * v:.1f}%" if percent else f"{v:.{digits}f}"


#: (column header, path into the metrics block, digits, percent); the reference shows "--" for FIDs.
_COLUMNS = (
    ("FID-T ↓", ("fid_t", "value"), 2, False),
    ("Patch FID-T ↓", ("patch_fid_t", "value"), 2, False),
    ("Precision ↑", ("precision_recall", "precision"), 3, False),
    ("Recall ↑", ("precision_recall", "recall"), 3, False),
    ("Diversity ↑", ("diversity", "value"), 3, False),
    ("CLIP ↑", ("clip_score", "value"), 4, False),
    ("HPSv2 ↑", ("hpsv2", "value"), 4, False),
    ("PickScore ↑", ("pickscore", "value"), 2, False),
    ("ImageReward ↑", ("imagereward", "value"), 3, False),
    ("Toy FID-T ↓", ("toy", "fid_t"), 2, False),
    ("Toy precision ↑", ("toy", "precision_recall", "precision"), 3, False),
    ("Toy recall ↑", ("toy", "precision_recall", "recall"), 3, False),
    ("Toy diversity ↑", ("toy", "diversity", "value"), 3, False),
    ("Layout diversity ↑", ("toy", "diversity", "layout", "value"), 2, False),
    ("Colour ↑", ("toy", "accuracy", "overall", "colour"), 1, True),
    ("Shape ↑", ("toy", "accuracy", "overall", "shape"), 1, True),
    ("Size ↑", ("toy", "accuracy", "overall", "size"), 1, True),
    ("Relation ↑", ("toy", "accuracy", "overall", "relation"), 1, True),
    ("Compositional ↑", ("toy", "accuracy", "overall", "all"), 1, True),
)


def markdown_table(records: list[dict[str, Any]]) -> str:
    """Rows = records (reference first); a column appears when any record has the block that holds its
    value (a block with a null value, e.g. diversity reported missing, shows "--")."""

    def present(path: tuple[str, ...]) -> bool:
        return any(isinstance(_block(r["metrics"], path[:-1]), dict) for r in records)

    cols = [c for c in _COLUMNS if present(c[1])]
    header = ["Model", "Sampler", "NFE", *(c[0] for c in cols)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in records:
        m = r["model"]
        cells = [m["name"], str(m["sampler"] or "--"), str(m["nfe"] or "--")]
        cells += [_fmt(_value(r["metrics"], *path), digits, pct) for _, path, digits, pct in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
