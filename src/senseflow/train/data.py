"""Training data: a stream per ``data.kind`` (from the registry) and a loader that prefetches it.

A stream's ``batch(i)`` returns this rank's :class:`~senseflow.models.batch.Batch` of iteration
``i`` and is a pure function of (seed, i, rank, world), so resuming needs only the iteration counter
and a run's data do not depend on how many ranks share it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from torch.utils.data import DataLoader, Dataset

from senseflow.config.registry import data_kind_spec, resolve_builder
from senseflow.config.schema import DistillConfig
from senseflow.models.batch import Batch


class BatchStream(Protocol):
    def batch(self, index: int) -> Batch:
        """This rank's batch of iteration ``index``."""


def stream_identity(stream: BatchStream) -> str:
    """What decides a stream's samples besides the recipe: its ``identity`` (a name a stream changes
    when it starts drawing other samples for the same recipe), else its class. Checkpoints record
    it, so a run is never resumed on other data than it started with."""
    return getattr(stream, "identity", None) or f"{type(stream).__module__}.{type(stream).__qualname__}"


def build_stream(cfg: DistillConfig, rank: int = 0, world: int = 1) -> BatchStream:
    spec = data_kind_spec(cfg.data.kind)
    if spec is None:
        raise ValueError(f"data.kind: '{cfg.data.kind}' is not registered")
    return resolve_builder(spec, "data.kind")(cfg, rank, world)


class _Iterations(Dataset):
    """Iterations ``start .. stop - 1`` of a stream, as a map-style dataset for a DataLoader."""

    def __init__(self, stream: BatchStream, start: int, stop: int):
        self.stream, self.start, self.stop = stream, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, i: int) -> Batch:
        return self.stream.batch(self.start + i)


def _keep(batch: Batch) -> Batch:
    return batch


class BatchLoader:
    """Hands the trainer the batch of each iteration, prepared ``data.num_workers`` processes ahead.

    With 0 workers the stream runs in the trainer's process. Asking for an iteration other than the
    next one (a resume) restarts the workers there, so the batches never depend on the prefetching;
    asking again for the last one returns it without a restart. Workers are forked processes, so a
    stream works on the CPU and holds no CUDA state; the trainer moves each batch to its device.
    """

    def __init__(self, stream: BatchStream, num_workers: int, stop: int):
        self.stream, self.num_workers, self.stop = stream, num_workers, stop
        self._next: int | None = None
        self._it: Iterator[Batch] | None = None
        self._last: tuple[int, Batch] | None = None

    def batch(self, index: int) -> Batch:
        if self.num_workers == 0:
            return self.stream.batch(index)
        if self._last is not None and self._last[0] == index:
            return self._last[1]
        if self._it is None or self._next != index:
            self.close()
            loader = DataLoader(
                _Iterations(self.stream, index, max(self.stop, index + 1)),
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_keep,
            )
            self._it = iter(loader)
        self._next = index + 1
        batch = next(self._it)
        self._last = (index, batch)
        return batch

    def close(self) -> None:
        """Stop the worker processes (a later ``batch`` starts them again): dropping the DataLoader's
        iterator shuts its workers down."""
        self._it, self._next, self._last = None, None, None
