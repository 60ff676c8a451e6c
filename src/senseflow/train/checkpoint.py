"""Atomic, self-contained training checkpoints.

A checkpoint is a folder ``step-XXXXXXXX/`` holding the networks' weights and optimiser states,
``state.pt`` (scheduler states, counters, data position) and the resolved config. It is written
under a temporary name and renamed into place only when complete, so a crash during a save leaves
the previous checkpoint as the latest loadable one; ``meta.json`` is written last inside the
temporary folder and marks completeness.

Two formats, named in ``meta.json``: ``dcp`` (sharded, every rank writes its own part;
:mod:`senseflow.train.sharded_checkpoint`) and ``safetensors`` (this module: one file per network,
weights and optimiser states gathered whole by ``torch.distributed.checkpoint.state_dict`` and keyed
by parameter name, so the same files come from one process, DDP or FSDP2). Either format resumes on
any world size; :func:`read_network` reads one network's whole weights from either.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from senseflow.train.checkpoint_layout import (
    CHECKPOINT_RE,
    CONFIG,
    META,
    STATE,
    TMP_SUFFIX,
    checkpoint_name,
    clean_partial,
    commit,
    latest_checkpoint,
    list_checkpoints,
    read_meta,
    remove_tree,
)
from senseflow.train.sharded_checkpoint import read_network as read_dcp

__all__ = [
    "CHECKPOINT_RE",
    "CONFIG",
    "META",
    "STATE",
    "TMP_SUFFIX",
    "checkpoint_name",
    "clean_partial",
    "commit",
    "gather_optimizer",
    "gather_weights",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_optimizer",
    "network_sha256",
    "read_meta",
    "read_network",
    "remove_tree",
    "save_checkpoint",
]

# Whole tensors on the CPU; under FSDP2 only rank 0 receives them (the others get empty dicts).
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
_SCATTER = StateDictOptions(full_state_dict=True, strict=True)


def gather_weights(module: nn.Module) -> dict[str, Tensor]:
    """The module's whole state dict (a collective under FSDP2: every rank must call it)."""
    return get_model_state_dict(module, options=_GATHER)


def gather_optimizer(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimiser's whole state, keyed by parameter name (a collective under FSDP2)."""
    return get_optimizer_state_dict(module, optimizer, options=_GATHER)


def load_optimizer(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore a state from ``gather_optimizer`` into a plain, DDP or FSDP2 module's optimiser.

    States keyed by parameter index (``optimizer.state_dict()``, as checkpoints of earlier versions
    hold) still load into an unsharded optimiser.
    """
    groups = state.get("param_groups", [])
    if groups and groups[0]["params"] and isinstance(groups[0]["params"][0], int):
        if any(isinstance(p, DTensor) for g in optimizer.param_groups for p in g["params"]):
            raise ValueError(
                "this checkpoint's optimiser state is keyed by parameter index (an earlier senseflow "
                "version) and cannot be loaded into a sharded run; resume it once with "
                "parallel.strategy none or ddp, which rewrites it"
            )
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(module, optimizer, state, options=_SCATTER)


def _module_tensors(module: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    tensors = module.state_dict() if isinstance(module, nn.Module) else module
    # safetensors refuses shared storage; clone contiguous copies (small next to a training step).
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def save_checkpoint(
    root: Path,
    step: int,
    modules: Mapping[str, nn.Module | Mapping[str, Tensor]],
    state: dict[str, Any],
    config_text: str,
    keep_last: int,
) -> Path:
    """Write a complete whole-weight checkpoint atomically, then prune to the newest ``keep_last``.

    ``modules`` maps a name to a module or to its (gathered) state dict.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / (final.name + TMP_SUFFIX)
    remove_tree(tmp)
    tmp.mkdir()
    for name, module in modules.items():
        save_file(_module_tensors(module), str(tmp / f"{name}.safetensors"))
    meta = {"step": step, "modules": sorted(modules), "format": "safetensors"}
    return commit(tmp, final, meta, state, config_text, keep_last)


def read_network(path: Path, name: str) -> dict[str, Tensor]:
    """Network ``name``'s whole weights from a checkpoint of either format, on the CPU, without a
    process group (``generate``, evaluation, export)."""
    meta = read_meta(path)
    if meta["format"] == "dcp":
        return read_dcp(path, name)
    file = path / f"{name}.safetensors"
    if not file.is_file():
        raise ValueError(f"checkpoint {path} holds no weights for {name!r} (it holds {meta['modules']})")
    return load_file(str(file))


def network_sha256(path: Path, name: str) -> str:
    """An identity of network ``name``'s weights in a checkpoint: the file's SHA-256 for the
    safetensors format, a SHA-256 over the names, dtypes, shapes and bytes of its tensors for dcp."""
    import hashlib

    if read_meta(path)["format"] != "dcp":
        digest = hashlib.sha256()
        with open(path / f"{name}.safetensors", "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    digest = hashlib.sha256()
    for key, tensor in sorted(read_network(path, name).items()):
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_checkpoint(path: Path, modules: Mapping[str, nn.Module]) -> dict[str, Any]:
    """Load network weights into ``modules`` (strictly) and return the saved training state."""
    meta = read_meta(path)
    missing = sorted(set(modules) - set(meta["modules"]))
    if missing:
        raise ValueError(f"checkpoint {path} has no weights for {missing} (it holds {meta['modules']})")
    for name, module in modules.items():
        set_model_state_dict(module, load_file(str(path / f"{name}.safetensors")), options=_SCATTER)
    return torch.load(path / STATE, weights_only=True, map_location="cpu")  # plain data only, no code
