"""``senseflow toy ablate``: the paper's ablation (DMD2 -> +IDA -> +ISG -> full) on the shapes world.

Every variant is the toy recipe (``configs/toy/distill.yaml``) with a few dotted overrides, listed
in :data:`VARIANTS`. For each (variant, seed) the student is trained with the ordinary
:class:`~senseflow.train.trainer.Distiller` into ``<runs>/<variant>/seed<k>``, timed, with a kept
checkpoint every ``--curve-every`` iterations; each of those checkpoints is sampled with the 4-step
renoise sampler on a fixed prompt set and measured (:mod:`.ablate_measure`): compositional accuracy
per split, FID-T (to the teacher's own reference samples of the same prompts and seeds), FID to
renders, precision and recall, intra-prompt diversity and the background's cast and texture. The
last checkpoint gives the tables, all of them the quality curves. The teacher's reference samples
and their features are computed once and cached in ``<runs>/reference/``. Variants are compared
seed by seed (same seed: same data, noise and initial draws) in paired tests.

Resumable per (variant, seed): a run whose final checkpoint exists is not trained again (an
interrupted one continues from its newest checkpoint), and a measured checkpoint is not measured
again. Training runs hold checkpoints, so they live under ``--runs`` (default ``runs/toy_ablation``,
ignored by git); the report (markdown, JSON, training and quality curves, sample grid) goes to
``--out``. ``--set`` picks the report (:data:`SETS`): its default variants, timing baseline, title
and file names (``--name`` renames the files; a run without the set's baseline among its variants
takes its first variant as the baseline).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import time
from pathlib import Path

import numpy as np

from senseflow import inputs
from senseflow.errors import UsageError
from senseflow.experiments.toy.ablate_measure import Diversity, measure_run, read_json, reference
from senseflow.experiments.toy.ablate_plots import (
    CURVES,
    QUALITY,
    _grid,
    _mean_over_seeds,
    mean_sd_over_seeds,
    plot_curves,
    plot_quality,
)
from senseflow.experiments.toy.ablate_report import markdown, paired_tests, summarise
from senseflow.experiments.toy.ablate_variants import DEFAULT_SET, SAMPLER, SETS, VARIANTS
from senseflow.experiments.toy.points import quality_point
from senseflow.jsonfile import write_json

SPLITS = ("train", "test", "heldout")


#: Overrides of every ablation run: log each iteration (loss_dmd exists on generator turns only),
#: no sample grids during training (they would distort the timing). Checkpoints are written every
#: ``--curve-every`` iterations and all kept: the quality curves measure each of them.
RUN_OVERRIDES = ("logging.every=1", "logging.sample_every=null")

GRID_PROMPTS = 8  # test and held-out prompts shown in the sample grid


def _grid_picks(per_split: int, n: int) -> np.ndarray:
    """Indices of GRID_PROMPTS prompts spread over the test and held-out part of the prompt set."""
    return np.linspace(per_split, n - 1, min(GRID_PROMPTS, n - per_split)).astype(int)


# ---------------------------------------------------------------------------------------------- runs


def _same_config(run_dir: Path, cfg) -> bool:
    from senseflow.config import load_config

    saved = run_dir / "config.yaml"
    return not saved.is_file() or load_config(saved) == cfg


def train_run(cfg, run_dir: Path, progress: bool) -> dict:
    """Train (or skip, or finish) one run; returns its timing record."""
    from senseflow.train import checkpoint as ckpt
    from senseflow.train.trainer import Distiller

    total = cfg.schedule.iterations
    final = run_dir / "checkpoints" / ckpt.checkpoint_name(total)
    timing_path = run_dir / "ablate_timing.json"
    if not _same_config(run_dir, cfg):
        raise ValueError(
            f"{run_dir} holds a run with another configuration (see its config.yaml); "
            "choose another --runs folder or delete that run"
        )
    if (final / ckpt.META).is_file():
        print(f"skip training {run_dir}: final checkpoint {final.name} exists", flush=True)
        return read_json(timing_path) or {
            "seconds": None,
            "iterations_timed": 0,
            "seconds_per_iteration": None,
        }
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    first = int(latest.name.split("-")[1]) if latest is not None else 0
    print(f"train {run_dir}: iterations {first}..{total}", flush=True)
    distiller = Distiller(cfg, progress=progress)
    start = time.perf_counter()
    distiller.run()
    seconds = time.perf_counter() - start
    timing = {
        "seconds": seconds,
        "iterations_timed": total - first,
        "seconds_per_iteration": seconds / max(1, total - first),
        "resumed_from": first,
    }
    write_json(timing_path, timing)
    return timing


def read_log(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Curves (iteration, value) of a run's log.jsonl; a resumed run's repeated iterations keep the last."""
    rows: dict[int, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[int(row["iteration"])] = row
    curves = {}
    for key, _ in CURVES:
        pts = [(n, r[key]) for n, r in sorted(rows.items()) if isinstance(r.get(key), (int, float))]
        pts = [(n, v) for n, v in pts if math.isfinite(v)]
        curves[key] = (np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float))
    return curves


