"""Checks of what a command line names, made before any work starts.

Each check raises :class:`~senseflow.errors.UsageError` (exit code 2) with one line of the form
``<what> (<option> <value>): <how to fix>``, so a typo is answered in a second rather than after a
model has loaded, and nothing has been written. Only the device check imports torch (when it
is called); the checks of run and checkpoint folders are in :mod:`senseflow.train.run_folder`.
"""

from __future__ import annotations

import math
from os import PathLike
from pathlib import Path

from senseflow.errors import UsageError

#: The longest prompt a prompts file may hold. Text encoders read 77 to 512 tokens, so a longer line
#: is almost surely not a prompt (a file with its line breaks lost, or a binary file).
MAX_PROMPT_CHARS = 10_000
#: Seeds seed a ``torch.Generator`` (64 bits); images of one command use seed, seed + 1, ...
MAX_SEED = 2**63 - 1


def at_least(value: float | None, minimum: int, option: str) -> None:
    """``value`` (when given) is at least ``minimum``: counts, sizes, steps."""
    if value is not None and value < minimum:
        raise UsageError(f"too small ({option} {value}): give a whole number of at least {minimum}")


def distinct(values: list, option: str) -> None:
    """No value of ``values`` (a list option: seeds, variants) is given twice."""
    repeated = [str(v) for i, v in enumerate(values) if v in values[:i]]
    if repeated:
        raise UsageError(f"repeated ({option} {' '.join(dict.fromkeys(repeated))}): give each value once")


def finite(value: float | None, option: str, minimum: float | None = None) -> None:
    """``value`` (when given) is a finite number, at least ``minimum``."""
    if value is None:
        return
    if not math.isfinite(value):
        raise UsageError(f"not a finite number ({option} {value}): give a number such as 1.5")
    if minimum is not None and value < minimum:
        raise UsageError(f"too small ({option} {value}): give a number of at least {minimum}")


def seed(value: int, option: str = "--seed", count: int = 1) -> None:
    """``value`` .. ``value + count - 1`` are all valid seeds (0 to :data:`MAX_SEED`)."""
    if value < 0:
        raise UsageError(f"negative seed ({option} {value}): seeds are whole numbers from 0 to {MAX_SEED}")
    if value + max(count, 1) - 1 > MAX_SEED:
        images = f"; the {count} images use seeds up to {option} + {count - 1}" if count > 1 else ""
        raise UsageError(
            f"seed too large ({option} {value}): seeds are whole numbers from 0 to {MAX_SEED}{images}"
        )


def existing_file(path: str | PathLike, option: str) -> Path:
    """``path`` is a file that exists."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"a folder, not a file ({option} {p}): give the file itself")
    if not p.is_file():
        raise UsageError(f"no such file ({option} {p}): check the path")
    return p


def existing_folder(path: str | PathLike, option: str) -> Path:
    """``path`` is a folder that exists."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UsageError(f"a file, not a folder ({option} {p}): give a folder")
    if not p.is_dir():
        raise UsageError(f"no such folder ({option} {p}): check the path")
    return p


def _writable_parent(p: Path, option: str) -> None:
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(
            f"a file stands where a folder is needed ({option} {p}: {parent} is a file): choose another path"
        )


def output_file(path: str | PathLike, option: str) -> Path:
    """``path`` can be written as a file: not a folder, and no file where one of its folders goes."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"a folder, not a file ({option} {p}): give the path of the file to write")
    _writable_parent(p, option)
    return p


def output_folder(path: str | PathLike, option: str) -> Path:
    """``path`` can be a folder: not a file, and no file where one of its parents goes."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UsageError(f"a file, not a folder ({option} {p}): give a folder to write into")
    _writable_parent(p, option)
    return p


def read_text(path: str | PathLike, option: str, what: str = "text", encoding: str = "utf-8") -> str:
    """The text of an existing UTF-8 file; a binary or otherwise encoded file is named with its line."""
    p = existing_file(path, option)
    data = p.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UsageError(
            f"not UTF-8 {what} ({option} {p}, line {line}, byte {exc.start}): "
            "give a UTF-8 text file (is it a binary file?)"
        ) from None


def check_prompts(prompts: list[str], option: str, path: str | PathLike) -> list[str]:
    """No prompt longer than :data:`MAX_PROMPT_CHARS` (``path`` names the file in the error)."""
    for i, p in enumerate(prompts):
        if len(p) > MAX_PROMPT_CHARS:
            raise UsageError(
                f"prompt {i + 1} is {len(p):,} characters long ({option} {path}): a prompt may have at "
                f"most {MAX_PROMPT_CHARS:,}; put one prompt on each line"
            )
    return prompts


def device(spec: str, option: str = "--device") -> None:
    """``spec`` names a device this machine has (a ValueError naming ``option`` otherwise)."""
    from senseflow.devices import resolve_device

    resolve_device(spec, option)
