"""T2I-CompBench 2D spatial scoring as pure Python over detector outputs.

The official evaluator detects objects with UniDet (detectron2, run externally in its own environment;
images resized with ``Resize(479, max_size=480)``, confidence threshold 0.5) and scores each image from
the detections. This module re-implements the scoring; detections come from anything implementing
:class:`Detector`, or from a detections file written by an external run (:func:`read_detections_jsonl`).
A non-UniDet detector gives numbers that are not comparable with the paper: label such runs ``approx``.

Rules (per image):

* Objects: from the sidecar; ``objects_simple`` for the spatial category, ``objects_complex`` for the
  complex category. ``girl``/``boy``/``man``/``woman`` become ``person``.
* Locality: the first of :data:`LOCALITY_VOCAB` that occurs as a substring of the prompt (or None).
* Each object takes the first detection carrying its label, in detector output order.
* :func:`determine_position` scores the pair (module constants give the thresholds).
* Image score: both objects found: ``0.25 * s1 + 0.25 * s2 + position / 2``; one found: ``0.25 * s``; none:
  0; then any score below 0.5 becomes 0 (so an image with one object always scores 0).

A zero-area union (both boxes degenerate) would divide by zero upstream; here IoU is taken as 0 and the
case is flagged (``zero_union``) and counted in the category info.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from senseflow.metrics.compbench.layout import CompBenchIndex
from senseflow.metrics.compbench.results import CategoryScores, records_from_scores
from senseflow.metrics.compbench.sidecar import Sidecar

LOCALITY_VOCAB = (
    "on side of",
    "next to",
    "near",
    "on the left of",
    "on the right of",
    "on the bottom of",
    "on the top of",
    "on top of",
)
NEAR_LOCALITIES = ("next to", "on side of", "near")
PERSON_WORDS = frozenset({"girl", "boy", "man", "woman"})
IOU_THRESHOLD = 0.1
DISTANCE_THRESHOLD = 150.0
IMAGE_SCORE_FLOOR = 0.5
DETECTION_SCORE_THRESHOLD = 0.5


@dataclass(frozen=True)
class Detection:
    """One detected object: label, confidence and box corners in the detector's output frame (pixels)."""

    label: str
    score: float
    x_min: float
    y_min: float
    x_max: float
    y_max: float

    def __post_init__(self) -> None:
        coords = (self.score, self.x_min, self.y_min, self.x_max, self.y_max)
        if not all(math.isfinite(float(c)) for c in coords):
            raise ValueError(f"non-finite value in {self}")
        if self.x_max < self.x_min or self.y_max < self.y_min:
            raise ValueError(f"inverted box in {self}")

    @property
    def center(self) -> tuple[float, float]:
        return (self.x_min + self.x_max) / 2, (self.y_min + self.y_max) / 2

    @property
    def area(self) -> float:
        return (self.x_max - self.x_min) * (self.y_max - self.y_min)


def find_locality(prompt: str) -> str | None:
    """First entry of :data:`LOCALITY_VOCAB` that is a substring of ``prompt``."""
    return next((word for word in LOCALITY_VOCAB if word in prompt), None)


def detector_label(word: str | None) -> str | None:
    """The detector label for an object word (``girl``/``boy``/``man``/``woman`` → ``person``)."""
    return "person" if word in PERSON_WORDS else word


def box_iou(box1: Detection, box2: Detection) -> tuple[float, bool]:
    """IoU of two boxes and whether their union has zero area (IoU then taken as 0)."""
    x_overlap = max(0, min(box1.x_max, box2.x_max) - max(box1.x_min, box2.x_min))
    y_overlap = max(0, min(box1.y_max, box2.y_max) - max(box1.y_min, box2.y_min))
    intersection = x_overlap * y_overlap
    union = box1.area + box2.area - intersection
    if union == 0:
        return 0.0, True
    return intersection / union, False


@dataclass(frozen=True)
class Position:
    """Result of :func:`position_details`: the score and which rule branch produced it."""

    score: float
    branch: str
    iou: float
    zero_union: bool


