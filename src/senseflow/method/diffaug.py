"""DiffAugment for the discriminator's input image (spec §8.1; parameters are §12.14).

Differentiable augmentations (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN
Training") applied to what D sees, real and fake alike, so that G's gradient passes through them.
They are split in two so that the trainer can draw every random number of an iteration up front
(``senseflow.train.draws``) and slice it per rank:

* :func:`draw_diffaug_params` draws one parameter set per sample from a ``torch.Generator``;
* :func:`diffaug` is a pure function of ``(x, params)``: the same params give the same output, and
  the output is differentiable in ``x``.

The ranges below are the DiffAugment paper's reference implementation's, per sample; the official
SenseFlow code uses them with a cutout ratio of 0.2 (§13), which the recipes set through
``method.gan.diffaug_translation`` / ``diffaug_cutout`` (the module defaults stay the paper's):

* ``color``: brightness x + b, b ~ U[-0.5, 0.5); saturation (x - m_c)·s + m_c with m_c the
  per-pixel mean over channels, s ~ U[0, 2); contrast (x - m)·c + m with m the per-sample mean over
  channels and pixels, c ~ U[0.5, 1.5); applied in that order.
* ``translation``: an integer shift of up to ⌊ratio·size + 0.5⌋ pixels (ratio 1/8) along each axis,
  uniform over the signed range; pixels shifted in are zero.
* ``cutout``: a square-ish box of ⌊ratio·size + 0.5⌋ pixels per side (ratio 1/2) is zeroed; its
  centre is uniform over the image (for an even side, over one position past the last row/column),
  and the part of the box outside the image is dropped.

Policies are applied in the fixed order color, translation, cutout (the reference order), whatever
order the recipe lists them in. Inputs are ``[N, C, H, W]`` tensors of any channel count.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "BRIGHTNESS_RANGE",
    "CONTRAST_RANGE",
    "CUTOUT_RATIO",
    "DIFFAUG_POLICIES",
    "SATURATION_RANGE",
    "TRANSLATION_RATIO",
    "DiffAugParams",
    "diffaug",
    "draw_diffaug_params",
    "neutral_diffaug_params",
]

DIFFAUG_POLICIES = ("color", "translation", "cutout")  # also the order of application

BRIGHTNESS_RANGE = (-0.5, 0.5)  # additive offset b
SATURATION_RANGE = (0.0, 2.0)  # factor s on the deviation from the channel mean
CONTRAST_RANGE = (0.5, 1.5)  # factor c on the deviation from the image mean
TRANSLATION_RATIO = 1 / 8  # largest shift as a fraction of the side
CUTOUT_RATIO = 1 / 2  # box side as a fraction of the image side

DiffAugParams = dict[str, Tensor]
"""Per-sample parameters, first dimension N: ``brightness``, ``saturation``, ``contrast`` [N] float;
``translation`` [N, 2] long (dy, dx); ``cutout`` [N, 4] long (centre y, centre x, height, width)."""


def _policies(policy: Iterable[str]) -> set[str]:
    chosen = set(policy)
    unknown = chosen - set(DIFFAUG_POLICIES)
    if unknown:
        raise ValueError(f"DiffAugment policies must be among {DIFFAUG_POLICIES}, got {sorted(unknown)}")
    return chosen


def _spatial(image_shape: Sequence[int]) -> tuple[int, int]:
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
    return int(image_shape[1]), int(image_shape[2])


def _side(ratio: float, size: int) -> int:
    return int(ratio * size + 0.5)


def _uniform(n: int, bounds: tuple[float, float], generator: torch.Generator | None) -> Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(n, generator=generator)


def draw_diffaug_params(
    policy: Iterable[str],
    n: int,
    image_shape: Sequence[int],
    generator: torch.Generator | None = None,
    translation_ratio: float = TRANSLATION_RATIO,
    cutout_ratio: float = CUTOUT_RATIO,
) -> DiffAugParams:
    """Parameters for ``n`` samples of shape ``image_shape`` = (C, H, W), drawn in policy order; the
    ratios default to the DiffAugment paper's (the official SenseFlow code: 1/8 and 0.2, §13)."""
    chosen = _policies(policy)
    h, w = _spatial(image_shape)
    params: DiffAugParams = {}
    if "color" in chosen:
        params["brightness"] = _uniform(n, BRIGHTNESS_RANGE, generator)
        params["saturation"] = _uniform(n, SATURATION_RANGE, generator)
        params["contrast"] = _uniform(n, CONTRAST_RANGE, generator)
    if "translation" in chosen:
        sy, sx = _side(translation_ratio, h), _side(translation_ratio, w)
        dy = torch.randint(-sy, sy + 1, (n,), generator=generator)
        dx = torch.randint(-sx, sx + 1, (n,), generator=generator)
        params["translation"] = torch.stack([dy, dx], dim=1)
    if "cutout" in chosen:
        ch, cw = _side(cutout_ratio, h), _side(cutout_ratio, w)
        cy = torch.randint(0, h + (1 - ch % 2), (n,), generator=generator)
        cx = torch.randint(0, w + (1 - cw % 2), (n,), generator=generator)
        size = torch.tensor([ch, cw]).expand(n, 2)
        params["cutout"] = torch.cat([torch.stack([cy, cx], dim=1), size], dim=1)
    return params


