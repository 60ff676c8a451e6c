"""The family-generic ``teacher`` image source: any family's teacher from a distillation recipe."""

from __future__ import annotations

import pytest
import torch

from senseflow.eval.config import ModelEntry
from senseflow.eval.sources import build_source
from senseflow.families.toy.pipeline import ToyTeacher


def _entry(tmp_path, teacher, **extra):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base: toy/distill\nmodel:\n  teacher: {teacher}\n")
    return ModelEntry(name="teacher", kind="teacher", path=str(recipe), **extra)


def test_teacher_source_equals_the_toy_teacher_sampler(tiny_teacher_dir, tmp_path):
    source = build_source(_entry(tmp_path, tiny_teacher_dir, steps=3, guidance=2.0))
    prompts, seeds = ["a small red circle", "a large blue square"], [4, 5]
    expected = ToyTeacher(tiny_teacher_dir).sample(prompts, seeds, steps=3, guidance=2.0)
    torch.testing.assert_close(source.generate(prompts, seeds), expected, rtol=0, atol=0)
    identity = source.identity()
    assert identity["family"] == "toy" and identity["nfe"] == 6 and identity["resolution"] == [32, 32]


def test_teacher_source_needs_steps_and_guidance(tiny_teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="'steps' and 'guidance'"):
        build_source(_entry(tmp_path, tiny_teacher_dir, steps=3))


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_teacher_source_of_a_real_family_equals_its_stock_pipeline(tiny_folder, tmp_path, family):
    """The FID-T reference set of a real family: the stock pipeline's images for the same noise."""
    from diffusers import FluxPipeline, StableDiffusionXLPipeline

    from senseflow.core.sampling import seeded_noise
    from senseflow.families.flux.adapter import pack

    folder = tiny_folder(family, "a")
    base = {"sdxl": "sdxl", "flux": "flux_dev"}[family]
    recipe = tmp_path / "recipe.yaml"
    lines = [f"base: {base}", "model:", f"  teacher: {folder}"]
    if family == "flux":
        lines.append("  max_sequence_length: 8")
    lines += ["data:", "  resolution: 64", "precision:", "  teacher_dtype: fp32"]
    recipe.write_text("\n".join(lines) + "\n")
    source = build_source(ModelEntry(name="teacher", kind="teacher", path=str(recipe), steps=3, guidance=4.0))
    prompts, seeds = ["a red cat", "a blue dog on grass"], [3, 9]
    ours = source.generate(prompts, seeds)
    noise = seeded_noise((4, 8, 8), seeds)
    pipe = {"sdxl": StableDiffusionXLPipeline, "flux": FluxPipeline}[family].from_pretrained(folder)
    kwargs = {"max_sequence_length": 8} if family == "flux" else {}
    latents = pack(noise) if family == "flux" else noise
    images = pipe(
        prompts,
        height=64,
        width=64,
        num_inference_steps=3,
        guidance_scale=4.0,
        latents=latents,
        output_type="pt",
        **kwargs,
    ).images
    torch.testing.assert_close(ours, (images * 2 - 1).clamp(-1, 1), rtol=1e-4, atol=1e-4)
