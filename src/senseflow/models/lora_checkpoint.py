"""Gradient checkpointing for LoRA mode: each block's recompute runs with the adapter that was active
at its forward, whichever role ran in between (the reason is in ``models/lora.py``'s docstring)."""

from __future__ import annotations

import contextlib
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

from senseflow.models.lora import _state, _states_applied, lora_layers


def lora_checkpoint(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``torch.utils.checkpoint.checkpoint`` (non-reentrant) of ``module(*args, **kwargs)`` whose
    recompute runs with the adapter state ``module``'s LoRA layers had at forward time.

    The signature is diffusers' ``gradient_checkpointing_func``; see
    :func:`enable_lora_gradient_checkpointing`."""
    layers = lora_layers(module)
    if not layers:
        return checkpoint(module.__call__, *args, use_reentrant=False, **kwargs)
    at_forward = [_state(layer) for layer in layers]

    def context_fn() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), _states_applied(layers, at_forward)

    return checkpoint(module.__call__, *args, use_reentrant=False, context_fn=context_fn, **kwargs)


def enable_lora_gradient_checkpointing(base: nn.Module) -> None:
    """Turn on diffusers' gradient checkpointing of ``base`` with :func:`lora_checkpoint`, so every
    block's recompute uses the adapter of its forward, whichever role ran in between."""
    enable = getattr(base, "enable_gradient_checkpointing", None)
    if enable is None:
        raise ValueError(f"{type(base).__name__} has no enable_gradient_checkpointing")
    enable(gradient_checkpointing_func=lora_checkpoint)
