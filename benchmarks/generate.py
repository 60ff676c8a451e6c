"""Time per image of ``senseflow generate`` against the sum of its parts and the stock diffusers pipeline.

In one process, on the same prompts and batches, it measures:

* **senseflow generate**: :func:`senseflow.generate.generate` as the command runs it (batches, the
  few-step chain, VAE decode, PNGs written to a temporary folder);
* **sum of parts**: the same work as separate pieces, each timed alone: text encoding of each batch,
  the K network forwards at the anchors on one batch, and the VAE decode of one batch of latents.
  What ``generate`` spends beyond this (noise, renoising, moving images to the host, quantising,
  writing, Python) is its overhead; the target is generate / sum of parts <= 1.05;
* **Student.sample** (printed below the table): generate's sampling without writing files, which
  tells the cost of PNG encoding apart when it competes with the network for the CPU;
* **stock pipeline**: ``DiffusionPipeline`` on an exported folder, called with
  ``num_inference_steps=K``, no CFG and ``output_type="np"``.

Each figure is the median of ``--repeats`` rounds after ``--warmup`` untimed ones; the
measurements are interleaved within a round, in an order that rotates from round to round, so that
they share the machine's conditions.

    python benchmarks/generate.py --tiny sdxl    # a tiny folder, a 2-iteration run and its export
    python benchmarks/generate.py --run runs/sdxl --exported exports/sdxl --prompts prompts.txt

``--tiny FAMILY`` writes a tiny random teacher, trains a 2-iteration run on it and exports the
student with ``senseflow export --format diffusers`` under ``--work``. Figures depend on the
machine, the thread count and the model's size: a tiny model on a CPU is dominated by Python and
small kernels, not by the network; quote them with the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from senseflow.config import load_config
from senseflow.core.sampling import seeded_noise
from senseflow.generate import (
    DEFAULT_BATCH_SIZE,
    DTYPE_CHOICES,
    WRITE_STAGE,
    configure,
    generate,
    load_student,
)
from senseflow.student import STAGES, StageTimer, Student, read_export_meta

TINY_FAMILIES = {"sdxl": "sdxl", "sd3": "sd35_large", "flux": "flux_dev"}
TINY_RESOLUTION = 64
TINY_TEXT_LENGTH = 8  # T5 tokens of the tiny sd3 / flux runs (the recipes' 256 / 512 would dominate)
TINY_PROMPTS = ["a red cat", "a blue dog", "a photo of the cat", "a green dog on the red cat"]
TARGET = 1.05  # generate / sum of parts


# ------------------------------------------------------------------------------- tiny run and export


def tiny_run(family: str, work: Path) -> Path:
    """A tiny random teacher of ``family`` and a 2-iteration run on it (prompts only, float32, CPU)."""
    from senseflow.families.tiny import write_tiny_teacher
    from senseflow.train.trainer import Distiller

    teacher = write_tiny_teacher(work / "teacher", family, "a")
    prompts = work / "train_prompts.txt"
    prompts.write_text("\n".join(TINY_PROMPTS) + "\n")
    overrides = [
        f"model.teacher={teacher}",
        f"output_dir={work / 'run'}",
        "data.kind=prompts",
        f"data.path={prompts}",
        f"data.resolution={TINY_RESOLUTION}",
        "data.batch_size=2",
        "data.num_workers=0",
        "schedule.iterations=2",
        "method.backward_sim_prob=1.0",
        "method.gan.type=none",
        "method.ttur_ratio=2",
        "optim.generator.name=adamw",
        "optim.fake.name=adamw",
        "optim.discriminator.name=adamw",
        "optim.warmup_steps=0",
        "precision.teacher_dtype=fp32",
        "precision.autocast_dtype=fp32",
        "precision.param_dtype=fp32",
        "parallel.strategy=none",
        "parallel.gradient_checkpointing=false",
        "parallel.device=cpu",
        "logging.every=1",
        "logging.sample_every=null",
        "logging.tensorboard=false",
    ]
    if family != "sdxl":
        overrides.append(f"model.max_sequence_length={TINY_TEXT_LENGTH}")
    Distiller(load_config(TINY_FAMILIES[family], overrides), progress=False).run()
    return work / "run"


def export_folder(run: Path, out: Path, sampler: str = "renoise") -> Path:
    """The run's student exported by ``senseflow export --format diffusers`` (float32, no card samples)."""
    from senseflow.cli import main as senseflow

    args = ["export", str(run), "--out", str(out), "--dtype", "fp32", "--sampler", sampler]
    if senseflow([*args, "--no-samples", "--overwrite"]) != 0:
        raise RuntimeError(f"senseflow export of {run} failed")
    return out


