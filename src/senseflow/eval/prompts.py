"""Prompt sets built from the user's own copies of COCO and T2I-CompBench, with provenance records.

No third-party prompt text lives in the repository: these builders read the user's local files and
write to the user's data directory (a folder inside this repository is refused).

COCO-5K (``build_coco5k``): from ``captions_val2017.json``, one caption per image, chosen by

* ``max_clip``: the caption with the highest CLIP image-text cosine, computed by a scorer callable
  ``scorer(image_path, captions) -> scores`` supplied by the caller (ties: smallest annotation id); the
  CLIP model id and weight sha256 are recorded;
* ``first``: the caption with the smallest annotation ``id``.

Captions are normalised by stripping and collapsing whitespace (nothing else). Output: a TSV with a
``image_id<TAB>caption`` header and one row per image sorted by ``image_id``, plus a provenance JSON
(input sha256, rule, model, output sha256, row count). :func:`read_prompt_tsv` reads that form, a
header-less two-column form, and MLPerf's ``captions_source.tsv`` (columns ``id, image_id, caption,
...``).

T2I-CompBench (``build_compbench_prompts``): from the ``examples/dataset`` folder of the user's
checkout of the benchmark, the six ``{category}_val.txt`` files (300 prompts each) and the three
complex subsets; writes the prompt lists, the sha256 and line count of each source file, and (when
spaCy is available, or an ``nlp`` callable is given) the linguistic sidecar of
:mod:`senseflow.metrics.compbench.sidecar`, which scoring then reads without spaCy.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from senseflow.errors import UsageError
from senseflow.inputs import check_prompts, read_text
from senseflow.jsonfile import write_json
from senseflow.metrics.compbench.sidecar import build_sidecar, load_sidecar, write_sidecar
from senseflow.metrics.compbench.three_in_one import normalise_line
from senseflow.metrics.weights import sha256_file

__all__ = [
    "COCO5K_RULES",
    "COMPBENCH_CATEGORY_FILES",
    "COMPBENCH_SUBSET_FILES",
    "CaptionScorer",
    "CocoCaption",
    "PromptFile",
    "PromptRow",
    "PromptSetRecord",
    "PromptTable",
    "build_coco5k",
    "build_compbench_prompts",
    "build_sidecar",
    "load_compbench_prompts",
    "load_sidecar",
    "normalise_caption",
    "read_coco_captions",
    "read_compbench_dataset",
    "read_prompt_lines",
    "read_prompt_tsv",
    "select_first",
    "select_max_clip",
    "sha256_file",
    "write_prompt_tsv",
]

PROVENANCE_SCHEMA = "senseflow.prompts/1"
COCO5K_RULES = ("max_clip", "first")
COCO5K_COUNT = 5000
TEXT_NORMALISATION = "strip+collapse_whitespace"

COMPBENCH_CATEGORY_FILES = {
    "color": "color_val.txt",
    "shape": "shape_val.txt",
    "texture": "texture_val.txt",
    "spatial": "spatial_val.txt",
    "non_spatial": "non_spatial_val.txt",
    "complex": "complex_val.txt",
}
COMPBENCH_SUBSET_FILES = {
    "complex_spatial": "complex_val_spatial.txt",
    "complex_action": "complex_val_action.txt",
    "complex_spatialaction": "complex_val_spatialaction.txt",
}
COMPBENCH_CATEGORY_COUNT = 300
# Approximate sizes of the complex subsets (recorded for comparison, not enforced).
COMPBENCH_SUBSET_APPROX = {"complex_spatial": 59, "complex_action": 212, "complex_spatialaction": 31}

# (image path, candidate captions) -> one score per caption.
CaptionScorer = Callable[[Path, Sequence[str]], Sequence[float]]


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _repository_root() -> Path | None:
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "senseflow").is_dir() else None


def _check_output_dir(out_dir: Path, allow_inside_repository: bool) -> None:
    root = _repository_root()
    if root is None or allow_inside_repository:
        return
    if out_dir.resolve().is_relative_to(root):
        raise ValueError(
            f"{out_dir} is inside the senseflow repository ({root}); prompt sets built from third-party "
            "text belong in the user's data directory"
        )


# --------------------------------------------------------------------------- COCO-5K


def normalise_caption(text: str) -> str:
    """Strip and collapse whitespace (spaces, tabs, newlines) to single spaces; nothing else."""
    return " ".join(text.split())


@dataclass(frozen=True)
class CocoCaption:
    ann_id: int
    image_id: int
    caption: str  # normalised


@dataclass(frozen=True)
class PromptRow:
    image_id: int
    caption: str


def _coco_json(path: Path, field: str) -> tuple[list[dict], list[dict]]:
    """The ``images`` and ``annotations`` lists of a COCO captions file, or one error naming it."""
    text = read_text(path, field, "JSON")
    expected = "expected COCO's captions_val2017.json (an object with 'images' and 'annotations' lists)"
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"not readable JSON ({field} {path}: {exc}): {expected}") from None
    lists = [data.get(key) if isinstance(data, dict) else None for key in ("images", "annotations")]
    if not all(isinstance(v, list) and all(isinstance(x, dict) for x in v) for v in lists):
        raise UsageError(f"not a COCO captions file ({field} {path}): {expected}")
    return lists[0], lists[1]


def read_coco_captions(
    path: str | PathLike, field: str = "captions file"
) -> tuple[dict[int, str], dict[int, list[CocoCaption]]]:
    """``({image_id: file_name}, {image_id: captions sorted by annotation id})`` from a COCO captions JSON
    (errors name ``field`` and the file)."""
    path = Path(path)
    images_list, annotations = _coco_json(path, field)
    try:
        images = {int(im["id"]): str(im.get("file_name", "")) for im in images_list}
        ids = [(int(ann["id"]), int(ann["image_id"]), ann["caption"]) for ann in annotations]
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(
            f"not a COCO captions file ({field} {path}): an image or annotation has no usable {exc}; "
            "images need an integer 'id', annotations an integer 'id', 'image_id' and a 'caption'"
        ) from None
    captions: dict[int, list[CocoCaption]] = {i: [] for i in images}
    seen: set[int] = set()
    for ann_id, image_id, caption in ids:
        if ann_id in seen:
            raise ValueError(f"{path}: annotation id {ann_id} appears twice")
        seen.add(ann_id)
        if image_id not in captions:
            raise ValueError(f"{path}: annotation {ann_id} refers to unknown image {image_id}")
        text = normalise_caption(str(caption))
        if not text:
            raise ValueError(f"{path}: annotation {ann_id} has an empty caption")
        captions[image_id].append(CocoCaption(ann_id, image_id, text))
    for image_id, caps in captions.items():
        if not caps:
            raise ValueError(f"{path}: image {image_id} has no caption")
        caps.sort(key=lambda c: c.ann_id)
    return images, captions


def select_first(captions: Sequence[CocoCaption]) -> CocoCaption:
    """The caption with the smallest annotation id."""
    return min(captions, key=lambda c: c.ann_id)


def select_max_clip(
    captions: Sequence[CocoCaption], image_path: Path, scorer: CaptionScorer
) -> tuple[CocoCaption, list[float], bool]:
    """The caption with the highest score (ties: smallest annotation id), all scores, and whether tied."""
    ordered = sorted(captions, key=lambda c: c.ann_id)
    scores = [float(s) for s in scorer(image_path, [c.caption for c in ordered])]
    if len(scores) != len(ordered):
        raise ValueError(f"scorer returned {len(scores)} scores for {len(ordered)} captions of {image_path}")
    if not all(math.isfinite(s) for s in scores):
        raise ValueError(f"non-finite caption score for {image_path}")
    best = max(scores)
    winners = [i for i, s in enumerate(scores) if s == best]
    return ordered[winners[0]], scores, len(winners) > 1


def write_prompt_tsv(rows: Sequence[PromptRow], path: str | PathLike) -> Path:
    """``image_id<TAB>caption`` with a header line, UTF-8, ``\\n`` line ends."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["image_id\tcaption"]
    for r in rows:
        if "\t" in r.caption or "\n" in r.caption:
            raise ValueError(f"caption of image {r.image_id} holds a tab or newline")
        lines.append(f"{r.image_id}\t{r.caption}")
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    return path


