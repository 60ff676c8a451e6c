"""``senseflow toy curve``: a distillation run's quality against its training iterations.

Every kept checkpoint of a run is sampled with the 4-step student on the demo's prompt set and seeds
and measured as the demo measures (compositional accuracy, FID-T to the teacher's reference-step
samples, precision and recall, diversity, background), beside the teacher at its reference steps
and at 4 Euler steps. It answers how many iterations a recipe needs (where the student saturates)
and picks the demo's iteration budget (docs/results/toy_demo.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from senseflow import inputs
from senseflow.errors import UsageError


def run_curve(
    run: Path, out: Path, per_split: int, seed: int, diversity: tuple[int, int], sampler: str
) -> Path:
    import numpy as np

    from senseflow.experiments.toy.ablate_plots import plot_quality
    from senseflow.experiments.toy.demo import FEW_STEPS, RUN_SAMPLES, student_generator, teacher_rows
    from senseflow.experiments.toy.points import quality_point
    from senseflow.experiments.toy.report import coverage_table, markdown_table, teacher_generator
    from senseflow.families.toy.pipeline import ToyTeacher
    from senseflow.student import Student
    from senseflow.train import checkpoint as ckpt

    points = ckpt.list_checkpoints(run / "checkpoints")
    if not points:
        raise UsageError(f"--run: no complete checkpoint in {run / 'checkpoints'}")
    cfg = Student.from_run(run, points[-1][1]).cfg
    teacher = ToyTeacher(cfg.model.teacher)
    guidance = teacher.recipe.sampling.guidance
    # teacher images sampled anew (another prompt set than the stored one) are kept with the run
    comp, cache_note = teacher_rows(teacher, per_split, seed, diversity, [run / RUN_SAMPLES])
    few_step = comp.add(
        f"teacher {FEW_STEPS} steps, CFG {guidance}", teacher_generator(teacher, FEW_STEPS, guidance)
    )
    reference = comp.reports[2]  # renders, the FID-T reference set, then the teacher on the common seeds
    students = []
    for n, path in points:
        report = comp.add(
            f"student, iteration {n} ({sampler})", student_generator(Student.from_run(run, path), sampler)
        )
        students.append((n, quality_point(report.record())))
    n_images = len(comp.prompt_set.prompts)
    levels = {
        f"teacher {teacher.recipe.sampling.steps} steps": quality_point(reference.record()),
        f"teacher {FEW_STEPS} steps": quality_point(few_step.record()),
    }
    x = np.array([n for n, _ in students])
    curve = {
        "student": {k: (x, np.array([p[k] for _, p in students], dtype=float), None) for k in students[0][1]}
    }
    png = plot_quality(curve, {"student": f"student ({sampler})"}, out.with_name(out.stem + ".png"), levels)
    command = (
        f"senseflow toy curve --run {run} --out {out} --per-split {per_split} --seed {seed} "
        f"--diversity-prompts {diversity[0]} --diversity-seeds {diversity[1]} --sampler {sampler}"
    )
    out.with_suffix(".json").write_text(
        json.dumps({"run": str(run), "sampler": sampler, "reports": comp.payload()}, indent=2)
    )
    out.write_text(
        f"""# Quality against training iterations: `{run}`

Every kept checkpoint of the run, sampled with the 4-step `{sampler}` sampler on {n_images} prompts
({per_split} per split: train, test, heldout; the demo's prompts and seeds) and measured as
`senseflow demo` measures. {cache_note}

{markdown_table(comp.reports, n_images)}

{coverage_table(comp.reports)}

![curve]({png.name})

Reproduce: `{command}`
"""
    )
    print(out.read_text())
    return out


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("curve", help="a run's quality at each kept checkpoint (the demo's measures)")
    p.add_argument("--run", required=True, help="training run folder (its checkpoints/ are measured)")
    p.add_argument("--out", required=True, help="markdown report (a .json and a .png are written beside it)")
    p.add_argument("--per-split", type=int, default=64, help="prompts per split (the demo's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt set (the demo's default)")
    p.add_argument("--diversity-prompts", type=int, default=16)
    p.add_argument("--diversity-seeds", type=int, default=4)
    p.add_argument("--sampler", choices=["renoise", "euler"], default="renoise")

    def run(a: argparse.Namespace) -> None:
        inputs.at_least(a.per_split, 1, "--per-split")
        inputs.at_least(a.diversity_prompts, 1, "--diversity-prompts")
        inputs.at_least(a.diversity_seeds, 2, "--diversity-seeds")
        inputs.seed(a.seed, "--seed")
        inputs.existing_folder(a.run, "--run")
        inputs.output_file(a.out, "--out")
        run_curve(
            Path(a.run), Path(a.out), a.per_split, a.seed, (a.diversity_prompts, a.diversity_seeds), a.sampler
        )

    p.set_defaults(func=run)
