"""Memory of the VFM discriminator per DINOv2 size and input side: computed and measured.

Computed (every size): the frozen backbone's and the trained heads' parameters (built on the meta
device from DINOv2's published configs and the head layout of ``senseflow.models.vfm``), and the
activations one judged image keeps for the backward pass: per transformer block about
``ACTS_PER_TOKEN`` floats per token and channel without block checkpointing (attention scores
counted separately), one block's worth with it.

Measured (small sizes, on this machine's CPU): the peak resident memory of one discriminator
forward + backward on a batch of 2, in a fresh process per case, minus the process's memory after
building the discriminator (so weights are excluded).

    python benchmarks/vfm_memory.py                 # computed table for S/B/L/g at 224, 518, 1024 px
    python benchmarks/vfm_memory.py --measure       # plus measured CPU peaks for ViT-S and ViT-B
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import Dinov2Config, Dinov2Model

from senseflow.models.vfm import VFMHead

GIB = 1024**3
PATCH = 14
# (hidden, layers, heads, intermediate, feature blocks as the official ViT-L hooks scaled to depth)
SIZES = {
    "S": (384, 12, 6, 1536, [2, 5, 8, 11]),
    "B": (768, 12, 12, 3072, [2, 5, 8, 11]),
    "L": (1024, 24, 16, 4096, [2, 5, 8, 10, 14, 19, 23]),
    "g": (1536, 40, 24, 6144, [4, 9, 14, 18, 24, 32, 39]),
}
SIDES = (224, 518, 1024)
TEXT_DIM = 768
ACTS_PER_TOKEN = 16  # floats kept per token and channel by one ViT block (norms, qkv, MLP in/out)


def config(size: str) -> Dinov2Config:
    hidden, layers, heads, inter, _ = SIZES[size]
    return Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        patch_size=PATCH,
        image_size=518,
        use_swiglu_ffn=size == "g",
    )


def params(size: str) -> tuple[int, int]:
    with init_empty_weights():
        backbone = Dinov2Model(config(size))
        head = VFMHead(SIZES[size][0], TEXT_DIM)
    maps = len(SIZES[size][4]) + 1
    return sum(p.numel() for p in backbone.parameters()), maps * sum(p.numel() for p in head.parameters())


def activations_gib(size: str, side: int, checkpointing: bool) -> float:
    hidden, _, heads, _, blocks = SIZES[size]
    tokens = (side // PATCH) ** 2 + 1
    depth = max(blocks) + 1
    per_block = tokens * hidden * ACTS_PER_TOKEN + heads * tokens * tokens  # + attention scores
    kept = per_block if checkpointing else per_block * depth
    return kept * 4 / GIB  # float32, one image


def measure_case(size: str, side: int) -> float:
    """Peak resident GiB of one forward + backward (batch 2) beyond the built discriminator."""
    from senseflow.config.method import GANConfig
    from senseflow.families.tiny_vfm import write_tiny_clip
    from senseflow.models.vfm import build_vfm

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "dino"
        Dinov2Model(config(size)).save_pretrained(folder)
        clip = write_tiny_clip(Path(tmp) / "clip")
        gan = GANConfig(
            type="vfm",
            weight=1.0,
            time_weight="alpha_sq",
            backbone=str(folder),
            text_encoder=str(clip),
            feature_blocks=SIZES[size][4],
            backbone_checkpointing=False,
        )
        disc = build_vfm(gan, None, None)
        x = (torch.rand(2, 3, side, side) * 2 - 1).requires_grad_(True)
        cond = disc.conditioning(["a", "b"], None, lambda: torch.rand(2, 3, side, side) * 2 - 1)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        disc(x, cond).mean().backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak - base) * 1024 / GIB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="also measure ViT-S and ViT-B on the CPU")
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)  # SIZE SIDE: one measurement, JSON out
    args = parser.parse_args()
    if args.case:
        print(json.dumps({"gib": measure_case(args.case[0], int(args.case[1]))}))
        return
    print(
        "| DINOv2 | backbone params | heads params (trained) | side | grid | activations / image, "
        "no checkpointing | with block checkpointing |"
    )
    print("|---|---|---|---|---|---|---|")
    for size in SIZES:
        backbone, heads = params(size)
        for side in SIDES:
            grid = side // PATCH
            plain, ckpt = activations_gib(size, side, False), activations_gib(size, side, True)
            print(
                f"| ViT-{size} | {backbone / 1e6:.0f} M | {heads / 1e6:.0f} M | {side} | {grid}x{grid} "
                f"| {plain:.2f} GiB | {ckpt:.2f} GiB |"
            )
    if args.measure:
        print("\n| measured on CPU (batch 2, fp32, no checkpointing) | side | peak beyond weights |")
        print("|---|---|---|")
        for size, side in (("S", 224), ("S", 448), ("B", 224)):
            out = subprocess.run(
                [sys.executable, __file__, "--case", size, str(side)],
                capture_output=True,
                text=True,
                check=True,
            )
            gib = json.loads(out.stdout.strip().splitlines()[-1])["gib"]
            print(f"| ViT-{size} | {side} | {gib:.2f} GiB |")


if __name__ == "__main__":
    main()
