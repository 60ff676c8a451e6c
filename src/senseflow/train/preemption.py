"""Stop training cleanly on SIGTERM or SIGINT (cluster preemption, Ctrl-C).

The first signal only sets a flag: the loop finishes its iteration, writes a checkpoint and ends with
:class:`senseflow.errors.Preempted` (exit code 75). A second signal ends the process at once with
the usual ``128 + signal`` code. Under torchrun every rank gets the signal, but not at the same
iteration, so the ranks agree on the flag with one small all-reduce per iteration before any of
them starts the collective checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
    """A context manager that turns the first SIGTERM/SIGINT into a request to stop."""

    def __init__(self, device: torch.device):
        self.device = device
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:  # the second signal: no more waiting
            os._exit(128 + signum)
        self.signal = signum

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def requested(self) -> bool:
        """Whether any rank was asked to stop (a collective when a process group exists)."""
        if not dist.is_initialized():
            return self.signal is not None
        flag = torch.tensor([0 if self.signal is None else 1], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else "a signal on another rank"
