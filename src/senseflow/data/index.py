"""Sample indexes: what a data kind lists at start-up, before any image is decoded.

An index holds, for sample ``i``, its identity string (the official key, a path or a member name),
its prompt and where its image bytes are. It is built once, checked once (every listed file exists,
lists agree in length, columns are present) and then only read, so worker processes share it. Each
index has a fingerprint of its content (identities, image locations as written, prompts) that
names the data in the stream's identity; moving the dataset folder keeps it.

Sample ids key the latent cache, so an id that names two different images is refused at start-up
(:meth:`SampleIndex.check_unique_ids`); an id listed twice for the same image (one image with two
captions, as in COCO-style tables) is allowed, since its latent is the same.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

from senseflow.data.images import IMAGE_EXTENSIONS

SHOW = 5  # how many offending names an error message lists


class DataWarning(UserWarning):
    """A training sample was skipped (or left out of the index)."""


def require_path(path: str | None, kind: str) -> Path:
    if not path:
        raise ValueError(f"data.path: required for data kind '{kind}'")
    found = Path(path).expanduser()
    if not found.exists():
        raise FileNotFoundError(f"data.path: {found} does not exist (data kind '{kind}')")
    return found


def listing(names: Sequence[str], show: int = SHOW) -> str:
    """``a, b, c and 7 more``."""
    head = ", ".join(str(n) for n in names[:show])
    return head if len(names) <= show else f"{head} and {len(names) - show} more"


def digest(parts: Iterable[str]) -> str:
    """A short content hash of a sequence of strings (order matters)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:16]


class SampleIndex(ABC):
    """The samples of a dataset. Subclasses fill ``ids`` and implement ``prompt``, ``read`` and
    ``where``; ``fingerprint`` hashes what decides the samples."""

    kind: str = ""
    ids: Sequence[str] = ()

    def __len__(self) -> int:
        return len(self.ids)

    @abstractmethod
    def prompt(self, i: int) -> str: ...

    @abstractmethod
    def read(self, i: int) -> bytes | str:
        """The image of sample ``i``: its bytes, or its file path."""

    def where(self, i: int) -> str:
        """The file (or shard and member) of sample ``i``, for messages."""
        return self.ids[i]

    @abstractmethod
    def fingerprint(self) -> str: ...

    def image_of(self, i: int) -> str:
        """Where sample ``i``'s image is, as a comparable name (two samples with the same one share
        their image)."""
        return self.where(i)

    def check_unique_ids(self, source: Path | str) -> None:
        """Refuse ids that name more than one image: the latent cache would give one sample the
        latent of another."""
        first: dict[str, int] = {}
        clashes: dict[str, list[str]] = {}
        for i, sample_id in enumerate(self.ids):
            j = first.setdefault(sample_id, i)
            if j != i and self.image_of(j) != self.image_of(i):
                images = clashes.setdefault(sample_id, [self.where(j)])
                if self.where(i) not in images:
                    images.append(self.where(i))
        if clashes:
            shown = [f"{k!r} ({', '.join(v)})" for k, v in list(clashes.items())[:SHOW]]
            more = f" and {len(clashes) - SHOW} more" if len(clashes) > SHOW else ""
            raise ValueError(
                f"data.path: {source}: {len(clashes)} sample id(s) name more than one image, so a latent "
                f"cache could not tell them apart: {'; '.join(shown)}{more}; make the ids unique "
                f"(data kind '{self.kind}')"
            )

    def check_not_empty(self, source: Path | str) -> None:
        if len(self) == 0:
            raise ValueError(f"data.path: {source} holds no sample (data kind '{self.kind}')")


