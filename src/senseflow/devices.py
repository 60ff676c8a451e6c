"""Where and in which precision networks run: device choice, dtypes, autocast.

Every loss is computed in float32. Networks may store their weights in bfloat16 (the teacher in
every official recipe, all networks for FLUX) and may compute under bfloat16 autocast; the helpers
here cast a network's inputs to its storage dtype and its output back to float32, so the losses and
samplers never see the difference.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def to_dtype(name: str, field: str = "dtype") -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"{field}: unknown dtype {name!r}; expected one of {sorted(DTYPES)}") from None


def resolve_device(spec: str, field: str = "parallel.device") -> torch.device:
    """``auto``: this rank's GPU (``LOCAL_RANK``) when CUDA is available, else the CPU.

    ``cuda`` also means this rank's GPU; ``cuda:N`` and ``cpu`` are taken as given. Asking for CUDA
    on a machine without it is an error rather than a silent fall-back to the CPU.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"{field}: {spec!r} is not a device (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{field}: {spec!r} was asked for but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(
                f"{field}: {spec!r} would put every rank on one GPU; under torchrun use auto or cuda "
                "(each rank takes its LOCAL_RANK)"
            )
    elif device.type != "cpu":
        raise ValueError(f"{field}: {spec!r} is not supported (expected auto, cpu, cuda or cuda:N)")
    return device


def module_dtype(module: nn.Module) -> torch.dtype:
    """Storage dtype of a module's (first floating) parameter; float32 for a module without any. A
    module may declare it as ``storage_dtype`` (a LoRA view: float32 adapters on a bf16 base); a DDP
    wrapper is looked through."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        module = module.module
    declared = getattr(module, "storage_dtype", None)
    if isinstance(declared, torch.dtype):
        return declared
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Autocast to ``dtype`` on ``device`` (nothing for float32)."""
    if dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def set_tf32(enabled: bool) -> None:
    """TF32 matmuls and convolutions on Ampere and later GPUs (no effect on the CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def reshard(*modules: nn.Module) -> None:
    """Free the gathered weights FSDP2 may keep after a forward (the root's stay gathered until a
    backward), so that parameter-wise updates (IDA) and ``requires_grad`` changes act on each rank's
    own shard and the next forward gathers afresh. No-op for modules FSDP2 does not shard."""
    from torch.distributed.fsdp import FSDPModule

    for module in modules:
        if isinstance(module, FSDPModule):
            module.reshard()
