"""``senseflow generate``: images from a distilled student for a prompt file, with fixed seeds.

``--run`` is a run folder (its newest checkpoint, or ``--checkpoint``) or a folder written by
``senseflow export --format diffusers`` (recognised by its ``senseflow/export.json``). Every argument
is checked before the student loads. An ``--out`` that holds an earlier run's images is refused unless
``--overwrite`` is given, which removes only what ``generate`` writes (``NNNNN.png``, ``grid.png``,
``index.jsonl``), once the student has loaded; other files in the folder are kept.

Where the time goes and what each switch changes:

* prompts are sampled ``--batch-size`` at a time; an image depends only on its (prompt, seed), its
  batch changing it by float rounding alone;
* ``--dtype`` casts the generator's weights (``auto``: bf16 on CUDA, fp32 on the CPU; see
  :mod:`senseflow.student`); the chain's arithmetic and the VAE stay in float32;
* the VAE decodes ``--decode-batch-size`` images at once; ``--vae-tiling`` / ``--vae-slicing``
  bound its memory at high resolution (diffusers' ``enable_tiling`` / ``enable_slicing``);
* ``--compile`` runs the generator through ``torch.compile``;
* prompts the run's offline text cache holds (``model.text_cache``) are read, not encoded;
* PNGs are written by writer threads while the next batch is sampled.

At the end a table gives each stage's time (text encoding, network forwards, VAE decode, waiting for
the writers) per image.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from senseflow import inputs
from senseflow.data.index import read_prompt_list
from senseflow.errors import UsageError
from senseflow.metrics.image_io import quantise
from senseflow.student import SAMPLERS, STAGES, StageTimer, Student, is_export
from senseflow.train.run_folder import checkpoint_folder, run_folder
from senseflow.viz import image_grid

DEFAULT_BATCH_SIZE = 8  # prompts per batch; activations grow with it, so lower it when a GPU runs out
GRID_COLUMNS = 8
GRID_IMAGES = 64  # grid.png previews the first images only (a grid of thousands would be GBs)
GRID_CELL = 128  # grid cells are about this many pixels: small images scaled up, large ones down
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
WRITE_STAGE = {"write": "waiting for PNG writes"}
WRITER_THREADS = 4  # PNG encoding mostly runs outside the GIL, so writers overlap with sampling
IN_FLIGHT_BATCHES = 2  # batches being written while the next is sampled
GRID_COMPRESSION = 1  # zlib level of the preview grid: lossless at any level, 1 about twice as fast as 6
OUTPUT_IMAGE = re.compile(r"^\d{5,}\.png$")  # the images' names, f"{index:05d}.png"
GRID_FILE = "grid.png"
INDEX_FILE = "index.jsonl"


def load_student(run: str | Path, checkpoint: str | None = None, device: str = "auto", dtype: str = "auto"):
    """A run's student (its newest checkpoint, or ``checkpoint``) or an exported folder's."""
    if is_export(run):
        if checkpoint:
            raise ValueError(f"--checkpoint: {run} is an exported folder, which holds one network; drop it")
        return Student.from_export(run, device=device, dtype=dtype)
    return Student.from_run(run, checkpoint, device=device, dtype=dtype)


def _has_cxx() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "clang++") if c)


def configure(
    student: Student,
    decode_batch_size: int | None = None,
    vae_tiling: bool = False,
    vae_slicing: bool = False,
    compile: bool = False,
) -> None:
    """Apply the speed switches, with one error naming the flag for each the student cannot take."""
    if decode_batch_size is not None:
        if decode_batch_size < 1:
            raise ValueError(f"--decode-batch-size: must be at least 1, got {decode_batch_size}")
        student.decode_batch_size = decode_batch_size
    for flag, wanted, method in (
        ("--vae-tiling", vae_tiling, "enable_tiling"),
        ("--vae-slicing", vae_slicing, "enable_slicing"),
    ):
        if not wanted:
            continue
        vae = student.vae
        if vae is None:
            raise ValueError(
                f"{flag}: the {student.cfg.model.family} family has no diffusers VAE (it samples in pixel "
                "space); drop the flag"
            )
        if not hasattr(vae, method):
            raise ValueError(f"{flag}: this family's VAE ({type(vae).__name__}) has no {method}; drop it")
        getattr(vae, method)()
    if compile:
        if student.device.type == "cpu" and not _has_cxx():
            raise ValueError(
                "--compile: torch.compile on the CPU builds C++ kernels and no C++ compiler was found "
                "(set CXX or install g++); drop --compile to sample in eager mode"
            )
        student.compile()


def _write_png(image: Tensor, path: Path) -> np.ndarray:
    """Quantise and save one image (in a writer thread); the uint8 image, for the grid."""
    pixels = quantise(image, rule="round")
    Image.fromarray(pixels).save(path)
    return pixels


def _finish(futures: list[Future]) -> None:
    """Wait for writes, raising the first one's error."""
    for f in futures:
        f.result()


