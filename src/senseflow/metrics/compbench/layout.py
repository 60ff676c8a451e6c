"""T2I-CompBench image index and the official file layout (``samples/{prompt}_{idx:06d}.png``).

The project never recovers prompts from file names: every category has an index file mapping an image
index ``idx`` to its prompt line, repeat ``k``, prompt text, seed and stored image. The official
evaluators, by contrast, take the prompt from ``filename.split('_')[0]`` and the ``question_id`` from the
last six digits, process files sorted by that number, and the official 3-in-1 assumes images
``i*10 .. i*10+9`` belong to line ``i`` of the prompt file. Hence ``idx = prompt_line * images_per_prompt
+ k`` everywhere, and :func:`official_filename` refuses prompts the official parsing would split wrongly
(an ``_`` or ``/`` in the text) or that make a file name too long for common file systems.

Index file (``schema: senseflow.compbench.index/1``)::

    {"schema": "senseflow.compbench.index/1", "category": "color", "images_per_prompt": 10,
     "seed_scheme": "base+index", "seed_base": 0, "prompts_sha256": "...",
     "entries": [{"idx": 0, "prompt_line": 0, "k": 0, "prompt": "...", "seed": 0,
                  "image": "000000.png"}, ...]}
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from os import PathLike
from pathlib import Path

INDEX_SCHEMA = "senseflow.compbench.index/1"
IMAGES_PER_PROMPT = 10
QUESTION_ID_DIGITS = 6
# Longest file name (in UTF-8 bytes) most file systems accept.
MAX_FILENAME_BYTES = 255


@dataclass(frozen=True)
class IndexEntry:
    """One image to generate and score: ``idx = prompt_line * images_per_prompt + k``."""

    idx: int
    prompt_line: int
    k: int
    prompt: str
    seed: int
    image: str


@dataclass(frozen=True)
class CompBenchIndex:
    category: str
    images_per_prompt: int
    seed_base: int
    prompts_sha256: str
    entries: tuple[IndexEntry, ...]
    seed_scheme: str = "base+index"

    def __len__(self) -> int:
        return len(self.entries)

    def by_idx(self) -> dict[int, IndexEntry]:
        return {e.idx: e for e in self.entries}

    @property
    def prompts(self) -> list[str]:
        """Prompt text of each line, in line order."""
        lines: dict[int, str] = {}
        for e in self.entries:
            lines.setdefault(e.prompt_line, e.prompt)
        return [lines[i] for i in sorted(lines)]


def prompts_digest(prompts: Sequence[str]) -> str:
    """sha256 of the prompt list as ``"\\n".join(prompts) + "\\n"`` in UTF-8."""
    return hashlib.sha256(("\n".join(prompts) + "\n").encode("utf-8")).hexdigest()


def build_index(
    category: str,
    prompts: Sequence[str],
    images_per_prompt: int = IMAGES_PER_PROMPT,
    seed_base: int = 0,
    image_pattern: str = "{idx:06d}.png",
) -> CompBenchIndex:
    """Index of ``prompts`` (prompt-file line order), ``images_per_prompt`` images each, seed = base + idx."""
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be at least 1, got {images_per_prompt}")
    entries = []
    for line, prompt in enumerate(prompts):
        if not prompt or prompt != prompt.strip():
            raise ValueError(f"prompt line {line} is empty or has surrounding whitespace: {prompt!r}")
        for k in range(images_per_prompt):
            idx = line * images_per_prompt + k
            entries.append(IndexEntry(idx, line, k, prompt, seed_base + idx, image_pattern.format(idx=idx)))
    return CompBenchIndex(
        category, images_per_prompt, seed_base, prompts_digest(list(prompts)), tuple(entries)
    )


def index_to_json(index: CompBenchIndex) -> dict:
    return {
        "schema": INDEX_SCHEMA,
        "category": index.category,
        "images_per_prompt": index.images_per_prompt,
        "seed_scheme": index.seed_scheme,
        "seed_base": index.seed_base,
        "prompts_sha256": index.prompts_sha256,
        "entries": [asdict(e) for e in index.entries],
    }


def index_from_json(data: dict) -> CompBenchIndex:
    if data.get("schema") != INDEX_SCHEMA:
        raise ValueError(
            f"not a T2I-CompBench index: schema {data.get('schema')!r}, expected {INDEX_SCHEMA!r}"
        )
    n = int(data["images_per_prompt"])
    entries = tuple(IndexEntry(**e) for e in data["entries"])
    for e in entries:
        if e.idx != e.prompt_line * n + e.k or not 0 <= e.k < n:
            raise ValueError(f"index entry {e} breaks idx = prompt_line * {n} + k")
    if sorted(e.idx for e in entries) != list(range(len(entries))):
        raise ValueError("index entries must cover idx 0 .. N-1 exactly once")
    return CompBenchIndex(
        category=data["category"],
        images_per_prompt=n,
        seed_base=int(data["seed_base"]),
        prompts_sha256=data["prompts_sha256"],
        entries=tuple(sorted(entries, key=lambda e: e.idx)),
        seed_scheme=data.get("seed_scheme", "base+index"),
    )


def write_index(index: CompBenchIndex, path: str | PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(index_to_json(index), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_index(path: str | PathLike) -> CompBenchIndex:
    return index_from_json(json.loads(Path(path).read_text(encoding="utf-8")))


# --------------------------------------------------------------------------- official file names


def validate_official_prompt(prompt: str) -> None:
    """Refuse prompts that the official ``split('_')[0]`` parsing or a file system would mangle."""
    bad = [c for c in ("_", "/", "\\", "\0") if c in prompt]
    if bad:
        raise ValueError(
            f"prompt {prompt!r} contains {bad!r}: the official evaluators read the prompt as "
            "filename.split('_')[0], so it cannot be exported to the official layout"
        )
    if not prompt.strip():
        raise ValueError("empty prompt")


def official_filename(prompt: str, idx: int, ext: str = "png") -> str:
    """``{prompt}_{idx:06d}.{ext}``, after :func:`validate_official_prompt` and a file-name length check."""
    validate_official_prompt(prompt)
    if not 0 <= idx < 10**QUESTION_ID_DIGITS:
        raise ValueError(f"image index {idx} does not fit {QUESTION_ID_DIGITS} digits")
    name = f"{prompt}_{idx:0{QUESTION_ID_DIGITS}d}.{ext}"
    if len(name.encode("utf-8")) > MAX_FILENAME_BYTES:
        raise ValueError(
            f"file name for prompt {prompt!r} is {len(name.encode())} bytes (> {MAX_FILENAME_BYTES})"
        )
    return name


@dataclass(frozen=True)
class OfficialName:
    prompt: str
    question_id: int


def parse_official_filename(name: str) -> OfficialName:
    """The official parsing: prompt = ``name.split('_')[0]``, question_id = ``int(last part before '.')``."""
    name = Path(name).name
    parts = name.split("_")
    if len(parts) < 2:
        raise ValueError(f"{name!r} is not an official T2I-CompBench image name (prompt_NNNNNN.png)")
    try:
        qid = int(parts[-1].split(".")[0])
    except ValueError:
        raise ValueError(f"{name!r}: no integer question_id after the last '_'") from None
    return OfficialName(parts[0], qid)


def sort_official_names(names: Iterable[str]) -> list[str]:
    """Names in the order the official scripts process them (by question_id)."""
    return sorted(names, key=lambda n: parse_official_filename(n).question_id)


def check_official_names(names: Iterable[str], index: CompBenchIndex) -> list[tuple[str, IndexEntry]]:
    """Pair official file names with index entries; every idx exactly once, prompts equal."""
    by_idx = index.by_idx()
    pairs = []
    seen: set[int] = set()
    for name in sort_official_names(names):
        parsed = parse_official_filename(name)
        entry = by_idx.get(parsed.question_id)
        if entry is None:
            raise ValueError(f"{name}: question_id {parsed.question_id} is not in the {index.category} index")
        if parsed.question_id in seen:
            raise ValueError(f"{name}: question_id {parsed.question_id} appears twice")
        if parsed.prompt != entry.prompt:
            raise ValueError(
                f"{name}: prompt {parsed.prompt!r} differs from the index prompt {entry.prompt!r}"
            )
        seen.add(parsed.question_id)
        pairs.append((name, entry))
    missing = sorted(set(by_idx) - seen)
    if missing:
        raise ValueError(f"{len(missing)} index images have no official file (first idx {missing[0]})")
    return pairs
