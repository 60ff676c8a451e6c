"""``senseflow demo``: the main job on the embedded shapes world, end to end on a CPU.

It distils the shipped toy teacher into a 4-step student with the toy recipe (resuming a finished
or interrupted run in the same folder), then measures on one prompt set, with the same seeds: the
teacher at its reference step count (the FID-T reference, plus a second seed set as FID-T's floor;
their images read from the samples stored beside the shipped teacher after re-sampling a few of
them, see :mod:`.sample_cache`), the teacher at 4 Euler steps (the baseline to beat) and the
student with both samplers, and a paired accuracy test on further prompts. It writes ``report.md``,
``grid.png``, ``results.json`` and any newly sampled teacher images (``teacher_samples.npz``) into
the output folder.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from senseflow import inputs
from senseflow.config import load_config
from senseflow.experiments.toy.report import (
    SPLITS,
    coverage_table,
    markdown_table,
    teacher_generator,
    teacher_sha256,
)
from senseflow.experiments.toy.sample_cache import SampleCache
from senseflow.families.toy.pipeline import ToyTeacher
from senseflow.metrics.coverage import DEFAULT_K
from senseflow.metrics.paired import PairedTest, mcnemar_exact
from senseflow.metrics.shapes.evaluator import score_image, to_uint8
from senseflow.metrics.shapes.quality import REFERENCE_SET_LABEL, Comparison, Generator, PromptSet
from senseflow.student import Student
from senseflow.train.trainer import Distiller
from senseflow.viz import labelled_rows, save_image

FEW_STEPS = 4
GRID_COLUMNS = 10
DEFAULT_RECIPE = "toy/distill"  # the shipped recipe, found from any working directory
PAIRED_SEED_BASE = 2_000_000  # seeds of the paired accuracy set: disjoint from the table's
BATCH = 64
DIVERSITY = (16, 4)  # intra-prompt diversity: prompts x seeds per prompt, for every row
#: The teacher's reference-step samples of the demo's prompts, shipped beside the teacher (see
#: senseflow.experiments.toy.sample_cache); a run also keeps its own copy in the output folder.
PACKAGED_SAMPLES = Path("reference") / "demo_samples.npz"
RUN_SAMPLES = "teacher_samples.npz"


def student_generator(student: Student, mode: str):
    return lambda prompts, seeds: to_uint8(student.sample(prompts, seeds, mode=mode))


def _verdicts(generate: Generator, prompt_set: PromptSet) -> np.ndarray:
    """Per image: is it compositionally right (colour, shape, size and relation)?"""
    out = []
    for i in range(0, len(prompt_set.prompts), BATCH):
        prompts = prompt_set.prompts[i : i + BATCH]
        images = generate(prompts, prompt_set.seeds[i : i + BATCH])
        out += [score_image(img, p).all for img, p in zip(images, prompts, strict=True)]
    return np.asarray(out)


def paired_accuracy(student: Generator, baseline: Generator, per_split: int, seed: int) -> PairedTest:
    """Student vs the few-step teacher on a larger prompt set than the table's (both are cheap), with
    the same prompt and seed for both, so the test is paired (exact McNemar)."""
    prompt_set = PromptSet.sample(SPLITS, per_split, seed=seed + 1, seed_base=PAIRED_SEED_BASE)
    return mcnemar_exact(_verdicts(student, prompt_set), _verdicts(baseline, prompt_set))


def teacher_rows(
    teacher: ToyTeacher, per_split: int, seed: int, diversity: tuple[int, int], caches: list[Path]
) -> tuple[Comparison, str]:
    """A comparison holding the renders row and the teacher's reference-step rows, and a sentence for
    the report on where the teacher's images came from. Stored samples are looked for in ``caches``
    (in order), then beside the teacher; images sampled anew are saved to ``caches[0]``."""
    ref_steps, guidance = teacher.recipe.sampling.steps, teacher.recipe.sampling.guidance
    comp = Comparison(SPLITS, per_split, seed=seed, diversity=diversity)
    ref_name = f"teacher {ref_steps} steps, CFG {guidance}"
    key = {"teacher_sha256": teacher_sha256(teacher.folder), "steps": ref_steps, "guidance": guidance}
    sample = teacher_generator(teacher, ref_steps, guidance)
    cache = SampleCache.open([*caches, teacher.folder / PACKAGED_SAMPLES], key, sample)
    cached = cache.wrap(sample)
    comp.add_reference_rows(lambda offset: lambda p, s: cached(p, [x + offset for x in s]), ref_name)
    if cache.misses:
        cache.save(caches[0])
    if cache.source is None:
        return comp, f"The teacher's {ref_steps}-step images were sampled in this run."
    stored = len(cache.images) - cache.misses
    packaged = cache.source == teacher.folder / PACKAGED_SAMPLES
    where = f"`{PACKAGED_SAMPLES}` in the teacher's folder" if packaged else f"`{cache.source}`"
    for report in comp.reports:
        if report.name.startswith(ref_name):  # the look-up's time says nothing: quote the check's
            report.seconds = cache.check_seconds_per_image * len(comp.prompt_set.prompts)
    return comp, (
        f"The teacher's {ref_steps}-step images come from stored samples of this teacher "
        f"({where}, {stored} images; {cache.misses} sampled now); {cache.checked} of them were "
        "sampled again and compared before use, and its rows' s / image is the time of that "
        f"re-sampling (one batch of {cache.checked})."
    )


def run_demo(
    out_dir: Path,
    recipe: str,
    per_split: int,
    seed: int,
    overrides: list[str],
    paired_per_split: int = 300,
    diversity: tuple[int, int] = DIVERSITY,
) -> Path:
    inputs.at_least(per_split, 1, "--per-split")
    inputs.at_least(diversity[0], 1, "--diversity-prompts")
    inputs.at_least(diversity[1], 2, "--diversity-seeds")
    inputs.at_least(paired_per_split, 1, "--paired-per-split")
    inputs.seed(seed, "--seed")
    inputs.output_folder(out_dir, "--out")
    # auto: continue the run a rerun finds in the folder, else start one
    cfg = load_config(recipe, [f"output_dir={out_dir / 'train'}", "checkpoint.resume=auto", *overrides])
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    Distiller(cfg).run()
    train_minutes = (time.perf_counter() - start) / 60
    student = Student.from_run(cfg.output_dir)
    teacher = ToyTeacher(cfg.model.teacher)
    ref_steps, guidance = teacher.recipe.sampling.steps, teacher.recipe.sampling.guidance

    comp, cache_note = teacher_rows(teacher, per_split, seed, diversity, [out_dir / RUN_SAMPLES])
    few_step_teacher = teacher_generator(teacher, FEW_STEPS, guidance)
    baseline = comp.add(f"teacher {FEW_STEPS} steps, CFG {guidance}", few_step_teacher)
    renoise = comp.add("student 4 steps (renoise)", student_generator(student, "renoise"))
    comp.add("student 4 steps (euler)", student_generator(student, "euler"))

    n = len(comp.prompt_set.prompts)
    cols = np.linspace(per_split, n - 1, GRID_COLUMNS).astype(int)
    names = [k for k in comp.images if REFERENCE_SET_LABEL not in k]
    grid = save_image(labelled_rows([comp.images[k][cols] for k in names], names), out_dir / "grid.png")
    paired = paired_accuracy(student_generator(student, "renoise"), few_step_teacher, paired_per_split, seed)
    payload = {
        "train_minutes": train_minutes,
        "recipe": recipe,
        "reports": comp.payload(),
        "paired_accuracy": {
            "student": "student 4 steps (renoise)",
            "baseline": baseline.name,
            **vars(paired),
        },
    }
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2))
    margin_fid = baseline.fid["teacher"] - renoise.fid["teacher"]
    margin_acc = renoise.accuracy["all"]["overall"]["all"] - baseline.accuracy["all"]["overall"]["all"]
    listing = "\n".join(f"{i + 1}. {comp.prompt_set.prompts[j]}" for i, j in enumerate(cols))
    student_entry = f"{{name: student, kind: student, path: {out_dir / 'train'}}}"
    eval_command = f"senseflow eval run configs/eval/toy.yaml 'students=[{student_entry}]'"
    paired_text = paired.summary("student", f"{FEW_STEPS}-step teacher")
    report = out_dir / "report.md"
    report.write_text(
        f"""# senseflow demo: shapes world