@dataclass(frozen=True)
class PromptTable:
    rows: tuple[PromptRow, ...]
    sha256: str
    source_format: str  # "senseflow", "two_column" or "mlperf"
    path: str

    @property
    def prompts(self) -> list[str]:
        return [r.caption for r in self.rows]


def read_prompt_tsv(path: str | PathLike, field: str = "prompts file") -> PromptTable:
    """Read a prompt TSV: this project's form, a header-less ``image_id<TAB>caption`` or MLPerf's.
    Errors name ``field`` and the file: not UTF-8, no rows, a bad row, a caption that is too long."""
    path = Path(path)
    text = read_text(path, field, "prompts", encoding="utf-8-sig")
    table = list(csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE))
    table = [row for row in table if row]
    if not table:
        raise UsageError(
            f"the file holds no prompt ({field} {path}): write one 'image_id<TAB>caption' row per line"
        )
    header = [h.strip() for h in table[0]]
    if "caption" in header and "image_id" in header:
        col_id, col_cap = header.index("image_id"), header.index("caption")
        fmt = "senseflow" if header == ["image_id", "caption"] else "mlperf"
        body = table[1:]
    else:
        col_id, col_cap, fmt, body = 0, 1, "two_column", table
    rows = []
    for n, row in enumerate(body, 2 if fmt != "two_column" else 1):
        try:
            rows.append(PromptRow(int(row[col_id]), normalise_caption(row[col_cap])))
        except (IndexError, ValueError):
            raise ValueError(f"{path}:{n}: expected an integer image_id and a caption, got {row!r}") from None
    check_prompts([r.caption for r in rows], field, path)
    return PromptTable(tuple(rows), sha256_file(path), fmt, str(path))