def _child_argv(args: argparse.Namespace, variant: str, seed: int, out: Path) -> list[str]:
    """This command's arguments for one (variant, seed): that run trained and measured, no figures."""
    argv = ["toy", "ablate", "--set", args.set, "--seeds", str(seed), "--variants", variant]
    argv += [str(part) for flag, value in _options(args) for part in (flag, value)]
    argv += ["--out", str(out), "--no-figures", "--quiet"]
    return argv + (["--threads", str(args.threads)] if args.threads else [])


def run_in_parallel(args: argparse.Namespace, runs: list[tuple[str, int]], logs: Path) -> None:
    """Train and measure ``runs`` ((variant, seed) pairs) in ``args.jobs`` child processes of this
    command at a time, each writing its output to ``logs/<variant>_seed<k>.log``; the report is then
    assembled from their cached checkpoints and measurements. On a GPU the children share it (many
    small runs keep it busier together; NVIDIA's MPS lets their kernels overlap)."""
    import subprocess
    import sys
    import tempfile

    logs.mkdir(parents=True, exist_ok=True)
    pending, running, failed = list(runs), {}, []
    with tempfile.TemporaryDirectory(prefix="ablate_child_") as tmp:
        while pending or running:
            while pending and len(running) < args.jobs:
                v, s = pending.pop(0)
                argv = [
                    sys.executable,
                    "-m",
                    "senseflow.cli",
                    *_child_argv(args, v, s, Path(tmp) / f"{v}_{s}"),
                ]
                path = logs / f"{v}_seed{s}.log"
                log = path.open("w")
                running[f"{v} seed {s}"] = (
                    subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT),
                    log,
                    path,
                )
                print(f"started {v} seed {s} (log {path})", flush=True)
            time.sleep(0.5)
            for name, (proc, log, path) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    del running[name]
                    print(f"finished {name}: exit {proc.returncode}", flush=True)
                    if proc.returncode:
                        failed.append(f"{name} ({path})")
    if failed:
        raise RuntimeError(f"--jobs: {len(failed)} run(s) failed: {'; '.join(failed)}")


