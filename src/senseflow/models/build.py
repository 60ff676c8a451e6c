"""Build on meta, shard, then load (torchtitan's order).

:func:`build_empty` makes a role's network from its class and config with parameters on the meta
device (no memory) and buffers real (a few small tables such as position embeddings, which a
config-only build computes and a weight file may not hold). The caller may then shard it (FSDP2's
``fully_shard`` works on meta parameters); :func:`build_roles` then allocates each rank's storage on
its device and streams the teacher's safetensors files into it one tensor at a time
(:class:`TeacherWeights`): a whole network reads whole tensors, a sharded one reads only the rows of
its own shards, so no rank ever holds a whole copy. Each tensor is read once and copied into every
role that starts from it (teacher, generator, fake score). ``load="rank0"`` is the fall-back: rank 0
reads everything and torch scatters it to the shards.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from senseflow.models.adapter import NETWORK_ROLES, FamilyAdapter, Role

WEIGHTS_INDEX_SUFFIX = ".safetensors.index.json"
log = logging.getLogger(__name__)


def safetensors_files(
    folder: Path, stem: str = "diffusion_pytorch_model", variant: str | None = None
) -> list[Path]:
    """A diffusers component's weight files: one file, or the shards its index names."""
    name = stem if variant is None else f"{stem}.{variant}"
    single = folder / f"{name}.safetensors"
    if single.is_file():
        return [single]
    index = folder / f"{name}{WEIGHTS_INDEX_SUFFIX}"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {', '.join(missing)}")
        return [folder / s for s in shards]
    raise FileNotFoundError(
        f"{folder}: no {name}.safetensors nor {name}{WEIGHTS_INDEX_SUFFIX} (safetensors weights expected)"
    )


def read_weights(files: Iterable[Path]) -> dict[str, Tensor]:
    state: dict[str, Tensor] = {}
    for path in files:
        state.update(load_file(str(path)))
    return state


@dataclass
class LoadStats:
    """What one process read: every read's (name, shape), the bytes, and the peak host memory."""

    reads: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    bytes_read: int = 0
    peak_host_bytes: int = 0


class TeacherWeights:
    """The teacher's safetensors files as an index of tensor names: whole tensors or row ranges are
    read on demand (safetensors reads only the bytes asked for)."""

    def __init__(self, files: Iterable[Path]):
        self.files = [Path(f) for f in files]
        self.where: dict[str, Path] = {}
        for path in self.files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    self.where[name] = path
        self.stats = LoadStats()

    def names(self) -> dict[str, str]:
        """Every tensor name mapped to itself: the references ``initial_weights`` selects from."""
        return {name: name for name in self.where}

    def read(self, name: str, offset: tuple[int, ...] = (), shape: tuple[int, ...] | None = None) -> Tensor:
        """Tensor ``name``, or its block of ``shape`` starting at ``offset``."""
        with safe_open(str(self.where[name]), framework="pt") as f:
            if shape is None:
                tensor = f.get_tensor(name)
            else:
                part = f.get_slice(name)
                index = tuple(slice(o, o + n) for o, n in zip(offset, shape, strict=True))
                tensor = part[index] if index else f.get_tensor(name)
        self.stats.reads.append((name, tuple(tensor.shape)))
        self.stats.bytes_read += tensor.numel() * tensor.element_size()
        return tensor


def peak_host_bytes() -> int:
    """This process's peak resident memory so far (Linux reports it in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _local_block(target: Tensor) -> tuple[Tensor, tuple[int, ...], tuple[int, ...] | None]:
    """The storage this rank fills for one state-dict entry, the block's offset in the whole tensor,
    and its shape (None: the whole tensor)."""
    if isinstance(target, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(
            target.shape, target.device_mesh, target.placements
        )
        return target.to_local(), tuple(offset), tuple(shape)
    return target, (), None


def stream_weights(
    nets: Mapping[str, nn.Module], sources: Mapping[str, Mapping[str, str]], weights: TeacherWeights
) -> None:
    """Fill every network's (local) tensors from the files: ``sources[role]`` maps the role's
    state-dict names to the teacher's tensor names. Each block is read once for all roles."""
    wanted: dict[tuple[str, tuple[int, ...], tuple[int, ...] | None], list[Tensor]] = {}
    for role, net in nets.items():
        for key, target in net.state_dict().items():
            local, offset, shape = _local_block(target)
            wanted.setdefault((sources[role][key], offset, shape), []).append(local)
    with torch.no_grad():
        for (name, offset, shape), targets in wanted.items():
            if shape is not None and 0 in shape:
                continue  # a rank whose shard of a short tensor is empty
            block = weights.read(name, offset, shape)
            for local in targets:
                local.copy_(block)
    weights.stats.peak_host_bytes = peak_host_bytes()