_DIRECTIONAL = {
    # locality: (axis, required sign of the centre difference box2 - box1)
    "on the right of": ("x", -1),
    "on the left of": ("x", +1),
    "on the bottom of": ("y", -1),
    "on the top of": ("y", +1),
}


def position_details(
    locality: str | None,
    box1: Detection,
    box2: Detection,
    iou_threshold: float = IOU_THRESHOLD,
    distance_threshold: float = DISTANCE_THRESHOLD,
) -> Position:
    """:func:`determine_position` with the branch taken (``near:close``, ``left:overlap``, ``other``, ...)."""
    (x1, y1), (x2, y2) = box1.center, box2.center
    dx, dy = x2 - x1, y2 - y1
    iou, zero_union = box_iou(box1, box2)
    if locality in NEAR_LOCALITIES:
        if abs(dx) < distance_threshold or abs(dy) < distance_threshold:
            return Position(1, "near:close", iou, zero_union)
        return Position(distance_threshold / max(abs(dx), abs(dy)), "near:far", iou, zero_union)
    if locality in _DIRECTIONAL:
        axis, sign = _DIRECTIONAL[locality]
        name = locality.split()[-2]  # right / left / bottom / top
        along, across = (dx, dy) if axis == "x" else (dy, dx)
        if not along * sign > 0:
            return Position(0, f"{name}:sign", iou, zero_union)
        if not abs(along) > abs(across):
            return Position(0, f"{name}:axis", iou, zero_union)
        if iou < iou_threshold:
            return Position(1, f"{name}:clear", iou, zero_union)
        return Position(iou_threshold / iou, f"{name}:overlap", iou, zero_union)
    return Position(0, "other", iou, zero_union)


def determine_position(
    locality: str | None,
    box1: Detection,
    box2: Detection,
    iou_threshold: float = IOU_THRESHOLD,
    distance_threshold: float = DISTANCE_THRESHOLD,
) -> float:
    """Soft score in [0, 1] that ``box1`` is ``locality`` ``box2`` (centre offsets, IoU; see module doc)."""
    return position_details(locality, box1, box2, iou_threshold, distance_threshold).score


def first_detection(detections: Sequence[Detection], label: str | None) -> Detection | None:
    if label is None:
        return None
    return next((d for d in detections if d.label == label), None)


@dataclass(frozen=True)
class SpatialImageScore:
    score: float
    raw_score: float
    objects: tuple[str | None, str | None]
    found: tuple[bool, bool]
    locality: str | None
    position: Position | None

    def details(self) -> dict[str, Any]:
        return {
            "raw_score": self.raw_score,
            "obj1": self.objects[0],
            "obj2": self.objects[1],
            "found": list(self.found),
            "locality": self.locality,
            "position": None if self.position is None else self.position.score,
            "branch": None if self.position is None else self.position.branch,
            "zero_union": bool(self.position is not None and self.position.zero_union),
        }


def spatial_image_score(
    obj1: str | None,
    obj2: str | None,
    locality: str | None,
    detections: Sequence[Detection],
    iou_threshold: float = IOU_THRESHOLD,
    distance_threshold: float = DISTANCE_THRESHOLD,
    floor: float = IMAGE_SCORE_FLOOR,
) -> SpatialImageScore:
    """Score one image from its detections (see the module docstring for the rule)."""
    obj1, obj2 = detector_label(obj1), detector_label(obj2)
    det1, det2 = first_detection(detections, obj1), first_detection(detections, obj2)
    position = None
    if det1 is not None and det2 is not None:
        position = position_details(locality, det1, det2, iou_threshold, distance_threshold)
        raw = 0.25 * det1.score + 0.25 * det2.score + position.score / 2
    elif det1 is not None:
        raw = 0.25 * det1.score
    elif det2 is not None:
        raw = 0.25 * det2.score
    else:
        raw = 0.0
    score = 0.0 if raw < floor else raw
    return SpatialImageScore(
        score, raw, (obj1, obj2), (det1 is not None, det2 is not None), locality, position
    )


