"""What the trainer checks before it loads anything, and the optimisers it builds from the recipe."""

from __future__ import annotations

import torch

from senseflow.config.registry import data_kind_spec, discriminator_spec, family_spec, resolve_builder
from senseflow.config.schema import DistillConfig, OptimizerConfig


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
