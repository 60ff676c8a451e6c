"""Datasets in the Hugging Face ``datasets`` formats: a ``save_to_disk`` folder or parquet files.

The image column may be an ``Image`` feature (read undecoded, so the shared decoder sees the bytes
and a bad image is skipped like any other) or raw bytes; the prompt column is read at start-up.
``datasets`` is an optional dependency (``pip install senseflow[data]``).
"""

from __future__ import annotations

import json
from pathlib import Path

from senseflow.data.index import SampleIndex, digest, require_path

INSTALL = "data kind 'hf' needs the datasets package: pip install senseflow[data]"


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ImportError(INSTALL) from None
    return datasets


def _parquet_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root] if root.suffix == ".parquet" else []
    return sorted(root.rglob("*.parquet"))


class HFIndex(SampleIndex):
    kind = "hf"

    def __init__(self, path: str | None, prompt_column: str, image_column: str):
        root = require_path(path, "hf")
        datasets = _datasets()
        parquet = _parquet_files(root)
        if root.is_dir() and ((root / "state.json").is_file() or (root / "dataset_dict.json").is_file()):
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
        self.origin = origin
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
