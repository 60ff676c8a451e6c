"""One prepared GPU check: a FLUX-width transformer distilled at 1024 px, full fine-tune and LoRA mode.

For each mode it runs the real trainer (``Distiller.train_step``, the ``flux_dev`` recipe) on a
random-init FLUX.1-dev-width transformer (3072 wide, 24 heads of 128, the published rotary axes; the
depth reduced to two settings, stated in the table) and prints, per mode and depth: the mean time of
one iteration over a whole TTUR cycle (one generator turn, ``ttur_ratio - 1`` fake-score turns), the
peak GPU memory, the FLOPs executed (``torch.utils.flop_counter``, recompute included) and the MFU
against ``--peak-tflops``; beside them the memory ``senseflow plan`` predicts for the same folder;
and the two depths extrapolated linearly to FLUX's 19 double + 38 single blocks (one single block
counted as half a double one), next to the planner's prediction for a config-only folder of full
depth.

What differs from a real FLUX.1-dev run, on purpose: random weights; tiny text encoders (their widths
only size the two context-embedding layers; the 512 text tokens are FLUX.1-dev's); no discriminator
(``gan.type none``, prompts only); torch AdamW instead of 8-bit AdamW (bitsandbytes is not assumed).

    python benchmarks/gpu_check.py                       # on the GPU: writes the folders, prints the table
    python benchmarks/gpu_check.py --small --device cpu  # the same path at a tiny width (a test runs it)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from senseflow.config import load_config
from senseflow.families.tiny import write_tiny_teacher

FULL_DEPTH = (19, 38)  # FLUX.1-dev's double- and single-stream blocks
DEPTHS = ((1, 2), (2, 4))
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM


def flux_transformer_config(double: int, single: int, small: bool) -> dict:
    heads, head_dim, axes = (2, 16, (4, 6, 6)) if small else (24, 128, (16, 56, 56))
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": 64,  # 16 latent channels, packed 2x2
        "num_layers": double,
        "num_single_layers": single,
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": 32,  # the tiny T5's width
        "pooled_projection_dim": 32,  # the tiny CLIP's width
        "guidance_embeds": True,
        "axes_dims_rope": list(axes),
    }


def write_folder(folder: Path, double: int, single: int, small: bool, weights: bool, device: str) -> Path:
    """The tiny FLUX folder with the transformer, VAE and scheduler replaced by FLUX-sized ones
    (``weights=False``: configs only, for the planner)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    write_tiny_teacher(folder, "flux", "a")
    FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        base_shift=0.5,
        max_shift=1.15,
    ).save_pretrained(folder / "scheduler")
    widths = (8, 16, 16, 16) if small else (128, 256, 512, 512)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=widths,
        layers_per_block=1 if small else 2,
        norm_num_groups=8 if small else 32,
        latent_channels=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    vae.save_pretrained(folder / "vae")
    config = flux_transformer_config(double, single, small)
    target = folder / "transformer"
    for old in target.glob("*.safetensors*"):
        old.unlink()
    if not weights:
        (target / "config.json").write_text(json.dumps(config, indent=2))
        return folder
    with torch.device(device):
        net = FluxTransformer2DModel.from_config(config).to(torch.bfloat16)
    net.save_pretrained(target, safe_serialization=True)
    return folder


def recipe(folder: Path, prompts: Path, mode: str, resolution: int, device: str, lora_rank: int, small: bool):
    overrides = [
        f"model.teacher={folder}",
        "model.max_sequence_length=512",
        "data.kind=prompts",
        f"data.path={prompts}",
        f"data.resolution={resolution}",
        "data.batch_size=1",
        "data.num_workers=0",
        "method.backward_sim_prob=1.0",
        "method.gan.type=none",
        "optim.generator.name=adamw",
        "optim.fake.name=adamw",
        "optim.discriminator.name=adamw",
        "parallel.strategy=none",
        f"parallel.device={device}",
        "logging.every=1000000",
        "logging.sample_every=null",
        "logging.tensorboard=false",
        "schedule.iterations=1000000",
    ]
    if small:  # the CPU check: float32 (bf16 matmuls are slow on CPUs), 16 text tokens, shorter cycles
        overrides += [
            "precision.param_dtype=fp32",
            "precision.teacher_dtype=fp32",
            "precision.autocast_dtype=fp32",
        ]
        overrides += ["model.max_sequence_length=16", "method.ttur_ratio=2"]
    if mode == "lora":
        overrides.append(f"model.lora.rank={lora_rank}")
    return load_config("flux_dev", overrides)


