"""``senseflow plan RECIPE``: the GPU memory a run needs per rank, for each parallel strategy.

Everything is computed from the teacher folder's configs: the networks are built on the meta
device (no weight file is read; ``model_index.json`` and the components' configs are enough), their
bytes counted exactly (:mod:`senseflow.train.plan_counts`) and their activations measured by
running the passes of one iteration on meta tensors (:mod:`senseflow.train.plan_trace`).

Strategies (per rank; ``W`` = GPUs x nodes):

* ``none``: one process on one GPU holding everything;
* ``ddp``: ``W`` processes with whole networks; DDP's gradient buckets double the gradients;
* ``fsdp``: FSDP2 shards teacher, generator and fake score over ``W`` ranks (HSDP: over
  ``W / parallel.replicate_degree``); the units being computed are gathered in
  ``precision.fsdp_param_dtype`` (two at a time with prefetch; each root stays gathered);
* ``fsdp_offload``: ``fsdp`` with the shards, gradients and optimiser states of
  ``parallel.cpu_offload`` (all three networks when the recipe names none) in host memory;
* ``lora``: LoRA mode (``model.lora``): one frozen base in ``precision.teacher_dtype`` and two
  rank-``r`` adapters (generator, fake score) in ``precision.param_dtype`` on
  ``model.lora.target_modules``, replicated on every rank.

The discriminator stays whole on every rank (in DDP with more than one rank), as the trainer keeps
it; its term holds its weights, what it holds by reference (the VFM's DINOv2 backbone, and its
CLIP tower without a text cache), its heads' gradients and optimiser states. The last term is the
largest of the iteration's turns (:class:`~senseflow.train.plan_trace.Activations`) and of what an
optimiser step allocates while it runs (torch's AdamW: one list of the size of its states).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from senseflow.config.schema import DistillConfig
from senseflow.devices import to_dtype
from senseflow.train import plan_counts as pc
from senseflow.train.parallel import shard_policy
from senseflow.train.plan_counts import Analysis, analyse

__all__ = ["Analysis", "Plan", "StrategyPlan", "add_parser", "analyse", "format_plan", "plan", "plan_for"]

STRATEGY_LABELS = {
    "none": "one process",
    "ddp": "DDP",
    "fsdp": "FSDP2",
    "fsdp_offload": "FSDP2 + CPU offload",
    "lora": "LoRA",
}
TERMS = {
    "teacher": "teacher weights",
    "generator": "generator weights",
    "fake_score": "fake score weights",
    "gradients": "gradients",
    "optimiser": "optimiser states",
    "gathered": "gathered FSDP units",
    "text_encoders": "text encoders",
    "vae": "VAE",
    "discriminator": "discriminator",
    "activations": "activations, temporaries",
}
TURNS = {
    "generator_turn": "generator turn",
    "fake_turn": "fake-score turn",
    "discriminator_turn": "discriminator turn",
    "optimiser_step": "optimiser step",
}
ROLES = ("teacher", "generator", "fake_score")
MAX_BATCH = 4096  # the search for the largest batch stops here
NOT_COUNTED = (
    "not counted: the CUDA context, NCCL and cuBLAS workspaces, allocator fragmentation, the prompt "
    "encodings of a live text encoder; keep some headroom"
)


@dataclass
class StrategyPlan:
    name: str
    label: str
    ranks: int
    shard: int  # ranks one network is sharded over (1: whole)
    terms: dict[str, int]  # bytes per rank
    turns: dict[str, float]  # bytes of each turn of the iteration and the optimiser step (term: the largest)
    host: int  # bytes in host memory per rank (offloaded shards, gradients, optimiser states)
    batch: int
    gpu_memory: float
    max_batch: int

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    @property
    def total_gib(self) -> float:
        return self.total / pc.GIB

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.gpu_memory


@dataclass
class Plan:
    recipe: str
    family: str
    resolution: int
    batch: int
    gpus: int
    nodes: int
    gpu_memory: float
    strategies: list[StrategyPlan]
    notes: list[str]

    def strategy(self, name: str) -> StrategyPlan:
        return next(s for s in self.strategies if s.name == name)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for s, d in zip(self.strategies, out["strategies"], strict=True):
            d.update(total=s.total, total_gib=round(s.total_gib, 3), fits=s.fits)
            d["gib"] = {k: round(v / pc.GIB, 3) for k, v in s.terms.items()}
        return out


def check_flags(**flags: float | None) -> None:
    """One error naming the flag for a count below 1 or a memory size that is not a positive number."""
    for name, value in flags.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if name == "gpu_memory" and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{flag}: expected a positive number of GiB, got {value}")
        if name != "gpu_memory" and value < 1:
            raise ValueError(f"{flag}: expected a positive whole number, got {value}")


def _compute_dtype(cfg: DistillConfig) -> torch.dtype:
    return to_dtype(cfg.precision.autocast_dtype, "precision.autocast_dtype")


def _storage(net: nn.Module) -> torch.dtype:
    return next(net.parameters()).dtype


def _policy(cfg: DistillConfig, role: str, storage: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """(gather dtype, reduce dtype) of a role under FSDP2, as the trainer's shard policy sets them."""
    policy = shard_policy(role, storage, cfg.precision, cfg.parallel)
    gather = policy.gather_dtype or storage
    return gather, policy.reduce_dtype or gather


