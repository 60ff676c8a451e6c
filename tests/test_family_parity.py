"""The adapters' teacher sampler equals the stock diffusers pipelines on tiny folders of every family.

``teacher-sample`` runs the network through the family's adapter (the call training makes) with the
folder's own scheduler; the stock pipelines with ``output_type="latent"`` and ``"np"`` are the
independent reference, on two folders per family with different configurations.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

from senseflow.cli import main
from senseflow.families.flux.adapter import pack, unpack
from senseflow.teacher_sample import adapter_for_teacher, teacher_sample

PIPELINES = {"sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
PROMPTS = ["a red cat on a mat", "two dogs on a beach at sunset"]
SIDE, STEPS = 64, 3
CASES = [(f, v) for f in PIPELINES for v in ("a", "b")]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _reference(family, folder, latents, guidance, **kwargs):
    pipe = PIPELINES[family].from_pretrained(folder)
    given = pack(latents) if family == "flux" else latents
    if family != "sdxl":
        kwargs["max_sequence_length"] = 8
    common = dict(height=SIDE, width=SIDE, num_inference_steps=STEPS, guidance_scale=guidance, **kwargs)
    final = pipe(PROMPTS, latents=given.clone(), output_type="latent", **common).images
    if family == "flux":
        final = unpack(final, *latents.shape[-2:])
    images = pipe(PROMPTS, latents=given.clone(), output_type="np", **common).images
    return final, torch.from_numpy(images)


@pytest.mark.parametrize(("family", "variant"), CASES, ids=[f"{f}-{v}" for f, v in CASES])
def test_teacher_sample_equals_the_stock_pipeline(tiny_folder, family, variant):
    folder = tiny_folder(family, variant)
    adapter = adapter_for_teacher(family, folder, max_sequence_length=None if family == "sdxl" else 8)
    side = SIDE // adapter.vae_scale_factor
    latents = torch.randn(
        len(PROMPTS), adapter.latent_channels, side, side, generator=torch.Generator().manual_seed(0)
    )
    ours = teacher_sample(adapter, PROMPTS, SIDE, SIDE, STEPS, 4.0, latents)
    final, images = _reference(family, folder, latents, 4.0)
    assert ours["latents"].shape == final.shape and ours["images"].shape == images.shape
    assert _relative(ours["latents"], final) < 1e-4
    assert _relative(ours["images"], images) < 1e-4
    assert ours["latents"].std() > 0 and ours["images"].std() > 0


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_guidance_changes_the_sample_as_in_the_pipeline(tiny_folder, family):
    """CFG (SDXL) or the guidance embedding (FLUX) at another scale: still the pipeline's result, and
    a different one (the guidance path is exercised, not skipped)."""
    folder = tiny_folder(family, "a")
    adapter = adapter_for_teacher(family, folder, max_sequence_length=None if family == "sdxl" else 8)
    side = SIDE // adapter.vae_scale_factor
    latents = torch.randn(2, adapter.latent_channels, side, side, generator=torch.Generator().manual_seed(1))
    low = teacher_sample(adapter, PROMPTS, SIDE, SIDE, STEPS, 1.5, latents)["latents"]
    high = teacher_sample(adapter, PROMPTS, SIDE, SIDE, STEPS, 7.0, latents)["latents"]
    final, _ = _reference(family, folder, latents, 7.0)
    assert _relative(high, final) < 1e-4
    assert _relative(low, high) > 1e-3


def test_teacher_sample_command_writes_latents_and_images(tiny_folder, tmp_path):
    folder = tiny_folder("sd3", "a")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    save_file({"latents": latents}, str(tmp_path / "latents.safetensors"))
    out = tmp_path / "out.safetensors"
    args = ["teacher-sample", "--teacher", str(folder), "--family", "sd3", "--prompts", str(prompts)]
    args += [
        "--height",
        "64",
        "--width",
        "64",
        "--steps",
        "2",
        "--guidance",
        "3",
        "--max-sequence-length",
        "8",
    ]
    assert (
        main(
            [*args, "--latents", str(tmp_path / "latents.safetensors"), "--out", str(out), "--device", "cpu"]
        )
        == 0
    )
    written = load_file(str(out))
    assert written["latents"].shape == (2, 4, 8, 8) and written["images"].shape == (2, 64, 64, 3)
    assert written["images"].min() >= 0 and written["images"].max() <= 1
    wrong = tmp_path / "wrong.safetensors"
    save_file({"latents": torch.zeros(2, 4, 4, 4)}, str(wrong))
    assert main([*args, "--latents", str(wrong), "--out", str(out), "--device", "cpu"]) == 2
