"""The checkpoint folder both formats share: names, completeness, resume candidates, pruning.

``step-XXXXXXXX/`` is written as ``step-XXXXXXXX.partial/`` and renamed into place once complete
(:func:`senseflow.train.checkpoint_commit.commit`); ``manifest.json``, written last, lists every file
with its size and hash and marks completeness. Checkpoints of earlier versions have ``meta.json`` and no
manifest: still complete, checked only by loading them.

Nothing here deletes a ``step-XXXXXXXX`` folder in place: it is first renamed to ``.deleting`` (one
atomic step), so a process killed half-way through a deletion leaves a leftover that
:func:`clean_partial` removes, never a checkpoint that looks complete but lacks files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from senseflow.errors import CheckpointError

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
TMP_SUFFIX = ".partial"  # being written
OLD_SUFFIX = ".old"  # the previous checkpoint of a step being saved again, while it is replaced
DELETING_SUFFIX = ".deleting"  # being pruned
LEFTOVER_RE = re.compile(r"^step-\d{8}(\.partial|\.old|\.deleting)$")
META = "meta.json"
STATE = "state.pt"
CONFIG = "config.yaml"
MANIFEST = "manifest.json"
#: Longest reason quoted from a low-level error (torch's refusals run to several paragraphs).
MAX_REASON_CHARS = 300

T = TypeVar("T")


class IncompleteCheckpointError(CheckpointError, FileNotFoundError):
    """A folder that does not exist or holds no complete checkpoint (neither manifest nor meta.json).

    Also a ``FileNotFoundError``: the user most often pointed at the wrong folder.
    """


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's renames and new entries, to disk (a rename is atomic, not
    durable, by itself; safetensors and DCP do not flush the files they write)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def one_line(exc: BaseException) -> str:
    """A short, single-line reason from a low-level error; for torch's weights-only refusal, the line
    naming what was refused rather than its advice to load the file unsafely."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "unsupported global" in line.lower() or "WeightsUnpickler" in line]
    text = (named or lines or [type(exc).__name__])[0]
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def is_complete(path: Path) -> bool:
    """Written to the end: a manifest, or ``meta.json`` for checkpoints of earlier versions."""
    return (path / MANIFEST).is_file() or (path / META).is_file()


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = CHECKPOINT_RE.match(child.name)
        if m and is_complete(child):
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def resume_candidates(root: Path) -> list[Path]:
    """The complete checkpoints under ``root``, newest first: what to try, in order, when resuming."""
    return [path for _, path in reversed(list_checkpoints(root))]


def load_newest_good(root: Path, load: Callable[[Path], T]) -> tuple[Path, T, list[tuple[Path, str]]]:
    """``load`` the newest checkpoint under ``root`` that loads, falling back to older ones.

    ``load`` (the caller's: verify, then load) raises :class:`CheckpointError` for a checkpoint that
    is damaged; that one is skipped and the next older one tried. Any other error (a checkpoint of
    another model, say) is raised at once: an older checkpoint would fail the same way. Returns the
    path loaded, what ``load`` returned and the skipped (path, reason) pairs, newest first, for the
    caller to report. Raises :class:`CheckpointError` when none loads, :class:`IncompleteCheckpointError`
    when there is none.
    """
    skipped: list[tuple[Path, str]] = []
    last: CheckpointError | None = None
    for path in resume_candidates(root):
        try:
            return path, load(path), skipped
        except CheckpointError as exc:
            skipped.append((path, str(exc)))
            last = exc
    if last is None:
        raise IncompleteCheckpointError(f"no complete checkpoint in {root}")
    reasons = "; ".join(reason for _, reason in skipped)
    raise CheckpointError(f"no usable checkpoint in {root}: {reasons}") from last


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's ``meta.json`` (step, networks, format); unreadable -> :class:`CheckpointError`."""
    file = path / META
    if not file.is_file():
        raise IncompleteCheckpointError(
            f"{path} is not a complete checkpoint (no {META}); choose another one"
        )
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {META} cannot be read ({one_line(exc)})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("modules"), list):
        raise CheckpointError(f"checkpoint {path}: {META} does not list the networks it holds")
    meta.setdefault("format", "safetensors")  # checkpoints of earlier versions
    return meta


def load_state(path: Path) -> dict[str, Any]:
    """The training state (``state.pt``) of a checkpoint of either format.

    Read with ``torch.load(weights_only=True)``: plain data only (tensors, numbers, strings,
    containers), so a crafted file cannot run code; a refused, truncated or corrupt file raises
    :class:`CheckpointError` naming it.
    """
    try:
        state = torch.load(path / STATE, weights_only=True, map_location="cpu")
    except Exception as exc:  # whatever a damaged or crafted file makes the unpickler raise
        raise CheckpointError(f"checkpoint {path}: {STATE} cannot be loaded ({one_line(exc)})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: {STATE} holds a {type(state).__name__}, not a dict")
    return state


def remove_tree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def discard(path: Path) -> None:
    """Delete a checkpoint folder so that no crash can leave it looking complete: rename it to
    ``.deleting`` (atomic), make the rename durable, then delete."""
    doomed = path.with_name(path.name + DELETING_SUFFIX)
    shutil.rmtree(doomed, ignore_errors=True)  # left by an earlier, interrupted deletion
    path.rename(doomed)
    fsync_path(path.parent)
    shutil.rmtree(doomed)


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (all kept when ``keep_last`` is 0).

    Best effort: a checkpoint that cannot be deleted is kept, with a warning; the save that called
    this has succeeded all the same. Returns the paths deleted.
    """
    removed: list[Path] = []
    if keep_last <= 0:
        return removed
    for _, path in list_checkpoints(root)[:-keep_last]:
        try:
            discard(path)
        except OSError as exc:
            warnings.warn(f"could not delete the old checkpoint {path}: {exc}", stacklevel=2)
        else:
            removed.append(path)
    return removed


def clean_partial(root: Path) -> list[Path]:
    """Remove what interrupted saves and deletions left (``step-*.partial``, ``.old``, ``.deleting``)
    and ``step-*`` folders that are not complete; returns what was removed, for the caller to log.

    Call it from one process only (rank 0), when no save is in flight.
    """
    removed: list[Path] = []
    if not root.is_dir():
        return removed
    for child in sorted(root.iterdir()):
        leftover = LEFTOVER_RE.match(child.name) is not None
        unfinished = CHECKPOINT_RE.match(child.name) is not None and not is_complete(child)
        if leftover or unfinished:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
            removed.append(child)
    return removed
