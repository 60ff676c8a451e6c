"""The commands around training take the language-model families like any other: ``senseflow generate``
writes the student's images of a run, and ``senseflow eval``'s student and teacher sources make images
of a run and of a recipe's teacher (the FID-T reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from senseflow.cli import main
from senseflow.eval.config import ModelEntry
from senseflow.eval.sources import build_source
from senseflow.student import Student
from senseflow.train.trainer import Distiller
from tests.family_helpers import RECIPES, TEXT_LENGTH, family_cfg, write_image_dataset

FAMILIES = ["qwen_image", "flux2", "flux2_klein", "z_image"]
PROMPTS = ["a red cat", "a blue dog on green grass"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_and_the_eval_sources_take_the_family(tiny_folder, tmp_path, family):
    folder = tiny_folder(family, "a")
    run = tmp_path / "run"
    data = write_image_dataset(tmp_path / "data")
    Distiller(family_cfg(family, folder, data, run, "schedule.iterations=1"), progress=False).run()

    out = tmp_path / "images"
    args = ["generate", "--run", str(run), "--out", str(out), "--device", "cpu", "--quiet", "--seed", "5"]
    assert main([*args, *(a for p in PROMPTS for a in ("--prompt", p))]) == 0
    written = [np.asarray(Image.open(out / f"{i:05d}.png")) for i in range(len(PROMPTS))]
    expected = Student.from_run(run).sample(PROMPTS, [5, 6])
    quantised = ((expected.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    for image, reference in zip(written, quantised, strict=True):
        assert image.shape == (64, 64, 3)
        assert np.abs(image.astype(np.int16) - reference.astype(np.int16)).max() <= 1

    student = build_source(ModelEntry(name="student", kind="student", path=str(run)))
    torch.testing.assert_close(student.generate(PROMPTS, [5, 6]), expected, rtol=1e-5, atol=1e-5)

    recipe = tmp_path / "recipe.yaml"
    length = TEXT_LENGTH.get(family, 8)
    recipe.write_text(
        f"base: {RECIPES[family]}\nmodel:\n  teacher: {folder}\n  max_sequence_length: {length}\n"
        "data:\n  resolution: 64\nprecision:\n  teacher_dtype: fp32\n"
    )
    entry = ModelEntry(name="teacher", kind="teacher", path=str(recipe), steps=2, guidance=2.0)
    teacher = build_source(entry)
    images = teacher.generate(PROMPTS, [1, 2])
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    assert teacher.identity()["family"] == family