def _cast_storage(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Storage dtype as ``from_pretrained(torch_dtype=...)`` sets it: what the state dict holds
    (floating parameters and persistent buffers) in ``dtype``, except in the modules the class keeps
    in float32; non-persistent buffers (tables a config computes) stay as built."""
    if dtype == torch.float32:
        return net
    keep = getattr(net, "_keep_in_fp32_modules", None) or []
    for name, module in net.named_modules():
        target = torch.float32 if any(part in keep for part in name.split(".")) else dtype
        for key, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype != target:
                setattr(module, key, nn.Parameter(p.to(target), requires_grad=p.requires_grad))
        for key, b in list(module._buffers.items()):
            if b is not None and b.is_floating_point() and key not in module._non_persistent_buffers_set:
                module._buffers[key] = b.to(target)
    return net


def build_empty(adapter: FamilyAdapter, role: Role, dtype: torch.dtype) -> nn.Module:
    """A role's network with meta parameters and real buffers, in its storage dtype."""
    cls, config = adapter.network_spec(role)
    with init_empty_weights(include_buffers=False):
        net = cls.from_config(config)
    net = _cast_storage(net, dtype)
    trainable = role in ("generator", "fake_score")
    return net.train(trainable).requires_grad_(trainable)


def _check_keys(net: nn.Module, state: Mapping[str, object], what: str, broadcast: bool) -> None:
    """One clear error, on every rank, when the weights do not fit the network built from the config
    (under ``broadcast`` only rank 0 holds them: it decides and tells the others)."""
    problem = None
    if not broadcast or torch.distributed.get_rank() == 0:
        expected = set(net.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            problem = (
                f"{what}: the teacher's weights do not fit the network its config builds "
                f"({len(missing)} missing, e.g. {missing[:3]}; "
                f"{len(unexpected)} unexpected, e.g. {unexpected[:3]})"
            )
    if broadcast:
        verdict = [problem]
        torch.distributed.broadcast_object_list(verdict, src=0)
        problem = verdict[0]
    if problem:
        raise ValueError(problem)


def materialise(
    net: nn.Module,
    device: torch.device,
    state: dict[str, Tensor] | None,
    broadcast: bool = False,
    what: str = "network",
) -> nn.Module:
    """Allocate ``net``'s storage on ``device`` and load ``state`` (``None``: leave it uninitialised,
    for weights loaded later, e.g. by :func:`stream_weights`).

    ``broadcast``: ``net`` is sharded (FSDP2) and ``state`` is rank 0's whole copy (other ranks pass
    an empty dict); torch's ``set_model_state_dict`` scatters it to every rank's shards.
    """
    if state is not None:
        _check_keys(net, state, what, broadcast)
    buffers = {name: b.detach().clone() for name, b in net.named_buffers()}
    net.to_empty(device=device)
    with torch.no_grad():
        for name, b in net.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])
    if state is None:
        return net
    if broadcast:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
        set_model_state_dict(net, dict(state), options=options)  # it replaces entries of the dict it gets
    else:
        net.load_state_dict(state, strict=True)
    return net


def build_roles(
    adapter: FamilyAdapter,
    roles: Iterable[Role],
    teacher_dtype: torch.dtype,
    train_dtype: torch.dtype,
    device: torch.device | str,
    prepare: Callable[[nn.Module, Role], nn.Module] | None = None,
    broadcast: bool = False,
) -> dict[str, nn.Module]:
    """Build on meta, ``prepare`` (the parallel plan: checkpointing, sharding), then load.

    By default every process streams from the teacher's files what its own (whole or sharded)
    networks hold; with ``broadcast`` rank 0 alone reads the files and scatters them to the shards.
    """
    nets = {}
    for role in roles:
        net = build_empty(adapter, role, teacher_dtype if role == "teacher" else train_dtype)
        nets[role] = net if prepare is None else prepare(net, role)
    files = adapter.weight_files()
    where = files[0].parent if files else type(adapter).__name__
    device = torch.device(device)
    if broadcast:
        teacher = read_weights(files) if torch.distributed.get_rank() == 0 else {}
        for role, net in nets.items():
            weights = adapter.initial_weights(role, teacher)
            materialise(net, device, weights, broadcast=True, what=f"{role} ({where})")
        return nets
    weights = TeacherWeights(files)
    sources = {role: adapter.initial_weights(role, weights.names()) for role in nets}
    for role, net in nets.items():
        _check_keys(net, sources[role], f"{role} ({where})", broadcast=False)
        materialise(net, device, None)
    stream_weights(nets, sources, weights)
    log.info(
        "rank %d loaded %s from %s: %.1f MiB read, peak host memory %.1f MiB",
        torch.distributed.get_rank() if torch.distributed.is_initialized() else 0,
        "/".join(nets),
        where,
        weights.stats.bytes_read / 2**20,
        weights.stats.peak_host_bytes / 2**20,
    )
    return nets


@dataclass
class Networks:
    """The teacher (frozen), and the generator and fake score initialised from its weights."""

    teacher: nn.Module
    generator: nn.Module
    fake_score: nn.Module


def build_networks(
    adapter: FamilyAdapter,
    teacher_dtype: torch.dtype = torch.float32,
    train_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Networks:
    """Teacher, generator and fake score for one process (tests, tools); the trainer builds its own
    so that it can shard between building and loading."""
    return Networks(**build_roles(adapter, NETWORK_ROLES, teacher_dtype, train_dtype, device))


def build_generator(
    adapter: FamilyAdapter, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> nn.Module:
    """The generator alone, uninitialised, to load a student's weights into (reads no teacher file)."""
    return materialise(build_empty(adapter, "generator", dtype), torch.device(device), None)
