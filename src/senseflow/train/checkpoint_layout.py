"""The checkpoint folder both formats share: names, completeness, atomic commit, pruning.

``step-XXXXXXXX/`` is written as ``step-XXXXXXXX.partial/`` and renamed into place by :func:`commit`
once complete (``meta.json``, written last, marks completeness); folders a crash left are removed by
:func:`clean_partial`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
TMP_SUFFIX = ".partial"
META = "meta.json"
STATE = "state.pt"
CONFIG = "config.yaml"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = CHECKPOINT_RE.match(child.name)
        if m and (child / META).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def remove_tree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)


def commit(
    tmp: Path, final: Path, meta: dict[str, Any], state: dict[str, Any], config_text: str, keep_last: int
) -> Path:
    """Complete the checkpoint being written in ``tmp`` (state, config, then ``meta.json``), move it
    to ``final`` and prune its folder to the newest ``keep_last``."""
    torch.save(state, tmp / STATE)
    (tmp / CONFIG).write_text(config_text)
    meta = {**meta, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (tmp / META).write_text(json.dumps(meta, indent=2))
    _fsync_dir(tmp)
    root = final.parent
    if final.exists():  # re-saving the same step: move the old one aside, then drop it
        old = root / (final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    for _, path in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path)
    return final


def read_meta(path: Path) -> dict[str, Any]:
    if not (path / META).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {META}); choose another one")
    meta = json.loads((path / META).read_text())
    meta.setdefault("format", "safetensors")  # checkpoints of earlier versions
    return meta


def clean_partial(root: Path) -> list[Path]:
    """Remove folders left by saves that were interrupted; returns what was removed."""
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.endswith((TMP_SUFFIX, ".old")):
                shutil.rmtree(child)
                removed.append(child)
    return removed