@dataclass(frozen=True)
class PromptSetRecord:
    tsv: Path
    provenance_path: Path
    provenance: dict[str, Any] = field(default_factory=dict)


def build_coco5k(
    captions_json: str | PathLike,
    out_dir: str | PathLike,
    rule: str = "max_clip",
    *,
    scorer: CaptionScorer | None = None,
    images_dir: str | PathLike | None = None,
    selection_model: str | None = None,
    selection_model_sha256: str | None = None,
    expected_count: int | None = COCO5K_COUNT,
    name: str = "coco5k",
    allow_inside_repository: bool = False,
) -> PromptSetRecord:
    """Build the COCO-5K prompt TSV and provenance JSON in ``out_dir`` (see the module docstring)."""
    if rule not in COCO5K_RULES:
        raise ValueError(f"unknown selection rule {rule!r}; expected one of {COCO5K_RULES}")
    if rule == "max_clip" and (scorer is None or images_dir is None or not selection_model):
        raise ValueError("rule 'max_clip' needs scorer, images_dir and selection_model (the CLIP model id)")
    out_dir = Path(out_dir)
    _check_output_dir(out_dir, allow_inside_repository)
    captions_json = Path(captions_json)
    images, captions = read_coco_captions(captions_json)
    if expected_count is not None and len(images) != expected_count:
        raise UsageError(
            f"not the expected image count ({captions_json} lists {len(images)} images, expected "
            f"{expected_count}): give captions_val2017.json, or accept another count (--any-count)"
        )
    rows, ties = [], 0
    for image_id in sorted(captions):
        if rule == "first":
            chosen = select_first(captions[image_id])
        else:
            assert scorer is not None and images_dir is not None
            image_path = Path(images_dir) / images[image_id]
            if not image_path.is_file():
                raise FileNotFoundError(f"image {image_id} not found at {image_path}")
            chosen, _, tied = select_max_clip(captions[image_id], image_path, scorer)
            ties += int(tied)
        rows.append(PromptRow(image_id, chosen.caption))
    tsv = write_prompt_tsv(rows, out_dir / f"{name}.tsv")
    provenance = {
        "schema": PROVENANCE_SCHEMA,
        "set": name,
        "source": str(captions_json),
        "source_sha256": sha256_file(captions_json),
        "selection_rule": rule,
        "selection_model": selection_model if rule == "max_clip" else None,
        "selection_model_sha256": selection_model_sha256 if rule == "max_clip" else None,
        "tie_break": "smallest annotation id",
        "ties": ties,
        "text_normalisation": TEXT_NORMALISATION,
        "count": len(rows),
        "file": tsv.name,
        "file_sha256": sha256_file(tsv),
        "created": _now(),
    }
    prov = write_json(out_dir / f"{name}.provenance.json", provenance, indent=1, ensure_ascii=False)
    return PromptSetRecord(tsv, prov, provenance)


# --------------------------------------------------------------------------- T2I-CompBench


@dataclass(frozen=True)
class PromptFile:
    name: str
    source: str
    sha256: str
    line_count: int  # lines in the source file, as readlines() counts them
    prompts: tuple[str, ...]


def read_prompt_lines(path: str | PathLike, field: str = "prompts file") -> PromptFile:
    """Prompts of a one-prompt-per-line UTF-8 file (each stripped); blank lines only allowed at the end.
    Errors name ``field`` and the file: not UTF-8, a blank line inside, a prompt too long. A file without
    prompts gives an empty list (T2I-CompBench's smaller subsets may be empty)."""
    path = Path(path)
    text = read_text(path, field, "prompts")
    lines = io.StringIO(text, newline=None).readlines()  # universal newlines, as the official scripts read
    prompts = [line.strip() for line in lines]
    while prompts and not prompts[-1]:
        prompts.pop()
    blank = [i + 1 for i, p in enumerate(prompts) if not p]
    if blank:
        raise ValueError(f"{path}: blank line {blank[0]} inside the prompt list would shift image indices")
    check_prompts(prompts, field, path)
    return PromptFile(path.stem, str(path), sha256_file(path), len(lines), tuple(prompts))


