"""Where a run's scalars go: ``log.jsonl`` always, TensorBoard event files when asked for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TENSORBOARD_DIR = "tensorboard"


class Logbook:
    """Appends one JSON line per logged iteration; mirrors the numbers to TensorBoard if enabled."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.file = (run_dir / "log.jsonl").open("a")
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
