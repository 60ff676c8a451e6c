"""What the trainer checks before it loads anything, and the optimisers it builds from the recipe."""

from __future__ import annotations

import warnings

import torch

from senseflow.config.registry import data_kind_spec, discriminator_spec, family_spec, resolve_builder
from senseflow.config.schema import DistillConfig, OptimConfig, OptimizerConfig


def check_optimizers(cfg: DistillConfig, device: torch.device) -> None:
    """8-bit AdamW is bitsandbytes' CUDA kernel: refuse it elsewhere before anything is loaded."""
    for field, o in (
        ("generator", cfg.optim.generator),
        ("fake", cfg.optim.fake),
        ("discriminator", cfg.optim.discriminator),
    ):
        if o.name == "adamw8bit" and device.type != "cuda":
            raise ValueError(
                f"optim.{field}.name: 'adamw8bit' (bitsandbytes) runs on CUDA only and this run's device is "
                f"{device}; use adamw"
            )


def build_optimizer(params, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ImportError(
                "optim.*.name 'adamw8bit' needs bitsandbytes (pip install bitsandbytes)"
            ) from exc
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def zero_missing_grads(optimizer: torch.optim.Optimizer) -> None:
    """Give a zero gradient to each trainable parameter with neither a gradient nor optimiser state.

    A parameter the output never reads (``adapter.has_unused_parameters``: a double-stream DiT whose
    last block still computes a text stream) gets no gradient, so AdamW would keep no state for it,
    while torch's state-dict loader on resume creates one for every parameter. With a zero gradient
    on its first update its moments are zero and it does not move (beyond weight decay)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None and p.requires_grad and p not in optimizer.state:
                p.grad = torch.zeros_like(p)


def warmup_factor(n: int, steps: int, start: float) -> float:
    """The LR multiplier at 0-based iteration ``n``: linear from ``start`` to 1 over ``steps``
    iterations, then 1 (the official LambdaWarmUpConstantScheduler, whose values are start and peak)."""
    return start + (1 - start) * n / steps if n < steps else 1.0


def build_schedulers(
    optimizers: dict[str, torch.optim.Optimizer], cfg: OptimConfig
) -> dict[str, torch.optim.lr_scheduler.LambdaLR]:
    """One warm-up schedule per optimiser; the trainer steps all of them once per iteration."""
    warm, start = cfg.warmup_steps, cfg.warmup_start_factor
    return {
        name: torch.optim.lr_scheduler.LambdaLR(opt, lambda n: warmup_factor(n, warm, start))
        for name, opt in optimizers.items()
    }


def step_schedulers(schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR]) -> None:
    """One step of every schedule, at the end of each iteration: the warm-up counts iterations, so a
    network that has not stepped yet (G before its first TTUR turn) advances too. torch warns about
    exactly that order; here it is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        for scheduler in schedulers.values():
            scheduler.step()


def check_buildable(cfg: DistillConfig) -> None:
    """Stop before anything is loaded when the recipe names a family, data kind or discriminator that
    this version can validate but not build."""
    resolve_builder(family_spec(cfg.model.family), "model.family")
    resolve_builder(data_kind_spec(cfg.data.kind), "data.kind")
    if cfg.method.gan.type != "none":
        resolve_builder(discriminator_spec(cfg.method.gan.type), "method.gan.type")


def check_supported(cfg: DistillConfig) -> None:
    """Refuse settings this version would otherwise silently mistrain with."""
    p = cfg.precision
    unsupported = [
        f"precision.{name}=fp16"
        for name, value in (("param_dtype", p.param_dtype), ("autocast_dtype", p.autocast_dtype))
        if value == "fp16"
    ]
    if unsupported:
        raise ValueError(
            "not supported: " + ", ".join(unsupported) + " (float16 training needs loss scaling, which this "
            "trainer does not do; use bf16, as every official recipe does)"
        )
