"""Measurements of ``senseflow toy ablate``: the teacher's reference rows (once, cached) and every
kept checkpoint of a run (cached per checkpoint), with the same prompt set, seeds and metrics.

Each measured generator gets compositional accuracy per split, FID-T (to the teacher's own
reference samples of the same prompts and seeds) and FID to renders, precision and recall against
the teacher's reference, the background's colour cast and texture, and intra-prompt diversity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from senseflow.experiments.toy.ablate_variants import SAMPLER
from senseflow.jsonfile import write_json

#: Bumped when what a measurement holds changes, so cached measurements are redone.
MEASURE_VERSION = 2


@dataclass(frozen=True)
class Diversity:
    """Intra-prompt diversity settings: ``prompts`` prompts x ``seeds`` seeds each."""

    prompts: int
    seeds: int


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _record(report, diversity: dict | None) -> dict:
    return {**report.record(), "diversity": diversity}


def reference(teacher_folder, prompts, key_base: dict, root: Path, picks, div: Diversity):
    """Teacher and render features of the prompt set, the teacher's rows (50 steps, 50 steps with
    other seeds, 4 steps), its grid images and the cache key; computed once and cached in ``root``."""
    from senseflow.experiments.toy.report import teacher_generator, teacher_sha256
    from senseflow.families.toy.pipeline import ToyTeacher
    from senseflow.metrics.shapes.features import extract_features
    from senseflow.metrics.shapes.quality import SECOND_SEED_SET, measure, measure_diversity, render_reference

    teacher = ToyTeacher(teacher_folder)
    steps, guidance = teacher.recipe.sampling.steps, teacher.recipe.sampling.guidance
    key = {
        **key_base,
        "teacher": str(teacher.folder.resolve()),
        "teacher_sha256": teacher_sha256(teacher.folder),
        "steps": steps,
        "guidance": guidance,
        "diversity": [div.prompts, div.seeds],
        "version": MEASURE_VERSION,
    }
    meta = read_json(root / "meta.json")
    if meta is not None and meta["key"] == key and (root / "features.npz").is_file():
        print(f"reference: cached in {root}", flush=True)
        feats = np.load(root / "features.npz")
        return {k: feats[k] for k in feats.files}, meta["rows"], np.load(root / "teacher_samples.npy"), key

    def teacher_gen(n_steps: int, offset: int = 0):
        return teacher_generator(teacher, n_steps, guidance, offset)

    n = len(prompts.prompts)
    print(f"reference: sampling the teacher ({steps} steps, CFG {guidance}) on {n} prompts", flush=True)
    renders = render_reference(prompts.prompts, seed=key_base["prompt_seed"] + 1)
    refs = {"renders": extract_features(renders)}
    ref_report, ref_images = measure(f"teacher, {steps} steps", teacher_gen(steps), prompts, refs)
    refs["teacher"] = extract_features(ref_images)
    ref_report.fid["teacher"] = 0.0
    rows = [_record(ref_report, measure_diversity(teacher_gen(steps), prompts, div.prompts, div.seeds))]
    for name, gen, with_diversity in (  # the floor set is the 50-step teacher again: no diversity of its own
        (f"teacher, {steps} steps, other seeds (FID-T floor)", teacher_gen(steps, SECOND_SEED_SET), False),
        (f"teacher, 4 steps (Euler, CFG {guidance})", teacher_gen(4), True),
    ):
        diversity = measure_diversity(gen, prompts, div.prompts, div.seeds) if with_diversity else None
        rows.append(_record(measure(name, gen, prompts, refs)[0], diversity))
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "features.npz", **refs)
    np.save(root / "teacher_samples.npy", ref_images[picks])
    write_json(root / "meta.json", {"key": key, "rows": rows})
    return refs, rows, ref_images[picks], key


def _measure_checkpoint(path: Path, run_dir: Path, prompts, refs: dict, key: dict, div: Diversity, picks):
    """One checkpoint's student, measured and cached in ``<run>/ablate_quality/<checkpoint>.json``
    (its grid images beside it)."""
    from senseflow.metrics.shapes.evaluator import to_uint8
    from senseflow.metrics.shapes.quality import measure, measure_diversity
    from senseflow.metrics.weights import sha256_file
    from senseflow.student import Student
    from senseflow.train import checkpoint as ckpt

    cache = run_dir / "ablate_quality" / f"{path.name}.json"
    samples = cache.with_suffix(".npy")
    # the manifest lists every file's size and SHA-256: its own hash names the checkpoint's content
    manifest = sha256_file(path / ckpt.MANIFEST)
    key = {**key, "checkpoint": path.name, "checkpoint_manifest_sha256": manifest, "sampler": SAMPLER}
    cached = read_json(cache)
    if cached is not None and cached["key"] == key and samples.is_file():
        return {**cached, "cached": True}
    student = Student.from_run(run_dir, path)

    def generate(p: list[str], s: list[int]) -> np.ndarray:
        return to_uint8(student.sample(p, s, mode=SAMPLER))

    report, images = measure(str(run_dir), generate, prompts, refs)
    out = {
        "key": key,
        "iteration": int(path.name.split("-")[1]),
        **_record(report, measure_diversity(generate, prompts, div.prompts, div.seeds)),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(samples, images[picks])
    write_json(cache, out)
    return out


def measure_run(run_dir: Path, cfg, prompts, refs: dict, ref_key: dict, picks, div: Diversity) -> dict:
    """Every kept checkpoint of the run, measured (cached): ``final`` (the last iteration's, with its
    grid images in ``samples``) and ``curve`` (all of them, by iteration)."""
    from senseflow.train import checkpoint as ckpt

    points = ckpt.list_checkpoints(run_dir / "checkpoints")
    expected = list(range(cfg.checkpoint.every, cfg.schedule.iterations, cfg.checkpoint.every))
    missing = sorted(set([*expected, cfg.schedule.iterations]) - {n for n, _ in points})
    if missing:  # e.g. pruned after a preempted run wrote an extra checkpoint
        raise ValueError(f"{run_dir}: no checkpoint of iteration(s) {missing} to measure; retrain this run")
    curve = [_measure_checkpoint(path, run_dir, prompts, refs, ref_key, div, picks) for _, path in points]
    if all([q.pop("cached", False) for q in curve]):
        print(f"skip measuring {run_dir}: measured before", flush=True)
    final = curve[-1]
    if final["iteration"] != cfg.schedule.iterations:
        raise ValueError(f"{run_dir}: newest checkpoint {final['iteration']}, not {cfg.schedule.iterations}")
    name = ckpt.checkpoint_name(cfg.schedule.iterations)
    final["samples"] = np.load(run_dir / "ablate_quality" / f"{name}.npy")
    print(
        f"measured {run_dir}: all {100 * final['accuracy']['all']['overall']['all']:.1f}% "
        f"FID-T {final['fid']['teacher']:.2f} recall {final['coverage']['recall']:.3f}",
        flush=True,
    )
    return {"final": final, "curve": curve}
