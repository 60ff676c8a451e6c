"""``senseflow export``: a trained student as a diffusers pipeline, a LoRA or single-file checkpoints.

Every format is written into a staging folder beside ``DIR`` and renamed to ``DIR`` once complete,
so an interrupted export never leaves a folder that looks finished; a non-empty ``DIR`` is replaced only with
``--overwrite`` (and then only after the new folder is complete).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from senseflow.devices import to_dtype
from senseflow.errors import UsageError
from senseflow.eval.record import markdown_table
from senseflow.export.card import CardInfo, model_card
from senseflow.export.formats import WRITERS, ExportJob, noise_note
from senseflow.export.pipeline_folder import diffusers_adapter, sampler_for
from senseflow.inputs import at_least, device, output_folder, read_text
from senseflow.metrics.image_io import quantise
from senseflow.student import Student
from senseflow.train import checkpoint as ckpt
from senseflow.train.checkpoint_layout import checkpoint_name
from senseflow.train.run_folder import run_folder
from senseflow.viz import image_grid, save_image

FORMATS = ("diffusers", "lora", "single-file")
DTYPES = ("bf16", "fp16", "fp32")
SAMPLES_FILE = "samples.png"
SAMPLE_COLUMNS = 4


@contextlib.contextmanager
def staged(out: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh staging folder beside ``out`` (``out.partial-*``), renamed to ``out`` when the block
    completes; the previous ``out`` is moved aside and removed only after that rename."""
    if (out.exists() or out.is_symlink()) and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"--out {out} is not empty; choose another folder or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left to look like an export
        raise
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
        aside = old / out.name
        out.rename(aside)
        tmp.rename(out)
        shutil.rmtree(old)  # a file, a folder or a link inside it; a link's target is left alone
    else:
        tmp.rename(out)


def _checkpoint(run: Path, step: int | None) -> Path | None:
    if step is None:
        return None
    path = run / "checkpoints" / checkpoint_name(step)
    if not path.is_dir():
        have = (
            sorted(p.name for p in (run / "checkpoints").glob("step-*"))
            if (run / "checkpoints").is_dir()
            else []
        )
        raise FileNotFoundError(
            f"--step {step}: no checkpoint {path} (the run has: {', '.join(have) or 'none'})"
        )
    return path


def _eval_table(path: str | None) -> str | None:
    """The table of ``senseflow eval`` records: one record file, or an eval output folder."""
    if path is None:
        return None
    p = Path(path)
    files = sorted((p / "records").glob("*.json")) if p.is_dir() else [p]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"--eval {path}: expected a record .json or a folder with records/*.json")
    records = []
    for f in files:
        text = read_text(f, "--eval", "JSON")
        try:
            records.append(json.loads(text))
        except ValueError as exc:
            raise UsageError(
                f"not readable JSON (--eval {f}: {exc}): give a record written by `senseflow eval run`"
            ) from None
    try:  # the reference row first, as `senseflow eval` writes its tables
        references = {(r.get("reference") or {}).get("name") for r in records}
        records.sort(key=lambda r: r["model"]["name"] not in references)
        return markdown_table(records)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"--eval {path}: not a `senseflow eval` record ({exc!r} missing)") from None


def _samples(student: Student, out: Path, mode: str) -> str | None:
    """The card's grid, made with the sampler the exported scheduler reproduces."""
    prompts = list(student.cfg.logging.sample_prompts)
    if not prompts:
        return None
    seeds = list(range(len(prompts)))
    images = quantise(student.sample(prompts, seeds, mode=mode), rule="round")
    save_image(image_grid(images, ncols=min(SAMPLE_COLUMNS, len(prompts))), out / SAMPLES_FILE)
    return SAMPLES_FILE


def check_out(out: Path, overwrite: bool) -> None:
    """An ``--out`` that is a file, or a non-empty folder without ``overwrite``, is refused."""
    output_folder(out, "--out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(
            f"the output folder is not empty (--out {out}): choose another folder, or pass --overwrite to "
            "replace it once the export is complete"
        )


