"""Precision, device placement and gradient checkpointing of the trainer (recipe fields precision.*,
parallel.device, parallel.gradient_checkpointing), checked on the CPU against float32 runs."""

import math

import pytest
import torch

from senseflow.config import ConfigError
from senseflow.devices import resolve_device
from senseflow.student import Student
from senseflow.train import checkpoint as ckpt
from senseflow.train.trainer import Distiller
from tests.trainer_helpers import straight_and_resumed, toy_cfg


def _cfg(teacher, out, *extra):
    return toy_cfg(teacher, out, *extra, checkpoint_every=2)


def _first_linear(net: torch.nn.Module) -> torch.nn.Linear:
    return next(m for m in net.modules() if isinstance(m, torch.nn.Linear))


def _record_output_dtypes(run: Distiller) -> dict[str, set]:
    seen: dict[str, set] = {"teacher": set(), "generator": set(), "fake_score": set()}
    for name in seen:
        layer = _first_linear(getattr(run, name))
        layer.register_forward_hook(lambda _m, _i, out, name=name: seen[name].add(out.dtype))
    return seen


def test_bf16_autocast_computes_in_bf16_and_stays_close_to_fp32(tiny_teacher_dir, tmp_path):
    reference = Distiller(_cfg(tiny_teacher_dir, tmp_path / "fp32", "schedule.iterations=1"), progress=False)
    ref_logs = reference.train_step()
    run = Distiller(
        _cfg(tiny_teacher_dir, tmp_path / "bf16", "schedule.iterations=1", "precision.autocast_dtype=bf16"),
        progress=False,
    )
    seen = _record_output_dtypes(run)
    logs = run.train_step()
    assert seen == {k: {torch.bfloat16} for k in seen}  # every network's matmuls ran in bf16
    assert all(p.dtype == torch.float32 for p in run.generator.parameters())  # weights stay fp32
    for key in ("loss_dmd", "loss_fake", "loss_isg", "loss_disc"):
        assert math.isfinite(logs[key])
        assert logs[key] != ref_logs[key]  # autocast changed the arithmetic ...
        assert logs[key] == pytest.approx(ref_logs[key], rel=0.1, abs=1e-3)  # ... only by rounding


def test_bf16_teacher_is_stored_in_bf16_and_answers_in_fp32(tiny_teacher_dir, tmp_path):
    fp32 = Distiller(_cfg(tiny_teacher_dir, tmp_path / "a"), progress=False)
    run = Distiller(_cfg(tiny_teacher_dir, tmp_path / "b", "precision.teacher_dtype=bf16"), progress=False)
    assert {p.dtype for p in run.teacher.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in run.generator.parameters()} == {torch.float32}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=g)
    level = torch.tensor([0.8, 0.3])
    cond = run.adapter.encode_prompts(["a small red circle", "a large blue square above a small red circle"])
    guidance = torch.tensor([3.0, 3.0])
    out = run.guided(x, level, cond, guidance)
    ref = fp32.guided(x, level, cond, guidance)
    assert out.dtype == torch.float32
    assert not torch.equal(out, ref)
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)
    assert math.isfinite(run.train_step()["loss_dmd"])


def test_bf16_weights_train_resume_bit_exact_and_sample(tiny_teacher_dir, tmp_path):
    bf16 = ["precision.param_dtype=bf16", "precision.teacher_dtype=bf16", "precision.autocast_dtype=bf16"]
    straight, split, resumed = straight_and_resumed(tiny_teacher_dir, tmp_path, 4, *bf16, checkpoint_every=2)
    assert {p.dtype for p in resumed.fake_score.parameters()} == {torch.bfloat16}
    for module in ("generator", "fake_score"):
        a = ckpt.read_network(straight / "checkpoints" / "step-00000004", module)
        b = ckpt.read_network(split / "checkpoints" / "step-00000004", module)
        assert {t.dtype for t in a.values()} == {torch.bfloat16}
        for key in a:
            assert torch.equal(a[key], b[key]), f"{module}.{key}"
    student = Student.from_run(straight)
    assert {p.dtype for p in student.generator.parameters()} == {torch.bfloat16}
    images = student.sample(["a small red circle"], [0])
    assert images.dtype == torch.float32 and images.shape == (1, 3, 32, 32)
    assert images.abs().max() <= 1.0 and images.std() > 0


DMD2_HEAD = ["method.gan.type=dmd2_head", "method.gan.weight=0.5", "method.gan.time_weight=constant"]


@pytest.mark.parametrize("gan", [[], DMD2_HEAD], ids=["toy", "dmd2_head"])
def test_gradient_checkpointing_gives_the_same_update(tiny_teacher_dir, tmp_path, gan):
    """Recomputing activations in the backward pass must not change any update (with the DMD2 head, the
    fake score also runs with its weights frozen for G's adversarial term)."""
    results = {}
    for flag in ("false", "true"):
        run = Distiller(
            _cfg(tiny_teacher_dir, tmp_path / flag, f"parallel.gradient_checkpointing={flag}", *gan),
            progress=False,
        )
        run.train_step()  # iteration 0 is a generator turn (DMD + GAN + ISG)
        run.train_step()
        assert run.generator.gradient_checkpointing == (flag == "true")
        nets = (run.generator, run.fake_score, run.discriminator)
        results[flag] = tuple({k: v.clone() for k, v in net.state_dict().items()} for net in nets)
        teacher = run.teacher.state_dict()
    for a, b in zip(results["false"], results["true"], strict=True):
        if a.keys() == teacher.keys():
            assert any(not torch.equal(a[k], teacher[k]) for k in a)  # the step did update the network
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_device_resolution(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"parallel.device: 'cuda' was asked for but CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match=r"parallel.device: 'gpu0' is not a device"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda", 1)  # this rank's GPU
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun a fixed index would stack every rank on one GPU
    with pytest.raises(ValueError, match=r"'cuda:0' would put every rank on one GPU"):
        resolve_device("cuda:0")
    assert resolve_device("cuda") == torch.device("cuda", 1)


def test_unknown_device_in_a_recipe_is_one_clear_error(tiny_teacher_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"parallel.device.*expected auto, cpu, cuda or cuda:N, got 'tpu'"):
        _cfg(tiny_teacher_dir, tmp_path, "parallel.device=tpu")
