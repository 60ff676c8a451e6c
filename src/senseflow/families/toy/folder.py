"""The toy teacher's folder: the shipped one, or any folder in the same diffusers pipeline layout."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

REQUIRED_SUBFOLDERS = ("transformer", "scheduler", "text_encoder", "tokenizer")
RECIPE_FILE = "recipe.yaml"


def shipped_teacher_path() -> Path:
    """The trained toy teacher that ships inside the package."""
    return Path(str(resources.files("senseflow") / "assets" / "toy_teacher"))


def resolve_teacher_folder(folder: str | Path | None, what: str = "teacher folder") -> Path:
    """The teacher folder (the shipped one for None), checked for the pipeline layout."""
    folder = Path(folder) if folder is not None else shipped_teacher_path()
    missing = [s for s in REQUIRED_SUBFOLDERS if not (folder / s).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{what} {folder} lacks {', '.join(missing)}/ (expected a pipeline layout with "
            f"{', '.join(REQUIRED_SUBFOLDERS)}; `senseflow toy train-teacher` writes one)"
        )
    return folder
