"""The teacher shipped in the package loads through the production path and draws the prompted colours."""

import numpy as np
import yaml

from senseflow.families.toy.folder import shipped_teacher_path
from senseflow.families.toy.pipeline import ToyTeacher
from senseflow.families.toy.world import all_objects
from senseflow.metrics.shapes.evaluator import evaluate, to_uint8

# The shipped teacher finds 12/12 prompted colours on these prompts at 20 steps (measured); the floor
# sits well under that, so the test catches a broken file or loader, not sampling noise.
COLOUR_FLOOR = 0.75


def test_shipped_teacher_layout_and_recipe():
    folder = shipped_teacher_path()
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    for required in (
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "scheduler/scheduler_config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "recipe.yaml",
        "train_summary.json",
    ):
        assert required in files
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    assert recipe["sampling"]["steps"] >= 1


def test_shipped_teacher_draws_prompted_colours():
    teacher = ToyTeacher()
    prompts = [o.phrase() for o in all_objects()][::3]  # 12 one-object prompts, every colour
    images = to_uint8(teacher.sample(prompts, list(range(len(prompts))), steps=20))
    assert images.shape == (len(prompts), 32, 32, 3)
    result = evaluate(images, prompts)["overall"]
    assert result["colour"] >= COLOUR_FLOOR, result
    assert np.isfinite(images.astype(float)).all()
