"""Stock pipeline on an exported folder vs senseflow's sampler, on both tiny folders of every family.

Trains a 2-iteration student per tiny folder, exports it (`--format diffusers`, fp32) for each
sampler, runs the stock pipeline with the card's call from fixed latents and noise, and prints the
relative error of the final latents and images against senseflow's chain fed the same noise (the
comparison of `tests/test_export.py`), and the plain call's largest distance from the anchors.

    python benchmarks/export_parity.py --out /tmp/export_parity
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.family_helpers import RESOLUTION, family_cfg, write_image_dataset
from tests.test_export import _fresh, _relative, export, senseflow_chain, stock_chain

from senseflow.families.tiny import tiny_variants, write_tiny_teacher
from senseflow.student import Student
from senseflow.train.trainer import Distiller

NOISE_SEED = 5


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/export_parity")
    root = Path(parser.parse_args(argv).out)
    data = write_image_dataset(root / "data")
    print("| family | folder | sampler | latents rel. error | images rel. error | plain call's max Δσ / Δt |")
    print("|---|---|---|---|---|---|")
    for family in ("sdxl", "sd3", "flux"):
        for variant in tiny_variants(family):
            run = root / f"{family}-{variant}"
            if not run.exists():
                folder = write_tiny_teacher(root / f"teacher-{family}-{variant}", family, variant)
                Distiller(family_cfg(family, folder, data, run), progress=False).run()
            student = Student.from_run(run)
            side = RESOLUTION // student.adapter.vae_scale_factor
            shape = (2, student.adapter.latent_channels, side, side)
            latents = torch.randn(shape, generator=torch.Generator().manual_seed(0))
            for mode in ("renoise", "euler"):
                out = root / f"export-{family}-{variant}-{mode}"
                shutil.rmtree(out, ignore_errors=True)
                manifest = export(run, out, "--sampler", mode, "--no-samples")
                call = {"num_inference_steps": manifest["num_inference_steps"], **manifest["call"]}
                final, images = stock_chain(family, out, latents, call, NOISE_SEED)
                x0, ours = senseflow_chain(student, latents, mode, _fresh(family, NOISE_SEED, mode))
                print(
                    f"| {family} | {variant} | {mode} | {_relative(final, x0):.2e} | "
                    f"{_relative(images, ours):.2e} | {manifest['default_walk_max_difference']:.2e} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
