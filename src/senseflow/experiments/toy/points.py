"""The numbers of one measured row (a ``QualityReport`` record or an ablation run record) that the
toy reports tabulate and plot, under one set of keys. Plain dicts in, no imports: the reports and
the ablation share it without importing each other."""

from __future__ import annotations

#: The values of :func:`quality_point`, in its order.
QUALITY_KEYS = (
    "fid_teacher",
    "accuracy_all",
    "precision",
    "recall",
    "diversity",
    "layout_diversity",
    "green_cast",
    "texture",
)


def quality_point(row: dict) -> dict:
    """A measured row's values under the quality curves' keys (None where not measured)."""
    diversity = row.get("diversity") or {}
    return {
        "fid_teacher": row["fid"]["teacher"],
        "accuracy_all": row["accuracy"]["all"]["overall"]["all"],
        "precision": (row.get("coverage") or {}).get("precision"),
        "recall": (row.get("coverage") or {}).get("recall"),
        "diversity": diversity.get("features"),
        "layout_diversity": diversity.get("layout"),
        "green_cast": (row.get("background") or {}).get("green_cast"),
        "texture": (row.get("background") or {}).get("texture"),
    }


#: The coverage, diversity and background columns of the toy reports' tables: (key, digits).
COVERAGE_COLUMNS = (
    ("precision", 3),
    ("recall", 3),
    ("diversity", 2),
    ("layout_diversity", 2),
    ("green_cast", 2),
    ("texture", 2),
)
COVERAGE_HEAD = (
    "| precision ↑ | recall ↑ | diversity (features) | diversity (layout, px) | green cast (0-255) "
    "| background texture (0-255) |"
)
