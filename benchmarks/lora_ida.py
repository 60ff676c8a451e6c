"""LoRA IDA, ``factors`` vs ``products``, on the toy teacher: how far apart do the two variants end up?

In LoRA mode the generator and the fake score are two adapters on one frozen base, and IDA pulls the
fake adapter toward the generator's after every generator step. ``products`` interpolates the deltas
ΔW = s·B·A exactly up to a rank-r truncation; ``factors`` interpolates A and B separately, which is not
the interpolation of the products. This script measures both against the exact recursion, without
the trainer:

* one base (the shipped toy teacher's ``SD3Transformer2DModel``) carries three adapters attached
  identically: ``generator``, ``fake_factors`` and ``fake_products``;
* the generator adapter takes ``--steps`` real optimiser steps (SGD or AdamW) on the flow-matching
  denoising loss of the toy world (rendered images and their prompts, σ ~ U(0, 1));
* after each step, IDA with ``--lam`` is applied to ``fake_factors`` (variant ``factors``) and to
  ``fake_products`` (variant ``products``), and the exact recursion ΔW_ref ← λΔW_ref + (1−λ)ΔW_G is
  kept as dense matrices per module (what full-weight IDA would do to these deltas);
* the fake adapters take no steps of their own, so every difference comes from IDA.

Printed per configuration (optimiser, learning rate, rank), after the last step:

* ``factors err`` / ``products err``: ‖ΔW_variant − ΔW_ref‖_F / ‖ΔW_ref‖_F over all modules;
* ``f vs p``: ‖ΔW_factors − ΔW_products‖_F / ‖ΔW_ref‖_F;
* ``dW_G / W``: ‖ΔW_G‖_F / ‖W‖_F over the adapted modules, how far the generator moved from the teacher;
* ``lag``: ‖ΔW_G − ΔW_ref‖_F / ‖ΔW_G‖_F, how far the (exact) fake trails the generator, for scale;
* ``f step err`` / ``p step err``: each update's error against the exact mix of the same fake
  (λΔW_f + (1−λ)ΔW_G from the fake's delta before the update), relative to the size of the step,
  ‖(1−λ)(ΔW_G − ΔW_f)‖_F, averaged over the steps: how wrong a single IDA update is;
* ``trunc mean`` / ``trunc max``: the products variant's reported truncation error (all modules
  together) averaged over the steps and its largest value, and the worst single module's;
* ``out f vs p``: the fake score's output, factors vs products, relative to how far the products
  fake's output is from the teacher's (on one fixed batch, in float64);
* the time of one IDA call of each variant on the toy network, and then, apart, of one module of
  ``--cost-width`` (FLUX.1-dev's 3072) for each rank.

    python benchmarks/lora_ida.py                          # the table of docs/results/lora_ida.md
    python benchmarks/lora_ida.py --steps 200 --ranks 4    # a longer run
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterable

import torch
from diffusers import SD3Transformer2DModel
from torch import Tensor, nn

from senseflow.families.toy.adapter import ToyAdapter
from senseflow.families.toy.data import ShapesBatches
from senseflow.method.ida_lora import ida_lora_update_
from senseflow.models.lora import LoraRole, LoraSettings, attach_lora

NAMES = ("generator", "fake_factors", "fake_products")


def deltas(base: nn.Module, name: str) -> dict[str, Tensor]:
    """ΔW = scaling·B·A (float64) of adapter ``name``, per adapted module."""
    out = {}
    for mname, module in base.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and name in lora_a:
            a = lora_a[name].weight.detach().double()
            b = module.lora_B[name].weight.detach().double()
            out[mname] = module.scaling[name] * (b @ a)
    return out


def frob(parts: Iterable[Tensor]) -> float:
    return math.sqrt(sum(float(p.square().sum()) for p in parts))


def rel(x: dict[str, Tensor], y: dict[str, Tensor], scale: dict[str, Tensor]) -> float:
    return frob(x[k] - y[k] for k in x) / frob(scale.values())


def run(
    opt_name: str, lr: float, rank: int, steps: int, lam: float, batch_size: int, seed: int
) -> dict[str, float]:
    adapter = ToyAdapter(None)
    torch.manual_seed(seed)
    base = SD3Transformer2DModel.from_pretrained(adapter.folder, subfolder="transformer")
    attach_lora(base, LoraSettings(rank=rank, alpha=float(rank), seed=seed), names=NAMES)
    gen = LoraRole(base, "generator")
    params = list(gen.parameters())
    opt = (
        torch.optim.SGD(params, lr=lr)
        if opt_name == "sgd"
        else torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    )
    data = ShapesBatches("train", batch_size, seed=seed)
    g = torch.Generator().manual_seed(seed)
    reference = deltas(base, "fake_products")  # zero at the start
    truncation, worst = [], []
    times: dict[str, list[float]] = {"factors": [], "products": []}
    step_errors: dict[str, list[float]] = {"factors": [], "products": []}
    for step in range(steps):
        x0, prompts = data.batch(step)
        cond = adapter.encode_prompts(prompts)
        sigma = torch.rand(batch_size, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        x_t = adapter.param.add_noise(x0, eps, sigma)
        target = adapter.param.training_target(x0, eps, sigma)
        loss = (adapter.predict(gen, x_t, sigma, cond) - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        generator_delta = deltas(base, "generator")
        for variant in ("factors", "products"):
            before = deltas(base, f"fake_{variant}")
            start = time.perf_counter()
            report = ida_lora_update_(base, lam, variant, fake=f"fake_{variant}")
            times[variant].append(time.perf_counter() - start)
            # this update against the exact mix of the same fake: its error relative to the step's size
            exact = {k: lam * v + (1.0 - lam) * generator_delta[k] for k, v in before.items()}
            wanted = {k: exact[k] - before[k] for k in before}
            step_errors[variant].append(rel(deltas(base, f"fake_{variant}"), exact, wanted))
        truncation.append(report.relative_error)
        worst.append(report.max_relative_error)
        reference = {k: lam * v + (1.0 - lam) * generator_delta[k] for k, v in reference.items()}

    d_f, d_p, d_g = deltas(base, "fake_factors"), deltas(base, "fake_products"), deltas(base, "generator")
    weights = dict(base.named_modules())
    moved = frob(d_g.values()) / frob(weights[k].base_layer.weight.double() for k in d_g)
    # outputs on one fixed batch, in float64 so that rounding does not hide small differences
    x0, prompts = data.batch(10_000)
    cond = adapter.encode_prompts(prompts)
    cond = type(cond)({k: v.double() for k, v in cond.tensors.items()})
    sigma = torch.linspace(0.1, 0.9, batch_size, dtype=torch.float64)
    x_t = adapter.param.add_noise(x0.double(), torch.randn(x0.shape, generator=g).double(), sigma)
    base.double()
    with torch.no_grad():
        out = {n: adapter.predict(LoraRole(base, n), x_t, sigma, cond) for n in (*NAMES[1:], None)}
    out_gap = (out["fake_factors"] - out["fake_products"]).norm() / (out["fake_products"] - out[None]).norm()
    return {
        "factors err": rel(d_f, reference, reference),
        "products err": rel(d_p, reference, reference),
        "f vs p": rel(d_f, d_p, reference),
        "lag": rel(d_g, reference, d_g),
        "trunc mean": sum(truncation) / len(truncation),
        "trunc max": max(truncation),
        "module max": max(worst),
        "f step err": sum(step_errors["factors"]) / steps,
        "p step err": sum(step_errors["products"]) / steps,
        "out f vs p": float(out_gap),
        "dW_G / W": moved,
        "ms factors": 1e3 * sum(times["factors"]) / steps,
        "ms products": 1e3 * sum(times["products"]) / steps,
    }


def module_cost(width: int, ranks: Iterable[int], repeats: int = 5) -> None:
    """Milliseconds of one module's IDA at ``width`` × ``width`` (FLUX.1-dev's attention projections
    are 3072 × 3072, 266 of them with the default targets), on this machine's CPU."""
    from senseflow.method.ida_lora import mix_lora_products

    g = torch.Generator().manual_seed(0)
    print(f"\none module of {width} x {width}, CPU, {torch.get_num_threads()} thread(s): ms per IDA call")
    print("| rank | factors | products |")
    print("|---|---|---|")
    for rank in ranks:
        a_f, a_g = (torch.randn(rank, width, generator=g) for _ in range(2))
        b_f, b_g = (torch.randn(width, rank, generator=g) for _ in range(2))
        laps = {"factors": [], "products": []}
        for _ in range(repeats):
            start = time.perf_counter()
            for fake, gen in ((a_f, a_g), (b_f, b_g)):
                fake.mul_(0.97).add_(gen, alpha=0.03)
            laps["factors"].append(time.perf_counter() - start)
            start = time.perf_counter()
            mix_lora_products(a_f, b_f, a_g, b_g, 0.97)
            laps["products"].append(time.perf_counter() - start)
        print(f"| {rank} | {1e3 * min(laps['factors']):.3f} | {1e3 * min(laps['products']):.2f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lam", type=float, default=0.97)
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    parser.add_argument(
        "--runs",
        nargs="+",
        default=["sgd:0.1", "sgd:1.0", "adamw:1e-4", "adamw:1e-3"],
        help="optimiser:learning-rate pairs (optimiser sgd or adamw)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cost-width", type=int, default=3072, help="0: skip the per-module cost table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    columns = [
        "dW_G / W",
        "factors err",
        "products err",
        "f vs p",
        "lag",
        "f step err",
        "p step err",
        "trunc mean",
        "trunc max",
        "module max",
        "out f vs p",
        "ms factors",
        "ms products",
    ]
    print(f"toy teacher, {args.steps} generator steps, IDA lambda {args.lam}, batch {args.batch_size}")
    print("| optimiser | lr | rank | " + " | ".join(columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    for spec in args.runs:
        opt_name, lr = spec.split(":")
        for rank in args.ranks:
            row = run(opt_name, float(lr), rank, args.steps, args.lam, args.batch_size, args.seed)
            cells = [f"{row[c]:.2f}" if c.startswith("ms") else f"{row[c]:.2e}" for c in columns]
            print(f"| {opt_name} | {lr} | {rank} | " + " | ".join(cells) + " |", flush=True)
    if args.cost_width:
        module_cost(args.cost_width, (*args.ranks, 64))


if __name__ == "__main__":
    main()
