"""T2I-CompBench aggregation: the ``compbench`` block of the result record and a Table-2 style table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from senseflow.metrics.compbench.results import CATEGORIES, CategoryScores

# Column order and headers of the paper's Table 2.
TABLE2_COLUMNS = (
    ("color", "Color"),
    ("shape", "Shape"),
    ("texture", "Texture"),
    ("spatial", "Spatial"),
    ("non_spatial", "Non-Spatial"),
    ("complex", "Complex"),
)
DEFAULT_EXCLUDE_CHUNKS = ("top", "the side", "the left", "the right")


def per_category(results: Sequence[CategoryScores]) -> dict[str, dict[str, Any]]:
    """``{category: {"value", "n", "metric", "info"}}``, the ``per_category`` field of the record."""
    out: dict[str, dict[str, Any]] = {}
    for r in results:
        if r.category not in CATEGORIES:
            raise ValueError(f"unknown T2I-CompBench category {r.category!r}; expected one of {CATEGORIES}")
        if r.category in out:
            raise ValueError(f"category {r.category!r} given twice")
        out[r.category] = {"value": r.value, "n": r.n, "metric": r.metric, "info": dict(r.info)}
    return out


def compbench_block(
    results: Sequence[CategoryScores],
    *,
    evaluator_version: str,
    images_per_prompt: int = 10,
    np_num: int = 8,
    exclude_chunks: Sequence[str] = DEFAULT_EXCLUDE_CHUNKS,
    round4: bool = True,
    vqa_image_size: int = 480,
    sidecar_spacy: str | None = None,
    spatial_detector: str | None = None,
) -> dict[str, Any]:
    """The ``metrics.compbench`` object of the result record (every field present, null if unknown)."""
    return {
        "evaluator_version": evaluator_version,
        "images_per_prompt": images_per_prompt,
        "np_num": np_num,
        "exclude_chunks": list(exclude_chunks),
        "round4": round4,
        "vqa_image_size": vqa_image_size,
        "sidecar_spacy": sidecar_spacy,
        "spatial_detector": spatial_detector,
        "per_category": per_category(results),
    }


def markdown_table(rows: Mapping[str, Mapping[str, float | None]], digits: int = 4) -> str:
    """Markdown table laid out like the paper's Table 2: one row per model, ``--`` for missing values.

    ``rows`` maps a model name to ``{category: value}`` (categories as in :data:`TABLE2_COLUMNS`).
    """
    header = "| Model | " + " | ".join(h for _, h in TABLE2_COLUMNS) + " |"
    rule = "|---|" + "|".join("---:" for _ in TABLE2_COLUMNS) + "|"
    lines = [header, rule]
    for model, values in rows.items():
        unknown = set(values) - {c for c, _ in TABLE2_COLUMNS}
        if unknown:
            raise ValueError(f"unknown categories for {model!r}: {sorted(unknown)}")
        cells = []
        for cat, _ in TABLE2_COLUMNS:
            v = values.get(cat)
            cells.append("--" if v is None else f"{v:.{digits}f}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_row(results: Sequence[CategoryScores]) -> dict[str, float]:
    """``{category: value}`` for :func:`markdown_table` from a model's category results."""
    return {r.category: r.value for r in results}
