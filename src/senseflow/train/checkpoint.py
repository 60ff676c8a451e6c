"""Atomic, self-contained training checkpoints.

A checkpoint is a folder ``step-XXXXXXXX/`` holding one safetensors file per trainable network,
``state.pt`` (optimiser and scheduler states, counters, RNG states, data position) and the
resolved config. It is written under a temporary name and renamed into place only when complete,
so a crash during a save leaves the previous checkpoint as the latest loadable one; ``meta.json``
is written last inside the temporary folder and marks completeness.

Weights and optimiser states are stored whole (not sharded) and keyed by parameter name, gathered
with ``torch.distributed.checkpoint.state_dict``: the same files come from one process, DDP or FSDP2,
and any of them can continue on any world size.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
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

CHECKPOINT_RE = re.compile(r"^step-(\d{8})$")
TMP_SUFFIX = ".partial"
META = "meta.json"
STATE = "state.pt"
CONFIG = "config.yaml"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as (step, path), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = CHECKPOINT_RE.match(child.name)
        if m and (child / META).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def save_checkpoint(
    root: Path,
    step: int,
    modules: Mapping[str, nn.Module | Mapping[str, Tensor]],
    state: dict[str, Any],
    config_text: str,
    keep_last: int,
) -> Path:
    """Write a complete checkpoint atomically, then prune to the newest ``keep_last``.

    ``modules`` maps a name to a module or to its (gathered) state dict.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / (final.name + TMP_SUFFIX)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, module in modules.items():
        save_file(_module_tensors(module), str(tmp / f"{name}.safetensors"))
    torch.save(state, tmp / STATE)
    (tmp / CONFIG).write_text(config_text)
    meta = {"step": step, "modules": sorted(modules), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (tmp / META).write_text(json.dumps(meta, indent=2))
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step: move the old one aside, then drop it
        old = root / (final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    for _, path in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path)
    return final


def load_checkpoint(path: Path, modules: Mapping[str, nn.Module]) -> dict[str, Any]:
    """Load network weights into ``modules`` (strictly) and return the saved training state."""
    if not (path / META).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {META}); choose another one")
    meta = json.loads((path / META).read_text())
    missing = sorted(set(modules) - set(meta["modules"]))
    if missing:
        raise ValueError(f"checkpoint {path} has no weights for {missing} (it holds {meta['modules']})")
    for name, module in modules.items():
        set_model_state_dict(module, load_file(str(path / f"{name}.safetensors")), options=_SCATTER)
    return torch.load(path / STATE, weights_only=True, map_location="cpu")  # plain data only, no code


def clean_partial(root: Path) -> list[Path]:
    """Remove folders left by saves that were interrupted; returns what was removed."""
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.endswith((TMP_SUFFIX, ".old")):
                shutil.rmtree(child)
                removed.append(child)
    return removed
