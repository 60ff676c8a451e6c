"""kill -9 soak: interrupt `senseflow train --resume auto` at random points and check nothing is lost.

One uninterrupted run is the reference. A second run in another folder is killed with SIGKILL
``--kills`` times and restarted with ``--resume auto`` each time, until it finishes. The kills are
spread over three moments: a random time after the start (loading, training, logging), while a
checkpoint is being written (a ``step-*.partial`` folder exists) and while an old checkpoint is being
pruned (a ``step-*.deleting`` folder exists). After every kill, every complete checkpoint must pass
its manifest check. At the end the report counts:

* divergence: tensors of the final checkpoint's networks that differ from the reference's, and
  logged losses that differ (the losses depend on the optimiser states too);
* corrupt checkpoints: complete checkpoints that failed verification after some kill;
* orphans: ``*.partial``, ``*.deleting``, ``*.old`` or incomplete ``step-*`` folders left at the end;
* log lines out of order or repeated.

    python benchmarks/kill_soak.py --kills 30 --report docs/results/kill_soak.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from senseflow.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
MOMENTS = ("random", "writing", "pruning")
POLL_SECONDS = 0.0005
#: the most a restarted run may go without reaching the moment a kill waits for
MOMENT_TIMEOUT_SECONDS = 120.0


def train_command(run: Path, iterations: int, every: int, fmt: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "senseflow.cli",
        "train",
        "toy/distill",
        "--quiet",
        "--resume",
        "auto",
        f"output_dir={run}",
        f"schedule.iterations={iterations}",
        f"checkpoint.every={every}",
        "checkpoint.keep_last=2",
        f"checkpoint.format={fmt}",
        "data.batch_size=2",
        "logging.every=1",
        "logging.sample_every=null",
    ]


def env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


def in_flight(root: Path, suffix: str, before: frozenset = frozenset()) -> bool:
    """Whether a ``*suffix`` folder exists that was not among ``before`` ((name, inode) pairs): a
    leftover of the previous kill, which the restarted run removes at start-up, does not count."""
    return any(name.endswith(suffix) for name, _ in _entries(root) - before)


def _entries(root: Path) -> frozenset:
    try:
        return frozenset((e.name, e.inode()) for e in os.scandir(root))
    except FileNotFoundError:
        return frozenset()


def kill_once(cmd: list[str], run: Path, moment: str, rng: random.Random, threads: int) -> dict:
    """Start training, SIGKILL it at ``moment``; returns what the kill hit (None if it finished first)."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env(threads), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    root = run / "checkpoints"
    before = _entries(root)
    start = time.monotonic()
    delay = rng.uniform(0.5, 12.0)
    suffix = {"writing": ckpt.TMP_SUFFIX, "pruning": ".deleting"}.get(moment)
    while proc.poll() is None:
        elapsed = time.monotonic() - start
        if (suffix is None and elapsed >= delay) or (suffix is not None and in_flight(root, suffix, before)):
            break
        if elapsed > MOMENT_TIMEOUT_SECONDS:
            break
        time.sleep(POLL_SECONDS if suffix else 0.01)
    if proc.poll() is not None:
        err = proc.stderr.read().decode()
        if proc.returncode != 0:
            raise SystemExit(f"training failed before the kill (exit {proc.returncode}): {err[-2000:]}")
        return {"moment": moment, "hit": None}
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    hit = {
        "writing": in_flight(root, ckpt.TMP_SUFFIX, before),
        "pruning": in_flight(root, ".deleting", before),
    }
    return {"moment": moment, "hit": [k for k, v in hit.items() if v] or ["between"], "after_s": elapsed}


def corrupt_checkpoints(root: Path) -> list[str]:
    bad = []
    for _, path in ckpt.list_checkpoints(root):
        try:
            ckpt.verify_checkpoint(path)
        except Exception as exc:  # report every kind of failure
            bad.append(f"{path.name}: {exc}")
    return bad


def orphans(root: Path) -> list[str]:
    complete = {path.name for _, path in ckpt.list_checkpoints(root)}
    return sorted(p.name for p in root.iterdir() if p.name not in complete) if root.is_dir() else []