def neutral_diffaug_params(policy: Iterable[str], n: int) -> DiffAugParams:
    """Parameters under which :func:`diffaug` is the identity (zero shift, unit factors, empty box)."""
    chosen = _policies(policy)
    params: DiffAugParams = {}
    if "color" in chosen:
        params["brightness"] = torch.zeros(n)
        params["saturation"] = torch.ones(n)
        params["contrast"] = torch.ones(n)
    if "translation" in chosen:
        params["translation"] = torch.zeros(n, 2, dtype=torch.long)
    if "cutout" in chosen:
        params["cutout"] = torch.zeros(n, 4, dtype=torch.long)
    return params


def _per_sample(values: Tensor, x: Tensor) -> Tensor:
    return values.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _color(x: Tensor, brightness: Tensor, saturation: Tensor, contrast: Tensor) -> Tensor:
    x = x + _per_sample(brightness, x)
    mean_c = x.mean(dim=1, keepdim=True)
    x = (x - mean_c) * _per_sample(saturation, x) + mean_c
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _per_sample(contrast, x) + mean


def _translate(x: Tensor, shift: Tensor) -> Tensor:
    """``out[..., i, j] = x[..., i + dy, j + dx]`` where that lies inside the image, else 0."""
    n, _, h, w = x.shape
    shift = shift.to(x.device)
    rows = torch.arange(h, device=x.device)[None, :] + shift[:, :1]  # [N, H]
    cols = torch.arange(w, device=x.device)[None, :] + shift[:, 1:]  # [N, W]
    keep = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None]
    # Advanced indices around a slice put the indexed axes first: [N, H, W, C].
    moved = x[batch, :, rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
    return moved.permute(0, 3, 1, 2) * keep[:, None].to(x.dtype)


def _cutout(x: Tensor, box: Tensor) -> Tensor:
    _, _, h, w = x.shape
    box = box.to(x.device)
    top = box[:, 0] - box[:, 2] // 2
    left = box[:, 1] - box[:, 3] // 2
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + box[:, 2])[:, None])  # [N, H]
    in_cols = (cols >= left[:, None]) & (cols < (left + box[:, 3])[:, None])  # [N, W]
    cut = in_rows[:, :, None] & in_cols[:, None, :]
    return x * (~cut)[:, None].to(x.dtype)


def diffaug(x: Tensor, params: DiffAugParams) -> Tensor:
    """Apply the augmentations present in ``params`` to ``x`` [N, C, H, W] (differentiable in ``x``)."""
    if x.ndim != 4:
        raise ValueError(f"DiffAugment needs [N, C, H, W] inputs, got shape {tuple(x.shape)}")
    for key, value in params.items():
        if value.shape[0] != x.shape[0]:
            raise ValueError(f"DiffAugment params '{key}' cover {value.shape[0]} samples, x has {x.shape[0]}")
    if "brightness" in params:
        x = _color(x, params["brightness"], params["saturation"], params["contrast"])
    if "translation" in params:
        x = _translate(x, params["translation"])
    if "cutout" in params:
        x = _cutout(x, params["cutout"])
    return x
