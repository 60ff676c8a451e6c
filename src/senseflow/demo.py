"""``senseflow demo``: the main job on the embedded shapes world, end to end on a CPU.

It loads the shipped toy teacher, samples the same prompts and seeds at the teacher's reference
step count and at 4 Euler steps (the baseline a 4-step student must beat), scores both with the
toy evaluator and FID, and writes a markdown report with a labelled PNG grid.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from senseflow.toy.evaluator import to_uint8
from senseflow.toy.features import extract_features
from senseflow.toy.pipeline import ToyTeacher
from senseflow.toy.quality import PromptSet, measure, render_reference
from senseflow.toy.report import markdown_table
from senseflow.viz import labelled_rows, save_image

DEMO_SPLITS = ("train", "test", "heldout")
FEW_STEPS = 4
GRID_COLUMNS = 10


def run_demo(out_dir: Path, per_split: int, seed: int, teacher_folder: str | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher = ToyTeacher(teacher_folder)
    ref_steps, guidance = teacher.recipe.sampling.steps, teacher.recipe.sampling.guidance
    prompts = PromptSet.sample(DEMO_SPLITS, per_split, seed=seed)
    references = {"renders": extract_features(render_reference(prompts.prompts, seed=seed + 1))}

    def teacher_at(steps: int):
        return lambda p, s: to_uint8(teacher.sample(p, s, steps=steps, guidance=guidance, progress=True))

    reference, ref_images = measure(f"teacher {ref_steps} steps", teacher_at(ref_steps), prompts, references)
    references["teacher"] = extract_features(ref_images)
    few, few_images = measure(f"teacher {FEW_STEPS} steps", teacher_at(FEW_STEPS), prompts, references)
    renders = render_reference(prompts.prompts, seed=seed + 1)

    cols = np.linspace(0, len(prompts.prompts) - 1, GRID_COLUMNS).astype(int)
    grid = save_image(
        labelled_rows(
            [renders[cols], ref_images[cols], few_images[cols]],
            ["rendered", reference.name, few.name],
        ),
        out_dir / "grid.png",
    )
    report = out_dir / "report.md"
    listing = "\n".join(f"{i + 1}. {prompts.prompts[j]}" for i, j in enumerate(cols))
    report.write_text(
        f"# senseflow demo (shapes world)\n\nCFG {guidance}; {len(prompts.prompts)} prompts "
        f"({per_split} per split: {', '.join(DEMO_SPLITS)}). FID-T is against the teacher's "
        f"{ref_steps}-step samples.\n\n{markdown_table([reference, few], len(prompts.prompts))}\n\n"
        f"![grid]({grid.name})\n\n{listing}\n"
    )
    print(report.read_text())
    return report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the main job on the built-in shapes world")
    p.add_argument("--out", default="runs/demo", help="output folder for report.md and grid.png")
    p.add_argument("--per-split", type=int, default=32, help="prompts per split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher", help="teacher folder (default: the shipped one)")
    p.set_defaults(func=lambda a: run_demo(Path(a.out), a.per_split, a.seed, a.teacher))
