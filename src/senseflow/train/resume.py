"""Which checkpoint a run continues from, with a fall-back past checkpoints that fail to load.

``checkpoint.resume``: null (a new run), a checkpoint folder (that one, or an error), ``latest`` (the
newest good checkpoint of the run; an error without one) or ``auto`` (the same, or a new run when
there is none). A checkpoint that fails its manifest check or its load is reported and the next
older one is tried, so a crash that damaged the newest one costs one checkpoint interval, not the run.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Protocol

from senseflow.errors import RunFolderError
from senseflow.train import checkpoint as ckpt

log = logging.getLogger("senseflow")


class Resumable(Protocol):
    rank: int

    def resume(self, path: Path) -> None: ...


def resume_run(run: Resumable, root: Path, mode: str | None) -> Path | None:
    """Load ``run`` from the checkpoint ``mode`` names (see the module); returns it, or None."""
    if run.rank == 0:
        for path in ckpt.clean_partial(root):
            log.warning("removed %s, left by a checkpoint write or deletion that did not finish", path)
    if mode is None:
        return None
    if mode not in ("latest", "auto"):
        run.resume(Path(mode))
        return Path(mode)
    try:
        path, _, skipped = ckpt.load_newest_good(root, run.resume)
    except ckpt.IncompleteCheckpointError:  # no checkpoint at all
        if mode == "latest":
            raise RunFolderError(
                f"nothing to resume ({root}): no complete checkpoint; use --resume auto to start fresh "
                "when there is none"
            ) from None
        return None
    for unusable, reason in skipped:
        log.warning("checkpoint %s is unusable (%s); trying the next older one", unusable, reason)
    if skipped:
        names = ", ".join(p.name for p, _ in skipped)
        log.warning("resumed from %s instead of the newer, unusable %s", path, names)
    return path


def check_data_stream(path: Path, saved: str | None, current: str) -> None:
    """Refuse a checkpoint trained on another data stream: it would continue on other samples."""
    if saved is None:
        warnings.warn(
            f"checkpoint {path} does not record its data stream (an earlier version wrote it); "
            f"it continues on this version's ({current})",
            stacklevel=3,
        )
    elif saved != current:
        raise ValueError(
            f"checkpoint.resume: {path} was trained on data stream {saved!r} but this version's is "
            f"{current!r}; resuming would continue on other samples (start a new run in another output_dir)"
        )
