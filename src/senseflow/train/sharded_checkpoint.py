"""Sharded checkpoints with torch.distributed.checkpoint (DCP).

Every rank writes the shards it holds (weights and optimiser states of the generator, the fake score
and the discriminator) into ``step-XXXXXXXX.partial/dcp/`` in parallel; rank 0 then adds ``state.pt``
(schedulers, counters, data position), the resolved config and ``meta.json`` and renames the folder
into place, so a checkpoint is visible only when complete and a crash leaves the previous one newest.
DCP records where each block of each tensor lives, so a checkpoint loads at any world size and
strategy (saved by 4 FSDP2 ranks, resumed by 1 or 2), and without a process group at all
(:func:`read_network`, for ``generate`` and export).

With ``async_save`` DCP copies the states to CPU memory and writes them in a background thread while
training goes on; the checkpoint is finalised (renamed) when its write has finished, at the latest
before the next save or at the end of the run.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from senseflow.errors import CheckpointError, CheckpointWriteError
from senseflow.train import checkpoint_layout as ckpt
from senseflow.train.checkpoint_commit import commit, writing
from senseflow.train.checkpoint_manifest import verify_checkpoint
from senseflow.train.safe_pickle import SafeFileSystemReader, SafeLoadPlanner

DCP_DIR = "dcp"
FORMAT = "dcp"

T = TypeVar("T")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _failures(exc: CheckpointException) -> list[BaseException]:
    """The per-rank errors DCP gathered (values are an error, or an (error, traceback) pair)."""
    found = []
    for failure in exc.failures.values():
        error = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(error, BaseException):
            found.append(error)
    return found


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every save and load without a process group that it assumes one process; that
    is what senseflow asks for there (``no_dist``), so the warning is only noise in the run's log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _writing_dcp(call: Callable[[], T]) -> T:
    """Run a DCP write; an ``OSError`` on any rank (which DCP wraps in a ``CheckpointException``, a
    ``BaseException``) is raised as that ``OSError``, for :func:`writing` to report."""
    try:
        with _single_process_quiet():
            return call()
    except CheckpointException as exc:
        os_errors = [e for e in _failures(exc) if isinstance(e, OSError)]
        if os_errors:
            raise os_errors[0] from exc
        raise


def _reading_dcp(path: Path, call: Callable[[], T]) -> T:
    """Run a DCP read; its failures (DCP's ``CheckpointException``, an unreadable or refused index)
    are raised as one :class:`CheckpointError` naming the checkpoint."""
    try:
        with _single_process_quiet():
            return call()
    except CheckpointException as exc:
        reasons = [ckpt.one_line(e) for e in _failures(exc)] or [ckpt.one_line(exc)]
        raise CheckpointError(f"checkpoint {path}: {DCP_DIR}/ cannot be read ({reasons[0]})") from exc
    except Exception as exc:  # the index: pickle refusals, truncation (EOFError), OSError, ...
        raise CheckpointError(f"checkpoint {path}: {DCP_DIR}/ cannot be read ({ckpt.one_line(exc)})") from exc


def _read_index(folder: Path) -> Metadata:
    """A DCP folder's index, unpickled without running code from it."""
    return _reading_dcp(folder.parent, lambda: SafeFileSystemReader(str(folder)).read_metadata())


def sharded_state(
    modules: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer]
) -> dict[str, Any]:
    """Each network's and optimiser's state as DCP saves it: local shards (DTensors) under FSDP2,
    whole tensors otherwise, keyed by parameter name (a collective under FSDP2)."""
    return {
        "networks": {name: get_model_state_dict(m) for name, m in modules.items()},
        "optimizers": {name: get_optimizer_state_dict(modules[name], o) for name, o in optimizers.items()},
    }


class ShardedCheckpointer:
    """Writes DCP checkpoints under ``root`` (every rank calls :meth:`save` and :meth:`wait`).

    A failed write raises :class:`~senseflow.errors.CheckpointWriteError` (rank 0 removes the
    ``.partial`` folder): on every rank when DCP's write fails, as DCP gathers the ranks' errors; on
    rank 0 alone when adding ``state.pt``, the config, ``meta.json`` or the manifest fails.
    """

    def __init__(self, root: Path, keep_last: int, async_save: bool = False, hashes: bool = True):
        self.root, self.keep_last, self.async_save, self.hashes = root, keep_last, async_save, hashes
        self._pending: tuple[Future, Path, Path, int, dict[str, Any]] | None = None
        # Background writes run their own collectives; a group of their own keeps them from pairing
        # with the training loop's.
        self._group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None

    def save(
        self,
        step: int,
        modules: Mapping[str, nn.Module],
        optimizers: Mapping[str, torch.optim.Optimizer],
        state: dict[str, Any],
        config_text: str,
    ) -> Path | None:
        """Write step ``step``; returns its final path on rank 0 once it is in place (None while an
        asynchronous write is still running, and on other ranks)."""
        self.wait()
        final = self.root / ckpt.checkpoint_name(step)
        tmp = self.root / (final.name + ckpt.TMP_SUFFIX)
        owner = _rank() == 0
        with writing(tmp, cleanup=owner) as w:
            if owner:
                w.file = self.root
                self.root.mkdir(parents=True, exist_ok=True)
                ckpt.remove_tree(tmp)
                tmp.mkdir()
            _barrier()
            meta = {"step": step, "modules": sorted(modules), "format": FORMAT}
            payload = {**state, "_meta": meta}
            tensors = sharded_state(modules, optimizers)
            w.file = tmp / DCP_DIR
            if self.async_save:
                future = _writing_dcp(
                    lambda: dcp.async_save(tensors, checkpoint_id=str(w.file), process_group=self._group)
                )
                self._pending = (future, tmp, final, step, {"payload": payload, "config": config_text})
                return None
            _writing_dcp(
                lambda: dcp.save(tensors, checkpoint_id=str(w.file), no_dist=not dist.is_initialized())
            )
        return self._finalise(tmp, final, payload, config_text)

    def wait(self) -> Path | None:
        """Block until the asynchronous write in flight (if any) is written and in place."""
        if self._pending is None:
            return None
        future, tmp, final, _, rest = self._pending
        self._pending = None
        with writing(tmp, cleanup=_rank() == 0) as w:
            w.file = tmp / DCP_DIR
            # rank 0's completes after every rank's shards and the metadata are written
            _writing_dcp(future.result)
        return self._finalise(tmp, final, rest["payload"], rest["config"])

    def _finalise(self, tmp: Path, final: Path, payload: dict[str, Any], config_text: str) -> Path | None:
        """Rank 0 completes the checkpoint; every rank returns (or raises) together."""
        path, error = None, None
        if _rank() == 0:
            meta = payload.pop("_meta")
            try:
                path = commit(tmp, final, meta, payload, config_text, self.keep_last, self.hashes)
            except CheckpointWriteError as exc:
                error = exc
        agree(error, f"checkpoint {final}")
        return path