def run_ablation(args: argparse.Namespace) -> Path:
    import torch

    from senseflow.config import load_config
    from senseflow.experiments.toy.report import teacher_sha256
    from senseflow.metrics.shapes.quality import PromptSet

    vset = SETS[args.set]
    if args.variants is None:
        args.variants = list(vset.variants)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    if not args.seeds:
        raise ValueError("--seeds: give at least one seed")
    inputs.distinct(args.variants, "--variants")
    inputs.distinct(args.seeds, "--seeds")
    for seed in args.seeds:
        inputs.seed(seed, "--seeds")
    inputs.seed(args.prompt_seed, "--prompt-seed")
    for value, option in (
        (args.iterations, "--iterations"),
        (args.batch_size, "--batch-size"),
        (args.per_split, "--per-split"),
        (args.threads, "--threads"),
    ):
        inputs.at_least(value, 1, option)
    name = report_name(args.name, vset.stem)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    baseline = vset.baseline if vset.baseline in args.variants else args.variants[0]
    recipe, runs, out = Path(args.config or "toy/distill"), Path(args.runs), Path(args.out)
    base = list(RUN_OVERRIDES)
    if args.teacher:
        base.append(f"model.teacher={args.teacher}")
    if args.iterations is not None:
        base.append(f"schedule.iterations={args.iterations}")
    if args.batch_size is not None:
        base.append(f"data.batch_size={args.batch_size}")
    base_cfg = load_config(recipe, base)
    inputs.at_least(args.curve_every, 1, "--curve-every")
    inputs.at_least(args.jobs, 1, "--jobs")
    kept = math.ceil(base_cfg.schedule.iterations / args.curve_every)
    base += [f"checkpoint.every={args.curve_every}", f"checkpoint.keep_last={kept}"]
    teacher_folder = base_cfg.model.teacher

    prompts = PromptSet.sample(SPLITS, args.per_split, seed=args.prompt_seed)
    picks = _grid_picks(args.per_split, len(prompts.prompts))
    div = Diversity(args.diversity_prompts, args.diversity_seeds)
    inputs.at_least(div.prompts, 1, "--diversity-prompts")
    inputs.at_least(div.seeds, 2, "--diversity-seeds")
    key_base = {"per_split": args.per_split, "prompt_seed": args.prompt_seed}
    refs, ref_rows, teacher_picks, ref_key = reference(
        teacher_folder, prompts, key_base, runs / "reference", picks, div
    )

    if args.jobs > 1:  # the runs first, in child processes; the loop below then finds them cached
        run_in_parallel(args, [(v, s) for v in args.variants for s in args.seeds], runs / "logs")
    records, curves, quality_curves, grid_rows = [], {}, {}, {"teacher": teacher_picks}
    for v in args.variants:
        per_seed = []
        for seed in args.seeds:
            run_dir = runs / v / f"seed{seed}"
            overrides = [*base, *VARIANTS[v].overrides, f"seed={seed}", f"output_dir={run_dir}"]
            cfg = load_config(recipe, [*overrides, "checkpoint.resume=auto"])
            timing = train_run(cfg, run_dir, progress=not args.quiet)
            quality = measure_run(run_dir, cfg, prompts, refs, ref_key, picks, div)
            final = quality["final"]
            log = read_log(run_dir / "log.jsonl")
            per_seed.append(log)
            last = {k: float(y[-1]) for k, (_, y) in log.items() if len(y)}
            records.append(
                {
                    "variant": v,
                    "seed": seed,
                    "run_dir": str(run_dir),
                    "overrides": overrides,
                    "timing": timing,
                    "fid": final["fid"],
                    "accuracy": final["accuracy"],
                    "coverage": final["coverage"],
                    "background": final["background"],
                    "diversity": final["diversity"],
                    "sampling_seconds": final["seconds"],
                    "last_logged": last,
                    "curve": [{"iteration": q["iteration"], **quality_point(q)} for q in quality["curve"]],
                }
            )
            if seed == min(args.seeds):
                grid_rows[VARIANTS[v].label] = final["samples"]
        curves[v] = {key: _mean_over_seeds([c[key] for c in per_seed]) for key, _ in CURVES}
        points = [r["curve"] for r in records if r["variant"] == v]
        quality_curves[v] = {
            key: mean_sd_over_seeds(
                [
                    (np.array([p["iteration"] for p in c]), np.array([p[key] for p in c], dtype=float))
                    for c in points
                ]
            )
            for key, _, _ in QUALITY
        }

    out.mkdir(parents=True, exist_ok=True)
    stem = out / name
    curves_png = grid_png = quality_png = None
    if not args.no_figures:
        labels = {v: VARIANTS[v].label for v in curves}
        curves_png = plot_curves(curves, labels, out / f"{name}_curves.png")
        levels = {row["name"].split(" (")[0]: quality_point(row) for row in ref_rows}
        quality_png = plot_quality(quality_curves, labels, out / f"{name}_quality.png", levels)
        if len(picks):
            grid_png = _grid(grid_rows, out / f"{name}_samples.png")
    payload = {
        "command": command_line(args),
        "set": args.set,
        "title": vset.title,
        "baseline": baseline,
        "recipe": str(recipe),
        "teacher": str(teacher_folder) if teacher_folder else "shipped toy teacher",
        "teacher_sha256": teacher_sha256(teacher_folder),
        "iterations": base_cfg.schedule.iterations,
        "batch_size": base_cfg.data.batch_size,
        "seeds": list(args.seeds),
        "per_split": args.per_split,
        "prompt_seed": args.prompt_seed,
        "prompts": len(prompts.prompts),
        "sampler": SAMPLER,
        "variants": list(args.variants),
        "curve_every": args.curve_every,
        "diversity": {"prompts": div.prompts, "seeds_per_prompt": div.seeds},
        "variant_overrides": {v: list(VARIANTS[v].overrides) for v in args.variants},
        "run_overrides": base[: len(RUN_OVERRIDES)] + base[-2:],  # logging and the curve's checkpoints
        "summary": summarise(records, list(args.variants), baseline),
        "paired": paired_tests(records, list(args.variants), baseline),
        "reference": ref_rows,
        "runs": records,
        "json": stem.with_suffix(".json").name,
        "software": {"python": platform.python_version(), "torch": torch.__version__},
        "machine": machine_note(base_cfg.parallel.device),
    }
    write_json(stem.with_suffix(".json"), payload)
    md = stem.with_suffix(".md")
    figures = {"curves": curves_png, "quality": quality_png, "grid": grid_png}
    md.write_text(markdown(payload, {k: p.name for k, p in figures.items() if p is not None}))
    print(f"ablation written to {md}", flush=True)
    return md