def score_spatial(
    index: CompBenchIndex,
    detections: Mapping[int, Sequence[Detection]],
    sidecar: Sidecar,
    complex_mode: bool = False,
    detector: str = "unidet-official",
    iou_threshold: float = IOU_THRESHOLD,
    distance_threshold: float = DISTANCE_THRESHOLD,
) -> CategoryScores:
    """Score every image of ``index`` from ``detections`` (keyed by idx); counts go into ``info``."""
    scores: dict[int, float] = {}
    details: dict[int, dict[str, Any]] = {}
    counts = {"zero_union": 0, "no_objects": 0, "both_found": 0, "one_found": 0, "none_found": 0}
    for entry in index.entries:
        if entry.idx not in detections:
            raise KeyError(f"no detections for {index.category} image idx {entry.idx} ({entry.image})")
        side = sidecar[entry.prompt]
        pair = side.objects_complex if complex_mode else side.objects_simple
        if pair is None:
            counts["no_objects"] += 1
            pair = (None, None)
        result = spatial_image_score(
            pair[0],
            pair[1],
            find_locality(entry.prompt),
            detections[entry.idx],
            iou_threshold,
            distance_threshold,
        )
        n_found = sum(result.found)
        counts[("none_found", "one_found", "both_found")[n_found]] += 1
        if result.position is not None and result.position.zero_union:
            counts["zero_union"] += 1
        scores[entry.idx] = result.score
        details[entry.idx] = result.details()
    info = {
        "mode": "complex" if complex_mode else "simple",
        "detector": detector,
        "iou_threshold": iou_threshold,
        "distance_threshold": distance_threshold,
        "counts": counts,
    }
    return CategoryScores(
        index.category, "spatial", records_from_scores(index, "spatial", scores, details), info
    )


# --------------------------------------------------------------------------- detectors and detection files


@runtime_checkable
class Detector(Protocol):
    """A pluggable detector. ``mode`` is ``"official"`` only for UniDet with the official weights."""

    name: str
    mode: Literal["official", "approx"]

    def detect(self, image: Any) -> list[Detection]:
        """Detections for one RGB PIL image, boxes in the frame the distance threshold refers to."""
        ...


def detector_label_for_record(detector: Detector) -> str:
    """``unidet-official`` or ``approx:<name>``, the ``spatial_detector`` field of the result record."""
    return "unidet-official" if detector.mode == "official" else f"approx:{detector.name}"


def run_detector(
    detector: Detector,
    index: CompBenchIndex,
    images_dir: str | PathLike,
    min_score: float = DETECTION_SCORE_THRESHOLD,
) -> dict[int, list[Detection]]:
    """Detect objects in every indexed image, keeping detections with score >= ``min_score``."""
    from PIL import Image

    out = {}
    for entry in index.entries:
        with Image.open(Path(images_dir) / entry.image) as im:
            dets = detector.detect(im.convert("RGB"))
        out[entry.idx] = [d for d in dets if d.score >= min_score]
    return out


def write_detections_jsonl(detections: Mapping[int, Sequence[Detection]], path: str | PathLike) -> Path:
    """One line per image: ``{"question_id": idx, "detections": [[label, score, x0, y0, x1, y1], ...]}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for qid in sorted(detections):
            rows = [[d.label, d.score, d.x_min, d.y_min, d.x_max, d.y_max] for d in detections[qid]]
            f.write(json.dumps({"question_id": int(qid), "detections": rows}) + "\n")
    return path


def read_detections_jsonl(path: str | PathLike) -> dict[int, list[Detection]]:
    """Read :func:`write_detections_jsonl` output (also accepts ``{"label", "score", "box": [...]}`` rows)."""
    out: dict[int, list[Detection]] = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        qid = int(rec["question_id"])
        if qid in out:
            raise ValueError(f"{path}:{n}: question_id {qid} appears twice")
        dets = []
        for row in rec["detections"]:
            if isinstance(row, Mapping):
                label, score, box = row["label"], row["score"], row["box"]
            else:
                label, score, *box = row
            dets.append(Detection(str(label), float(score), *(float(v) for v in box)))
        out[qid] = dets
    return out


def count_labels(detections: Iterable[Sequence[Detection]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for dets in detections:
        for d in dets:
            counts[d.label] = counts.get(d.label, 0) + 1
    return counts