def agree(error: BaseException | None, what: str) -> None:
    """Raise on every rank when rank 0 met ``error`` (re-raised there), instead of leaving the other
    ranks waiting at the next collective until the process-group timeout; a barrier otherwise."""
    if dist.is_initialized():
        failed = torch.tensor([0 if error is None else 1], device=_collective_device())
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item() and error is None:
            raise CheckpointError(f"{what}: rank 0 failed (its error names the file and the cause)")
    if error is not None:
        raise error


def _collective_device() -> torch.device:
    """Where a small tensor for a collective must live: the rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def load_sharded(
    path: Path,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    verify: bool = True,
) -> None:
    """Load a DCP checkpoint's weights and optimiser states into this run's networks, whatever the
    world size and strategy it was saved with (a collective when a process group exists).

    The whole checkpoint is verified against its manifest first unless ``verify`` is False (the caller
    did, on one rank); a damaged one raises :class:`CheckpointError`. The training state is
    :func:`senseflow.train.checkpoint_layout.load_state`'s.
    """
    if verify:
        verify_checkpoint(path)
    saved = _saved_networks(path / DCP_DIR)
    missing = sorted(set(modules) - set(saved))
    if missing:
        raise ValueError(f"checkpoint {path} has no weights for {missing} (it holds {sorted(saved)})")
    tensors = sharded_state(modules, optimizers)
    for name, wanted in tensors["networks"].items():
        # Another model's checkpoint: say so here, not as a read failure (which resuming skips past).
        differ = sorted(key for key, value in wanted.items() if not _fits(saved[name].get(key), value))
        if differ:
            raise ValueError(
                f"checkpoint {path} holds other weights for {name!r} than this run's network "
                f"({len(differ)} missing or of another shape, e.g. {differ[0]!r})"
            )
    _load(tensors, path, no_dist=not dist.is_initialized())
    for name, module in modules.items():
        set_model_state_dict(module, tensors["networks"][name])
    for name, optimizer in optimizers.items():
        set_optimizer_state_dict(modules[name], optimizer, tensors["optimizers"][name])


def _fits(entry: Any, value: Any) -> bool:
    """Whether a saved entry (DCP's metadata of it; None if absent) can fill ``value`` (its global
    shape for a tensor or DTensor)."""
    if entry is None:
        return False
    return not isinstance(value, Tensor) or tuple(getattr(entry, "size", ())) == tuple(value.shape)


def _load(tensors: dict[str, Any], path: Path, no_dist: bool) -> None:
    """``dcp.load`` of ``path``'s DCP folder into ``tensors``, through the restricted reader and planner."""
    folder = str(path / DCP_DIR)
    _reading_dcp(
        path,
        lambda: dcp.load(
            tensors, storage_reader=SafeFileSystemReader(folder), planner=SafeLoadPlanner(), no_dist=no_dist
        ),
    )


def saved_keys(folder: Path) -> list[str]:
    """The flattened keys a DCP folder holds (``networks.<name>.<param>``, ``optimizers.<name>...``)."""
    return sorted(_read_index(folder).state_dict_metadata)


def _saved_networks(folder: Path) -> dict[str, dict[str, Any]]:
    """network -> parameter name -> DCP's metadata of that tensor."""
    metadata = _read_index(folder)
    found: dict[str, dict[str, Any]] = {}
    for key, entry in metadata.state_dict_metadata.items():
        where = metadata.planner_data[key]
        if len(where) == 3 and where[0] == "networks":
            found.setdefault(where[1], {})[where[2]] = entry
    return found


def read_network(path: Path, name: str, verify: bool = True) -> dict[str, Tensor]:
    """One network's whole weights from a DCP checkpoint, on the CPU, without a process group; the
    files it reads are verified first unless ``verify`` is False (the caller did)."""
    if verify:
        verify_checkpoint(path, only=(ckpt.META, DCP_DIR))
    entries = _saved_networks(path / DCP_DIR).get(name)
    if entries is None:
        raise ValueError(f"checkpoint {path} holds no weights for {name!r}")
    target = {
        key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype) for key, entry in entries.items()
    }
    _load({"networks": {name: target}}, path, no_dist=True)
    return target