class FileIndex(SampleIndex):
    """Samples whose images are files: prompts in memory, paths as written (relative to ``root``)."""

    def __init__(
        self, kind: str, source: Path, root: Path, ids: list[str], paths: list[str], prompts: list[str]
    ):
        self.kind, self.source, self.root = kind, source, root
        self.ids, self.paths, self.prompts = ids, paths, prompts
        self.check_not_empty(source)
        self.files = [str(root / p) for p in paths]  # an absolute path stays as it is
        self.check_unique_ids(source)
        missing = [f for f in self.files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(
                f"data.path: {source} lists {len(missing)} image file(s) that do not exist: "
                f"{listing(missing)}"
            )

    def prompt(self, i: int) -> str:
        return self.prompts[i]

    def read(self, i: int) -> str:
        return self.files[i]

    def where(self, i: int) -> str:
        return self.files[i]

    def image_of(self, i: int) -> str:
        return os.path.normpath(self.files[i])

    def fingerprint(self) -> str:
        parts = zip(self.ids, self.paths, self.prompts, strict=True)
        return digest(item for part in parts for item in part)


def _text(value: object) -> str:
    return "" if value is None else str(value)


def json_index(path: str | None) -> FileIndex:
    """The official format: one object ``{"keys": [...], "image_paths": [...], "prompts": [...]}``."""
    source = require_path(path, "json")
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"data.path: {source} is not readable JSON ({exc})") from None
    fields = ("keys", "image_paths", "prompts")
    if not isinstance(data, dict) or any(not isinstance(data.get(f), list) for f in fields):
        raise ValueError(f"data.path: {source} must hold one object with the lists {', '.join(fields)}")
    lengths = {f: len(data[f]) for f in fields}
    if len(set(lengths.values())) != 1:
        found = ", ".join(f"{f}: {n}" for f, n in lengths.items())
        raise ValueError(f"data.path: {source}: keys, image_paths and prompts differ in length ({found})")
    return FileIndex(
        "json",
        source,
        source.parent,
        [_text(k) for k in data["keys"]],
        [_text(p) for p in data["image_paths"]],
        [_text(p) for p in data["prompts"]],
    )


def _check_columns(source: Path, have: Iterable[str], columns: dict[str, str], where: str = "") -> None:
    """``columns``: field name -> the column it names."""
    have = set(have)
    for field, column in columns.items():
        if column not in have:
            found = ", ".join(sorted(have)) or "none"
            raise ValueError(f"{field}: {source}{where} has no column '{column}' (columns: {found})")


def table_index(kind: str, path: str | None, prompt_column: str, image_column: str) -> FileIndex:
    """``jsonl``, ``csv`` or ``tsv``: one row per sample, the image a path relative to the file."""
    source = require_path(path, kind)
    want = {"data.prompt_column": prompt_column, "data.image_column": image_column}
    rows: list[dict] = []
    if kind == "jsonl":
        with source.open(encoding="utf-8-sig") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"data.path: {source}:{number} is not a JSON object ({exc})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"data.path: {source}:{number} is not a JSON object")
                _check_columns(source, row, want, f":{number}")
                rows.append(row)
    else:
        with source.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if kind == "tsv" else ",")
            _check_columns(source, reader.fieldnames or (), want)
            rows = list(reader)
    paths = [_text(row[image_column]) for row in rows]
    return FileIndex(kind, source, source.parent, paths, paths, [_text(row[prompt_column]) for row in rows])


def folder_index(path: str | None) -> FileIndex:
    """Images under a folder (recursively) with a ``.txt`` caption of the same stem beside each."""
    root = require_path(path, "folder")
    if not root.is_dir():
        raise ValueError(f"data.path: {root} is not a folder (data kind 'folder')")
    images = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and p.is_file()
    )
    if not images:
        raise ValueError(
            f"data.path: {root} holds no image ({', '.join(IMAGE_EXTENSIONS)}) (data kind 'folder')"
        )
    captions = [root / Path(p).with_suffix(".txt") for p in images]
    missing = [p for p, c in zip(images, captions, strict=True) if not c.is_file()]
    if missing:
        raise FileNotFoundError(
            f"data.path: {len(missing)} image(s) under {root} have no .txt caption of the same name: "
            f"{listing(missing)}"
        )
    prompts = [c.read_text(encoding="utf-8-sig").strip() for c in captions]
    return FileIndex("folder", root, root, images, images, prompts)


def read_prompt_list(source: Path, field: str) -> list[str]:
    """Prompts from a UTF-8 file: a ``.json`` list of strings (or an object with a ``prompts`` list, as
    in the official format), else one prompt per non-blank line. Errors name ``field`` and the file:
    a missing file or a folder, a binary file, no prompt, a prompt over
    :data:`~senseflow.inputs.MAX_PROMPT_CHARS` characters."""
    from senseflow.inputs import check_prompts, read_text

    text = read_text(source, field, "prompts", encoding="utf-8-sig")
    if source.suffix.lower() == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{field}: {source} is not readable JSON ({exc})") from None
        if isinstance(data, dict):
            data = data.get("prompts")
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise ValueError(f"{field}: {source} must hold a list of prompts (or an object with one)")
        prompts = data
    else:
        prompts = [p for p in (line.strip() for line in text.splitlines()) if p]
    if not prompts:
        raise ValueError(f"the file holds no prompt ({field} {source}): write one prompt per line")
    return check_prompts(prompts, field, source)


def prompt_list(path: str | None) -> tuple[Path, list[str]]:
    """The ``prompts`` kind's list (see :func:`read_prompt_list`)."""
    source = require_path(path, "prompts")
    return source, read_prompt_list(source, "data.path")