def read_compbench_dataset(
    dataset_dir: str | PathLike, expected_counts: Mapping[str, int] | None = None, strict: bool = True
) -> dict[str, PromptFile]:
    """Read the six category files and three complex subsets from ``examples/dataset``.

    ``expected_counts`` (default 300 per category) is enforced when ``strict``; subset sizes are only
    recorded. Returns ``{name: PromptFile}`` keyed by category (``color`` ...) and subset
    (``complex_spatial`` ...) names.
    """
    dataset_dir = Path(dataset_dir)
    expected = dict.fromkeys(COMPBENCH_CATEGORY_FILES, COMPBENCH_CATEGORY_COUNT)
    if expected_counts is not None:
        expected.update(expected_counts)
    files = {}
    for name, file in {**COMPBENCH_CATEGORY_FILES, **COMPBENCH_SUBSET_FILES}.items():
        path = dataset_dir / file
        if not path.is_file():
            raise FileNotFoundError(f"T2I-CompBench prompt file {file} not found in {dataset_dir}")
        pf = read_prompt_lines(path)
        files[name] = PromptFile(name, pf.source, pf.sha256, pf.line_count, pf.prompts)
        if strict and name in expected and len(pf.prompts) != expected[name]:
            raise ValueError(f"{path}: {len(pf.prompts)} prompts, expected {expected[name]}")
    return files


def build_compbench_prompts(
    dataset_dir: str | PathLike,
    out_dir: str | PathLike,
    *,
    sidecar: bool | str = "auto",
    nlp: Any | None = None,
    expected_counts: Mapping[str, int] | None = None,
    strict: bool = True,
    allow_inside_repository: bool = False,
) -> dict[str, Any]:
    """Write ``{name}.txt`` prompt lists, ``compbench.provenance.json`` and ``compbench.sidecar.json``.

    ``sidecar``: ``True`` (fail without spaCy unless ``nlp`` is given), ``False``, or ``"auto"`` (build
    it when ``nlp`` is given or spaCy imports; otherwise record why not). Returns the provenance.
    """
    out_dir = Path(out_dir)
    _check_output_dir(out_dir, allow_inside_repository)
    files = read_compbench_dataset(dataset_dir, expected_counts, strict)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = {}
    for name, pf in files.items():
        out = out_dir / f"{name}.txt"
        out.write_bytes(("\n".join(pf.prompts) + "\n").encode("utf-8"))
        entry: dict[str, Any] = {
            "source": pf.source,
            "source_sha256": pf.sha256,
            "line_count": pf.line_count,
            "prompt_count": len(pf.prompts),
            "file": out.name,
            "file_sha256": sha256_file(out),
        }
        if name in COMPBENCH_SUBSET_FILES:
            complex_keys = {normalise_line(p) for p in files["complex"].prompts}
            entry["approx_expected"] = COMPBENCH_SUBSET_APPROX[name]
            entry["not_in_complex"] = sum(normalise_line(p) not in complex_keys for p in pf.prompts)
        entries[name] = entry
    sidecar_info: dict[str, Any] = {"built": False, "file": None, "reason": None}
    if sidecar:
        if nlp is None:
            try:
                from senseflow.metrics.compbench.sidecar import spacy_pipeline

                nlp = spacy_pipeline()
            except (ImportError, OSError) as exc:
                if sidecar is True:
                    raise
                sidecar_info["reason"] = f"spaCy unavailable: {exc}"
        if nlp is not None:
            prompts = [p for name in COMPBENCH_CATEGORY_FILES for p in files[name].prompts]
            data = build_sidecar(prompts, nlp)
            path = write_sidecar(out_dir / "compbench.sidecar.json", data)
            sidecar_info = {
                "built": True,
                "file": path.name,
                "sha256": sha256_file(path),
                "analyser": data["analyser"],
            }
    else:
        sidecar_info["reason"] = "not requested"
    provenance = {
        "schema": PROVENANCE_SCHEMA,
        "set": "t2i-compbench",
        "source": str(dataset_dir),
        "files": entries,
        "sidecar": sidecar_info,
        "created": _now(),
    }
    write_json(out_dir / "compbench.provenance.json", provenance, indent=1, ensure_ascii=False)
    return provenance


def load_compbench_prompts(out_dir: str | PathLike, verify: bool = True) -> dict[str, list[str]]:
    """Prompt lists written by :func:`build_compbench_prompts`, checked against the recorded sha256."""
    out_dir = Path(out_dir)
    provenance = json.loads((out_dir / "compbench.provenance.json").read_text(encoding="utf-8"))
    lists = {}
    for name, entry in provenance["files"].items():
        path = out_dir / entry["file"]
        if verify and sha256_file(path) != entry["file_sha256"]:
            raise ValueError(f"{path} changed since it was built (sha256 mismatch)")
        lists[name] = read_prompt_lines(path).prompts
    return {k: list(v) for k, v in lists.items()}