Distillation: `{recipe}`, {cfg.schedule.iterations} iterations, {train_minutes:.1f} min (this run; 0 when it
resumed a finished run). {n} prompts ({per_split} per split: {", ".join(SPLITS)}), one image per prompt,
the same seeds for every row. FID-T is the FID to the teacher's {ref_steps}-step samples on an independent
seed set ("{REFERENCE_SET_LABEL}"); the teacher's own {ref_steps}-step row gives FID-T's floor at this N.

{markdown_table(comp.reports, n)}

{coverage_table(comp.reports)}

{cache_note} Precision and recall (k = {DEFAULT_K}) are against the FID-T reference set; diversity is the mean
pairwise distance among {diversity[1]} seeds of each of {diversity[0]} prompts (toy features; layout:
the evaluator's object positions and sizes); green cast and texture describe the background
(`senseflow.metrics.shapes.background`).

Student (renoise) vs teacher at {FEW_STEPS} Euler steps: FID-T lower by {margin_fid:.2f}, compositional
accuracy higher by {100 * margin_acc:.1f} points.

Compositional accuracy, paired, on {paired.n} further prompts ({paired_per_split} per split, seeds from
{PAIRED_SEED_BASE}; the same prompt and seed for both): {paired_text}.

![grid]({grid.name})

Columns (test and held-out prompts):

{listing}

The same models in the evaluation table layout (JSON record per model, as for a COCO-5K run):

```
{eval_command}
```
"""
    )
    print(report.read_text())
    return report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="distil the built-in toy teacher and report (CPU, no downloads)")
    p.add_argument("--out", default="runs/demo", help="output folder (training run, report.md, grid.png)")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help="distillation recipe")
    p.add_argument("--per-split", type=int, default=64, help="evaluation prompts per split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--paired-per-split",
        type=int,
        default=300,
        help="prompts per split of the paired accuracy test (student vs the 4-step teacher)",
    )
    p.add_argument(
        "--diversity-prompts", type=int, default=DIVERSITY[0], help="prompts of the diversity measure"
    )
    p.add_argument(
        "--diversity-seeds", type=int, default=DIVERSITY[1], help="seeds per prompt of the diversity measure"
    )
    p.add_argument(
        "overrides", nargs="*", default=[], help="dotted recipe overrides, e.g. schedule.iterations=200"
    )
    p.set_defaults(
        func=lambda a: run_demo(
            Path(a.out),
            a.recipe,
            a.per_split,
            a.seed,
            a.overrides,
            a.paired_per_split,
            (a.diversity_prompts, a.diversity_seeds),
        )
    )