def compare(a: Path, b: Path) -> list[str]:
    """Names of the networks' tensors that differ between two checkpoints (either format)."""
    diffs = []
    for name in ckpt.read_meta(a)["modules"]:
        x, y = ckpt.read_network(a, name), ckpt.read_network(b, name)
        if x.keys() != y.keys():
            diffs.append(f"{name}: keys differ")
            continue
        diffs += [f"{name}.{k}" for k in x if not x[k].equal(y[k])]
    return diffs


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=30)
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--every", type=int, default=2, help="checkpoint.every (small: many writes and prunes)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--format", choices=("safetensors", "dcp"), default="safetensors", help="checkpoint.format"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="folder for the two runs (default: a temporary one)")
    p.add_argument("--report", type=Path, help="write the report as markdown here")
    args = p.parse_args()
    rng = random.Random(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="kill_soak_"))
    reference, soaked = work / "reference", work / "soaked"
    for run in (reference, soaked):
        shutil.rmtree(run, ignore_errors=True)
    started = time.monotonic()
    subprocess.run(
        train_command(reference, args.iterations, args.every, args.format),
        cwd=ROOT,
        env=env(args.threads),
        check=True,
    )
    cmd = train_command(soaked, args.iterations, args.every, args.format)
    kills, corrupt = [], []
    while len(kills) < args.kills:
        moment = MOMENTS[len(kills) % len(MOMENTS)]
        result = kill_once(cmd, soaked, moment, rng, args.threads)
        if result["hit"] is None:  # it finished before the kill: start over with a longer run
            raise SystemExit(f"the run finished after {len(kills)} kills; raise --iterations")
        kills.append(result)
        corrupt += corrupt_checkpoints(soaked / "checkpoints")
        print(
            f"kill {len(kills):2d} ({moment}): hit {', '.join(result['hit'])} after {result['after_s']:.2f} s"
        )
    subprocess.run(cmd, cwd=ROOT, env=env(args.threads), check=True)
    final_ref = ckpt.latest_checkpoint(reference / "checkpoints")
    final = ckpt.latest_checkpoint(soaked / "checkpoints")
    diverged = (
        compare(final_ref, final) if final is not None and final.name == final_ref.name else ["no final"]
    )
    log_ref, log = read_log(reference), read_log(soaked)
    iterations = [r["iteration"] for r in log]
    log_order = iterations != list(range(args.iterations))
    drop = ("seconds",)
    log_diffs = sum(
        {k: v for k, v in a.items() if k not in drop} != {k: v for k, v in b.items() if k not in drop}
        for a, b in zip(log_ref, log, strict=False)
    )
    left = orphans(soaked / "checkpoints")
    hits = {m: sum(1 for k in kills if m in k["hit"]) for m in ("writing", "pruning", "between")}
    minutes = (time.monotonic() - started) / 60
    lines = [
        "# kill -9 soak",
        "",
        f"`python benchmarks/kill_soak.py --kills {args.kills} --iterations {args.iterations} "
        f"--every {args.every} --seed {args.seed} --format {args.format}` ({minutes:.1f} min on this "
        "machine). The toy recipe, "
        f"batch 2, a checkpoint every {args.every} iterations, the newest 2 kept (so every save also "
        f"prunes one), {args.format} format; each restart is `senseflow train ... --resume auto`.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| kills (SIGKILL) | {len(kills)} |",
        f"| ... while a checkpoint was being written (`.partial` present) | {hits['writing']} |",
        f"| ... while an old checkpoint was being pruned (`.deleting` present) | {hits['pruning']} |",
        f"| ... at other moments (start-up, training, logging) | {hits['between']} |",
        f"| final checkpoint tensors that differ from the uninterrupted run | {len(diverged)} |",
        f"| logged iterations whose losses differ from the uninterrupted run | {log_diffs} |",
        f"| log out of order, repeated or missing iterations | {'yes' if log_order else 0} |",
        f"| complete checkpoints that failed verification after a kill | {len(corrupt)} |",
        f"| orphaned folders left at the end | {len(left)} |",
    ]
    if diverged or corrupt or left:
        lines += ["", "Details:", *(f"- {d}" for d in [*diverged[:20], *corrupt[:20], *left])]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report:
        args.report.write_text(text)


if __name__ == "__main__":
    main()
