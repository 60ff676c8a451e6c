"""What `senseflow train` promises about run folders, interruptions and resuming (docs/reliability.md):
no silent mixing or deletion of runs, a checkpoint and a distinct exit code on SIGTERM/SIGINT, a
fall-back past a damaged checkpoint, logs that do not repeat iterations after a resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from senseflow.cli import main
from senseflow.errors import PREEMPTED
from senseflow.train import checkpoint as ckpt
from senseflow.train.trainer import Distiller
from tests.trainer_helpers import RECIPE, toy_cfg

ROOT = Path(__file__).resolve().parents[1]


def _args(teacher, out, *extra: str) -> list[str]:
    return [
        "train",
        "--quiet",
        str(RECIPE),
        f"model.teacher={teacher}",
        f"output_dir={out}",
        "data.batch_size=2",
        "logging.every=1",
        "logging.sample_every=null",
        *extra,
    ]


def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(lines), lines
    return errors[0]


def _steps(run: Path) -> list[int]:
    return [step for step, _ in ckpt.list_checkpoints(run / "checkpoints")]


def test_a_folder_holding_a_run_is_refused_without_resume_or_overwrite(tiny_teacher_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(tiny_teacher_dir, run, "schedule.iterations=2", "checkpoint.every=2")) == 0
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert main(_args(tiny_teacher_dir, run, "schedule.iterations=4")) == 2
    line = _error(capsys)
    assert str(run) in line and "--resume" in line and "--overwrite" in line
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing written or removed


def test_resume_without_a_checkpoint_is_an_error_and_auto_starts_fresh(tiny_teacher_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*_args(tiny_teacher_dir, run, "schedule.iterations=2"), "--resume"]) == 2
    assert "nothing to resume" in _error(capsys) and not run.exists()
    assert (
        main(
            [*_args(tiny_teacher_dir, run, "schedule.iterations=2", "checkpoint.every=1"), "--resume", "auto"]
        )
        == 0
    )
    assert _steps(run) == [1, 2]
    # auto again continues from step 2 instead of starting over
    assert (
        main(
            [*_args(tiny_teacher_dir, run, "schedule.iterations=3", "checkpoint.every=1"), "--resume", "auto"]
        )
        == 0
    )
    log = [json.loads(line)["iteration"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert log == [0, 1, 2]


def test_overwrite_moves_the_old_run_aside_and_never_deletes_it(tiny_teacher_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(tiny_teacher_dir, run, "schedule.iterations=1")) == 0
    old_log = (run / "log.jsonl").read_text()
    assert main([*_args(tiny_teacher_dir, run, "schedule.iterations=1"), "--overwrite", "--resume"]) == 2
    assert "--overwrite" in _error(capsys)
    assert main([*_args(tiny_teacher_dir, run, "schedule.iterations=2"), "--overwrite"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and (aside[0] / "log.jsonl").read_text() == old_log
    assert _steps(run) == [2] and _steps(aside[0]) == [1]


def test_overrides_are_accepted_after_options(tiny_teacher_dir, tmp_path):
    run = tmp_path / "run"
    args = _args(tiny_teacher_dir, run)
    assert (
        main([*args[:2], *args[2:], "--resume", "auto", "schedule.iterations=1", "checkpoint.every=1"]) == 0
    )
    assert _steps(run) == [1]


def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(tiny_teacher_dir, tmp_path, caplog):
    """The newest checkpoint's weights cut short: resume warns, names both, continues from the older
    one, and the run ends as an uninterrupted one does."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    Distiller(
        toy_cfg(tiny_teacher_dir, straight, "schedule.iterations=4", checkpoint_every=2), progress=False
    ).run()
    Distiller(
        toy_cfg(tiny_teacher_dir, split, "schedule.iterations=4", checkpoint_every=2), progress=False
    ).run()
    newest = ckpt.latest_checkpoint(split / "checkpoints")
    victim = next(p for p in sorted(newest.rglob("*")) if p.is_file() and p.stat().st_size > 1024)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    resumed = Distiller(
        toy_cfg(
            tiny_teacher_dir, split, "schedule.iterations=4", "checkpoint.resume=latest", checkpoint_every=2
        ),
        progress=False,
    )
    with caplog.at_level("WARNING", logger="senseflow"):
        resumed.run()
    text = caplog.text
    assert "step-00000004" in text and "step-00000002" in text
    a = ckpt.read_network(ckpt.latest_checkpoint(straight / "checkpoints"), "generator")
    b = ckpt.read_network(ckpt.latest_checkpoint(split / "checkpoints"), "generator")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_a_resumed_run_logs_each_iteration_once(tiny_teacher_dir, tmp_path):
    """Lines logged after the last checkpoint by an interrupted run are dropped on resume."""
    run = tmp_path / "run"
    Distiller(
        toy_cfg(tiny_teacher_dir, run, "schedule.iterations=3", checkpoint_every=2), progress=False
    ).run()
    # as if killed after logging iteration 2 (0-based) but before checkpointing it, with a cut line
    (run / "checkpoints" / "step-00000003").rename(run / "checkpoints" / "step-00000003.deleting")
    with (run / "log.jsonl").open("a") as f:
        f.write('{"iteration": 3, "loss_dm')
    cfg = toy_cfg(
        tiny_teacher_dir, run, "schedule.iterations=4", "checkpoint.resume=latest", checkpoint_every=2
    )
    Distiller(cfg, progress=False).run()
    log = [json.loads(line)["iteration"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert log == [0, 1, 2, 3]
    assert not (run / "checkpoints" / "step-00000003.deleting").exists()


def _start(teacher, run: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "senseflow.cli", *_args(teacher, run, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_log(proc: subprocess.Popen, run: Path, timeout: float = 120.0) -> None:
    """Until the loop has logged an iteration (its signal handlers are then in place)."""
    deadline = time.monotonic() + timeout
    log = run / "log.jsonl"
    while not (log.is_file() and log.read_text().strip()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_training_with_a_checkpoint_and_a_distinct_exit_code(
    tiny_teacher_dir, tmp_path, signum
):
    run = tmp_path / "run"
    proc = _start(tiny_teacher_dir, run, "schedule.iterations=100000", "checkpoint.every=100000")
    _wait_for_log(proc, run)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and signal.Signals(signum).name in errors[0] and "Traceback" not in err
    steps = _steps(run)
    assert len(steps) == 1 and 0 < steps[0] < 100000
    logged = [json.loads(line)["iteration"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert logged[-1] == steps[0] - 1  # the checkpoint holds every iteration the log shows
    ckpt.verify_checkpoint(run / "checkpoints" / ckpt.checkpoint_name(steps[0]))


def test_a_second_signal_exits_at_once(tiny_teacher_dir, tmp_path):
    run = tmp_path / "run"
    proc = _start(tiny_teacher_dir, run, "schedule.iterations=100000", "checkpoint.every=100000")
    _wait_for_log(proc, run)
    # two different signals (two of the same kind may merge into one before they are delivered)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode in (128 + signal.SIGTERM, 128 + signal.SIGINT)
    assert _steps(run) == []  # it did not wait for the iteration's end and its checkpoint


def _best_of(cmd: list[str], repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=ROOT, capture_output=True, check=False)
        times.append(time.perf_counter() - start)
    return min(times)


def test_a_bad_recipe_is_answered_before_torch_loads(tmp_path):
    """`senseflow train bad.yaml` loads no torch, diffusers or transformers, and takes a fraction of
    the time `import torch` alone takes (measured here: about 0.15; the bound leaves room for noise)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: toy/distill\noptim:\n  generator:\n    lr: .inf\n")
    probe = (
        "import sys; from senseflow.cli import main; rc = main(['train', sys.argv[1]]); "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; print(rc, heavy)"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(bad)], cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.split() == ["2", "[]"], done.stdout + done.stderr
    assert "optim.generator.lr" in done.stderr
    answer = _best_of([sys.executable, "-m", "senseflow.cli", "train", str(bad)])
    torch_import = _best_of([sys.executable, "-c", "import torch"])
    cli_import = _best_of([sys.executable, "-c", "import senseflow.cli"])
    print(
        f"bad recipe answered in {answer:.2f} s; import senseflow.cli {cli_import:.2f} s; "
        f"import torch {torch_import:.2f} s"
    )
    assert answer / torch_import < 0.5


def _calls(tree) -> list[tuple[str, object]]:
    """(called name, call node) for every call: ``f(...)`` gives f, ``a.b(...)`` gives b."""
    import ast

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
            found.append((name, node))
    return found


def test_no_code_runs_from_an_input_file():
    """No builtin eval/exec, no tar extraction to disk, no unrestricted unpickling anywhere in the
    package: torch.load only with weights_only=True, pickle only through the DCP index reader."""
    import ast

    problems = []
    for path in sorted((ROOT / "src" / "senseflow").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(ROOT)
        for name, node in _calls(tree):
            if name in ("eval", "exec") and isinstance(node.func, ast.Name):
                problems.append(f"{where}:{node.lineno} {name}()")
            if name in ("extractall", "extract") and "tar" in ast.unparse(node.func).lower():
                problems.append(f"{where}:{node.lineno} tar {name}")
            if name == "load" and ast.unparse(node.func) == "torch.load":
                flag = {k.arg: ast.unparse(k.value) for k in node.keywords}.get("weights_only")
                if flag != "True":
                    problems.append(f"{where}:{node.lineno} torch.load(weights_only={flag})")
            if name in ("load", "loads") and ast.unparse(node.func).startswith("pickle."):
                problems.append(f"{where}:{node.lineno} {ast.unparse(node.func)}")
    assert problems == []


def test_a_signal_to_one_rank_stops_every_rank_with_one_checkpoint(tiny_teacher_dir, tmp_path):
    """Under torchrun a SIGTERM that reaches rank 1 alone: both ranks agree, finish the iteration,
    write one checkpoint together and exit with code 75 (no rank waits for the timeout)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += [str(ROOT / "tests" / "rank_failure_main.py"), "train", "--quiet", str(RECIPE)]
    cmd += [f"model.teacher={tiny_teacher_dir}", f"output_dir={tmp_path}", "data.batch_size=1"]
    cmd += ["schedule.iterations=50", "checkpoint.every=50", "logging.sample_every=null"]
    cmd += ["checkpoint.format=safetensors", "parallel.timeout_minutes=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SENSEFLOW_TEST_FAILURE": "sigterm", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert f"exitcode: {PREEMPTED}" in done.stderr or f"exitcode  : {PREEMPTED}" in done.stderr, done.stderr
    assert "stopped by SIGTERM after iteration 2" in done.stderr  # rank 1's line; rank 0 names no signal
    assert _steps(tmp_path) == [2]
    ckpt.verify_checkpoint(tmp_path / "checkpoints" / ckpt.checkpoint_name(2))
