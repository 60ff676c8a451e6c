"""``manifest.json``: every file of a checkpoint with its size and SHA-256, written last.

A checkpoint can be damaged after it was written completely: a copy that stopped early, a disk that
returned other bytes, a deletion killed half-way. Loaders then fail deep inside safetensors, pickle
or DCP with messages that do not name the checkpoint, or (a flipped byte in a weight) do not fail
at all. :func:`verify_checkpoint` compares the files against the manifest first and names the
checkpoint, the file and what is wrong in one line.

Hashing reads every byte again; for very large runs ``hashes=False`` records sizes only (which still
catches truncated and missing files), and the manifest says which was done.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from pathlib import Path
from typing import Any

from senseflow.errors import CheckpointError
from senseflow.train.checkpoint_layout import (
    MANIFEST,
    META,
    IncompleteCheckpointError,
    fsync_path,
    one_line,
)

MANIFEST_VERSION = 1
#: Read size when hashing: large enough to be fast, small enough to never hold a weight file whole.
HASH_CHUNK_BYTES = 1 << 20
#: Hex digits of a SHA-256 shown in a mismatch message (enough to tell two apart).
SHOWN_DIGEST_CHARS = 12


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checkpoint_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST
    )


def write_manifest(folder: Path, hashes: bool = True) -> Path:
    """List every file under ``folder`` (relative path, size, SHA-256 when ``hashes``) in
    ``manifest.json``, after flushing each to disk (so that after a power cut the renamed folder
    cannot lack a file's data); the manifest itself is flushed too."""
    files = []
    for path in _checkpoint_files(folder):
        fsync_path(path)
        entry: dict[str, Any] = {"path": path.relative_to(folder).as_posix(), "size": path.stat().st_size}
        if hashes:
            entry["sha256"] = file_sha256(path)
        files.append(entry)
    manifest = {"version": MANIFEST_VERSION, "hashed": hashes, "files": files}
    out = folder / MANIFEST
    out.write_text(json.dumps(manifest, indent=1) + "\n")
    fsync_path(out)
    return out


def _read_manifest(path: Path) -> list[dict[str, Any]] | None:
    """The manifest's file entries; None for a checkpoint of an earlier version (no manifest)."""
    file = path / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text())
        files = manifest["files"]
        if not all(isinstance(e["path"], str) and isinstance(e["size"], int) for e in files):
            raise ValueError("an entry without a path or size")
        if any(Path(e["path"]).is_absolute() or ".." in Path(e["path"]).parts for e in files):
            raise ValueError("a path outside the checkpoint")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is damaged: {MANIFEST} is unreadable ({one_line(exc)})"
        ) from exc
    return files


def _selected(relative: str, only: Collection[str] | None) -> bool:
    return only is None or any(relative == name or relative.startswith(name + "/") for name in only)


def _problem(path: Path, entry: dict[str, Any]) -> str | None:
    """What is wrong with one listed file, or None."""
    file = path / entry["path"]
    if not file.is_file():
        return "missing"
    size = file.stat().st_size
    if size != entry["size"]:
        return f"size differs: expected {entry['size']} bytes, found {size}"
    expected = entry.get("sha256")
    if expected is not None:
        found = file_sha256(file)
        if found != expected:
            shown = SHOWN_DIGEST_CHARS
            return f"sha256 mismatch: expected {expected[:shown]}..., found {found[:shown]}..."
    return None


def verify_checkpoint(path: Path, only: Collection[str] | None = None) -> None:
    """Check a checkpoint's files against its manifest; raise :class:`CheckpointError` naming the
    checkpoint, the first damaged file and what is wrong.

    ``only``: relative paths (a file, or a folder for everything under it) to check, for readers that
    need a part (``read_network``); None checks every listed file. Files that are not listed are
    ignored. A checkpoint of an earlier version (``meta.json``, no manifest) passes: loading it is its
    check. A folder that is neither raises :class:`IncompleteCheckpointError`.
    """
    if not path.is_dir():
        raise IncompleteCheckpointError(f"{path} is not a checkpoint (no such folder)")
    files = _read_manifest(path)
    if files is None:
        if not (path / META).is_file():
            raise IncompleteCheckpointError(
                f"{path} is not a complete checkpoint (no {MANIFEST} or {META}); choose another one"
            )
        return
    problems = []
    for entry in files:
        if _selected(entry["path"], only):
            problem = _problem(path, entry)
            if problem is not None:
                problems.append(f"{entry['path']}: {problem}")
    if problems:
        more = f" (and {len(problems) - 1} more damaged file(s))" if len(problems) > 1 else ""
        raise CheckpointError(f"checkpoint {path} is damaged: {problems[0]}{more}")
