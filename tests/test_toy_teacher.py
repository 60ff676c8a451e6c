import itertools
import json

import numpy as np
import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler

from senseflow.cli import main
from senseflow.core.flow import FlowSchedule
from senseflow.core.parameterisation import FlowParameterisation
from senseflow.core.sampling import combine_guidance, seeded_noise
from senseflow.families.toy.data import ShapesBatches
from senseflow.families.toy.pipeline import ToyTeacher
from senseflow.families.toy.text import PromptEncoder
from senseflow.families.toy.world import scenes_in_split


def test_batches_are_resumable_and_from_split():
    a = ShapesBatches("train", 4, seed=3)
    first = [next(a) for _ in range(3)]
    b = ShapesBatches("train", 4, seed=3)
    b.load_state_dict({"position": 2})
    img, prompts = next(b)
    torch.testing.assert_close(img, first[2][0], rtol=0, atol=0)
    assert prompts == first[2][1]
    assert img.shape == (4, 3, 32, 32) and img.min() >= -1 and img.max() <= 1
    train = {s.prompt for s in scenes_in_split("train")}
    assert all(p in train for _, ps in first for p in ps)


def test_text_encoder_keeps_word_order(tiny_teacher_dir):
    enc = PromptEncoder(tiny_teacher_dir)
    tokens, pooled = enc(
        [
            "a small red circle to the left of a large blue square",
            "a small blue circle to the left of a large red square",
            "",
        ]
    )
    assert tokens.shape == (3, 16, 16) and pooled.shape == (3, 16)
    assert (pooled[0] - pooled[1]).abs().max() > 1e-3  # same bag of words, different binding
    again, _ = PromptEncoder(tiny_teacher_dir)(["a small red circle to the left of a large blue square"])
    torch.testing.assert_close(again[0], tokens[0])


def test_teacher_folder_layout_and_recipe(tiny_teacher_dir):
    for sub in ("transformer", "scheduler", "text_encoder", "tokenizer"):
        assert (tiny_teacher_dir / sub).is_dir()
    assert (tiny_teacher_dir / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    recipe = yaml.safe_load((tiny_teacher_dir / "recipe.yaml").read_text())
    assert recipe["train"]["steps"] == 3
    log = [json.loads(line) for line in (tiny_teacher_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2]
    assert all(np.isfinite(r["loss"]) for r in log)


def test_teacher_sampling_is_per_seed(tiny_teacher_dir):
    teacher = ToyTeacher(tiny_teacher_dir)
    prompts = ["a small red circle", "a large blue square above a small green triangle"]
    both = teacher.sample(prompts, [7, 8], steps=3, guidance=2.0)
    alone = teacher.sample(prompts[1:], [8], steps=3, guidance=2.0)
    assert both.shape == (2, 3, 32, 32)
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)


def test_teacher_euler_matches_diffusers_scheduler(tiny_teacher_dir):
    """Our Euler loop equals diffusers' FlowMatchEulerDiscreteScheduler driving the same model."""
    teacher = ToyTeacher(tiny_teacher_dir)
    prompts = ["a small red circle"]
    ours = teacher.sample(prompts, [0], steps=5, guidance=1.0)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_teacher_dir, subfolder="scheduler")
    scheduler.set_timesteps(5)
    tokens, pooled = teacher.encoder(prompts)
    x = seeded_noise(teacher.image_shape, [0])
    for t in scheduler.timesteps:
        v = teacher.transformer(
            hidden_states=x,
            encoder_hidden_states=tokens,
            pooled_projections=pooled,
            timestep=t.expand(1),
            return_dict=False,
        )[0]
        x = scheduler.step(v, t, x, return_dict=False)[0]
    torch.testing.assert_close(ours, x.clamp(-1, 1), rtol=1e-4, atol=1e-4)


def test_guidance_conventions():
    c, u = torch.tensor([3.0]), torch.tensor([1.0])
    assert combine_guidance(c, u, 1.0, "uncond_plus").item() == 3.0
    assert combine_guidance(c, u, 4.0, "uncond_plus").item() == 1.0 + 4 * 2
    assert (
        combine_guidance(c, u, 3.0, "cond_plus").item() == combine_guidance(c, u, 4.0, "uncond_plus").item()
    )
    with pytest.raises(ValueError, match="convention"):
        combine_guidance(c, u, 1.0, "other")


def test_euler_with_oracle_velocity_recovers_data():
    """The teacher sampler's step (``param.step_to``, flow Euler) along the straight path."""
    x0 = torch.randn(2, 3, 4, 4)
    noise = seeded_noise((3, 4, 4), [1, 2])
    param, sigmas = FlowParameterisation(FlowSchedule()), torch.linspace(1, 0, 7)
    out = noise
    for s, s_next in itertools.pairwise(sigmas):
        out = param.step_to(out, noise - x0, s.expand(2), s_next.expand(2))
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)


def test_missing_teacher_folder_is_a_clear_error(tmp_path, capsys):
    assert (
        main(["toy", "sample", "--teacher", str(tmp_path), "--n", "1", "--out", str(tmp_path / "x.png")]) == 2
    )
    err = capsys.readouterr().err
    assert "transformer" in err and str(tmp_path) in err


def test_cli_sample_writes_grid(tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = main(
        ["toy", "sample", "--teacher", str(tiny_teacher_dir), "--n", "3", "--steps", "2", "--out", str(out)]
    )
    assert code == 0 and out.is_file()
    assert "images fully correct" in capsys.readouterr().out


def test_cli_bad_prompt_and_bad_override(tiny_teacher_dir, tmp_path, capsys):
    code = main(
        ["toy", "sample", "--teacher", str(tiny_teacher_dir), "--prompt", "a pink cat", "--steps", "1"]
    )
    assert code == 2 and "grammar" in capsys.readouterr().err
    recipe = tiny_teacher_dir / "recipe.yaml"
    code = main(["toy", "train-teacher", "--config", str(recipe), "--out", str(tmp_path), "train.stepz=1"])
    assert code == 2 and "did you mean 'steps'" in capsys.readouterr().err


def test_periodic_saves_and_continuation_history(tiny_teacher_dir, tmp_path, monkeypatch):
    """train.save_every writes the EMA mid-run (replacing the folder whole); init_from keeps history."""
    from diffusers import SD3Transformer2DModel

    from senseflow.experiments.toy import teacher as teacher_mod
    from tests.conftest import TINY_TEACHER

    saved: list[int] = []
    real_save = teacher_mod._save_ema

    def spy(ema, out_dir, cfg, steps_done, seconds):
        saved.append(steps_done)
        return real_save(ema, out_dir, cfg, steps_done, seconds)

    monkeypatch.setattr(teacher_mod, "_save_ema", spy)
    train = TINY_TEACHER.train.model_copy(
        update={"steps": 5, "save_every": 2, "init_from": str(tiny_teacher_dir)}
    )
    cfg = TINY_TEACHER.model_copy(update={"train": train})
    out = teacher_mod.train_teacher(cfg, tmp_path, progress=False)
    assert saved == [2, 4, 5]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("transformer")) == ["transformer"]
    SD3Transformer2DModel.from_pretrained(out / "transformer")  # loadable
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 5
    assert [h["steps"] for h in summary["history"]] == [3, 5]
    assert summary["total_steps"] == 8
