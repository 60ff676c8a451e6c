"""The generic distillation loop on the tiny toy teacher: resume, DDP equivalence, guards."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from senseflow.train import checkpoint as ckpt
from senseflow.train.draws import draw_step
from senseflow.train.health import TrainingDiverged
from senseflow.train.trainer import Distiller
from tests.trainer_helpers import straight_and_resumed, toy_cfg

WHOLE = ("checkpoint.format=safetensors",)  # whole-weight checkpoints, as earlier versions wrote


def _cfg(teacher, out, *extra):
    return toy_cfg(teacher, out, *extra)


def _weights(run_dir, step):
    path = Path(run_dir) / "checkpoints" / f"step-{step:08d}"
    return {m: ckpt.read_network(path, m) for m in ("generator", "fake_score", "discriminator")}


def _assert_identical(a, b):
    for module in a:
        for key in a[module]:
            assert torch.equal(a[module][key], b[module][key]), f"{module}.{key} differs"


def test_resume_is_bit_exact(tiny_teacher_dir, tmp_path):
    straight, split, resumed = straight_and_resumed(tiny_teacher_dir, tmp_path, 6)
    assert resumed.iteration == 6
    _assert_identical(_weights(straight, 6), _weights(split, 6))
    from senseflow.train.sharded_checkpoint import DCP_DIR, saved_keys

    saved = saved_keys(split / "checkpoints" / "step-00000006" / DCP_DIR)
    assert {k.split(".")[1] for k in saved if k.startswith("optimizers.")} == {
        "generator",
        "fake_score",
        "discriminator",
    }
    assert (split / "config.yaml").is_file()


def test_training_changes_generator_and_logs_health(tiny_teacher_dir, tmp_path):
    run = Distiller(_cfg(tiny_teacher_dir, tmp_path, "schedule.iterations=2"), progress=False)
    before = {k: v.clone() for k, v in run.generator.state_dict().items()}
    logs = run.run()
    assert any(not torch.equal(before[k], v) for k, v in run.generator.state_dict().items())
    for key in ("loss_fake", "loss_disc", "disc_real_acc", "image_std", "image_saturated"):
        assert key in logs
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert '"loss_dmd"' in lines[0] and '"loss_isg"' in lines[0] and '"loss_adv"' in lines[0]


def test_ida_moves_fake_toward_generator(tiny_teacher_dir, tmp_path, monkeypatch):
    """With fake-score LR ~0 the fake score changes only through IDA: phi <- lam phi + (1 - lam) theta."""
    cfg = _cfg(
        tiny_teacher_dir, tmp_path, "schedule.iterations=1", "optim.fake.lr=1e-30", "method.ida.lam=0.5"
    )
    run = Distiller(cfg, progress=False)
    fake0 = {k: v.clone() for k, v in run.fake_score.named_parameters()}
    run.train_step()
    for name, theta in run.generator.named_parameters():
        expected = 0.5 * fake0[name] + 0.5 * theta.detach()
        torch.testing.assert_close(dict(run.fake_score.named_parameters())[name].detach(), expected)


def test_ida_refuses_mismatched_networks(tiny_teacher_dir, tmp_path, monkeypatch):
    original = Distiller._build_networks

    def mismatched(self):
        nets = original(self)
        nets["fake_score"].extra = torch.nn.Linear(2, 2)
        return nets

    monkeypatch.setattr(Distiller, "_build_networks", mismatched)
    with pytest.raises(ValueError, match="extra"):
        Distiller(_cfg(tiny_teacher_dir, tmp_path, "schedule.iterations=1"), progress=False)


def test_nan_guard_skips_then_aborts(tiny_teacher_dir, tmp_path, monkeypatch):
    cfg = _cfg(
        tiny_teacher_dir,
        tmp_path,
        "schedule.iterations=10",
        "health.nan_patience=3",
        "method.ida.enabled=false",
    )
    run = Distiller(cfg, progress=False)
    run.save()  # a checkpoint that must survive the abort
    fake0 = {k: v.clone() for k, v in run.fake_score.state_dict().items()}
    real_predict = run.adapter.predict

    def poisoned(net, *args, **kwargs):
        out = real_predict(net, *args, **kwargs)
        return out * float("nan") if net is run.fake_score else out

    monkeypatch.setattr(run.adapter, "predict", poisoned)
    with pytest.raises(TrainingDiverged, match="3 consecutive iterations"):
        run.run()
    assert run.iteration == 2  # iterations 0, 1 skipped their updates; the third non-finite one aborts
    for k, v in run.fake_score.state_dict().items():
        assert torch.equal(v, fake0[k]), "a non-finite step must not update the fake score"
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints").name == "step-00000000"


DMD2_HEAD = [
    "method.gan.type=dmd2_head",
    "method.gan.weight=5e-3",
    "method.gan.disc_weight=1e-2",
    "method.gan.time_weight=constant",
]


# D's loss at full weight, so that a fake-score gradient missing from DDP's all-reduce would show.
DMD2_HEAD_SHARED = [*DMD2_HEAD, "method.gan.disc_weight=1.0"]


ROOT = Path(__file__).resolve().parents[1]


def _train_cli(*args: str, ranks: int = 1) -> None:
    """``senseflow train`` in a subprocess: plain, or under torchrun with ``ranks`` CPU ranks (gloo)."""
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*launcher, "-m", "senseflow.cli", "train", "--quiet", "configs/toy/distill.yaml", *args]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


def _assert_close_weights(a, b):
    for module in a:
        assert a[module].keys() == b[module].keys()
        for key in a[module]:
            torch.testing.assert_close(a[module][key], b[module][key], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gan", [[], DMD2_HEAD_SHARED], ids=["toy", "dmd2_head_trains_fake"])
def test_ddp_two_ranks_match_one_process(tiny_teacher_dir, tmp_path, gan):
    """torchrun with 2 ranks x batch 1 equals one process x batch 2 (per-sample randomness)."""
    common = [
        f"model.teacher={tiny_teacher_dir}",
        "schedule.iterations=6",
        "logging.sample_every=null",
        "checkpoint.every=6",
        *gan,
    ]
    _train_cli(*common, "data.batch_size=2", f"output_dir={tmp_path / 'one'}")
    _train_cli(*common, "data.batch_size=1", f"output_dir={tmp_path / 'two'}", ranks=2)
    _assert_close_weights(_weights(tmp_path / "one", 6), _weights(tmp_path / "two", 6))


@pytest.mark.parametrize(
    "gan",
    [[], DMD2_HEAD_SHARED, [*DMD2_HEAD_SHARED, "method.gan.head_trains_fake=false"]],
    ids=["toy", "dmd2_head_trains_fake", "dmd2_head_alone"],
)
def test_fsdp2_matches_one_process_and_its_checkpoints_resume_anywhere(tiny_teacher_dir, tmp_path, gan):
    """FSDP2 (fully_shard per transformer block, then the root) on 2 ranks x batch 1, stopped at 3 and
    resumed to 6, equals one process x batch 2; its whole-weight checkpoint at 3 also continues in one
    process to the same weights. Samples are drawn on both ranks (each sharded forward gathers)."""
    common = [
        f"model.teacher={tiny_teacher_dir}",
        "logging.sample_every=3",
        "logging.sample_seeds=[0]",
        "checkpoint.every=3",
        "checkpoint.keep_last=3",
        *gan,
    ]
    one, two, mixed = tmp_path / "one", tmp_path / "two", tmp_path / "mixed"
    _train_cli(*common, "schedule.iterations=6", "data.batch_size=2", f"output_dir={one}")
    fsdp = [*common, "data.batch_size=1", "parallel.strategy=fsdp", f"output_dir={two}"]
    _train_cli(*fsdp, "schedule.iterations=3", ranks=2)
    _train_cli(*fsdp, "schedule.iterations=6", "checkpoint.resume=latest", ranks=2)
    sharded_step3 = two / "checkpoints" / "step-00000003"
    _train_cli(
        *common,
        "schedule.iterations=6",
        "data.batch_size=2",
        f"checkpoint.resume={sharded_step3}",
        f"output_dir={mixed}",
    )
    reference = _weights(one, 6)
    _assert_close_weights(reference, _weights(two, 6))
    _assert_close_weights(reference, _weights(mixed, 6))
    assert (two / "samples" / "step-00000003.png").is_file()
    assert (two / "samples" / "step-00000006.png").is_file()


def test_dmd2_head_trains_and_logs_finite_losses(tiny_teacher_dir, tmp_path, monkeypatch):
    """Vanilla DMD2's discriminator (§8.2, §11.3): a head on the fake score, fed model-space samples."""
    import json
    import math

    run = Distiller(_cfg(tiny_teacher_dir, tmp_path, "schedule.iterations=2", *DMD2_HEAD), progress=False)
    assert run.discriminator.input_space == "model"
    head0 = {k: v.clone() for k, v in run.discriminator.state_dict().items()}
    fake_grads_at_g_step = []
    real_update = run.update

    def spy(name, loss):
        real_update(name, loss)
        if name == "generator":  # the adversarial term went through the fake network's activations
            fake_grads_at_g_step.append([p.grad for p in run.fake_score.parameters()])

    monkeypatch.setattr(run, "update", spy)
    run.run()
    assert fake_grads_at_g_step and all(g is None for g in fake_grads_at_g_step[0])
    assert any(not torch.equal(head0[k], v) for k, v in run.discriminator.state_dict().items())
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert "loss_adv" in lines[0]
    for line in lines:
        for key in ("loss_dmd", "loss_adv", "loss_fake", "loss_disc"):
            if key in line:
                assert math.isfinite(line[key]), f"{key} = {line[key]}"
    saved = _weights(tmp_path, 2)["discriminator"]
    assert saved.keys() == head0.keys()  # the checkpoint holds the head only, not the fake score