# ------------------------------------------------------------------------------- the three measurements


def time_generate(student: Student, prompts: list[str], batch_size: int, out: Path) -> tuple[float, dict]:
    """Wall seconds of ``generate`` and its own stage times."""
    timer = StageTimer(student.device)
    timer.sync()
    start = time.perf_counter()
    generate(student, prompts, 0, None, out, batch_size, timer)
    timer.sync()
    return time.perf_counter() - start, dict(timer.seconds)


@torch.no_grad()
def time_parts(student: Student, prompts: list[str], batch_size: int) -> dict[str, float]:
    """Text encoding, the K forwards and the VAE decode of every batch, each timed alone."""
    adapter, net = student.adapter, student.generator
    timer = StageTimer(student.device)
    shape = adapter.sample_shape(student.cfg.data.resolution)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        with timer.stage("text"):
            cond = student.conditioning(chunk)
        x = seeded_noise(shape, range(start, start + len(chunk))).to(student.device)
        with timer.stage("denoise"):
            for level in student.anchor_levels:
                out = adapter.forward(net, x, level.expand(len(chunk)), cond)
        with timer.stage("decode"):
            adapter.decode(out).float()
    return dict(timer.seconds)


def stock_call_kwargs(exported: Path) -> dict[str, Any]:
    """The call the export's model card gives (its size, no CFG, the trained T5 length, the anchors
    when the plain call does not walk them), with the images returned as arrays."""
    manifest = read_export_meta(exported)
    if manifest is None:
        raise ValueError(f"--exported {exported}: not a folder written by `senseflow export` (no senseflow/)")
    return {**manifest["call"], "output_type": "np"}


@torch.no_grad()
def time_stock(pipe: Any, prompts: list[str], batch_size: int, steps: int, kwargs: dict, device) -> float:
    timer = StageTimer(device)
    timer.sync()
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i : i + batch_size]
        generators = [torch.Generator().manual_seed(i + j) for j in range(len(chunk))]
        pipe(prompt=chunk, num_inference_steps=steps, generator=generators, **kwargs)
    timer.sync()
    return time.perf_counter() - start


# ------------------------------------------------------------------------------- report


