"""``senseflow train RECIPE [overrides]``: one process, or one per rank under torchrun."""

from __future__ import annotations

import argparse
import logging
import os
from datetime import timedelta
from pathlib import Path

from senseflow.config import load_config
from senseflow.errors import SenseflowError


def init_distributed(device_spec: str = "auto", timeout_minutes: float = 30.0) -> None:
    """Join the process group torchrun describes, with the backend of this rank's device (nccl for a
    GPU, gloo for the CPU); no-op for one process. A collective that waits longer than the timeout
    (a rank died or hangs) raises on the ranks still alive, and torchrun then ends the job."""
    import torch
    import torch.distributed as dist

    from senseflow.devices import resolve_device

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        device = resolve_device(device_spec)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
        if device.type == "cuda":
            torch.cuda.set_device(device)


def cmd_train(args: argparse.Namespace) -> None:
    # The recipe and the run folder are checked before torch loads, so a mistake is answered at once.
    overrides, resume = list(args.overrides), args.resume
    if resume is not None and "=" in resume and not Path(resume).exists():  # `--resume key=value`
        overrides, resume = [*overrides, resume], "latest"
    cfg = load_config(args.recipe, overrides)
    from senseflow.train.run_folder import prepare_run_folder

    # senseflow's own messages (start-up memory, dropped keys) on stderr; --quiet keeps warnings only
    logging.basicConfig(format="%(message)s")
    logging.getLogger("senseflow").setLevel(logging.WARNING if args.quiet else logging.INFO)
    is_main = int(os.environ.get("RANK", "0")) == 0
    resume = resume if resume is not None else cfg.checkpoint.resume
    resume = prepare_run_folder(Path(cfg.output_dir), resume, args.overwrite, is_main)
    if resume != cfg.checkpoint.resume:
        cfg = load_config(args.recipe, [*overrides, f"checkpoint.resume={resume or 'null'}"])

    import torch.distributed as dist

    from senseflow.train.trainer import Distiller

    init_distributed(cfg.parallel.device, cfg.parallel.timeout_minutes)
    try:
        logs = Distiller(cfg, progress=not args.quiet).run()
        if dist.is_initialized():  # every rank done before any tears its connections down
            dist.barrier()
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"done: {cfg.schedule.iterations} iterations in {cfg.output_dir}; last log {logs}")
    except (dist.DistError, RuntimeError) as exc:
        if not (dist.is_initialized() and _peer_failure(exc)):
            raise
        raise SenseflowError(
            f"rank {dist.get_rank()} stopped: a collective waited longer than parallel.timeout_minutes "
            f"({cfg.parallel.timeout_minutes}) or lost its connection; another rank died or hangs "
            f"(its own error is above). Resume with --resume once it is fixed. ({exc})"
        ) from exc
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _peer_failure(exc: BaseException) -> bool:
    """Whether an error is a collective's timeout or a lost connection to another rank."""
    import torch.distributed as dist

    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or any(
        s in text for s in ("timed out", "timeout", "connection closed", "connection reset")
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="distil a teacher with a recipe (torchrun for several ranks)")
    p.add_argument(
        "recipe", help="recipe YAML, or a shipped recipe's name (toy/distill; `senseflow recipes` lists them)"
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.generator.lr=1e-6")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="auto|CHECKPOINT",
        help="continue the run in output_dir from its newest good checkpoint (an error if there is none); "
        "--resume auto: continue if there is one, else start fresh (requeued jobs); or a checkpoint folder",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start again in an output_dir that holds a run; the old folder is moved aside, not deleted",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("recipes", help="the shipped recipes, usable by name from any directory")
    p.set_defaults(func=cmd_recipes)


def cmd_recipes(args: argparse.Namespace) -> None:
    """Each shipped recipe with its family and whether this version can train it."""
    from senseflow.config.loader import read_recipe
    from senseflow.config.recipes import recipes_root, resolve_recipe, shipped_recipes
    from senseflow.config.registry import available

    buildable = set(available("family"))
    for name in shipped_recipes():
        data = read_recipe(resolve_recipe(name))
        family = (data.get("model") or {}).get("family") if isinstance(data.get("model"), dict) else None
        if family is not None:
            state = "trains" if family in buildable else "recipe only: its adapter is not in this version"
            print(f"{name:24s} senseflow train {name}  (family {family}: {state})")
        elif "prompts" in data:
            print(f"{name:24s} senseflow eval run {name}")
        else:
            print(f"{name:24s} senseflow toy train-teacher --config {name}")
    print(f"(files in {recipes_root()})")