def _write_grid(images: list[Future], path: Path) -> Path:
    """``grid.png`` from the first images' writes, in cells of about ``GRID_CELL`` pixels; the grid is a
    preview, so it is compressed fast rather than small."""
    pixels = np.stack([f.result() for f in images])
    side = pixels.shape[1]
    scale = max(1, GRID_CELL // side)
    if side > GRID_CELL:
        factor = -(-side // GRID_CELL)
        pixels = np.stack([np.asarray(Image.fromarray(im).reduce(factor)) for im in pixels])
    image_grid(pixels, ncols=GRID_COLUMNS, scale=scale).save(path, compress_level=GRID_COMPRESSION)
    return path


def generate(
    student: Student,
    prompts: list[str],
    seed: int,
    sampler: str | None,
    out_dir: Path,
    batch_size: int = DEFAULT_BATCH_SIZE,
    timer: StageTimer | None = None,
    progress: bool = False,
) -> Path:
    """Write ``NNNNN.png`` per prompt (seed = seed + index), ``index.jsonl`` and ``grid.png`` (the first
    ``GRID_IMAGES``). ``sampler`` None: the student's default (an export's, else renoise).

    Quantising and PNG encoding run in writer threads while the next batch is sampled (Pillow's
    encoder does not hold the GIL while it compresses); at most two batches are in flight, which bounds
    host memory."""
    if not prompts:
        raise ValueError("no prompts to generate")
    if batch_size < 1:
        raise ValueError(f"--batch-size: must be at least 1, got {batch_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    sampler = sampler or student.default_sampler
    seeds = [seed + i for i in range(len(prompts))]
    wait = timer.stage if timer is not None else (lambda _name: nullcontext())
    first: list[Future] = []  # the grid's images
    in_flight: deque[list[Future]] = deque()
    with ThreadPoolExecutor(WRITER_THREADS) as writers, (out_dir / INDEX_FILE).open("w") as index:
        grid = None
        for start, batch in student.batches(prompts, seeds, sampler, batch_size, timer, progress):
            if len(in_flight) == IN_FLIGHT_BATCHES:
                with wait("write"):
                    _finish(in_flight.popleft())
            names = [f"{start + i:05d}.png" for i in range(len(batch))]
            futures = [writers.submit(_write_png, batch[i], out_dir / n) for i, n in enumerate(names)]
            in_flight.append(futures)
            first.extend(futures[: GRID_IMAGES - len(first)])
            if grid is None and len(first) == min(GRID_IMAGES, len(prompts)):
                grid = writers.submit(_write_grid, first, out_dir / GRID_FILE)
            for i, name in enumerate(names, start):
                record = {"file": name, "prompt": prompts[i], "seed": seeds[i], "sampler": sampler}
                index.write(json.dumps(record) + "\n")
        with wait("write"):
            _finish([f for futures in in_flight for f in futures])
            return grid.result()


def earlier_outputs(out: Path) -> list[Path]:
    """The files an earlier ``generate`` wrote into ``out`` (``NNNNN.png``, ``grid.png``,
    ``index.jsonl``): what ``--overwrite`` removes. Any other file is the user's and is kept."""
    if not out.is_dir():
        return []
    return sorted(
        p
        for p in out.iterdir()
        if p.is_file() and (OUTPUT_IMAGE.match(p.name) or p.name in (GRID_FILE, INDEX_FILE))
    )


def check_out(out: Path, overwrite: bool) -> list[Path]:
    """Refuse an ``--out`` that is a file or holds an earlier run's images (unless ``overwrite``);
    the earlier outputs to remove before writing."""
    inputs.output_folder(out, "--out")
    earlier = earlier_outputs(out)
    if earlier and not overwrite:
        raise UsageError(
            f"the output folder holds images from an earlier run (--out {out}: {len(earlier)} files such as "
            f"{earlier[0].name}): pass --overwrite to replace them (other files are kept), or choose "
            "another --out"
        )
    return earlier


def check_args(args: argparse.Namespace) -> list[str]:
    """Every argument checked before the student loads; the prompts."""
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: must be at least 1, got {args.batch_size}")
    if args.decode_batch_size is not None and args.decode_batch_size < 1:
        raise ValueError(f"--decode-batch-size: must be at least 1, got {args.decode_batch_size}")
    prompts = inputs.check_prompts(list(args.prompt or []), "--prompt", "on the command line")
    if args.prompts:
        prompts += read_prompt_list(Path(args.prompts), "--prompts")
    if not prompts:
        raise UsageError(
            "no prompts (--prompt, --prompts): give --prompt TEXT (repeatable) or --prompts FILE"
        )
    inputs.seed(args.seed, "--seed", len(prompts))
    inputs.device(args.device, "--device")
    run = run_folder(args.run, "--run")
    if args.checkpoint and is_export(run):
        raise UsageError(
            f"an exported folder holds one network (--checkpoint {args.checkpoint}): drop --checkpoint "
            f"to sample the export in {run}"
        )
    if args.checkpoint:
        checkpoint_folder(args.checkpoint, "--checkpoint")
    return prompts


def cmd_generate(args: argparse.Namespace) -> None:
    prompts = check_args(args)
    out = Path(args.out)
    earlier = check_out(out, args.overwrite)
    student = load_student(args.run, args.checkpoint, device=args.device, dtype=args.dtype)
    configure(student, args.decode_batch_size, args.vae_tiling, args.vae_slicing, args.compile)
    for path in earlier:  # only now: a student that fails to load leaves the earlier images alone
        path.unlink()
    timer = StageTimer(student.device)
    start = time.perf_counter()
    grid = generate(student, prompts, args.seed, args.sampler, out, args.batch_size, timer, not args.quiet)
    total = time.perf_counter() - start
    print(f"{len(prompts)} images written to {args.out} (grid: {grid}) in {total:.2f} s")
    if not args.quiet:
        print(f"prompts: {student.text_source}; dtype {student.dtype}; batch {args.batch_size}")
        print(timer.summary(len(prompts), total, labels={**STAGES, **WRITE_STAGE}))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="images from a distilled student with fixed seeds")
    p.add_argument(
        "--run",
        required=True,
        help="run folder written by `senseflow train`, or a folder written by `senseflow export` "
        "(one holding senseflow/export.json)",
    )
    p.add_argument("--checkpoint", help="a checkpoint folder of the run (default: the run's newest)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts", help="file with one prompt per line")
    p.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default=None,
        help="the few-step chain (default: an export's own, else renoise)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i")
    p.add_argument(
        "--out",
        default="runs/generated",
        help="output folder; one that holds an earlier run's images is refused unless --overwrite",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the images, grid.png and index.jsonl of an earlier run in --out (other files stay)",
    )
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"prompts sampled together (default {DEFAULT_BATCH_SIZE}); images do not depend on it "
        "beyond float rounding",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="the generator's compute dtype (default auto: bf16 on CUDA, fp32 on the CPU); its weights "
        "are cast, the VAE stays in fp32",
    )
    p.add_argument(
        "--decode-batch-size",
        type=int,
        default=None,
        help="images the VAE decodes at once (default: the recipe's model.decode_chunk)",
    )
    p.add_argument(
        "--vae-tiling",
        action="store_true",
        help="decode in overlapping tiles (diffusers' enable_tiling): bounded memory at high resolution",
    )
    p.add_argument(
        "--vae-slicing",
        action="store_true",
        help="decode one image at a time (diffusers' enable_slicing)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the generator (the first batch compiles: minutes, longer on a CPU)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar and no timing table")
    p.set_defaults(func=cmd_generate)
