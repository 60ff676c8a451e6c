"""Atomic, self-contained training checkpoints.

A checkpoint is a folder ``step-XXXXXXXX/`` holding the networks' weights and optimiser states,
``state.pt`` (scheduler states, counters, data position) and the resolved config. It is written
under a temporary name and renamed into place only when complete, so a crash during a save leaves
the previous checkpoint as the latest loadable one; ``manifest.json`` is written last inside the
temporary folder, lists every file with its size and SHA-256, and marks completeness. Loaders check
the files against it first (:func:`verify_checkpoint`) and report a damaged checkpoint as one
:class:`~senseflow.errors.CheckpointError`; resuming falls back to older ones
(:func:`load_newest_good`).

Two formats, named in ``meta.json``: ``dcp`` (sharded, every rank writes its own part;
:mod:`senseflow.train.sharded_checkpoint`) and ``safetensors`` (this module: one file per network,
weights and optimiser states gathered whole by ``torch.distributed.checkpoint.state_dict`` and keyed
by parameter name, so the same files come from one process, DDP or FSDP2). Either format resumes on
any world size; :func:`read_network` reads one network's whole weights from either.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
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

from senseflow.errors import CheckpointError
from senseflow.train.checkpoint_commit import commit, writing
from senseflow.train.checkpoint_layout import (
    CHECKPOINT_RE,
    CONFIG,
    MANIFEST,
    META,
    STATE,
    TMP_SUFFIX,
    IncompleteCheckpointError,
    checkpoint_name,
    clean_partial,
    latest_checkpoint,
    list_checkpoints,
    load_newest_good,
    load_state,
    one_line,
    read_meta,
    remove_tree,
    resume_candidates,
)
from senseflow.train.checkpoint_manifest import file_sha256, verify_checkpoint
from senseflow.train.sharded_checkpoint import DCP_DIR
from senseflow.train.sharded_checkpoint import read_network as read_dcp

__all__ = [
    "CHECKPOINT_RE",
    "CONFIG",
    "MANIFEST",
    "META",
    "STATE",
    "TMP_SUFFIX",
    "IncompleteCheckpointError",
    "checkpoint_name",
    "clean_partial",
    "commit",
    "gather_optimizer",
    "gather_weights",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_newest_good",
    "load_optimizer",
    "load_state",
    "network_sha256",
    "read_meta",
    "read_network",
    "remove_tree",
    "resume_candidates",
    "save_checkpoint",
    "verify_checkpoint",
]

#: How safetensors words a failed write (a Rust I/O error with its errno) in the SafetensorError it
#: raises instead of an OSError.
_SAFETENSORS_IO_ERROR = re.compile(r"I/O error: .*\(os error (?P<errno>\d+)\)")

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


def _save_network(tensors: dict[str, Tensor], file: Path) -> None:
    """``save_file``, its I/O failures raised as the ``OSError`` they are (disk full, read-only...)."""
    try:
        save_file(tensors, str(file))
    except SafetensorError as exc:
        m = _SAFETENSORS_IO_ERROR.search(str(exc))
        if m is None:
            raise
        code = int(m["errno"])
        raise OSError(code, os.strerror(code), str(file)) from exc


def _load_network(path: Path, name: str) -> dict[str, Tensor]:
    """Network ``name``'s safetensors file; a truncated or corrupt one raises :class:`CheckpointError`."""
    file = path / f"{name}.safetensors"
    try:
        return load_file(str(file))
    except Exception as exc:  # SafetensorError for a bad header, OSError for an unreadable file
        raise CheckpointError(f"checkpoint {path}: {file.name} cannot be read ({one_line(exc)})") from exc


def save_checkpoint(
    root: Path,
    step: int,
    modules: Mapping[str, nn.Module | Mapping[str, Tensor]],
    state: dict[str, Any],
    config_text: str,
    keep_last: int,
    hashes: bool = True,
) -> Path:
    """Write a complete whole-weight checkpoint atomically, then prune to the newest ``keep_last``.

    ``modules`` maps a name to a module or to its (gathered) state dict; ``hashes``: record SHA-256s
    in the manifest (else sizes only). A failed write raises
    :class:`~senseflow.errors.CheckpointWriteError` and leaves no ``.partial`` folder behind.
    """
    final = root / checkpoint_name(step)
    tmp = root / (final.name + TMP_SUFFIX)
    with writing(tmp) as w:
        w.file = root
        root.mkdir(parents=True, exist_ok=True)
        remove_tree(tmp)
        tmp.mkdir()
        for name, module in modules.items():
            w.file = tmp / f"{name}.safetensors"
            _save_network(_module_tensors(module), w.file)
        meta = {"step": step, "modules": sorted(modules), "format": "safetensors"}
        return commit(tmp, final, meta, state, config_text, keep_last, hashes)


def _needed_for(name: str) -> Collection[str]:
    """The files ``read_network(path, name)`` reads, in either format."""
    return (META, f"{name}.safetensors", DCP_DIR)


def read_network(path: Path, name: str) -> dict[str, Tensor]:
    """Network ``name``'s whole weights from a checkpoint of either format, on the CPU, without a
    process group (``generate``, evaluation, export). The files it reads are verified first."""
    verify_checkpoint(path, only=_needed_for(name))
    meta = read_meta(path)
    if meta["format"] == "dcp":
        return read_dcp(path, name, verify=False)
    if name not in meta["modules"]:
        raise ValueError(f"checkpoint {path} holds no weights for {name!r} (it holds {meta['modules']})")
    return _load_network(path, name)


def network_sha256(path: Path, name: str) -> str:
    """An identity of network ``name``'s weights in a checkpoint: the file's SHA-256 for the
    safetensors format, a SHA-256 over the names, dtypes, shapes and bytes of its tensors for dcp."""
    if read_meta(path)["format"] != "dcp":
        return file_sha256(path / f"{name}.safetensors")
    digest = hashlib.sha256()
    for key, tensor in sorted(read_network(path, name).items()):
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_checkpoint(path: Path, modules: Mapping[str, nn.Module], verify: bool = True) -> dict[str, Any]:
    """Load network weights into ``modules`` (strictly) and return the saved training state.

    The checkpoint is verified against its manifest first (unless ``verify`` is False: the caller
    did); a damaged one raises :class:`CheckpointError` before any module is touched when it has a
    manifest, and as soon as a file fails to load when it has none (an earlier version's).
    """
    if verify:
        verify_checkpoint(path)
    meta = read_meta(path)
    missing = sorted(set(modules) - set(meta["modules"]))
    if missing:
        raise ValueError(f"checkpoint {path} has no weights for {missing} (it holds {meta['modules']})")
    state = load_state(path)  # plain data only, no code; read before the weights, which it cannot spoil
    for name, module in modules.items():
        set_model_state_dict(module, _load_network(path, name), options=_SCATTER)
    return state
