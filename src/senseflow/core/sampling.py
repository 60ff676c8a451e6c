"""Noise and guidance shared by every sampler (the samplers themselves: senseflow.models.sampling).

Noise is drawn per sample from its own seed, so an image depends only on (prompt, seed) and not
on which other prompts share its batch: a grid, an evaluation and a resumed job agree pixel for
pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

CfgConvention = Literal["uncond_plus", "cond_plus"]


def seeded_noise(shape: Sequence[int], seeds: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """One N(0, I) tensor of ``shape`` per seed, stacked: [len(seeds), *shape]."""
    return torch.stack(
        [
            torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)), dtype=dtype)
            for s in seeds
        ]
    )


def combine_guidance(
    cond: Tensor, uncond: Tensor, scale: float | Tensor, convention: CfgConvention
) -> Tensor:
    """Classifier-free guidance.

    ``uncond_plus``: u + w (c - u), so w = 1 is the plain conditional prediction (diffusers).
    ``cond_plus``: c + w (c - u), the convention reported for DMD2's code (its w is ours minus 1).
    """
    if convention == "uncond_plus":
        return uncond + scale * (cond - uncond)
    if convention == "cond_plus":
        return cond + scale * (cond - uncond)
    raise ValueError(f"unknown cfg convention {convention!r}; expected 'uncond_plus' or 'cond_plus'")
