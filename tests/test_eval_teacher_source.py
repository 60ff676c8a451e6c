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
