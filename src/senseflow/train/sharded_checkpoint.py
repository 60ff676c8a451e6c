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

from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from senseflow.train import checkpoint_layout as ckpt

DCP_DIR = "dcp"
FORMAT = "dcp"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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
    """Writes DCP checkpoints under ``root`` (every rank calls :meth:`save` and :meth:`wait`)."""

    def __init__(self, root: Path, keep_last: int, async_save: bool = False):
        self.root, self.keep_last, self.async_save = root, keep_last, async_save
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
        if _rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            ckpt.remove_tree(tmp)
            tmp.mkdir()
        _barrier()
        meta = {"step": step, "modules": sorted(modules), "format": FORMAT}
        payload = {**state, "_meta": meta}
        tensors = sharded_state(modules, optimizers)
        if self.async_save:
            future = dcp.async_save(tensors, checkpoint_id=str(tmp / DCP_DIR), process_group=self._group)
            self._pending = (future, tmp, final, step, {"payload": payload, "config": config_text})
            return None
        dcp.save(tensors, checkpoint_id=str(tmp / DCP_DIR), no_dist=not dist.is_initialized())
        path = self._finalise(tmp, final, payload, config_text)
        _barrier()
        return path

    def wait(self) -> Path | None:
        """Block until the asynchronous write in flight (if any) is written and in place."""
        if self._pending is None:
            return None
        future, tmp, final, _, rest = self._pending
        self._pending = None
        future.result()  # rank 0's completes after every rank's shards and the metadata are written
        return self._finalise(tmp, final, rest["payload"], rest["config"])

    def _finalise(self, tmp: Path, final: Path, payload: dict[str, Any], config_text: str) -> Path | None:
        if _rank() != 0:
            return None
        meta = payload.pop("_meta")
        return ckpt.commit(tmp, final, meta, payload, config_text, self.keep_last)


def load_sharded(
    path: Path,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
) -> None:
    """Load a DCP checkpoint's weights and optimiser states into this run's networks, whatever the
    world size and strategy it was saved with (a collective when a process group exists)."""
    saved = set(_saved_networks(path / DCP_DIR))
    missing = sorted(set(modules) - saved)
    if missing:
        raise ValueError(f"checkpoint {path} has no weights for {missing} (it holds {sorted(saved)})")
    tensors = sharded_state(modules, optimizers)
    dcp.load(tensors, checkpoint_id=str(path / DCP_DIR), no_dist=not dist.is_initialized())
    for name, module in modules.items():
        set_model_state_dict(module, tensors["networks"][name])
    for name, optimizer in optimizers.items():
        set_optimizer_state_dict(modules[name], optimizer, tensors["optimizers"][name])


def saved_keys(folder: Path) -> list[str]:
    """The flattened keys a DCP folder holds (``networks.<name>.<param>``, ``optimizers.<name>...``)."""
    return sorted(dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata)


def _saved_networks(folder: Path) -> dict[str, dict[str, Any]]:
    """network -> parameter name -> DCP's metadata of that tensor."""
    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    found: dict[str, dict[str, Any]] = {}
    for key, entry in metadata.state_dict_metadata.items():
        where = metadata.planner_data[key]
        if len(where) == 3 and where[0] == "networks":
            found.setdefault(where[1], {})[where[2]] = entry
    return found


def read_network(path: Path, name: str) -> dict[str, Tensor]:
    """One network's whole weights from a DCP checkpoint, on the CPU, without a process group."""
    entries = _saved_networks(path / DCP_DIR).get(name)
    if entries is None:
        raise ValueError(f"checkpoint {path} holds no weights for {name!r}")
    target = {
        key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype) for key, entry in entries.items()
    }
    dcp.load({"networks": {name: target}}, checkpoint_id=str(path / DCP_DIR), no_dist=True)
    return target
