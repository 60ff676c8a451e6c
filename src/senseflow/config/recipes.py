"""The recipes shipped inside the package (``senseflow/configs``), found by name from anywhere.

``toy/distill``, ``toy/distill.yaml`` and ``configs/toy/distill.yaml`` all name the same shipped
recipe; a path that exists is always taken as it is, so a local copy wins over the shipped one.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

__all__ = ["recipes_root", "resolve_recipe", "shipped_recipe", "shipped_recipes"]

SUFFIXES = (".yaml", ".yml")


def recipes_root() -> Path:
    return Path(str(resources.files("senseflow") / "configs"))


def shipped_recipes() -> list[str]:
    """Names of the shipped recipes (``toy/distill``, ``sdxl``, ``eval/toy``, ...)."""
    root = recipes_root()
    return sorted(
        p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*") if p.suffix in SUFFIXES
    )


def shipped_recipe(name: str | os.PathLike[str]) -> Path | None:
    """The shipped recipe ``name`` names (``toy/distill``, ``toy/distill.yaml``,
    ``configs/toy/distill.yaml``), or None."""
    name = Path(name).as_posix().removeprefix("./").removeprefix("configs/")
    root = recipes_root()
    for candidate in (root / name, *(root / f"{name}{s}" for s in SUFFIXES)):
        if candidate.is_file():
            return candidate
    return None


def resolve_recipe(source: str | os.PathLike[str]) -> Path:
    """``source`` when it is a file, else the shipped recipe it names, else ``source`` unchanged (the
    loader then reports the missing file with the shipped names as a hint). A folder of the same name
    (say a downloaded ``./sdxl/`` teacher) does not hide a shipped recipe."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    return shipped_recipe(source) or path
