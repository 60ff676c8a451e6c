"""``senseflow toy ...``: train, sample and measure the shapes world's teacher."""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from senseflow import inputs
from senseflow.config.loader import load_config
from senseflow.data.index import read_prompt_list
from senseflow.errors import UsageError
from senseflow.experiments.toy.ablate import add_parser as add_ablate_parser
from senseflow.experiments.toy.curve import add_parser as add_curve_parser
from senseflow.families.toy.world import SPLITS
from senseflow.viz import image_grid, save_image


def _default_teacher_recipe() -> Path:
    return Path(str(resources.files("senseflow") / "assets" / "toy_teacher" / "recipe.yaml"))


def read_prompts(args: argparse.Namespace) -> list[str]:
    """Prompts from --prompt (repeatable), --prompts FILE (one per line), else --n from --split."""
    prompts = inputs.check_prompts(list(args.prompt or []), "--prompt", "on the command line")
    if args.prompts:
        prompts += read_prompt_list(Path(args.prompts), "--prompts")
    if not prompts:
        from senseflow.metrics.shapes.quality import PromptSet

        prompts = PromptSet.sample([args.split], args.n, seed=args.seed).prompts
    return prompts


def _check_sampling(args: argparse.Namespace) -> None:
    """Steps and guidance (one value each, or lists) before the teacher loads."""
    for steps in args.steps if isinstance(args.steps, list) else [args.steps]:
        inputs.at_least(steps, 1, "--steps")
    for guidance in args.guidance if isinstance(args.guidance, list) else [args.guidance]:
        inputs.finite(guidance, "--guidance", minimum=0)


def _teacher(folder: str | None) -> Path:
    """The teacher folder (the shipped one for None), its layout checked."""
    from senseflow.families.toy.folder import resolve_teacher_folder

    if folder is not None:
        inputs.existing_folder(folder, "--teacher")
    try:
        return resolve_teacher_folder(folder, "--teacher")
    except FileNotFoundError as exc:
        raise UsageError(f"not a toy teacher folder ({exc})") from None


def cmd_train_teacher(args: argparse.Namespace) -> None:
    from senseflow.experiments.toy.teacher import train_teacher
    from senseflow.families.toy.recipe import ToyTeacherConfig

    recipe = args.config or _default_teacher_recipe()
    cfg = load_config(recipe, args.overrides, schema=ToyTeacherConfig)
    out = inputs.output_folder(args.out, "--out")
    out = train_teacher(cfg, out, progress=True)
    print(f"teacher written to {out}")


def cmd_sample(args: argparse.Namespace) -> None:
    from senseflow.families.toy.pipeline import ToyTeacher
    from senseflow.metrics.shapes.evaluator import score_image, to_uint8

    inputs.at_least(args.n, 1, "--n")
    inputs.at_least(args.cols, 1, "--cols")
    _check_sampling(args)
    inputs.seed(args.seed, "--seed")  # it also draws the prompts from --split
    prompts = read_prompts(args)
    inputs.seed(args.seed, "--seed", len(prompts))
    out = inputs.output_file(args.out, "--out")
    teacher = ToyTeacher(None if args.teacher is None else _teacher(args.teacher))
    seeds = [args.seed + i for i in range(len(prompts))]
    images = to_uint8(teacher.sample(prompts, seeds, steps=args.steps, guidance=args.guidance, progress=True))
    path = save_image(image_grid(images, ncols=args.cols), out)
    correct = [score_image(img, p).all for img, p in zip(images, prompts, strict=True)]
    for i, (p, ok) in enumerate(zip(prompts, correct, strict=True)):
        print(f"{i:3d} {'ok ' if ok else 'bad'} {p}")
    print(f"{sum(correct)}/{len(prompts)} images fully correct; grid (row-major) written to {path}")


def cmd_report_teacher(args: argparse.Namespace) -> None:
    from senseflow.experiments.toy.report import write_teacher_report

    inputs.at_least(args.per_split, 1, "--per-split")
    _check_sampling(args)
    inputs.seed(args.seed, "--seed")
    out = inputs.output_file(args.out, "--out")
    path = write_teacher_report(
        teacher_folder=None if args.teacher is None else _teacher(args.teacher),
        per_split=args.per_split,
        steps=args.steps,
        guidance=args.guidance,
        out_markdown=out,
        seed=args.seed,
    )
    print(f"report written to {path}")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    toy = subparsers.add_parser("toy", help="the built-in shapes world (CPU, no downloads)")
    sub = toy.add_subparsers(
        dest="toy_command", metavar="{train-teacher,sample,report-teacher,ablate,curve}", required=True
    )

    p = sub.add_parser("train-teacher", help="train the toy SD3 teacher from a recipe")
    p.add_argument("--config", help="teacher recipe YAML (default: the shipped teacher's recipe)")
    p.add_argument("--out", default="runs/toy_teacher", help="output folder (pipeline layout)")
    p.add_argument("overrides", nargs="*", default=[], help="dotted overrides, e.g. train.steps=100")
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser("sample", help="a PNG grid of teacher samples")
    p.add_argument("--teacher", help="teacher folder (default: the shipped one)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", help="file with one prompt per line")
    p.add_argument(
        "--split", default="test", choices=SPLITS, help="split to draw prompts from when none are given"
    )
    p.add_argument("--n", type=int, default=16, help="number of prompts drawn from --split")
    p.add_argument("--steps", type=int, help="Euler steps (default: the teacher recipe's)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: the teacher recipe's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i")
    p.add_argument("--cols", type=int, default=8)
    p.add_argument("--out", default="runs/toy_samples.png")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("report-teacher", help="measure the teacher and write docs/results/toy_teacher.md")
    p.add_argument("--teacher", help="teacher folder (default: the shipped one)")
    p.add_argument("--per-split", type=int, default=300, help="prompts per split (train, test, heldout)")
    p.add_argument("--steps", type=int, nargs="+", help="step counts (default: the recipe's, and 4)")
    p.add_argument("--guidance", type=float, nargs="+", help="CFG scales (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/toy_teacher.md")
    p.set_defaults(func=cmd_report_teacher)

    add_ablate_parser(sub)
    add_curve_parser(sub)