def _gathered(analysis: Analysis) -> int:
    """Per rank under FSDP2: every root's own parameters (FSDP2 keeps a root gathered after its
    forward), two of the largest unit (the one computing and the one prefetched), and in a trained
    network's backward one unit's unsharded gradient and its copy in ``precision.reduce_dtype``."""
    roots = units = backward = 0
    for role, (sizes, root) in analysis.units.items():
        gather, reduce = _policy(analysis.cfg, role, _storage(analysis.nets[role]))
        biggest = max(sizes, default=0)
        roots += root * gather.itemsize
        units = max(units, 2 * biggest * gather.itemsize)
        if role != "teacher":
            cast = reduce.itemsize if reduce != gather else 0
            backward = max(backward, biggest * (gather.itemsize + cast))
    return roots + units + backward


def _copies(analysis: Analysis, seen: torch.dtype, role: str) -> int:
    """Bytes of the bf16 copies autocast makes of a trained pass's weights held in ``seen``."""
    compute = _compute_dtype(analysis.cfg)
    if compute == torch.float32 or seen == compute:
        return 0
    return analysis.copies_numel[role] * compute.itemsize


def recipe_strategy(cfg: DistillConfig) -> str:
    """The strategy the recipe itself asks for (its column is marked with ``*``)."""
    if cfg.model.lora is not None:
        return "lora"
    if cfg.parallel.strategy == "fsdp" and cfg.parallel.cpu_offload:
        return "fsdp_offload"
    return cfg.parallel.strategy


