"""``senseflow teacher-sample``: the teacher through its adapter, as its stock pipeline samples it.

The network call is the one training makes (the family's adapter); the sampler is the folder's own
scheduler with the arguments the stock pipeline passes (``models.sampling.scheduler_sample``). With
the same prompts, latents, steps and guidance the result equals ``StableDiffusionXLPipeline``,
``StableDiffusion3Pipeline`` or ``FluxPipeline`` with ``output_type="latent"`` / ``"np"``: a check a
user runs before distilling, and the parity the tests assert.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from senseflow import inputs
from senseflow.config import load_config
from senseflow.config.registry import family_spec
from senseflow.core.sampling import seeded_noise
from senseflow.data.index import read_prompt_list
from senseflow.devices import resolve_device, to_dtype
from senseflow.errors import UsageError
from senseflow.models import FamilyAdapter, build_adapter
from senseflow.models.build import build_roles
from senseflow.models.sampling import scheduler_sample

#: The largest --height / --width, well above the 1024 to 2048 pixels the supported teachers sample at:
#: a larger value is a typo whose latents and attention alone would fill the memory.
MAX_SIDE = 4096


def adapter_for_teacher(
    family: str,
    teacher: str | Path,
    *,
    max_sequence_length: int | None = None,
    variant: str | None = None,
    dtype: str = "fp32",
) -> FamilyAdapter:
    """A family's adapter on a teacher folder, from the family's shipped recipe (no run needed); its
    text encoders in ``dtype``, like the teacher."""
    spec = family_spec(family)
    if spec is None or spec.recipe is None:
        raise ValueError(f"--family: '{family}' has no shipped recipe to sample its teacher with")
    overrides = [
        f"model.teacher={Path(teacher).expanduser().resolve()}",
        "model.revision=null",
        f"precision.teacher_dtype={dtype}",
    ]
    if max_sequence_length is not None:
        overrides.append(f"model.max_sequence_length={max_sequence_length}")
    if variant is not None:
        overrides.append(f"model.variant={variant}")
    adapter = build_adapter(load_config(spec.recipe, overrides))
    adapter.guidance_kind = adapter.folder_guidance_kind()  # as the stock pipeline guides this folder
    return adapter


def teacher_sample(
    adapter: FamilyAdapter,
    prompts: list[str],
    height: int,
    width: int,
    steps: int,
    guidance: float,
    latents: torch.Tensor | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """``latents`` (final, unpacked, before decoding) and ``images`` (decoded, [0, 1], NHWC)."""
    device = torch.device(device)
    adapter.to(device)
    net = build_roles(adapter, ("teacher",), dtype, dtype, device)["teacher"]
    shape = (adapter.latent_channels, *adapter.latent_size(height, width))
    if latents is None:
        latents = seeded_noise(shape, [seed + i for i in range(len(prompts))])
    elif tuple(latents.shape) != (len(prompts), *shape):
        raise ValueError(
            f"--latents: expected shape {(len(prompts), *shape)} (unpacked [B, C, h, w]) for "
            f"{len(prompts)} prompts at {height}x{width}, got {tuple(latents.shape)}"
        )
    latents = latents.to(device, torch.float32)
    cond = adapter.encode_prompts(prompts)
    final = scheduler_sample(adapter, net, cond, latents, steps, guidance, progress)
    with torch.no_grad():
        images = (adapter.decode_model(final) / 2 + 0.5).clamp(0, 1)
    return {"latents": final.float().cpu(), "images": images.permute(0, 2, 3, 1).float().cpu().contiguous()}


def read_latents(path: str) -> torch.Tensor:
    """The tensor ``latents`` of a safetensors file, or one error naming ``--latents``."""
    from safetensors import SafetensorError

    source = inputs.existing_file(path, "--latents")
    try:
        stored = load_file(str(source))
    except (SafetensorError, OSError) as exc:
        raise UsageError(
            f"not a safetensors file (--latents {source}: {exc}): give a file written by safetensors' "
            "save_file with a tensor 'latents'"
        ) from None
    if "latents" not in stored:
        raise ValueError(f"--latents: {source} holds no tensor named 'latents'")
    return stored["latents"]


def check_args(args: argparse.Namespace) -> list[str]:
    """Every argument checked before the teacher loads; the prompts."""
    for option in ("height", "width", "steps", "max_sequence_length"):
        inputs.at_least(getattr(args, option), 1, "--" + option.replace("_", "-"))
    for option in ("height", "width"):
        if getattr(args, option) > MAX_SIDE:
            raise UsageError(
                f"image too large (--{option} {getattr(args, option)}): the teachers sample at most "
                f"{MAX_SIDE} pixels a side"
            )
    inputs.finite(args.guidance, "--guidance", minimum=0)
    to_dtype(args.dtype, "--dtype")
    spec = family_spec(args.family)
    if spec is None or spec.recipe is None:
        raise ValueError(f"--family: '{args.family}' has no shipped recipe to sample its teacher with")
    inputs.existing_folder(args.teacher, "--teacher")
    prompts = read_prompt_list(Path(args.prompts), "--prompts")
    inputs.seed(args.seed, "--seed", len(prompts))
    inputs.device(args.device, "--device")
    inputs.output_file(args.out, "--out")
    return prompts


def cmd_teacher_sample(args: argparse.Namespace) -> None:
    prompts = check_args(args)
    latents = read_latents(args.latents) if args.latents else None
    adapter = adapter_for_teacher(
        args.family,
        args.teacher,
        max_sequence_length=args.max_sequence_length,
        variant=args.variant,
        dtype=args.dtype,
    )
    out = teacher_sample(
        adapter,
        prompts,
        args.height,
        args.width,
        args.steps,
        args.guidance,
        latents,
        args.seed,
        resolve_device(args.device, "--device"),
        to_dtype(args.dtype, "--dtype"),
        progress=True,
    )
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))
    print(f"{len(prompts)} samples of {args.family} ({args.steps} steps, guidance {args.guidance}) -> {path}")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "teacher-sample", help="sample a teacher folder through its adapter, as its stock pipeline does"
    )
    p.add_argument("--teacher", required=True, help="the teacher's diffusers folder")
    p.add_argument("--family", required=True, help="sdxl, sd3 or flux")
    p.add_argument("--prompts", required=True, help="file with one prompt per line")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--latents", help="safetensors file with a tensor 'latents' [B, C, h, w] (unpacked)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the first prompt (prompt i: seed+i)")
    p.add_argument("--max-sequence-length", type=int, help="T5 tokens (SD 3.5, FLUX); the pipeline's default")
    p.add_argument("--variant", help="weight-file variant of the folder, e.g. fp16")
    p.add_argument("--dtype", default="fp32", help="teacher weights' dtype (fp32, bf16, fp16)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", required=True, help="output safetensors: latents and images")
    p.set_defaults(func=cmd_teacher_sample)