def table(rows: dict[str, float | None], parts: float) -> str:
    lines = ["| path | s/image | ratio to sum of parts |", "|---|---:|---:|"]
    for name, value in rows.items():
        if value is None:
            lines.append(f"| {name} | not measured | |")
        else:
            lines.append(f"| {name} | {value:.4f} | {value / parts:.3f} |")
    return "\n".join(lines)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", help="a run folder (or an exported folder) to sample")
    what.add_argument(
        "--tiny", choices=sorted(TINY_FAMILIES), help="train a 2-iteration tiny run and time it"
    )
    p.add_argument(
        "--exported",
        help="exported diffusers folder for the stock row (default with --tiny: the tiny run's export)",
    )
    p.add_argument("--checkpoint", help="a checkpoint of --run (default: the newest)")
    p.add_argument("--prompts", help="file with one prompt per line (default: a few fixed prompts)")
    p.add_argument("--images", type=int, default=8, help="images per measurement (default 8)")
    p.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="as generate's (default %(default)s)"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is reported (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="as generate's (default auto)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--work", help="folder for the tiny run, its export and the images (default: temporary)")
    args = p.parse_args(argv)
    for flag in ("images", "batch_size", "repeats"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')}: must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table and return the medians (seconds per image)."""
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        run, exported = (Path(args.run) if args.run else None), args.exported
        if args.tiny:
            run = tiny_run(args.tiny, work / f"tiny_{args.tiny}")
            exported = exported or export_folder(run, work / f"tiny_{args.tiny}" / "export")
        return measure(args, run, None if exported is None else Path(exported), work)


def measure(args: argparse.Namespace, run: Path, exported: Path | None, work: Path) -> dict[str, Any]:
    from senseflow.data.index import read_prompt_list

    pool = read_prompt_list(Path(args.prompts), "--prompts") if args.prompts else TINY_PROMPTS
    prompts = [pool[i % len(pool)] for i in range(args.images)]
    student = load_student(run, args.checkpoint, device=args.device, dtype=args.dtype)
    configure(student)
    steps = len(student.anchor_levels)
    pipe = kwargs = None
    if exported is not None:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(exported, dtype=student.dtype).to(student.device)
        pipe.set_progress_bar_config(disable=True)
        kwargs = stock_call_kwargs(Path(exported))
    n, bs = len(prompts), args.batch_size
    results: dict[str, list] = {"generate": [], "sample": [], "stages": [], "parts": [], "stock": []}

    def run_generate() -> dict[str, Any]:
        total, stages = time_generate(student, prompts, bs, work / "images")
        return {"generate": total / n, "stages": stages}

    def run_sample() -> dict[str, Any]:  # generate's sampling without the files
        timer = StageTimer(student.device)
        timer.sync()
        start = time.perf_counter()
        student.sample(prompts, list(range(n)), batch_size=bs)
        timer.sync()
        return {"sample": (time.perf_counter() - start) / n}

    def run_parts() -> dict[str, Any]:
        return {"parts": time_parts(student, prompts, bs)}

    def run_stock() -> dict[str, Any]:
        return {"stock": time_stock(pipe, prompts, bs, steps, kwargs, student.device) / n}

    tasks = [run_generate, run_sample, run_parts] + ([run_stock] if pipe is not None else [])
    for round_ in range(args.warmup + args.repeats):
        shift = round_ % len(tasks)  # each measurement takes each place in the order in turn
        got: dict[str, Any] = {}
        for task in tasks[shift:] + tasks[:shift]:
            got.update(task())
        if round_ >= args.warmup:
            for key, value in got.items():
                results[key].append(value)
    median = statistics.median
    gen = median(results["generate"])
    part = {k: median(r[k] for r in results["parts"]) / n for k in results["parts"][0]}
    parts = sum(part.values())
    stock = median(results["stock"]) if results["stock"] else None
    rows = {"senseflow generate": gen, "sum of parts": parts, "stock pipeline": stock}
    print(
        f"\n{run} on {student.device} ({student.dtype}, {torch.get_num_threads()} threads): {n} images, "
        f"batch {bs}, K = {steps}, median of {args.repeats} after {args.warmup} warm-up; load average "
        f"{os.getloadavg()[0]:.2f} at the end\n"
    )
    print(table(rows, parts))
    print(
        f"\nparts per image: text {part['text']:.4f} s, {steps} forwards {part['denoise']:.4f} s, "
        f"decode {part['decode']:.4f} s"
    )
    print(f"overhead generate / sum of parts: {gen / parts:.3f} (target <= {TARGET})")
    sample = median(results["sample"])
    print(
        f"Student.sample on the same batches, without PNG files: {sample:.4f} s/image "
        f"({sample / parts:.3f} of the sum of parts)"
    )
    i = results["generate"].index(sorted(results["generate"])[(len(results["generate"]) - 1) // 2])
    stage_timer = StageTimer(student.device)
    stage_timer.seconds = results["stages"][i]
    summary = stage_timer.summary(n, gen * n, {**STAGES, **WRITE_STAGE})
    print(f"\ngenerate's own stages (the round nearest the median):\n{summary}")
    return {"rows": rows, "parts": part, "overhead": gen / parts, "sample": sample, "steps": steps}


if __name__ == "__main__":
    main()