def _fake_grads_at_its_step(run: Distiller, iteration: int) -> dict[str, torch.Tensor]:
    """The fake score's gradients when its optimiser steps at ``iteration``."""
    grads = {}

    def record(_opt, _args, _kwargs):
        grads.update({n: p.grad.clone() for n, p in run.fake_score.named_parameters() if p.grad is not None})

    run.optimizers["fake_score"].register_step_pre_hook(record)
    run.iteration = iteration
    run.train_step()
    return grads


def test_dmd2_head_loss_trains_the_fake_score(tiny_teacher_dir, tmp_path):
    """DMD2 (§8.2): the head is part of the fake network, so the fake score's update is the gradient of
    fake loss + D loss; with head_trains_fake=false it is the fake loss's alone. The difference must be
    D's gradient with respect to the fake score's weights, taken directly with autograd."""
    extra = ["schedule.iterations=2", *DMD2_HEAD, "method.gan.disc_weight=1.0", "optim.fake.clip_grad=null"]
    joint = _fake_grads_at_its_step(Distiller(_cfg(tiny_teacher_dir, tmp_path / "a", *extra)), 1)
    alone = _fake_grads_at_its_step(
        Distiller(_cfg(tiny_teacher_dir, tmp_path / "b", *extra, "method.gan.head_trains_fake=false")), 1
    )
    # D's loss of iteration 1 on a fresh run, differentiated with respect to the fake score.
    run = Distiller(_cfg(tiny_teacher_dir, tmp_path / "c", *extra), progress=False)
    run.iteration = 1
    x_real, cond = run.inputs(run.data.batch(1))
    draws = draw_step(
        run.cfg.method,
        run.param,
        run.anchor_levels,
        tuple(x_real.shape[1:]),
        2,
        2,
        run.cfg.seed,
        1,
        disc_shape=tuple(x_real.shape[1:]),
        disc_noised=True,
    )
    x_in = run.step.generator_input(x_real, draws, cond)
    level_j = run.levels[draws.anchor_index]
    with torch.no_grad():
        x0 = run.param.x0_from_output(x_in, run.predict(run.generator, x_in, level_j, cond), level_j)
    with run.discriminator.fake_in_graph():
        d_loss, _ = run.step.discriminator_loss(x_real, x0, cond, level_j, draws)
    names, params = zip(*run.fake_score.named_parameters(), strict=True)
    d_grads = torch.autograd.grad(d_loss, params, allow_unused=True)
    reached = 0
    for name, g in zip(names, d_grads, strict=True):
        if g is None:  # blocks after the head's block do not affect D's logit
            torch.testing.assert_close(joint[name], alone[name], rtol=0, atol=0)
            continue
        reached += int(g.abs().max() > 0)
        torch.testing.assert_close(joint[name] - alone[name], g, rtol=1e-4, atol=1e-7)
    assert reached > 0


