"""Where the time of one SenseFlow iteration goes: the full step and each of its passes, timed.

Builds a :class:`senseflow.train.trainer.Distiller` from a recipe and times, on one fixed batch and
one fixed set of draws (those of a generator turn), the full ``train_step`` of a generator turn and
of a non-generator turn, then every pass of the iteration in isolation, each through the
Distiller's public pieces (``inputs``, ``draws``, ``predict``, ``guided``, ``decode``, ``update``,
``joint_update``) and its :class:`~senseflow.train.step.SenseFlowStep` (``generator_input``,
``fake_loss``, ``discriminator_loss``) and the method functions the step calls. Each figure is the mean of
``--iterations`` repeats after ``--warmup`` untimed ones.

    python benchmarks/distill_step.py --teacher runs/toy_teacher --batch-size 16

Figures depend on the machine (CPU model, core count, ``--threads``, other load) and on the
teacher's size: compare numbers only from the same machine and invocation. The passes do not add
up exactly to the measured step (allocation, Python overhead, small tensor ops between passes);
the ratio printed below says by how much.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from senseflow.config import load_config
from senseflow.method import ida_update_, isg_loss, isg_targets, isg_x0_targets
from senseflow.train.draws import StepDraws
from senseflow.train.trainer import Distiller

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = ROOT / "configs" / "toy" / "distill.yaml"
PAPER = "paper: IDA +0.57%, ISG +3.2-6.2% per step"


def _sync() -> None:
    """GPU work is asynchronous: wait for it so a lap times its own kernels."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Laps:
    """Wall-clock laps keyed by (turn, pass); laps taken while ``recording`` is off are warm-up."""

    def __init__(self) -> None:
        self.times: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.recording = False
        self.turn = "G"

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        _sync()
        start = time.perf_counter()
        yield
        _sync()
        if self.recording:
            self.times[(self.turn, name)].append(time.perf_counter() - start)

    def ms(self, turn: str, name: str) -> float | None:
        t = self.times.get((turn, name))
        return 1000.0 * statistics.fmean(t) if t else None

    def total_ms(self, turn: str) -> float:
        return sum(self.ms(turn, name) or 0.0 for name in PASSES)


@dataclass
class Batch:
    """Everything one iteration computes before its networks run (as ``Distiller.train_step`` does)."""

    images: torch.Tensor
    x_real: torch.Tensor
    draws: StepDraws
    cond: object
    x_in: torch.Tensor
    level_j: torch.Tensor
    level_next: torch.Tensor


def prepare(dist: Distiller, n: int, lap: Laps) -> Batch:
    """The preamble of ``train_step`` for iteration ``n``, timed as two laps."""
    with lap("data, draws, prompt encoding"):
        batch = dist.data.batch(n).to(dist.device)
        x_real, cond = dist.inputs(batch)
        _, d = dist.draws(n, tuple(x_real.shape[1:]))
    with lap("input (backward simulation)"):
        x_in = dist.step.generator_input(x_real, d, cond)
    level_j, level_next = dist.levels[d.anchor_index], dist.levels[d.anchor_index + 1]
    images = batch.images if batch.images is not None else dist.decode(x_real)
    return Batch(images, x_real, d, cond, x_in, level_j, level_next)