def measure(cfg, cycles: int) -> dict:
    """Mean seconds per iteration over ``cycles`` TTUR cycles (after one untimed), the peak memory and
    the FLOPs of one cycle."""
    from torch.utils.flop_counter import FlopCounterMode

    from senseflow.train.trainer import Distiller

    cuda = cfg.parallel.device.startswith("cuda")
    run = Distiller(cfg, progress=False)
    k = cfg.method.ttur_ratio
    for _ in range(k):  # warm-up cycle (allocator, kernels)
        run.train_step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(cycles * k):
        run.train_step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / (cycles * k)
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    counter = FlopCounterMode(display=False)
    with counter:
        for _ in range(k):
            run.train_step()
    del run
    if cuda:
        torch.cuda.empty_cache()
    return {"seconds": seconds, "peak_gib": peak / 2**30, "flops": counter.get_total_flops() / k}


def predicted_gib(cfg, strategy: str, gpu_memory: float) -> float:
    from senseflow.train.plan import plan

    lora_rank = cfg.model.lora.rank if cfg.model.lora is not None else 64
    full = cfg.model_copy(update={"model": cfg.model.model_copy(update={"lora": None})})
    return plan(full, gpus=1, gpu_memory=gpu_memory, lora_rank=lora_rank).strategy(strategy).total_gib


def units(double: int, single: int) -> float:
    return double + single / 2


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny width, fp32, 16 tokens, TTUR 2 (a CPU check)")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--cycles", type=int, default=2, help="timed TTUR cycles per setting")
    p.add_argument("--gpu-memory", type=float, default=None, help="GiB (default: the device's)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default by name)")
    p.add_argument("--lora-rank", type=int, default=64, help="LoRA mode's rank (<= 16 at the tiny width)")
    p.add_argument("--work", type=Path, default=None, help="folder for the written teachers")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    memory = args.gpu_memory or (torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 80.0)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    prompts = work / "prompts.txt"
    work.mkdir(parents=True, exist_ok=True)
    prompts.write_text("a photo of a red fox in the snow\nan astronaut riding a horse\n")
    print(f"device {name}; peak {peak} TFLOP/s; {memory:.0f} GiB; {args.resolution} px; work {work}")
    rows, measured = [], {}
    for double, single in DEPTHS:
        folder = write_folder(work / f"flux_{double}_{single}", double, single, args.small, True, args.device)
        for mode in ("full", "lora"):
            cfg = recipe(folder, prompts, mode, args.resolution, args.device, args.lora_rank, args.small)
            got = measure(cfg, args.cycles)
            got["planned_gib"] = predicted_gib(cfg, "none" if mode == "full" else "lora", memory)
            measured[mode, double, single] = got
            mfu = got["flops"] / got["seconds"] / (peak * 1e12) if peak else float("nan")
            rows.append(
                (mode, f"{double}+{single}", got["seconds"], got["peak_gib"], got["planned_gib"], mfu)
            )
    config_only = write_folder(work / "flux_full_configs", *FULL_DEPTH, args.small, False, args.device)
    for mode in ("full", "lora"):
        (a, b) = (measured[mode, *d] for d in DEPTHS)
        slope = [
            (b[key] - a[key]) / (units(*DEPTHS[1]) - units(*DEPTHS[0])) for key in ("seconds", "peak_gib")
        ]
        extra = units(*FULL_DEPTH) - units(*DEPTHS[0])
        seconds, peak_gib = a["seconds"] + slope[0] * extra, a["peak_gib"] + slope[1] * extra
        cfg = recipe(config_only, prompts, mode, args.resolution, args.device, args.lora_rank, args.small)
        planned = predicted_gib(cfg, "none" if mode == "full" else "lora", memory)
        rows.append((mode, "19+38 (extrapolated)", seconds, peak_gib, planned, float("nan")))
    print()
    print(
        "| mode | double+single blocks | s / iteration | peak GiB (measured) | GiB (senseflow plan) | MFU |"
    )
    print("|---|---|---|---|---|---|")
    for mode, depth, seconds, peak_gib, planned, mfu in rows:
        mfu_text = "n/a" if mfu != mfu else f"{100 * mfu:.1f} %"
        peak_text = f"{peak_gib:.1f}" if cuda else "n/a (CPU)"
        print(f"| {mode} | {depth} | {seconds:.3f} | {peak_text} | {planned:.2f} | {mfu_text} |")


if __name__ == "__main__":
    main()