def _largest_batch(fits) -> int:
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= MAX_BATCH and fits(hi):
        lo, hi = hi, 2 * hi
    hi = min(hi, MAX_BATCH + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _strategy(analysis: Analysis, name: str, world: int, batch: int, memory: float) -> StrategyPlan:
    cfg, nets = analysis.cfg, analysis.nets
    o, par = cfg.optim, cfg.parallel
    ranks, shard = (1, 1) if name == "none" else (world, 1)
    if name.startswith("fsdp"):
        replicas = par.replicate_degree
        if world % replicas:
            raise ValueError(
                f"parallel.replicate_degree: {replicas} does not divide the {world} ranks (--gpus x --nodes)"
            )
        shard = world // replicas
    replicated = 2 if ranks > 1 else 1  # DDP's gradient buckets (D always, G and F under ddp and lora)
    terms, host = dict.fromkeys(TERMS, 0), 0
    step = []  # what each optimiser's step allocates while it runs (torch AdamW: one state-sized list)
    if name == "lora":
        adapter = pc.grad_bytes(analysis.lora)
        step += [adapter for n in (o.generator.name, o.fake.name) if n == "adamw"]
        terms.update(teacher=pc.weight_bytes(nets["teacher"]), generator=adapter, fake_score=adapter)
        terms["gradients"] = 2 * adapter * replicated
        terms["optimiser"] = sum(
            pc.optimiser_bytes(analysis.lora, n) for n in (o.generator.name, o.fake.name)
        )
        copies = _copies(analysis, _storage(nets["teacher"]), "teacher")
        activations = analysis.lora_activations
    else:
        offload = set(par.cpu_offload or ROLES) if name == "fsdp_offload" else set()
        optimisers = {"generator": o.generator.name, "fake_score": o.fake.name}
        for role, net in nets.items():
            weights = pc.weight_bytes(net, shard)
            trained = pc.trained(net)
            grads = pc.grad_bytes(trained, shard) * (2 if name == "ddp" else 1)
            states = pc.optimiser_bytes(trained, optimisers[role], shard) if role in optimisers else 0
            if role in offload:
                host += weights + grads + states
                continue
            if optimisers.get(role) == "adamw":
                step.append(pc.grad_bytes(trained, shard))
            terms[role] = weights
            terms["gradients"] += grads
            terms["optimiser"] += states
        seen = _storage(nets["generator"])
        if name.startswith("fsdp"):
            terms["gathered"] = _gathered(analysis)
            seen = _policy(cfg, "generator", seen)[0]
        copies = _copies(analysis, seen, "generator")
        activations = analysis.activations
    terms["text_encoders"], terms["vae"] = analysis.text_bytes, analysis.vae_bytes
    if analysis.disc_weights:
        trained = analysis.disc_trained
        states = pc.optimiser_bytes(trained, o.discriminator.name)
        terms["discriminator"] = analysis.disc_weights + pc.grad_bytes(trained) * replicated + states
        if o.discriminator.name == "adamw":
            step.append(pc.grad_bytes(trained))
    fixed = sum(terms.values())
    turns = {**activations.turns(batch, copies), "optimiser_step": max(step, default=0)}
    terms["activations"] = round(max(turns.values()))
    largest = _largest_batch(
        lambda b: fixed + max(activations.at(b, copies), turns["optimiser_step"]) <= memory * pc.GIB
    )
    label = STRATEGY_LABELS[name]
    if name.startswith("fsdp") and shard != world:
        label = label.replace("FSDP2", f"HSDP {world // shard}x{shard}")
    if name == recipe_strategy(cfg):
        label += " *"
    return StrategyPlan(name, label, ranks, shard, terms, turns, host, batch, memory, largest)


def plan_for(
    analysis: Analysis, gpus: int = 1, nodes: int = 1, gpu_memory: float = 80.0, batch: int | None = None
) -> Plan:
    """The per-rank memory of every strategy on ``gpus`` x ``nodes`` GPUs of ``gpu_memory`` GiB,
    at ``batch`` per GPU (default: the recipe's ``data.batch_size``)."""
    check_flags(gpus=gpus, nodes=nodes, gpu_memory=gpu_memory, batch=batch)
    cfg = analysis.cfg
    b = batch or cfg.data.batch_size
    plans = [_strategy(analysis, name, gpus * nodes, b, gpu_memory) for name in STRATEGY_LABELS]
    notes = [*analysis.notes, "*: the recipe's own strategy", NOT_COUNTED]
    if cfg.model.text_cache == "live":
        notes.append("the text encoders are held (model.text_cache: live); a text cache removes them")
    return Plan(cfg.name, cfg.model.family, cfg.data.resolution, b, gpus, nodes, gpu_memory, plans, notes)


def plan(
    cfg: DistillConfig,
    gpus: int = 1,
    nodes: int = 1,
    gpu_memory: float = 80.0,
    batch: int | None = None,
    lora_rank: int | None = None,
) -> Plan:
    """:func:`analyse` then :func:`plan_for` (the flags are checked before anything is built)."""
    check_flags(gpus=gpus, nodes=nodes, gpu_memory=gpu_memory, batch=batch, lora_rank=lora_rank)
    return plan_for(analyse(cfg, lora_rank), gpus=gpus, nodes=nodes, gpu_memory=gpu_memory, batch=batch)


def format_plan(p: Plan) -> str:
    """One column per strategy, one row per term, in GiB per GPU."""
    world = p.gpus * p.nodes
    head = (
        f"{p.recipe} (family {p.family}): {p.resolution} px, batch {p.batch} per GPU, {world} GPU"
        f"{'s' if world > 1 else ''} ({p.gpus} per node x {p.nodes}), {p.gpu_memory:g} GiB per GPU"
    )
    cols = [s.label if s.name in ("none", "lora") else f"{s.label} x{s.ranks}" for s in p.strategies]
    width = max(len(c) for c in cols) + 2

    def row(label: str, cells: list[str]) -> str:
        return label.ljust(24) + "".join(c.rjust(width) for c in cells)

    rows = [head, "", row("GiB per GPU", cols)]
    rows += [row(label, [f"{s.terms[k] / pc.GIB:.2f}" for s in p.strategies]) for k, label in TERMS.items()]
    for key, label in TURNS.items():  # what the last term is the largest of
        rows.append(row(f"  {label}", [f"{s.turns[key] / pc.GIB:.2f}" for s in p.strategies]))
    rows.append(row("total", [f"{s.total_gib:.2f}" for s in p.strategies]))
    rows.append(row(f"fits in {p.gpu_memory:g} GiB", ["yes" if s.fits else "no" for s in p.strategies]))
    rows.append(row("largest batch per GPU", [str(s.max_batch) for s in p.strategies]))
    if any(s.host for s in p.strategies):
        rows.append(row("host memory per rank", [f"{s.host / pc.GIB:.2f}" for s in p.strategies]))
    return "\n".join([*rows, "", *(f"note: {n}" for n in p.notes)])


def cmd_plan(args: argparse.Namespace) -> None:
    from senseflow.config import load_config

    check_flags(
        gpus=args.gpus,
        nodes=args.nodes,
        gpu_memory=args.gpu_memory,
        batch=args.batch,
        lora_rank=args.lora_rank,
    )
    cfg = load_config(args.recipe, list(args.overrides))
    print("senseflow plan: building on the meta device, measuring one iteration ...", file=sys.stderr)
    result = plan(cfg, args.gpus, args.nodes, args.gpu_memory, args.batch, args.lora_rank)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_plan(result))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan", help="GPU memory per rank of a recipe for each strategy, from the teacher folder's configs"
    )
    p.add_argument("recipe", help="recipe YAML or a shipped recipe's name")
    p.add_argument(
        "overrides",
        nargs="*",
        default=[],
        help="dotted overrides, e.g. model.teacher=PATH model.text_cache=DIR",
    )
    p.add_argument("--gpus", type=int, default=1, help="GPUs per node (default 1)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB each GPU may use (default 80)")
    p.add_argument("--batch", type=int, help="batch per GPU (default: the recipe's data.batch_size)")
    p.add_argument(
        "--lora-rank", type=int, default=64, help="rank of the LoRA strategy's adapters (default 64)"
    )
    p.add_argument("--json", action="store_true", help="the plan as JSON (bytes, and GiB per term)")
    p.set_defaults(func=cmd_plan)