def generator_turn_passes(dist: Distiller, b: Batch, lap: Laps) -> None:
    """Every pass of a generator turn, in isolation, on batch ``b``."""
    m, p = dist.cfg.method, dist.param
    d, cond = b.draws, b.cond
    gen_opt = dist.optimizers["generator"]
    gen_opt.zero_grad(set_to_none=True)
    with lap("generator forward+backward"):
        out_in = dist.predict(dist.generator, b.x_in, b.level_j, cond)
        x0 = p.x0_from_output(b.x_in, out_in, b.level_j)
        (x0 * d.dmd_noise).mean().backward()  # a stand-in loss: the backward of the generator graph
    with lap("generator optimiser step (clip + AdamW)"):
        if dist.clips["generator"] is not None:
            torch.nn.utils.clip_grad_norm_(dist.generator.parameters(), dist.clips["generator"])
        gen_opt.step()
    out_in, x0 = out_in.detach(), x0.detach()
    x_t = p.add_noise(x0, d.dmd_noise, d.dmd_level)
    with torch.no_grad():
        with lap("teacher guided forward (DMD, CFG: 2x batch)"):
            dist.guided(x_t, d.dmd_level, cond, d.dmd_guidance)
        with lap("fake-score forward (DMD, no grad)"):
            dist.predict(dist.fake_score, x_t, d.dmd_level, cond)
    if dist.discriminator is not None and m.gan.weight:
        x0_leaf = x0.clone().requires_grad_(True)
        with lap("GAN generator loss (D forward+backward to x0)"):
            pixels = dist.discriminator.input_space == "pixels"
            x_d = dist.decode(x0_leaf) if pixels else x0_leaf
            logits = dist.step.discriminate(dist.step.nets.discriminator, x_d, cond, d.disc_gen)
            dist.step.g_loss(logits, dist.step.gan_weights(b.level_j)).backward()
    if m.isg.weight > 0:
        with lap("ISG (teacher CFG step + generator no-grad step)"):
            teacher = lambda x, level: dist.guided(x, level, cond, d.isg_guidance)  # noqa: E731
            if p.kind == "ddpm" and m.isg.sdxl_mode == "official":
                t = isg_x0_targets(b.x_in, b.level_j, b.level_next, teacher, out_in, p)
            else:
                student = lambda x, level: dist.predict(dist.generator, x, level, cond)  # noqa: E731
                level_mid = p.level_from_grid(d.isg_mid_grid)
                t = isg_targets(b.x_in, b.level_j, b.level_next, level_mid, teacher, student, out_in, p)
            isg_loss(t.x_direct, t.x_target, m.isg.loss, m.isg.charbonnier_eps)
    if m.ida.enabled:
        with lap("IDA update"):
            ida_update_(dist.fake_score, dist.generator, m.ida.lam, m.ida.update_dtype)
    shared_passes(dist, b, x0, lap)


def other_turn_passes(dist: Distiller, b: Batch, lap: Laps) -> None:
    """Every pass of a non-generator turn: the generator forward runs without grad, no update."""
    with torch.no_grad(), lap("generator forward (no grad)"):
        out_in = dist.predict(dist.generator, b.x_in, b.level_j, b.cond)
        x0 = dist.param.x0_from_output(b.x_in, out_in, b.level_j)
    shared_passes(dist, b, x0, lap)


def shared_passes(dist: Distiller, b: Batch, x0: torch.Tensor, lap: Laps) -> None:
    """The fake-score and discriminator updates every iteration makes."""
    d, disc = b.draws, dist.discriminator
    shared = disc is not None and disc.shares_fake_update
    with lap(FAKE_AND_D if shared else "fake-score training step (fwd+bwd+opt)"):
        loss = dist.step.fake_loss(x0, d, b.cond)
        if shared:  # the DMD2 head: one backward of fake loss + D loss, as the trainer does
            with disc.fake_in_graph():
                d_loss, _ = dist.step.discriminator_loss(b.x_real, x0, b.cond, b.level_j, d)
            dist.joint_update(("fake_score", "discriminator"), loss + d_loss)
        else:
            dist.update("fake_score", loss)
    if disc is not None and not shared:
        pixels = disc.input_space == "pixels"
        real, fake = (b.images, dist.decode(x0)) if pixels else (b.x_real, x0)
        with lap("discriminator step"):
            d_loss, _ = dist.step.discriminator_loss(real, fake, b.cond, b.level_j, d)
            dist.update("discriminator", d_loss)


# Every pass in table order; a turn's sum is over the passes measured for it (the step excluded).
PASSES = (
    "data, draws, prompt encoding",
    "input (backward simulation)",
    "generator forward+backward",
    "generator optimiser step (clip + AdamW)",
    "generator forward (no grad)",
    "teacher guided forward (DMD, CFG: 2x batch)",
    "fake-score forward (DMD, no grad)",
    "GAN generator loss (D forward+backward to x0)",
    "ISG (teacher CFG step + generator no-grad step)",
    "IDA update",
    "fake-score training step (fwd+bwd+opt)",
    "discriminator step",
    "fake-score + discriminator joint step (DMD2 head)",
)
FAKE_AND_D = "fake-score + discriminator joint step (DMD2 head)"
STEP = "train_step (measured)"
IDA = "IDA update"
ISG = "ISG (teacher CFG step + generator no-grad step)"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(DEFAULT_RECIPE), help="distillation recipe YAML")
    ap.add_argument("--teacher", help="teacher folder (default: the recipe's model.teacher)")
    ap.add_argument("--batch-size", type=int, help="per-step batch (default: the recipe's)")
    ap.add_argument("--iterations", type=int, default=5, help="timed repeats of every measurement")
    ap.add_argument("--warmup", type=int, default=2, help="untimed repeats before the timed ones")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("overrides", nargs="*", help="dotted recipe overrides, e.g. method.isg.weight=0")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.iterations < 1 or args.warmup < 0:
        raise SystemExit("--iterations must be >= 1 and --warmup >= 0")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"output_dir={tmp}", "parallel.strategy=none", *args.overrides]
        if args.teacher:
            overrides.append(f"model.teacher={args.teacher}")
        if args.batch_size:
            overrides.append(f"data.batch_size={args.batch_size}")
        cfg = load_config(args.config, overrides)
        dist = Distiller(cfg, progress=False)
        lap = measure(dist, args.warmup, args.iterations)
        print_report(dist, lap, args)
    return 0


