"""Scaling: sharded loading, FSDP2 policies, HSDP, DCP checkpoints at other world sizes (CPU, gloo)."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from torch.distributed.tensor import DTensor

from senseflow.config.schema import PrecisionConfig
from senseflow.models import build_adapter
from senseflow.models.adapter import NETWORK_ROLES
from senseflow.train import checkpoint as ckpt
from senseflow.train.parallel import ShardPolicy, shard_policy
from tests.dist_helpers import run_ranks
from tests.family_helpers import family_cfg, write_image_dataset
from tests.trainer_helpers import toy_cfg

# ---------------------------------------------------------------------------------------- sharded load


def _load_on_ranks(cfg, load: str, replicate: int = 1) -> dict:
    """Build the three roles sharded over the ranks and report what this rank read and holds."""
    import senseflow.models.build as build
    from senseflow.train.parallel import device_mesh, shard

    adapter = build_adapter(cfg)
    mesh = device_mesh(torch.device("cpu"), "fsdp", replicate)
    reads: list[tuple[str, tuple[int, ...]]] = []
    whole_reads: list[int] = []
    original, original_whole = build.TeacherWeights.read, build.read_weights

    def spy(self, name, offset=(), shape=None):
        tensor = original(self, name, offset, shape)
        reads.append((name, tuple(tensor.shape)))
        return tensor

    def spy_whole(files):
        state = original_whole(files)
        whole_reads.append(sum(t.numel() for t in state.values()))
        return state

    build.TeacherWeights.read, build.read_weights = spy, spy_whole
    try:
        nets = build.build_roles(
            adapter,
            NETWORK_ROLES,
            torch.float32,
            torch.float32,
            "cpu",
            prepare=lambda net, role: shard(net, role, "fsdp", adapter, mesh),
            broadcast=load == "rank0",
        )
    finally:
        build.TeacherWeights.read, build.read_weights = original, original_whole
    full, local_rows = {}, {}
    for role, net in nets.items():
        full[role] = {}
        for key, value in net.state_dict().items():
            if isinstance(value, DTensor):
                local_rows[key] = value.to_local().shape[0]
                value = value.full_tensor()  # a collective: every rank calls it
            full[role][key] = value.detach().clone()
    buffers = {name for net in nets.values() for name, _ in net.named_buffers()}
    return {
        "reads": reads,
        "whole_reads": whole_reads,
        "full": full,
        "local_rows": local_rows,
        "buffers": buffers,
    }


def _reference(cfg) -> dict[str, dict[str, torch.Tensor]]:
    from senseflow.models.build import read_weights

    adapter = build_adapter(cfg)
    teacher = read_weights(adapter.weight_files())
    return {role: adapter.initial_weights(role, teacher) for role in NETWORK_ROLES}


@pytest.fixture
def flux_cfg(tiny_folder, tmp_path):
    return family_cfg(
        "flux", tiny_folder("flux", "a"), write_image_dataset(tmp_path / "data"), tmp_path / "o"
    )


@pytest.mark.parametrize("family", ["toy", "flux"])
def test_each_rank_reads_only_its_own_shards(family, tiny_teacher_dir, flux_cfg, tmp_path):
    cfg = toy_cfg(tiny_teacher_dir, tmp_path / "o") if family == "toy" else flux_cfg
    ranks = run_ranks(_load_on_ranks, 2, cfg, "sharded")
    reference = _reference(cfg)
    for rank, got in enumerate(ranks):
        assert got["whole_reads"] == []  # nothing read whole
        for (
            role,
            tensors,
        ) in reference.items():  # every role equals the folder (FLUX's students less its keys)
            assert got["full"][role].keys() == tensors.keys()
            for key, value in tensors.items():
                assert torch.equal(got["full"][role][key], value.float()), (rank, role, key)
        names = [name for name, _ in got["reads"]]
        assert len(names) == len(set(names)), "a tensor was read twice (once should feed all roles)"
        for name, shape in got["reads"]:
            if name in got["buffers"]:  # FSDP2 keeps buffers whole on every rank
                assert shape == tuple(reference["teacher"][name].shape), name
                continue
            rows = reference["teacher"][name].shape[0]
            assert shape[0] == got["local_rows"][name] <= math.ceil(rows / 2), name  # this rank's rows
            assert shape[1:] == tuple(reference["teacher"][name].shape[1:]), name


def test_rank0_fallback_gives_the_same_shards(tiny_teacher_dir, tmp_path):
    cfg = toy_cfg(tiny_teacher_dir, tmp_path / "o")
    sharded = run_ranks(_load_on_ranks, 2, cfg, "sharded")
    rank0 = run_ranks(_load_on_ranks, 2, cfg, "rank0")
    assert rank0[0]["whole_reads"] and not rank0[1]["whole_reads"]  # only rank 0 reads, and whole
    for role, tensors in sharded[0]["full"].items():
        for key, value in tensors.items():
            assert torch.equal(rank0[1]["full"][role][key], value), (role, key)


def test_hsdp_ranks_read_the_shard_of_their_group(tiny_teacher_dir, tmp_path):
    """On a 2x2 mesh each rank holds and reads half of every sharded parameter (its shard group's
    half), and replicas read the same rows."""
    cfg = toy_cfg(tiny_teacher_dir, tmp_path / "o")
    ranks = run_ranks(_load_on_ranks, 4, cfg, "sharded", 2)
    reference = _reference(cfg)["teacher"]
    for got in ranks:
        for key, value in reference.items():
            assert torch.equal(got["full"]["teacher"][key], value.float()), key
    assert ranks[0]["reads"] == ranks[2]["reads"] and ranks[1]["reads"] == ranks[3]["reads"]


# ---------------------------------------------------------------------------------------- FSDP2 policies


def test_shard_policy_follows_the_recipe():
    from senseflow.config.runtime import ParallelConfig

    bf16, fp32 = torch.bfloat16, torch.float32
    par = ParallelConfig(strategy="fsdp", cpu_offload=["teacher"])
    auto = PrecisionConfig(autocast_dtype="bf16")
    assert shard_policy("generator", fp32, auto, par) == ShardPolicy(bf16, fp32, False)
    assert shard_policy("teacher", bf16, auto, par) == ShardPolicy(None, fp32, True)
    plain = PrecisionConfig(autocast_dtype="fp32")
    assert shard_policy("fake_score", fp32, plain, par) == ShardPolicy(None, fp32, False)
    upcast = PrecisionConfig(fsdp_param_dtype="fp32", reduce_dtype="bf16")
    assert shard_policy("teacher", bf16, upcast, par).gather_dtype is None  # never gathers a frozen net up
    assert shard_policy("generator", bf16, upcast, par) == ShardPolicy(fp32, bf16, False)


def test_sharding_fields_need_fsdp():
    from senseflow.config.loader import ConfigError

    with pytest.raises(ConfigError, match=r"parallel\.replicate_degree: HSDP needs strategy fsdp"):
        toy_cfg("x", "o", "parallel.strategy=ddp", "parallel.replicate_degree=2")
    with pytest.raises(ConfigError, match=r"parallel\.cpu_offload: .*needs strategy fsdp"):
        toy_cfg("x", "o", "parallel.cpu_offload=[teacher]")


# ---------------------------------------------------------------------------------------- DCP checkpoints


def test_a_failed_save_leaves_the_previous_checkpoint_newest(tiny_teacher_dir, tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from senseflow.train.trainer import Distiller

    run = Distiller(toy_cfg(tiny_teacher_dir, tmp_path, "schedule.iterations=6"), progress=False)
    run.iteration = 3
    first = run.save()
    real_save = dcp.save

    def dies_half_way(state, checkpoint_id, **kwargs):
        real_save({"networks": state["networks"]}, checkpoint_id=checkpoint_id, **kwargs)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(dcp, "save", dies_half_way)
    run.iteration = 6
    with pytest.raises(KeyboardInterrupt):
        run.save()
    root = tmp_path / "checkpoints"
    assert ckpt.latest_checkpoint(root) == first
    assert (root / "step-00000006.partial").is_dir()  # what the crash left, never taken for a checkpoint
    assert ckpt.clean_partial(root) == [root / "step-00000006.partial"]


def test_async_save_writes_the_same_checkpoint(tiny_teacher_dir, tmp_path):
    from senseflow.train.trainer import Distiller

    for name, extra in (("sync", ()), ("async", ("checkpoint.async_save=true",))):
        Distiller(
            toy_cfg(tiny_teacher_dir, tmp_path / name, "schedule.iterations=6", *extra), progress=False
        ).run()
    for step in (3, 6):
        a, b = (tmp_path / n / "checkpoints" / f"step-{step:08d}" for n in ("sync", "async"))
        for module in ("generator", "fake_score", "discriminator"):
            left, right = ckpt.read_network(a, module), ckpt.read_network(b, module)
            assert left.keys() == right.keys()
            assert all(torch.equal(left[k], right[k]) for k in left), (step, module)


def test_whole_weight_checkpoints_of_earlier_versions_still_resume(tiny_teacher_dir, tmp_path):
    """A safetensors checkpoint (without a format in meta.json, as earlier versions wrote) continues
    in a run that now writes DCP checkpoints, to the weights of an uninterrupted run."""
    import json

    from senseflow.train.trainer import Distiller

    straight = tmp_path / "straight"
    Distiller(toy_cfg(tiny_teacher_dir, straight, "schedule.iterations=6"), progress=False).run()
    old = tmp_path / "old"
    first = toy_cfg(tiny_teacher_dir, old, "schedule.iterations=3", "checkpoint.format=safetensors")
    Distiller(first, progress=False).run()
    meta_file = old / "checkpoints" / "step-00000003" / ckpt.META
    meta = json.loads(meta_file.read_text())
    del meta["format"]
    meta_file.write_text(json.dumps(meta))
    (meta_file.parent / ckpt.MANIFEST).unlink()  # earlier versions wrote no manifest
    Distiller(
        toy_cfg(tiny_teacher_dir, old, "schedule.iterations=6", "checkpoint.resume=latest"), progress=False
    ).run()
    assert ckpt.read_meta(old / "checkpoints" / "step-00000006")["format"] == "dcp"
    for module in ("generator", "fake_score", "discriminator"):
        a = ckpt.read_network(straight / "checkpoints" / "step-00000006", module)
        b = ckpt.read_network(old / "checkpoints" / "step-00000006", module)
        assert all(torch.equal(a[k], b[k]) for k in a), module


# ---------------------------------------------------------------------------------------- whole runs


def _run(*args: str, ranks: int = 1) -> None:
    from tests.test_trainer import _train_cli

    _train_cli(*args, ranks=ranks)


def _close(reference, other, step: int, tol: float = 1e-4) -> None:
    for module in ("generator", "fake_score", "discriminator"):
        a = ckpt.read_network(reference / "checkpoints" / f"step-{step:08d}", module)
        b = ckpt.read_network(other / "checkpoints" / f"step-{step:08d}", module)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=tol, atol=tol, msg=f"{module}.{key}")


@pytest.mark.slow
def test_dcp_saved_at_two_ranks_continues_at_one_and_at_four_hsdp(tiny_teacher_dir, tmp_path):
    """One process x batch 4 for 6 iterations; FSDP2 on 2 ranks x batch 2 stopped at 3; its DCP
    checkpoint continued by 4 ranks x batch 1 on a 2x2 HSDP mesh, and by one process x batch 4: all
    three end at the same weights (to float tolerance: the sums over ranks are ordered otherwise)."""
    common = [f"model.teacher={tiny_teacher_dir}", "logging.sample_every=null", "checkpoint.every=3"]
    one, two, four, back = (tmp_path / n for n in ("one", "two", "four", "back"))
    _run(*common, "schedule.iterations=6", "data.batch_size=4", f"output_dir={one}")
    fsdp = ["parallel.strategy=fsdp", "schedule.iterations=3"]
    _run(*common, *fsdp, "data.batch_size=2", f"output_dir={two}", ranks=2)
    saved = two / "checkpoints" / "step-00000003"
    assert ckpt.read_meta(saved)["format"] == "dcp"
    resume = ["schedule.iterations=6", f"checkpoint.resume={saved}"]
    hsdp = ["parallel.strategy=fsdp", "parallel.replicate_degree=2", "data.batch_size=1"]
    _run(*common, *resume, *hsdp, f"output_dir={four}", ranks=4)
    _run(*common, *resume, "data.batch_size=4", f"output_dir={back}")
    _close(one, four, 6)
    _close(one, back, 6)


@pytest.mark.slow
def test_cpu_offload_and_bf16_gathering_train_like_the_plain_plan(tiny_teacher_dir, tmp_path):
    """FSDP2 with every network's shards offloaded equals the plain FSDP2 run (its checkpoints
    written asynchronously by both ranks); gathering in bf16 (MixedPrecisionPolicy) stays within
    bf16's resolution of it."""
    common = [
        f"model.teacher={tiny_teacher_dir}",
        "logging.sample_every=null",
        "checkpoint.every=3",
        "schedule.iterations=3",
        "data.batch_size=1",
        "parallel.strategy=fsdp",
    ]
    plain, offload, bf16 = (tmp_path / n for n in ("plain", "offload", "bf16"))
    _run(*common, f"output_dir={plain}", ranks=2)
    offloaded = ["parallel.cpu_offload=[teacher,generator,fake_score]", "checkpoint.async_save=true"]
    _run(*common, *offloaded, f"output_dir={offload}", ranks=2)
    _run(*common, "precision.fsdp_param_dtype=bf16", f"output_dir={bf16}", ranks=2)
    _close(plain, offload, 3)
    _close(plain, bf16, 3, tol=2e-2)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_blocks_give_the_same_losses(tiny_teacher_dir, tmp_path):
    import json

    from senseflow.train.trainer import Distiller

    logs = {}
    for name, extra in (("eager", ()), ("compiled", ("parallel.compile=true",))):
        cfg = toy_cfg(tiny_teacher_dir, tmp_path / name, "schedule.iterations=2", *extra)
        run = Distiller(cfg, progress=False)
        if extra:
            units = run.adapter.shard_units(run.generator)
            assert units and all(getattr(u, "_compiled_call_impl", None) is not None for u in units)
        run.run()
        lines = (tmp_path / name / "log.jsonl").read_text().splitlines()
        logs[name] = [json.loads(line) for line in lines]
    for eager, compiled in zip(logs["eager"], logs["compiled"], strict=True):
        for key in ("loss_dmd", "loss_fake", "loss_disc"):
            if key in eager:
                assert compiled[key] == pytest.approx(eager[key], rel=1e-3, abs=1e-5), key


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["die", "hang"])
def test_a_failed_rank_ends_the_job_instead_of_hanging(tiny_teacher_dir, tmp_path, failure):
    """A rank that dies (torchrun stops the others) or hangs (the others' next collective passes
    parallel.timeout_minutes and raises) ends the whole job with an error within seconds."""
    import os
    import subprocess
    import sys
    import time

    from tests.test_trainer import ROOT

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += [str(ROOT / "tests" / "rank_failure_main.py"), "train", "--quiet", "configs/toy/distill.yaml"]
    cmd += [f"model.teacher={tiny_teacher_dir}", f"output_dir={tmp_path}", "data.batch_size=1"]
    cmd += ["schedule.iterations=4", "logging.sample_every=null", "parallel.timeout_minutes=0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SENSEFLOW_TEST_FAILURE": failure, "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert time.monotonic() - start < 240
    if failure == "die":
        assert "exitcode: 3" in done.stderr  # torchrun names the rank that died and stops the others
    else:
        assert "another rank died or hangs" in done.stderr and "parallel.timeout_minutes (0.1)" in done.stderr


def test_the_slurm_example_passes_a_valid_recipe(tiny_folder, tmp_path):
    """examples/slurm/distill.sbatch is valid bash and its overrides make a valid flux_dev recipe."""
    import shlex
    import subprocess

    from senseflow.config import load_config
    from tests.test_trainer import ROOT

    script = ROOT / "examples" / "slurm" / "distill.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "--rdzv_backend c10d" in text and "--requeue" in text
    command = text.split('train "$RECIPE" --resume auto', 1)[1].split(" &\n", 1)[0].replace("\\\n", " ")
    values = {
        "$TEACHER": str(tiny_folder("flux", "a")),
        "$DATA": str(write_image_dataset(tmp_path / "data")),
        "$RUN_DIR": str(tmp_path / "run"),
        "$SLURM_NNODES": "2",
    }
    overrides = []
    for token in shlex.split(command):
        for name, value in values.items():
            token = token.replace(name, value)
        assert "$" not in token, token
        overrides.append(token)
    cfg = load_config("flux_dev", overrides)
    assert cfg.parallel.strategy == "fsdp" and cfg.parallel.replicate_degree == 2
