"""``senseflow generate``: images from a distilled student for a prompt file, with fixed seeds."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from senseflow.data.index import read_prompt_list
from senseflow.metrics.image_io import quantise
from senseflow.student import Student
from senseflow.viz import image_grid, save_image

GRID_COLUMNS = 8


def generate(student: Student, prompts: list[str], seed: int, sampler: str, out_dir: Path) -> Path:
    """Write ``NNNNN.png`` per prompt (seed = seed + index), ``index.jsonl`` and ``grid.png``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = [seed + i for i in range(len(prompts))]
    images = quantise(student.sample(prompts, seeds, mode=sampler), rule="round")
    with (out_dir / "index.jsonl").open("w") as index:
        for i, (img, prompt, s) in enumerate(zip(images, prompts, seeds, strict=True)):
            name = f"{i:05d}.png"
            Image.fromarray(img).save(out_dir / name)
            index.write(json.dumps({"file": name, "prompt": prompt, "seed": s, "sampler": sampler}) + "\n")
    return save_image(image_grid(images, ncols=GRID_COLUMNS), out_dir / "grid.png")


def cmd_generate(args: argparse.Namespace) -> None:
    prompts = list(args.prompt or [])
    if args.prompts:
        prompts += read_prompt_list(Path(args.prompts), "--prompts")
    if not prompts:
        raise ValueError("give --prompt (repeatable) or --prompts FILE")
    student = Student.from_run(args.run, args.checkpoint, device=args.device)
    grid = generate(student, prompts, args.seed, args.sampler, Path(args.out))
    print(f"{len(prompts)} images written to {args.out} (grid: {grid})")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="images from a distilled student with fixed seeds")
    p.add_argument("--run", required=True, help="run folder written by `senseflow train`")
    p.add_argument("--checkpoint", help="a checkpoint folder (default: the run's newest)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", help="file with one prompt per line")
    p.add_argument("--sampler", choices=("renoise", "euler"), default="renoise")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i")
    p.add_argument("--out", default="runs/generated")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_generate)