def report_name(name: str | None, default: str) -> str:
    """The report's file stem: ``--name`` if given (a plain file name: several reports of one set,
    from other machines or seeds, can sit side by side in one folder), else the set's."""
    if name is None:
        return default
    if not name or name != Path(name).name or name.startswith(".") or Path(name).suffix:
        raise UsageError(f"--name: expected a file name without folder or extension, got {name!r}")
    return name


def machine_note(device_spec: str) -> str:
    """Where the runs trained: the training device (the GPU's name on CUDA) and the CPU, for the
    report's timings."""
    import os

    import torch

    from senseflow.devices import resolve_device

    cpu = platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        models = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        cpu = models[0] if models else cpu
    except OSError:  # no /proc (not Linux)
        pass
    device = resolve_device(device_spec)
    trained = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU"
    return f"trained on {trained}; CPU {cpu}, {os.cpu_count()} cores"


def _options(args: argparse.Namespace) -> list[tuple[str, object]]:
    """The options that shape the runs and their measurement, as given (None: left out)."""
    pairs = (
        ("--config", args.config),
        ("--teacher", args.teacher),
        ("--iterations", args.iterations),
        ("--batch-size", args.batch_size),
        ("--per-split", args.per_split),
        ("--prompt-seed", args.prompt_seed),
        ("--curve-every", args.curve_every),
        ("--diversity-prompts", args.diversity_prompts),
        ("--diversity-seeds", args.diversity_seeds),
        ("--runs", args.runs),
    )
    return [(flag, value) for flag, value in pairs if value is not None]


def command_line(args: argparse.Namespace) -> str:
    parts = ["senseflow", "toy", "ablate"]
    if args.set != DEFAULT_SET:
        parts += ["--set", args.set]
    parts += ["--seeds", *map(str, args.seeds), "--variants", *args.variants]
    parts += [str(part) for flag, value in [*_options(args), ("--out", args.out)] for part in (flag, value)]
    if args.name:
        parts += ["--name", args.name]
    if args.no_figures:
        parts.append("--no-figures")
    return shlex.join(parts)


def cmd_ablate(args: argparse.Namespace) -> None:
    run_ablation(args)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ablate", help="vanilla DMD2 vs +IDA, +ISG, full: train, measure, report")
    p.add_argument(
        "--set",
        choices=list(SETS),
        default=DEFAULT_SET,
        help=f"which report: its default variants, timing baseline and file names (default {DEFAULT_SET})",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument(
        "--variants",
        nargs="+",
        help=f"variants to run (default: the set's, {' '.join(SETS[DEFAULT_SET].variants)} for "
        f"{DEFAULT_SET}; known: {', '.join(VARIANTS)})",
    )
    p.add_argument("--config", help="distillation recipe (default configs/toy/distill.yaml)")
    p.add_argument("--teacher", help="teacher folder (default: the recipe's, i.e. the shipped teacher)")
    p.add_argument("--iterations", type=int, help="training iterations per run (default: the recipe's)")
    p.add_argument("--batch-size", type=int, help="training batch (default: the recipe's)")
    p.add_argument(
        "--per-split", type=int, default=100, help="measured prompts per split (train, test, heldout)"
    )
    p.add_argument("--prompt-seed", type=int, default=0, help="seed of the measured prompt set")
    p.add_argument("--diversity-prompts", type=int, default=16, help="prompts of the diversity measure")
    p.add_argument("--diversity-seeds", type=int, default=4, help="seeds per prompt of the diversity measure")
    p.add_argument(
        "--curve-every",
        type=int,
        default=100,
        help="iterations between the checkpoints whose students the quality curves measure (default 100)",
    )
    p.add_argument("--runs", default="runs/toy_ablation", help="training runs and the reference cache")
    p.add_argument("--out", default="docs/results", help="folder of the report (<stem>.md/.json, PNGs)")
    p.add_argument(
        "--name",
        help="file name of the report without extension (default: the set's, e.g. toy_ablation_stressed)",
    )
    p.add_argument("--no-figures", action="store_true", help="markdown and JSON only, no PNGs")
    p.add_argument("--threads", type=int, help="torch.set_num_threads, also each child's (default: torch's)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="(variant, seed) runs trained and measured at a time, each in a child process "
        "(default 1: one after another in this process)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_ablate)
