"""Datasets in the Hugging Face ``datasets`` formats: a ``save_to_disk`` folder or parquet files.

The image column may be an ``Image`` feature (read undecoded, so the shared decoder sees the bytes
and a bad image is skipped like any other) or raw bytes; the prompt column is read at start-up.
``datasets`` is an optional dependency (``pip install senseflow[data]``).

``data.path`` is a ``save_to_disk`` folder (its ``train`` split when it holds several), one parquet
file, a glob pattern of parquet files (``shards/*.parquet``; both taken as given), or a folder of
parquet files. In a folder laid out as the Hub does (``data/train-00000-of-00002.parquet``,
``data/test-00000-of-00001.parquet``, or ``train/*.parquet``) only the train split's files are read,
and a warning names them and what was left out; a folder whose file names name no split is read
whole. A split is recognised from a word of the file name (``train``, ``training``, ``test``,
``validation``, ``valid``, ``val``, ``dev``, ``eval``, ...; digits may follow) or else from the name
of a folder between ``data.path`` and the file.
"""

from __future__ import annotations

import glob
import json
import os
import re
import warnings
from pathlib import Path

from senseflow.data.index import DataWarning, SampleIndex, digest, listing, require_path

INSTALL = "data kind 'hf' needs the datasets package: pip install senseflow[data]"


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError(INSTALL) from None
    return datasets


_SPLITS = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
    "eval": "test",
    "evaluation": "test",
}


def split_of(file: Path, root: Path) -> str | None:
    """The split a parquet file under ``root`` belongs to by the Hub's naming, or None."""
    relative = file.relative_to(root)
    for word in re.split(r"[-._ ]+", relative.stem.lower()):
        found = re.fullmatch(r"([a-z]+)\d*", word)
        if found and found.group(1) in _SPLITS:
            return _SPLITS[found.group(1)]
    for folder in reversed(relative.parts[:-1]):
        if folder.lower() in _SPLITS:
            return _SPLITS[folder.lower()]
    return None


def _is_pattern(path: str) -> bool:
    return any(c in path for c in "*?[") and not Path(path).expanduser().exists()


def _parquet_files(root: Path) -> list[Path]:
    """A file as given; a folder's parquet files, only the train split's when split names are
    recognisable (a warning names the files read and what was left out)."""
    if root.is_file():
        return [root] if root.suffix == ".parquet" else []
    found = sorted(root.rglob("*.parquet"))
    splits = {f: split_of(f, root) for f in found}
    named = sorted({s for s in splits.values() if s is not None})
    if not named:
        return found
    train = [f for f in found if splits[f] == "train"]
    if not train:
        raise ValueError(
            f"data.path: the parquet files under {root} are named for the splits {', '.join(named)}; "
            "expected a 'train' split (or give the files to read: one parquet file or a glob pattern)"
        )
    left = [f for f in found if splits[f] != "train"]
    if left:
        counts: dict[str, int] = {}
        for f in left:
            name = splits[f] or "no split named"
            counts[name] = counts.get(name, 0) + 1
        out = ", ".join(f"{name} ({n} file(s))" for name, n in counts.items())
        used = [f.relative_to(root).as_posix() for f in train]
        warnings.warn(
            f"data: {root}: reading the train split's {len(train)} parquet file(s) ({listing(used)}); "
            f"left out: {out}. Give one parquet file or a glob pattern as data.path to choose others",
            DataWarning,
            stacklevel=3,
        )
    return train


def _pattern_files(pattern: str) -> tuple[Path, list[Path]]:
    """The files a glob pattern matches, taken as given, and their common folder."""
    files = sorted(
        Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)
    )
    if not files:
        raise FileNotFoundError(f"data.path: the pattern {pattern} matches no file (data kind 'hf')")
    odd = [str(f) for f in files if f.suffix != ".parquet"]
    if odd:
        raise ValueError(
            f"data.path: the pattern {pattern} matches {len(odd)} file(s) that are not parquet: "
            f"{listing(odd)}"
        )
    return Path(os.path.commonpath([str(f.parent) for f in files])), files


def _saved_dataset(root: Path) -> bool:
    return root.is_dir() and ((root / "state.json").is_file() or (root / "dataset_dict.json").is_file())


class HFIndex(SampleIndex):
    kind = "hf"

    def __init__(self, path: str | None, prompt_column: str, image_column: str):
        pattern = bool(path) and _is_pattern(str(path))
        root = Path(str(path)) if pattern else require_path(path, "hf")
        datasets = _datasets()
        if pattern:
            root, parquet = _pattern_files(str(path))
        else:
            parquet = [] if _saved_dataset(root) else _parquet_files(root)
        if not parquet and _saved_dataset(root):
            data = datasets.load_from_disk(str(root))
            if isinstance(data, datasets.DatasetDict):
                if "train" not in data:
                    raise ValueError(
                        f"data.path: {root} holds the splits {', '.join(data)}; expected a 'train' split "
                        "or a single dataset"
                    )
                data = data["train"]
                root = root / "train"
            state = json.loads((root / "state.json").read_text())
            origin = [str(state.get("_fingerprint"))]
        elif parquet:
            data = datasets.load_dataset(
                "parquet", data_files=[str(p) for p in parquet], split="train", keep_in_memory=False
            )
            origin = [f"{p.name}:{p.stat().st_size}" for p in parquet]
        else:
            raise ValueError(
                f"data.path: {root} is neither a dataset folder written by save_to_disk nor parquet files "
                "(data kind 'hf')"
            )
        columns = data.column_names
        for field, column in (("data.prompt_column", prompt_column), ("data.image_column", image_column)):
            if column not in columns:
                raise ValueError(f"{field}: {root} has no column '{column}' (columns: {', '.join(columns)})")
        feature = data.features[image_column]
        if isinstance(feature, datasets.Image):
            data = data.cast_column(image_column, datasets.Image(decode=False))
        elif not (isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary")):
            raise ValueError(
                f"data.image_column: column '{image_column}' of {root} is {feature}; expected an Image "
                "feature or bytes"
            )
        self.root, self.column = root, image_column
        self.prompts = ["" if p is None else str(p) for p in data[prompt_column]]
        self.images = data.select_columns([image_column])
        self.ids = [f"row{i}" for i in range(len(self.prompts))]
        self.origin, self.files = origin, parquet  # the parquet files read (none for a saved dataset)
        self.check_not_empty(root)

    def prompt(self, i: int) -> str:
        return self.prompts[i]

    def read(self, i: int) -> bytes | str:
        value = self.images[i][self.column]
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                return value["bytes"]
            if value.get("path"):
                path = Path(value["path"])
                return str(path if path.is_absolute() else self.root / path)
            return b""
        return b"" if value is None else bytes(value)

    def where(self, i: int) -> str:
        return f"{self.root} row {i}"

    def fingerprint(self) -> str:
        return digest([*self.origin, str(len(self)), *self.prompts])
