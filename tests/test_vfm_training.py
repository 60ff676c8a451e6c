"""The VFM discriminator through the trainer: toy world and a real family's tiny folder, bit-exact
resume, the text cache's VFM group, and ``gan.official_grad_leak``."""

from __future__ import annotations

import pytest
import torch

from senseflow.cli import main
from senseflow.families.tiny_vfm import write_tiny_clip, write_tiny_dinov2
from senseflow.train import checkpoint as ckpt
from senseflow.train.trainer import Distiller
from tests.family_helpers import family_cfg, write_image_dataset
from tests.trainer_helpers import straight_and_resumed, toy_cfg


@pytest.fixture(scope="module")
def vfm(tmp_path_factory):
    root = tmp_path_factory.mktemp("vfm_parts")
    dino, clip = write_tiny_dinov2(root / "dino"), write_tiny_clip(root / "clip")
    return [
        "method.gan.type=vfm",
        "method.gan.weight=0.5",
        "method.gan.time_weight=alpha_sq",
        f"method.gan.backbone={dino}",
        f"method.gan.text_encoder={clip}",
        "method.gan.feature_blocks=[1,3]",
        "method.gan.diffaug=[color,translation,cutout]",
    ]


def _weights(run, step):
    folder = run / "checkpoints" / f"step-{step:08d}"
    return {m: ckpt.read_network(folder, m) for m in ("generator", "fake_score", "discriminator")}


def _identical(a, b):
    for module, tensors in a.items():
        assert tensors.keys() == b[module].keys(), module
        for key, value in tensors.items():
            assert torch.equal(value, b[module][key]), f"{module}.{key}"


def test_toy_distillation_with_the_vfm_resumes_bit_exactly(tiny_teacher_dir, tmp_path, vfm):
    straight, split, resumed = straight_and_resumed(
        tiny_teacher_dir, tmp_path, 4, *vfm, "method.ttur_ratio=2", checkpoint_every=2
    )
    _identical(_weights(straight, 4), _weights(split, 4))
    disc = _weights(straight, 4)["discriminator"]
    assert disc and all(k.startswith("heads.") for k in disc)  # the frozen backbone is not saved
    logs = resumed.last_logs
    assert "disc_real_acc" in logs and "loss_disc" in logs


# the recipes' default discriminator on every family whose recipe uses it (SD 3.5 and the language-model
# teachers: their VAEs differ, and the VFM judges the decoded image)
@pytest.mark.parametrize("family", ["sd3", "qwen_image", "flux2", "flux2_klein", "z_image"])
def test_a_real_family_trains_with_the_vfm_and_resumes_bit_exactly(tiny_folder, tmp_path, vfm, family):
    data = write_image_dataset(tmp_path / "data")

    def run(out, iterations, *more):
        cfg = family_cfg(
            family,
            tiny_folder(family, "a"),
            data,
            out,
            *vfm,
            f"schedule.iterations={iterations}",
            "checkpoint.every=2",
            *more,
        )
        trainer = Distiller(cfg, progress=False)
        trainer.run()
        return trainer

    trainer = run(tmp_path / "straight", 4)
    run(tmp_path / "split", 2)
    run(tmp_path / "split", 4, "checkpoint.resume=latest")
    assert torch.isfinite(torch.tensor(trainer.last_logs["loss_disc"]))
    _identical(_weights(tmp_path / "straight", 4), _weights(tmp_path / "split", 4))
    initial = _weights(tmp_path / "split", 2)["generator"]
    final = _weights(tmp_path / "straight", 4)["generator"]
    assert any(not torch.equal(v, final[k]) for k, v in initial.items())  # G trained through the decode


def test_grad_leak_changes_only_the_discriminators_update(tiny_teacher_dir, tmp_path, vfm):
    def run(out, leak, iterations=1):
        cfg = toy_cfg(
            tiny_teacher_dir,
            out,
            *vfm,
            f"method.gan.official_grad_leak={leak}",
            "method.ttur_ratio=2",
            f"schedule.iterations={iterations}",
            checkpoint_every=1,
        )
        Distiller(cfg, progress=False).run()
        return _weights(out, iterations)

    off, on = run(tmp_path / "off", "false"), run(tmp_path / "on", "true")
    _identical({"generator": off["generator"]}, {"generator": on["generator"]})  # G's turn: same update
    differs = [k for k, v in off["discriminator"].items() if not torch.equal(v, on["discriminator"][k])]
    assert differs  # D's step also saw G's adversarial gradient


def test_cache_text_adds_the_vfm_group_and_a_cached_run_holds_no_clip(tiny_teacher_dir, tmp_path, vfm):
    common = [f"model.teacher={tiny_teacher_dir}", *vfm, "schedule.iterations=2", "data.batch_size=2"]
    assert main(["cache-text", "toy/distill", *common, "--out", str(tmp_path / "cache"), "--quiet"]) == 0
    cfg = toy_cfg(
        tiny_teacher_dir,
        tmp_path / "run",
        *vfm,
        "schedule.iterations=2",
        f"model.text_cache={tmp_path / 'cache'}",
    )
    trainer = Distiller(cfg, progress=False)
    trainer.run()
    assert trainer.discriminator.text_cache is not None
    assert trainer.discriminator.text._model is None  # D's CLIP text tower was never loaded
    # the cache alone suffices: a run on a machine without the CLIP folder
    elsewhere = [v for v in vfm if not v.startswith("method.gan.text_encoder=")]
    cfg = toy_cfg(
        tiny_teacher_dir,
        tmp_path / "run2",
        *elsewhere,
        "method.gan.text_encoder=nobody/missing-clip",
        "schedule.iterations=1",
        f"model.text_cache={tmp_path / 'cache'}",
    )
    Distiller(cfg, progress=False).run()
