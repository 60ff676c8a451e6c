"""How hard ISG pulls on the generator's output, next to DMD, for each ISG loss: the measurement
behind the toy recipe's ISG loss (docs/results/toy_ablation.md).

For a distillation run's checkpoint (or the untrained student, ``--checkpoint none``), on
``--batches`` generator turns drawn as the trainer draws them, it computes the DMD loss and the ISG
segment targets once, then for the squared L2 and for the Charbonnier at each ``--eps``:

* the ratio of the norms of the two terms' gradients on G's raw output (as logged during training
  as ``isg_grad_ratio``), at ISG weight 1;
* the share of the ISG gradient's energy that lands on background pixels (the evaluator's labels of
  the segment target), next to the background's share of the pixels and DMD's own share;
* the share of residuals |x_direct - x_target| larger than 10 eps (where the Charbonnier behaves as L1:
  the same push for every such pixel however small its error).

    python benchmarks/isg_scale.py --run runs/toy_ablation/vanilla/seed0 --batches 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from senseflow.config import load_config
from senseflow.method import dmd_loss, isg_loss, isg_targets
from senseflow.metrics.shapes.evaluator import BACKGROUND_LABEL, label_pixels, to_uint8
from senseflow.train import checkpoint as ckpt
from senseflow.train.trainer import Distiller


def _background(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] bool: pixels the evaluator labels background in images ``x`` ([-1, 1], NCHW)."""
    masks = [label_pixels(img)[0] == BACKGROUND_LABEL for img in to_uint8(x.detach())]
    return torch.from_numpy(np.stack(masks))[:, None]


def _share(g: torch.Tensor, mask: torch.Tensor) -> float:
    energy = g.float() ** 2
    return float((energy * mask).sum() / energy.sum())


def measure(dist: Distiller, batches: int, eps_list: list[float]) -> dict[str, dict[str, list[float]]]:
    p, out = dist.param, {}
    if p.kind == "ddpm" and dist.cfg.method.isg.sdxl_mode == "official":
        raise SystemExit("isg_scale.py measures the segment form of ISG; sdxl_mode official is not covered")
    for n in range(batches):
        batch = dist.data.batch(n).to(dist.device)
        x_real, cond = dist.inputs(batch)
        _, d = dist.draws(n, tuple(x_real.shape[1:]))
        with torch.no_grad():
            x_in = dist.step.generator_input(x_real, d, cond)
        level_j, level_next = dist.levels[d.anchor_index], dist.levels[d.anchor_index + 1]
        out_in = dist.predict(dist.generator, x_in, level_j, cond).detach().requires_grad_(True)
        x0 = p.x0_from_output(x_in, out_in, level_j)
        x_t = p.add_noise(x0, d.dmd_noise, d.dmd_level).detach()
        with torch.no_grad():
            fake = p.x0_from_output(x_t, dist.predict(dist.fake_score, x_t, d.dmd_level, cond), d.dmd_level)
            real = p.x0_from_output(x_t, dist.guided(x_t, d.dmd_level, cond, d.dmd_guidance), d.dmd_level)
        dmd = dmd_loss(x0, fake, real)
        teacher = lambda x, level, c=cond, g=d.isg_guidance: dist.guided(x, level, c, g)  # noqa: E731
        student = lambda x, level, c=cond: dist.predict(dist.generator, x, level, c)  # noqa: E731
        level_mid = p.level_from_grid(d.isg_mid_grid)
        t = isg_targets(x_in, level_j, level_next, level_mid, teacher, student, out_in, p)
        mask = _background(t.x_target)
        (g_dmd,) = torch.autograd.grad(dmd.loss, out_in, retain_graph=True)
        residual = (t.x_direct - t.x_target).detach().abs()
        row = out.setdefault("DMD", {})
        row.setdefault("background share of gradient", []).append(_share(g_dmd, mask))
        row.setdefault("background share of pixels", []).append(float(mask.float().mean()))
        for kind, eps in [("l2", None), *[("charbonnier", e) for e in eps_list]]:
            name = "L2" if kind == "l2" else f"Charbonnier eps {eps:g}"
            term = isg_loss(t.x_direct, t.x_target, kind, eps)
            (g,) = torch.autograd.grad(term, out_in, retain_graph=True)
            row = out.setdefault(name, {})
            row.setdefault("|grad ISG| / |grad DMD|", []).append(float(g.norm() / g_dmd.norm()))
            row.setdefault("background share of gradient", []).append(_share(g, mask))
            if eps is not None:
                row.setdefault("residuals > 10 eps", []).append(float((residual > 10 * eps).float().mean()))
        out.setdefault("residual", {}).setdefault("mean |x_direct - x_target|", []).append(
            float(residual.mean())
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a distillation run folder (its config.yaml is used)")
    ap.add_argument("--checkpoint", default="latest", help="latest, none (the untrained student) or a path")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-3, 1e-2, 3e-2, 1e-1])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"output_dir={tmp}", "checkpoint.resume=null", "method.isg.weight=1"]
        dist = Distiller(load_config(run / "config.yaml", overrides), progress=False)
        if args.checkpoint != "none":
            path = (
                ckpt.latest_checkpoint(run / "checkpoints")
                if args.checkpoint == "latest"
                else args.checkpoint
            )
            if path is None:
                raise SystemExit(f"no complete checkpoint in {run / 'checkpoints'}")
            dist.resume(Path(path))
            where = Path(path).name
        else:
            where = "untrained student (the teacher's weights)"
        results = measure(dist, args.batches, args.eps)
    print(f"{run}, {where}, {args.batches} generator turns of batch {dist.batch}: mean (min..max) over turns")
    print("| term | statistic | value |\n|---|---|---|")
    for term, stats in results.items():
        for stat, values in stats.items():
            mean = statistics.fmean(values)
            print(f"| {term} | {stat} | {mean:.4g} ({min(values):.3g}..{max(values):.3g}) |")


if __name__ == "__main__":
    main()
