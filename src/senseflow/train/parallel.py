"""The parallel plan, applied by the trainer to the networks an adapter builds.

Two phases around weight loading (build on meta, shard, load, wrap):

* :func:`shard` before the weights exist: gradient checkpointing, ``torch.compile`` per block, then,
  for ``fsdp``, FSDP2's ``fully_shard`` on every unit the adapter names (``shard_units``) and then
  the root, for generator, fake score and teacher, on the run's one device mesh (1-D: shard over
  every rank; 2-D with ``replicate_degree`` > 1: HSDP), with the recipe's mixed-precision policy and
  CPU offload;
* :func:`wrap` after loading: DistributedDataParallel for what trains and is not sharded (the
  generator and fake score under ``ddp``, the discriminator under both strategies, as the official
  code keeps it in DDP). DDP's constructor broadcasts rank 0's weights, so it comes last.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from senseflow.models.adapter import FamilyAdapter, Role


def device_mesh(device: torch.device, strategy: str, replicate_degree: int = 1):
    """The run's mesh: every rank on one dimension, or (replicate, shard) for HSDP (None when nothing
    is sharded)."""
    if strategy != "fsdp" or not dist.is_initialized():
        return None
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if replicate_degree == 1:
        return init_device_mesh(device.type, (world,))
    if world % replicate_degree:
        raise ValueError(
            f"parallel.replicate_degree {replicate_degree} does not divide the world size {world} "
            "(HSDP needs equal shard groups)"
        )
    shape = (replicate_degree, world // replicate_degree)
    return init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard"))


@dataclass(frozen=True)
class ShardPolicy:
    """How FSDP2 holds one network: the dtype it gathers parameters in (None: the storage dtype),
    the dtype gradients are reduced in (None: the gather dtype), and whether its shards live on the
    CPU."""

    gather_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    cpu_offload: bool = False

    def fsdp_kwargs(self, trainable: bool) -> dict:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

        mixed = MixedPrecisionPolicy(
            param_dtype=self.gather_dtype, reduce_dtype=self.reduce_dtype if trainable else None
        )
        offload = (
            CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if self.cpu_offload else OffloadPolicy()
        )
        return {"mp_policy": mixed, "offload_policy": offload}


def shard_policy(role: Role, storage: torch.dtype, precision, parallel) -> ShardPolicy:
    """A role's policy from the recipe: gather in ``precision.fsdp_param_dtype`` ('auto' follows a
    bf16 autocast), never above the storage dtype for the frozen teacher (no gain, twice the
    all-gather); reduce in ``precision.reduce_dtype``."""
    from senseflow.devices import to_dtype

    name = precision.fsdp_param_dtype
    if name == "auto":
        name = precision.autocast_dtype if precision.autocast_dtype == "bf16" else None
    gather = None if name is None else to_dtype(name, "precision.fsdp_param_dtype")
    upcast = gather is not None and role == "teacher" and gather.itemsize > storage.itemsize
    if gather == storage or upcast:
        gather = None
    reduce = to_dtype(precision.reduce_dtype, "precision.reduce_dtype")
    return ShardPolicy(gather, reduce, role in parallel.cpu_offload)


def is_sharded(role: Role, strategy: str) -> bool:
    return strategy == "fsdp" and dist.is_initialized() and role != "discriminator"


def shard(
    module: nn.Module,
    role: Role,
    strategy: str,
    adapter: FamilyAdapter,
    mesh,
    gradient_checkpointing: bool = False,
    policy: ShardPolicy | None = None,
    compile_units: bool = False,
) -> nn.Module:
    """Checkpointing, compilation and FSDP2 sharding of one network (in place; meta parameters are
    fine)."""
    if strategy not in ("none", "ddp", "fsdp"):
        raise ValueError(f"parallel.strategy {strategy!r} is not supported (none, ddp or fsdp)")
    if gradient_checkpointing and role != "discriminator":
        adapter.enable_gradient_checkpointing(module)
    units = adapter.shard_units(module)
    if compile_units:
        for unit in units:
            unit.compile()  # in place: names and state dicts stay those of the uncompiled module
    if is_sharded(role, strategy):
        from torch.distributed.fsdp import fully_shard

        kwargs = (policy or ShardPolicy()).fsdp_kwargs(trainable=role != "teacher")
        for unit in units:
            fully_shard(unit, mesh=mesh, **kwargs)
        fully_shard(module, mesh=mesh, **kwargs)
    return module


def wrap(module: nn.Module, role: Role, strategy: str, unused_parameters: bool = False) -> nn.Module:
    """What the trainer calls for a network whose backward must synchronise gradients.
    ``unused_parameters``: the network has parameters its output never reads (the adapter says so),
    which DDP must then look for in every backward."""
    if strategy == "none" or not dist.is_initialized() or role == "teacher" or is_sharded(role, strategy):
        return module
    return nn.parallel.DistributedDataParallel(module, find_unused_parameters=unused_parameters)
