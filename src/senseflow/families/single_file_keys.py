"""Renaming a diffusers state dict into an original (non-diffusers) single-file layout, tensor by
tensor, with a check that every source tensor landed and every expected one was found."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

_PARAMS = ("weight", "bias")


def swap_halves(t: Tensor) -> Tensor:
    """Exchange the two halves of the output rows ((scale, shift) <-> (shift, scale))."""
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


class KeyMover:
    """Moves tensors from a source state dict to a target one under new names, remembering which
    sources were used, so that :meth:`finish` can refuse a conversion that missed or dropped one
    (shared by the FLUX and SD3 layouts)."""

    def __init__(self, source: Mapping[str, Tensor]) -> None:
        self.source = source
        self.left = set(source)
        self.out: dict[str, Tensor] = {}
        self.missing: list[str] = []

    def _take(self, key: str) -> Tensor | None:
        if key not in self.source:
            self.missing.append(key)
            return None
        self.left.discard(key)
        return self.source[key]

    def _put(self, key: str, value: Tensor) -> None:
        if key in self.out:
            raise ValueError(f"two tensors map to {key!r}")
        self.out[key] = value

    def rename(self, src: str, dst: str) -> None:
        """One tensor renamed."""
        value = self._take(src)
        if value is not None:
            self._put(dst, value)

    def module(self, src: str, dst: str, *, swap: bool = False) -> None:
        """A linear layer renamed (its weight, and its bias when it has one)."""
        for param in _PARAMS:
            key = f"{src}.{param}"
            if param == "bias" and key not in self.source:
                continue
            value = self._take(key)
            if value is not None:
                self._put(f"{dst}.{param}", swap_halves(value) if swap else value)

    def norm(self, src: str, dst: str) -> None:
        """An RMS norm's weight, called ``scale`` in the original layout."""
        value = self._take(f"{src}.weight")
        if value is not None:
            self._put(f"{dst}.scale", value)

    def fused(self, srcs: tuple[str, ...], dst: str) -> None:
        """Linear layers stacked along their output rows into one."""
        for param in _PARAMS:
            keys = [f"{s}.{param}" for s in srcs]
            present = [k in self.source for k in keys]
            if param == "bias" and not any(present):
                continue
            parts = [self._take(k) for k in keys]
            if all(p is not None for p in parts):
                self._put(f"{dst}.{param}", torch.cat(parts, dim=0))

    def modules(self, src: str, dst: str, table: Mapping[str, str]) -> None:
        """Every layer of ``table`` (diffusers name -> original name) under the two prefixes."""
        for s, d in table.items():
            self.module(src + s, dst + d)

    def norms(self, src: str, dst: str, table: Mapping[str, str]) -> None:
        for s, d in table.items():
            self.norm(src + s, dst + d)

    def fused_layers(self, src: str, dst: str, table: Mapping[str, tuple[str, ...]]) -> None:
        """Every fused layer of ``table`` (original name -> the diffusers layers stacked in it)."""
        for d, parts in table.items():
            self.fused(tuple(src + p for p in parts), dst + d)

    def finish(self, what: str) -> dict[str, Tensor]:
        if self.missing:
            raise ValueError(f"{what}: expected tensors missing: {', '.join(sorted(self.missing))}")
        if self.left:
            unmapped = ", ".join(sorted(self.left))
            raise ValueError(f"{what}: tensors with no place in the original layout: {unmapped}")
        return self.out
