"""What ``senseflow train`` does with a run folder that already holds a run.

Never mix two runs in one folder and never delete one silently: a folder that holds anything is
refused unless the command line says to continue it (``--resume``) or to start again
(``--overwrite``, which moves the old folder aside). ``--resume auto`` is for jobs a cluster may
requeue: continue when a checkpoint exists, start fresh otherwise. Also the checks of run and
checkpoint folders that ``generate``, ``eval`` and ``export`` read.
"""

from __future__ import annotations

import logging
import time
from os import PathLike
from pathlib import Path

from senseflow.errors import RunFolderError, UsageError
from senseflow.inputs import existing_folder
from senseflow.train.checkpoint_layout import MANIFEST, META, is_complete, list_checkpoints

log = logging.getLogger("senseflow")

CHECKPOINTS = "checkpoints"
RESUME_MODES = ("latest", "auto")


def holds_run(run_dir: Path) -> bool:
    return run_dir.is_dir() and any(run_dir.iterdir())


def move_aside(run_dir: Path) -> Path:
    """Rename ``run_dir`` to ``<name>.old-<date>-<time>`` beside it (a number added if taken)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
    run_dir.rename(target)
    return target


def prepare_run_folder(run_dir: Path, resume: str | None, overwrite: bool, is_main: bool) -> str | None:
    """Check the run folder against the command line and return the ``checkpoint.resume`` to train with.

    ``resume``: None (a new run), ``latest`` (continue; an error without a checkpoint), ``auto``
    (continue if a checkpoint exists, else start fresh) or a checkpoint path. Only the main process
    (``is_main``) moves folders; every process returns the same answer.
    """
    if overwrite and resume is not None:
        raise UsageError(
            "--overwrite starts a new run and --resume continues one (senseflow train): give one of them"
        )
    has_checkpoint = bool(list_checkpoints(run_dir / CHECKPOINTS))
    if resume == "latest" and not has_checkpoint:
        raise RunFolderError(
            f"nothing to resume ({run_dir / CHECKPOINTS}): no complete checkpoint there; drop --resume to "
            "start a new run, or use --resume auto to continue when there is one and start fresh otherwise"
        )
    fresh = overwrite or (resume == "auto" and not has_checkpoint)
    if resume is None and not overwrite and holds_run(run_dir):
        raise RunFolderError(
            f"the run folder already holds a run ({run_dir}): continue it with --resume, start again with "
            f"--overwrite (the old folder is moved to {run_dir.name}.old-<time>, not deleted), or set "
            "another output_dir"
        )
    if fresh and is_main and holds_run(run_dir):
        moved = move_aside(run_dir)
        log.warning("moved the earlier run in %s to %s", run_dir, moved)
    return None if fresh else resume


def run_folder(path: str | PathLike, option: str, exports: bool = True) -> Path:
    """``path`` is a run folder with a complete checkpoint or (``exports``) an exported folder."""
    from senseflow.student import is_export

    p = Path(path).expanduser()
    what = "a run folder written by `senseflow train`" + (
        " or a folder written by `senseflow export`" if exports else ""
    )
    if p.exists() and not p.is_dir():
        raise UsageError(f"a file, not a run folder ({option} {p}): give {what}")
    if not p.is_dir():
        raise UsageError(f"no such folder ({option} {p}): give {what}")
    if (exports and is_export(p)) or list_checkpoints(p / "checkpoints"):
        return p
    raise UsageError(
        f"not a run folder ({option} {p}): no complete checkpoint in {p / 'checkpoints'}; give {what} "
        "(train first if the run has not written a checkpoint yet)"
    )


def checkpoint_folder(path: str | PathLike, option: str = "--checkpoint") -> Path:
    """``path`` is a complete checkpoint folder (``step-XXXXXXXX`` with its manifest or ``meta.json``)."""
    p = existing_folder(path, option)
    if not is_complete(p):
        raise UsageError(
            f"not a complete checkpoint ({option} {p}): it has no {MANIFEST} or {META}; give one of the "
            "run's checkpoints/step-XXXXXXXX folders, or drop the option for the newest"
        )
    return p
