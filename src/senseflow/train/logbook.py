"""Where a run's scalars go: ``log.jsonl`` always, TensorBoard event files when asked for."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "tensorboard"


class Logbook:
    """Appends one JSON line per logged iteration; mirrors the numbers to TensorBoard if enabled.

    A run resumed at iteration ``start`` first drops the lines of iterations ``start`` and later,
    which the interrupted run logged after its last checkpoint and the resumed run logs again."""

    def __init__(self, run_dir: Path, tensorboard: bool, start: int = 0):
        path = run_dir / "log.jsonl"
        if start > 0 and path.is_file():
            _truncate(path, start)
        self.file = path.open("a")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError(
                    "logging.tensorboard: true needs the tensorboard package "
                    "(pip install 'senseflow[tensorboard]'), or set logging.tensorboard=false"
                ) from exc
            self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))

    def write(self, record: dict[str, Any], step: int) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is None:
            return
        for key, value in record.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or key == "iteration":
                continue
            self.writer.add_scalar(key, value, step)
        if record.get("alarm"):
            self.writer.add_text("alarm", str(record["alarm"]), step)
        self.writer.flush()

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


def _truncate(path: Path, start: int) -> None:
    """Keep the lines of iterations before ``start``, atomically (a line cut short by a kill is dropped)."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            iteration = json.loads(line).get("iteration", -1)
        except (ValueError, AttributeError):
            continue
        if iteration < start:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