def measure(dist: Distiller, warmup: int, iterations: int) -> Laps:
    """Rounds of (step and passes of a generator turn, step and passes of another turn).

    Iteration 0 is a generator turn for any ``ttur_ratio`` and iteration 1 is not (unless the ratio
    is 1): the step is reset to those iterations each time, so every repeat sees the same batch and
    draws. Interleaving the four measurements exposes all of them to the same machine conditions.
    """
    lap = Laps()
    turns = {"G": 0} if dist.cfg.method.ttur_ratio == 1 else {"G": 0, "other": 1}
    for r in range(warmup + iterations):
        lap.recording = r >= warmup
        for turn, n in turns.items():
            lap.turn = turn
            dist.iteration = n
            with lap(STEP):
                dist.train_step()
            b = prepare(dist, n, lap)
            (generator_turn_passes if turn == "G" else other_turn_passes)(dist, b, lap)
    return lap


def _peak_memory(dist: Distiller) -> str:
    """Peak GPU memory allocated by torch, or the process's peak resident set on the CPU."""
    if dist.device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(dist.device) / 2**30:.2f} GiB (GPU, allocated)"
    import resource

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"


def print_report(dist: Distiller, lap: Laps, args: argparse.Namespace) -> None:
    cfg, ratio = dist.cfg, dist.cfg.method.ttur_ratio
    params = sum(p.numel() for p in dist.generator.parameters())
    teacher = getattr(dist.adapter, "folder", cfg.model.teacher)
    m = cfg.method
    print(
        f"recipe {args.config}\nteacher {teacher} ({params:,} parameters), batch {dist.batch}, "
        f"ttur_ratio {ratio}, ida {m.ida.enabled}, isg weight {m.isg.weight}, gan {m.gan.type}\n"
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); mean of {args.iterations} "
        f"repeats after {args.warmup} warm-up\n"
        f"device {dist.device}, precision {cfg.precision.model_dump()}, "
        f"gradient checkpointing {cfg.parallel.gradient_checkpointing}; peak memory {_peak_memory(dist)}"
    )
    turns = [t for t in ("G", "other") if lap.ms(t, STEP) is not None]
    width = max(len(n) for n in PASSES)
    head = "".join(f"  {t + ' turn ms':>13}  {'share':>6}" for t in turns)
    print(f"\n{'pass':<{width}}{head}")
    for name in PASSES:
        if all(lap.ms(t, name) is None for t in turns):
            continue
        cells = ""
        for t in turns:
            ms = lap.ms(t, name)
            cells += (
                f"  {ms:13.2f}  {100 * ms / lap.total_ms(t):5.1f}%"
                if ms is not None
                else f"  {'-':>13}  {'':>6}"
            )
        print(f"{name:<{width}}{cells}")
    print(f"{'sum of the passes':<{width}}" + "".join(f"  {lap.total_ms(t):13.2f}  {'':>6}" for t in turns))
    print(f"{STEP:<{width}}" + "".join(f"  {lap.ms(t, STEP):13.2f}  {'':>6}" for t in turns))
    print(
        f"{'measured / sum':<{width}}"
        + "".join(f"  {lap.ms(t, STEP) / lap.total_ms(t):13.3f}  {'':>6}" for t in turns)
    )
    step_g = lap.ms("G", STEP)
    cycle = step_g + (ratio - 1) * (lap.ms("other", STEP) or 0.0)
    print(f"\none TTUR cycle ({ratio} iterations): {cycle:.2f} ms, {cycle / ratio:.2f} ms per iteration")
    for name, label in ((IDA, "IDA"), (ISG, "ISG")):
        ms = lap.ms("G", name)
        if ms is not None:
            print(
                f"{label}: {ms:.2f} ms = +{100 * ms / (step_g - ms):.2f}% on a generator turn without it, "
                f"+{100 * ms / (cycle - ms):.2f}% per iteration averaged over a TTUR cycle"
            )
    print(f"({PAPER})")


if __name__ == "__main__":
    sys.exit(main())
