"""The parallel plan, applied by the trainer to the networks an adapter builds.

Two phases around weight loading (build on meta, shard, load, wrap):

* :func:`shard` before the weights exist: gradient checkpointing, then, for ``fsdp``, FSDP2's
  ``fully_shard`` on every unit the adapter names (``shard_units``) and then the root, for
  generator, fake score and teacher, on the run's one device mesh;
* :func:`wrap` after loading: DistributedDataParallel for what trains and is not sharded (the
  generator and fake score under ``ddp``, the discriminator under both strategies, as the official
  code keeps it in DDP). DDP's constructor broadcasts rank 0's weights, so it comes last.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from senseflow.models.adapter import FamilyAdapter, Role


def device_mesh(device: torch.device, strategy: str):
    """The run's one-dimensional mesh over every rank (None when nothing is sharded)."""
    if strategy != "fsdp" or not dist.is_initialized():
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (dist.get_world_size(),))


def is_sharded(role: Role, strategy: str) -> bool:
    return strategy == "fsdp" and dist.is_initialized() and role != "discriminator"


def shard(
    module: nn.Module,
    role: Role,
    strategy: str,
    adapter: FamilyAdapter,
    mesh,
    gradient_checkpointing: bool = False,
) -> nn.Module:
    """Checkpointing and FSDP2 sharding of one network (in place; meta parameters are fine)."""
    if strategy not in ("none", "ddp", "fsdp"):
        raise ValueError(f"parallel.strategy {strategy!r} is not supported (none, ddp or fsdp)")
    if gradient_checkpointing and role != "discriminator":
        adapter.enable_gradient_checkpointing(module)
    if is_sharded(role, strategy):
        from torch.distributed.fsdp import fully_shard

        for unit in adapter.shard_units(module):
            fully_shard(unit, mesh=mesh)
        fully_shard(module, mesh=mesh)
    return module


def wrap(module: nn.Module, role: Role, strategy: str) -> nn.Module:
    """What the trainer calls for a network whose backward must synchronise gradients."""
    if strategy == "none" or not dist.is_initialized() or role == "teacher" or is_sharded(role, strategy):
        return module
    return nn.parallel.DistributedDataParallel(module)
