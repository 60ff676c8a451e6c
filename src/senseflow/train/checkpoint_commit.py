"""Writing a checkpoint folder so that a failure leaves the previous checkpoint the newest valid one.

A checkpoint is written in ``step-XXXXXXXX.partial/``; :func:`commit` adds ``state.pt``,
``config.yaml``, ``meta.json`` and, last, ``manifest.json``, flushes them and renames the folder into
place. A write that fails (disk full, read-only file system, permission denied) inside
:func:`writing` removes the ``.partial`` folder and raises :class:`CheckpointWriteError` in one line
that says which file failed and which checkpoint is still the newest valid one; training code can
stop or go on with that, but never meets a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from senseflow.errors import CheckpointWriteError
from senseflow.train.checkpoint_layout import (
    CONFIG,
    MANIFEST,
    META,
    OLD_SUFFIX,
    STATE,
    TMP_SUFFIX,
    fsync_path,
    latest_checkpoint,
    prune,
)
from senseflow.train.checkpoint_manifest import write_manifest


class Writing:
    """A checkpoint being written in ``tmp``; ``file`` is the file (or folder) written now, named in
    the error when a write fails without naming its file itself."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.file: Path | None = None


def _shown(file: Path, tmp: Path) -> str:
    """A file inside the checkpoint relative to it, anything else in full."""
    return file.relative_to(tmp).as_posix() if file.is_relative_to(tmp) and file != tmp else str(file)


def write_failure(tmp: Path, exc: OSError, file: Path | None, cleanup: bool = True) -> CheckpointWriteError:
    """Remove ``tmp`` (best effort, never raising) and describe the failed write in one line."""
    if cleanup:
        shutil.rmtree(tmp, ignore_errors=True)
    root = tmp.parent
    name = tmp.name.removesuffix(TMP_SUFFIX)
    named = exc.filename if isinstance(exc.filename, (str, os.PathLike)) and exc.filename else None
    where = Path(named) if named is not None else file if file is not None else tmp
    reason = exc.strerror or str(exc) or type(exc).__name__
    try:
        newest = latest_checkpoint(root)
    except OSError:
        newest = None
    error = CheckpointWriteError(
        f"cannot write checkpoint {name} in {root}: {reason} ({_shown(where, tmp)}); "
        f"the newest valid checkpoint is still {newest if newest is not None else 'none'}"
    )
    error.errno = exc.errno  # an OSError too: callers may look at the cause (ENOSPC, EROFS, EACCES)
    return error


@contextmanager
def writing(tmp: Path, cleanup: bool = True) -> Iterator[Writing]:
    """Turn an ``OSError`` raised while writing the checkpoint in ``tmp`` into
    :class:`CheckpointWriteError`, removing ``tmp`` first (when ``cleanup``: only the process that
    owns the folder, rank 0 for DCP). An error already turned passes unchanged."""
    target = Writing(tmp)
    try:
        yield target
    except CheckpointWriteError:
        raise
    except OSError as exc:
        raise write_failure(tmp, exc, target.file, cleanup) from exc


def save_torch(obj: Any, file: Path) -> None:
    """``torch.save`` through a Python file, whose write errors are ``OSError``s with an errno (given
    a path, torch reports a full disk as an opaque ``RuntimeError``), then flushed to disk."""
    with open(file, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def write_text(file: Path, text: str) -> None:
    """Write and flush a small text file."""
    file.write_text(text)
    fsync_path(file)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; a checkpoint already there (the same step saved again) is moved to
    ``.old`` first and put back if the rename fails, then deleted."""
    if not final.exists():
        tmp.rename(final)
        return
    old = final.with_name(final.name + OLD_SUFFIX)
    shutil.rmtree(old, ignore_errors=True)
    final.rename(old)
    try:
        tmp.rename(final)
    except OSError:
        old.rename(final)
        raise
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)  # what is left, clean_partial removes


def commit(
    tmp: Path,
    final: Path,
    meta: dict[str, Any],
    state: dict[str, Any],
    config_text: str,
    keep_last: int,
    hashes: bool = True,
) -> Path:
    """Complete the checkpoint being written in ``tmp`` (``state.pt``, ``config.yaml``,
    ``meta.json``, then ``manifest.json`` listing them all, with SHA-256s when ``hashes``), move it to
    ``final`` and prune its folder to the newest ``keep_last``.

    Raises :class:`CheckpointWriteError` (``tmp`` removed) when a write fails before the rename.
    Afterwards the checkpoint is in place: a failure to flush the parent folder or to delete old
    checkpoints is only warned about.
    """
    with writing(tmp) as w:
        w.file = tmp / STATE
        save_torch(state, w.file)
        w.file = tmp / CONFIG
        write_text(w.file, config_text)
        w.file = tmp / META
        write_text(w.file, json.dumps({**meta, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=2))
        w.file = tmp / MANIFEST
        write_manifest(tmp, hashes)
        fsync_path(tmp)
        w.file = final
        _move_into_place(tmp, final)
    try:
        fsync_path(final.parent)
    except OSError as exc:
        warnings.warn(
            f"checkpoint {final} is in place but its folder could not be flushed: {exc}", stacklevel=2
        )
    prune(final.parent, keep_last)
    return final