def export_run(args: argparse.Namespace) -> Path:
    run, out = run_folder(args.run, "run", exports=False), Path(args.out)
    checkpoint = _checkpoint(run, args.step)
    at_least(args.rank, 1, "--rank")
    device(args.device, "--device")
    check_out(out, args.overwrite)
    eval_table = _eval_table(args.eval)  # read now: a bad file is refused before the student loads
    student = Student.from_run(run, checkpoint, device=args.device)
    adapter = diffusers_adapter(student.adapter, "senseflow export")
    cfg, dtype = student.cfg, to_dtype(args.dtype, "--dtype")
    sampler = sampler_for(adapter, args.sampler, cfg.data.resolution)
    meta = ckpt.read_meta(student.checkpoint)
    step = int(meta.get("step", 0))
    summary = {
        **sampler.summary(),
        "call": {**adapter.student_call_kwargs(cfg.data.resolution), **sampler.call},
        "sampler_mode": args.sampler,
        "run": str(run.resolve()),
        "step": step,
        "generator_sha256": ckpt.network_sha256(student.checkpoint, "generator"),
        "recipe": cfg.name,
        "format": args.format,
        "dtype": args.dtype,
    }
    with staged(out, args.overwrite) as tmp:
        job = ExportJob(
            student,
            adapter,
            sampler,
            tmp,
            args.out,
            dtype,
            args.dtype,
            summary,
            args.rank,
            args.target_modules,
        )
        load_code = WRITERS[args.format](job)
        job.notes.extend(noise_note(sampler))
        info = CardInfo(
            title=f"{cfg.name}: {sampler.steps}-step student ({args.format})",
            fmt=args.format,
            teacher=cfg.model.teacher,
            teacher_folder=adapter.folder.path,
            pipeline_class=adapter.folder.index.get("_class_name", adapter.PIPELINE),
            sampler=sampler,
            call_kwargs=summary["call"],
            load_code=load_code,
            recipe_name=cfg.name,
            step=step,
            checkpoint_sha256=summary["generator_sha256"],
            dtype=args.dtype,
            notes=job.notes,
            training=_training(cfg),
            eval_table=eval_table,
            samples=None if args.no_samples else _samples(student, tmp, args.sampler),
        )
        (tmp / "README.md").write_text(model_card(info), encoding="utf-8")
    return out


def _training(cfg: Any) -> dict[str, Any]:
    m = cfg.method
    return {
        "iterations": cfg.schedule.iterations,
        "resolution": cfg.data.resolution,
        "batch_size": cfg.data.batch_size,
        "lora": None
        if cfg.model.lora is None
        else {"rank": cfg.model.lora.rank, "alpha": cfg.model.lora.alpha},
        "ida": m.ida.enabled,
        "isg_weight": m.isg.weight,
        "gan": m.gan.type,
        "backward_sim_prob": m.backward_sim_prob,
    }


def cmd_export(args: argparse.Namespace) -> None:
    out = export_run(args)
    print(f"exported ({args.format}) to {out}")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="write a student as a diffusers pipeline, a LoRA or a single-file checkpoint"
    )
    p.add_argument("run", help="run folder written by `senseflow train`")
    p.add_argument("--step", type=int, help="the checkpoint of this iteration (default: the newest)")
    p.add_argument("--format", choices=FORMATS, default="diffusers")
    p.add_argument("--out", required=True, help="output folder (must be empty unless --overwrite)")
    p.add_argument(
        "--sampler",
        choices=("renoise", "euler"),
        default="renoise",
        help="the few-step chain the scheduler reproduces (renoise: x̂0 then fresh noise; "
        "euler: deterministic steps)",
    )
    p.add_argument(
        "--dtype", choices=DTYPES, default="bf16", help="dtype of the written weights (default bf16)"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --out once the export is complete"
    )
    p.add_argument(
        "--rank", type=int, help="--format lora of a fully fine-tuned run: the extracted LoRA's rank"
    )
    p.add_argument(
        "--target-modules",
        nargs="+",
        help="--format lora extraction: the layers the LoRA covers (default: model.lora's default targets)",
    )
    p.add_argument("--eval", help="a `senseflow eval` output folder (or one record .json) for the model card")
    p.add_argument("--no-samples", action="store_true", help="skip the model card's sample grid")
    p.add_argument("--device", default="cpu", help="where the student is loaded (cpu, cuda, cuda:N, auto)")
    p.set_defaults(func=cmd_export)
