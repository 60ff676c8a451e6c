"""LoRA mode in the trainer: one frozen base, two adapters, resume, IDA variants, generate."""

from __future__ import annotations

import json

import pytest
import torch

from senseflow.config.loader import ConfigError
from senseflow.models.lora import base_fingerprint
from senseflow.train import checkpoint as ckpt
from senseflow.train.trainer import Distiller
from tests.family_helpers import family_cfg, write_image_dataset
from tests.trainer_helpers import straight_and_resumed, toy_cfg

LORA = ("model.lora.rank=4", "method.ida.lam=0.9")


def _step(run_dir, step: int):
    return run_dir / "checkpoints" / f"step-{step:08d}"


@pytest.mark.parametrize("variant", ["products", "factors"])
def test_toy_lora_resumes_exactly_and_trains_only_the_adapters(tiny_teacher_dir, tmp_path, variant):
    extra = (*LORA, f"model.lora.ida={variant}", "method.ttur_ratio=2")
    straight, split, resumed = straight_and_resumed(tiny_teacher_dir, tmp_path, 6, *extra)
    base = resumed.generator.base
    fresh = Distiller(
        toy_cfg(tiny_teacher_dir, tmp_path / "fresh", "schedule.iterations=1", *extra), progress=False
    )
    assert base_fingerprint(base) == base_fingerprint(fresh.generator.base)  # the base never moved
    for module in ("generator", "fake_score"):
        a = ckpt.read_network(_step(straight, 6), module)
        b = ckpt.read_network(_step(split, 6), module)
        assert a and all(".lora_A." in k or ".lora_B." in k for k in a), "only adapter tensors are saved"
        assert all(torch.equal(a[k], b[k]) for k in a), module
        start = dict(getattr(fresh, module).named_parameters())
        assert any(not torch.equal(a[k], start[k].detach()) for k in a if ".lora_B." in k), module
    logs = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    errors = [line["ida_lora_error"] for line in logs if "ida_lora_error" in line]
    if variant == "products":
        assert errors and all(0 <= e < 1e-2 for e in errors)
    else:
        assert not errors


def test_lora_gradient_checkpointing_trains_the_same_adapters(tiny_teacher_dir, tmp_path):
    """Checkpointed blocks recompute with the adapter of their forward, although the fake score and
    the teacher run between the generator's forward and its backward."""
    runs = {}
    for name, flag in (("plain", "false"), ("checkpointed", "true")):
        cfg = toy_cfg(
            tiny_teacher_dir,
            tmp_path / name,
            "schedule.iterations=3",
            *LORA,
            f"parallel.gradient_checkpointing={flag}",
        )
        Distiller(cfg, progress=False).run()
        runs[name] = {m: ckpt.read_network(_step(tmp_path / name, 3), m) for m in ("generator", "fake_score")}
    for module, tensors in runs["plain"].items():
        for key, value in tensors.items():
            torch.testing.assert_close(runs["checkpointed"][module][key], value, rtol=1e-5, atol=1e-6)


def test_flux_lora_trains_resumes_and_generates(tiny_folder, tmp_path):
    """FLUX.1-dev in LoRA mode: the students share the teacher's guidance embedder and pass
    model.lora.student_guidance; the run resumes exactly and `generate` samples its student."""
    from senseflow.cli import main

    data = write_image_dataset(tmp_path / "data")
    folder = tiny_folder("flux", "a")
    extra = ("method.gan.type=none", *LORA, "model.lora.student_guidance=2.0", "checkpoint.every=2")

    def cfg(out, iterations, *more):
        return family_cfg("flux", folder, data, out, f"schedule.iterations={iterations}", *extra, *more)

    Distiller(cfg(tmp_path / "straight", 4), progress=False).run()
    Distiller(cfg(tmp_path / "split", 2), progress=False).run()
    run = Distiller(cfg(tmp_path / "split", 4, "checkpoint.resume=latest"), progress=False)
    assert run.adapter.student_guidance == 2.0 and run.generator.base.config.guidance_embeds
    run.run()
    for module in ("generator", "fake_score"):
        a = ckpt.read_network(_step(tmp_path / "straight", 4), module)
        b = ckpt.read_network(_step(tmp_path / "split", 4), module)
        assert all(torch.equal(a[k], b[k]) for k in a), module
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")
    out = tmp_path / "images"
    args = ["generate", "--run", str(tmp_path / "straight"), "--prompts", str(prompts), "--out", str(out)]
    assert main([*args, "--device", "cpu"]) == 0
    assert (out / "00000.png").is_file()


def test_lora_mode_refuses_what_it_cannot_do(tiny_teacher_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.lora: LoRA mode holds the frozen base whole"):
        toy_cfg(tiny_teacher_dir, tmp_path, *LORA, "parallel.strategy=fsdp")
    with pytest.raises(ConfigError, match=r"method\.gan\.type: dmd2_head reads the fake score's blocks"):
        toy_cfg(tiny_teacher_dir, tmp_path, *LORA, "method.gan.type=dmd2_head")
    with pytest.raises(ConfigError, match=r"model\.lora\.target_modules"):
        toy_cfg(tiny_teacher_dir, tmp_path, "model.lora.target_modules=[]")
    cfg = toy_cfg(tiny_teacher_dir, tmp_path, *LORA, "model.lora.target_modules=[no_such_layer]")
    with pytest.raises(ValueError, match=r"match no module"):
        Distiller(cfg, progress=False)
    cfg = toy_cfg(tiny_teacher_dir, tmp_path, "model.lora.rank=4096")
    with pytest.raises(ValueError, match=r"model\.lora\.rank 4096 exceeds .*smaller side"):
        Distiller(cfg, progress=False)


def test_8bit_adamw_off_cuda_is_one_clear_error(tiny_teacher_dir, tmp_path):
    cfg = toy_cfg(tiny_teacher_dir, tmp_path, "optim.fake.name=adamw8bit", "parallel.device=cpu")
    with pytest.raises(
        ValueError, match=r"optim\.fake\.name: 'adamw8bit' \(bitsandbytes\) runs on CUDA only"
    ):
        Distiller(cfg, progress=False)
