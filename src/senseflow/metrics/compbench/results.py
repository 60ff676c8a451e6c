"""Per-image and per-category T2I-CompBench scores, and their JSONL form for re-aggregation."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from senseflow.metrics.compbench.layout import CompBenchIndex, IndexEntry

CATEGORIES = ("color", "shape", "texture", "spatial", "non_spatial", "complex")
ATTRIBUTE_CATEGORIES = ("color", "shape", "texture")


@dataclass(frozen=True)
class ImageScore:
    """Score of one image, with where it came from (index entry) and the metric's details."""

    category: str
    metric: str
    idx: int
    prompt_line: int
    k: int
    prompt: str
    seed: int
    image: str
    score: float
    details: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_entry(
        cls, category: str, metric: str, entry: IndexEntry, score: float, **details: Any
    ) -> ImageScore:
        return cls(
            category,
            metric,
            entry.idx,
            entry.prompt_line,
            entry.k,
            entry.prompt,
            entry.seed,
            entry.image,
            float(score),
            details,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "category": self.category,
            "metric": self.metric,
            "idx": self.idx,
            "prompt_line": self.prompt_line,
            "k": self.k,
            "prompt": self.prompt,
            "seed": self.seed,
            "image": self.image,
            "score": self.score,
            "details": dict(self.details),
        }


@dataclass(frozen=True)
class CategoryScores:
    """All image scores of one category, their mean, and run facts (counts, options) in ``info``."""

    category: str
    metric: str
    records: tuple[ImageScore, ...]
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def value(self) -> float:
        return mean_score(r.score for r in self.records)

    @property
    def n(self) -> int:
        return len(self.records)

    def scores_by_idx(self) -> dict[int, float]:
        return {r.idx: r.score for r in self.records}


def mean_score(scores: Iterable[float]) -> float:
    """Plain mean in the order given (Python float sum, as the official scripts)."""
    values = [float(s) for s in scores]
    if not values:
        raise ValueError("no scores to average")
    if not all(math.isfinite(v) for v in values):
        raise ValueError("non-finite score")
    return sum(values) / len(values)


def records_from_scores(
    index: CompBenchIndex,
    metric: str,
    scores: Mapping[int, float],
    details: Mapping[int, Mapping] | None = None,
) -> tuple[ImageScore, ...]:
    """Attach ``scores`` (keyed by idx) to the index; every idx of the index must have a score."""
    missing = [e.idx for e in index.entries if e.idx not in scores]
    if missing:
        raise KeyError(
            f"{len(missing)} {index.category} images have no {metric} score (first idx {missing[0]})"
        )
    extra = sorted(set(scores) - {e.idx for e in index.entries})
    if extra:
        raise KeyError(
            f"{len(extra)} {metric} scores have no {index.category} index entry (first idx {extra[0]})"
        )
    details = details or {}
    return tuple(
        ImageScore.from_entry(index.category, metric, e, scores[e.idx], **dict(details.get(e.idx, {})))
        for e in index.entries
    )


def write_image_scores(records: Sequence[ImageScore], path: str | PathLike) -> Path:
    """Per-image JSONL (one record per line), for re-aggregation and parity checks."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    return path


def read_image_scores(path: str | PathLike) -> list[ImageScore]:
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            d = json.loads(line)
            out.append(ImageScore(**{**d, "details": d.get("details", {})}))
    return out