@pytest.mark.parametrize("gan", [[], DMD2_HEAD], ids=["toy", "dmd2_head"])
def test_resume_is_bit_exact_with_diffaug(tiny_teacher_dir, tmp_path, gan):
    """DiffAugment parameters (and the DMD2 head's noise) come from the per-iteration draws."""
    extra = ["method.gan.diffaug=[color,translation,cutout]", *gan]
    straight, split, _ = straight_and_resumed(tiny_teacher_dir, tmp_path, 6, *extra)
    _assert_identical(_weights(straight, 6), _weights(split, 6))


def test_float16_training_is_refused(tiny_teacher_dir, tmp_path):
    cfg = _cfg(tiny_teacher_dir, tmp_path, "precision.param_dtype=fp16", "precision.autocast_dtype=fp16")
    with pytest.raises(ValueError, match=r"precision.param_dtype=fp16, precision.autocast_dtype=fp16.*bf16"):
        Distiller(cfg, progress=False)


def test_tensorboard_mirrors_the_jsonl_log(tiny_teacher_dir, tmp_path):
    """logging.tensorboard writes every logged scalar at its iteration, the same values as log.jsonl."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tiny_teacher_dir, tmp_path, "schedule.iterations=3", "logging.tensorboard=true")
    Distiller(cfg, progress=False).run()
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for key in ("loss_fake", "loss_disc", "image_std"):
        logged = [(line["iteration"], line[key]) for line in lines]
        board = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in board] == [s for s, _ in logged]
        assert [v for _, v in board] == pytest.approx([v for _, v in logged], rel=1e-6)
    assert "loss_dmd" in events.Tags()["scalars"]


def test_tensorboard_without_the_package_is_one_clear_error(tiny_teacher_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were missing
    cfg = _cfg(tiny_teacher_dir, tmp_path, "schedule.iterations=1", "logging.tensorboard=true")
    with pytest.raises(ImportError, match=r"logging.tensorboard: true needs the tensorboard package"):
        Distiller(cfg, progress=False).run()


def test_fsdp2_with_bf16_checkpointing_and_dmd2_head_runs(tiny_teacher_dir, tmp_path):
    """The official recipes' combination (sharding, bf16 storage and autocast, gradient checkpointing)
    with the DMD2 head, whose frozen-weight pass must not clash with checkpointing."""
    import json
    import math

    bf16 = ["precision.param_dtype=bf16", "precision.teacher_dtype=bf16", "precision.autocast_dtype=bf16"]
    _train_cli(
        f"model.teacher={tiny_teacher_dir}",
        "schedule.iterations=2",
        "logging.sample_every=null",
        "checkpoint.every=2",
        "data.batch_size=1",
        "parallel.strategy=fsdp",
        "parallel.gradient_checkpointing=true",
        *bf16,
        *DMD2_HEAD,
        f"output_dir={tmp_path}",
        ranks=2,
    )
    weights = _weights(tmp_path, 2)
    assert {t.dtype for t in weights["generator"].values()} == {torch.bfloat16}
    for line in (tmp_path / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert all(math.isfinite(record[k]) for k in ("loss_fake", "loss_disc") if k in record)


def test_checkpoints_with_index_keyed_optimiser_states_still_resume(tiny_teacher_dir, tmp_path):
    """Checkpoints of earlier versions hold ``optimizer.state_dict()`` (keyed by parameter index); an
    unsharded run resumes them to the same weights as one that never stopped."""
    straight = tmp_path / "straight"
    Distiller(_cfg(tiny_teacher_dir, straight, "schedule.iterations=6", *WHOLE), progress=False).run()
    split = tmp_path / "split"
    first = Distiller(_cfg(tiny_teacher_dir, split, "schedule.iterations=3", *WHOLE), progress=False)
    first.run()
    state_file = split / "checkpoints" / "step-00000003" / "state.pt"
    state = torch.load(state_file, weights_only=True)
    state["optimizers"] = {k: o.state_dict() for k, o in first.optimizers.items()}
    assert isinstance(state["optimizers"]["generator"]["param_groups"][0]["params"][0], int)
    torch.save(state, state_file)
    (state_file.parent / ckpt.MANIFEST).unlink()  # earlier versions wrote no manifest
    cfg = _cfg(tiny_teacher_dir, split, "schedule.iterations=6", "checkpoint.resume=latest", *WHOLE)
    Distiller(cfg, progress=False).run()
    _assert_identical(_weights(straight, 6), _weights(split, 6))


@pytest.mark.parametrize(("turn", "expected"), [("period_end", [2, 5]), ("period_start", [0, 3, 6])])
def test_the_generator_updates_on_the_recipes_ttur_turns(tiny_teacher_dir, tmp_path, turn, expected):
    """period_end is the official loop's schedule: its iteration count starts at 1 and G steps when the
    count is a multiple of k, i.e. after k - 1 fake-score updates."""
    official = [i - 1 for i in range(1, 8) if i % 3 == 0]
    assert (official == expected) == (turn == "period_end")
    cfg = _cfg(
        tiny_teacher_dir,
        tmp_path,
        "schedule.iterations=7",
        "logging.every=1",
        "method.ttur_ratio=3",
        f"method.ttur_generator_turn={turn}",
    )
    run = Distiller(cfg, progress=False)
    moved = []
    for n in range(7):
        before = {k: v.clone() for k, v in run.generator.state_dict().items()}
        logs = run.train_step()
        changed = any(not torch.equal(before[k], v) for k, v in run.generator.state_dict().items())
        assert bool(logs["generator_turn"]) == changed == ("loss_dmd" in logs), n
        if changed:
            moved.append(n)
    assert moved == expected


def test_every_optimiser_warms_up_per_iteration_as_the_official_scheduler(tiny_teacher_dir, tmp_path):
    """LambdaWarmUpConstantScheduler's values (lr_start -> lr_max over the warm-up, then lr_max),
    stepped once per iteration for G, the fake score and D alike, G's off-turns included."""
    warm, start = 4, 0.5
    cfg = _cfg(
        tiny_teacher_dir,
        tmp_path,
        "schedule.iterations=6",
        "method.ttur_ratio=3",
        f"optim.warmup_steps={warm}",
        f"optim.warmup_start_factor={start}",
    )
    run = Distiller(cfg, progress=False)
    peaks = {"generator": cfg.optim.generator.lr, "fake_score": cfg.optim.fake.lr}
    peaks["discriminator"] = cfg.optim.discriminator.lr
    assert set(run.optimizers) == set(peaks)
    for n in range(6):
        for name, peak in peaks.items():
            lr_start = start * peak
            expected = (peak - lr_start) / warm * n + lr_start if n < warm else peak
            assert run.optimizers[name].param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12), (n, name)
        run.train_step()
