"""``senseflow toy report-teacher``: the toy teacher's quality, measured and written as markdown.

Rows: a second set of renders (the floor of the FID against renders), the teacher at its reference
setting on an independent seed set (the FID-T reference) and on the common seeds (FID-T's floor),
and every other (steps, guidance) setting asked for, such as 4 Euler steps, the baseline a 4-step
student must beat.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import torch

from senseflow.families.toy.folder import resolve_teacher_folder
from senseflow.families.toy.pipeline import ToyTeacher
from senseflow.metrics.shapes.evaluator import to_uint8
from senseflow.metrics.shapes.quality import REFERENCE_SET_LABEL, Comparison, QualityReport
from senseflow.metrics.weights import sha256_file
from senseflow.viz import labelled_rows, save_image

SPLITS = ("train", "test", "heldout")
GRID_PROMPTS = 10


def teacher_sha256(folder: str | Path | None) -> str:
    """SHA-256 of the teacher's transformer weights: which teacher a measurement belongs to."""
    weights = resolve_teacher_folder(folder) / "transformer" / "diffusion_pytorch_model.safetensors"
    return sha256_file(weights)


def teacher_generator(teacher: ToyTeacher, steps: int, guidance: float, seed_offset: int = 0):
    def generate(prompts: list[str], seeds: list[int]) -> np.ndarray:
        shifted = [s + seed_offset for s in seeds]
        return to_uint8(teacher.sample(prompts, shifted, steps=steps, guidance=guidance))

    return generate


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:.2f}"


def markdown_table(reports: list[QualityReport], n_images: int) -> str:
    head = (
        "| setting | all (%) | train | test | held-out | colour | shape | size | relation "
        "| FID vs renders | FID-T | s / image |\n|" + "---|" * 12
    )
    lines = [head]
    for r in reports:
        acc = r.accuracy["all"]["overall"]
        by_split = [_fmt(r.accuracy[split]["overall"]["all"]) for split in SPLITS]
        attributes = [_fmt(acc[k]) for k in ("colour", "shape", "size", "relation")]
        fids = [_fmt(r.fid.get(k), pct=False) for k in ("renders", "teacher")]
        cells = [r.name, _fmt(acc["all"]), *by_split, *attributes, *fids, f"{r.seconds / n_images:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def coverage_table(reports: list[QualityReport]) -> str:
    """Precision and recall against the teacher's reference set, intra-prompt diversity (toy features
    and layout) and the background's green cast and texture, one row per report."""
    from senseflow.experiments.toy.points import COVERAGE_COLUMNS, COVERAGE_HEAD, quality_point

    lines = ["| setting " + COVERAGE_HEAD + "\n|" + "---|" * (1 + len(COVERAGE_COLUMNS))]
    for r in reports:
        point = quality_point({**r.record(), "fid": {"teacher": None}})
        cells = ["–" if point[k] is None else f"{point[k]:.{d}f}" for k, d in COVERAGE_COLUMNS]
        lines.append("| " + " | ".join([r.name, *cells]) + " |")
    return "\n".join(lines)


def write_teacher_report(
    teacher_folder: str | Path | None,
    per_split: int,
    steps: list[int] | None,
    guidance: list[float] | None,
    out_markdown: Path,
    seed: int = 0,
) -> Path:
    teacher = ToyTeacher(teacher_folder)
    ref_steps, ref_guidance = teacher.recipe.sampling.steps, teacher.recipe.sampling.guidance
    steps = steps or [ref_steps, 4]
    guidance = guidance or [ref_guidance]
    comp = Comparison(SPLITS, per_split, seed=seed)
    prompts, n = comp.prompt_set, len(comp.prompt_set.prompts)
    ref_name = f"teacher {ref_steps} steps, CFG {ref_guidance}"
    comp.add_reference_rows(
        lambda offset: teacher_generator(teacher, ref_steps, ref_guidance, offset), ref_name
    )
    for s in steps:
        for g in guidance:
            if (s, g) != (ref_steps, ref_guidance):
                comp.add(f"teacher {s} steps, CFG {g}", teacher_generator(teacher, s, g))
    reports, grid_rows = comp.reports, comp.images

    out_markdown = Path(out_markdown)
    out_markdown.parent.mkdir(parents=True, exist_ok=True)
    stem = out_markdown.with_suffix("")
    pick = np.linspace(per_split, n - 1, GRID_PROMPTS).astype(int)  # test and held-out prompts
    grid_names = [name for name in grid_rows if REFERENCE_SET_LABEL not in name]
    grid = save_image(
        labelled_rows([grid_rows[k][pick] for k in grid_names], grid_names),
        stem.with_name(stem.name + "_grid.png"),
    )
    summary = json.loads((teacher.folder / "train_summary.json").read_text())
    payload = {
        "teacher": str(teacher.folder),
        "train_summary": summary,
        "prompts_per_split": per_split,
        "seed": seed,
        "reports": comp.payload(),
        "software": {"python": platform.python_version(), "torch": torch.__version__},
    }
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    minutes = summary.get("total_train_seconds", summary["train_seconds"]) / 60
    command = (
        f"senseflow toy report-teacher --per-split {per_split} --seed {seed} "
        f"--steps {' '.join(map(str, steps))} --guidance {' '.join(map(str, guidance))}"
    )
    grid_prompts = "\n".join(f"{i + 1}. {prompts.prompts[j]}" for i, j in enumerate(pick))
    out_markdown.write_text(
        f"""# Toy teacher: measured quality

Teacher: `{teacher.folder.name}` — `SD3Transformer2DModel`, {summary["parameters"]:,} parameters, pixel space
32x32, trained for {summary.get("total_steps", summary["steps"])} steps in
{minutes:.1f} min on this machine's CPU (`senseflow toy train-teacher`;
the recipe is the teacher folder's `recipe.yaml`, the stages are in its `train_summary.json`).

{n} prompts ({per_split} each from the train, test and held-out splits; held-out prompts use
colour-shape pairs never seen in training), one image per prompt, seed = prompt index. Accuracy is
the rule-based evaluator's (`senseflow.metrics.shapes.evaluator`): an image is correct ("all") when
every prompted colour is found with the prompted shape and size and, for two objects, in the
prompted relation. FIDs use the toy feature network (`senseflow.metrics.shapes.features`) at N =
{n}: against renders of the same prompts, and FID-T against the teacher's own {ref_steps}-step
samples on an independent seed set. The "other placements" row and the teacher's {ref_steps}-step
row on the common seeds are the floors of those two FIDs at this N.

{markdown_table(reports, n)}

Grid (`{grid.name}`), one column per prompt, rows as labelled:

{grid_prompts}

![grid]({grid.name})

Reproduce (about {sum(r.seconds for r in reports) / 60:.0f} min of sampling on 2 CPU cores):

```
{command}
```
"""
    )
    return out_markdown
