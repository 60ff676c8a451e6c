"""FID preprocessing: clean-fid's "clean" resizer and the preset transforms.

See :mod:`senseflow.metrics.fid` for the protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from senseflow.metrics.image_io import center_crop, center_crop_square

INCEPTION_SIZE = 299

# --- resizer and presets ----------------------------------------------------------------------------


def clean_resize(image: np.ndarray, size: int = INCEPTION_SIZE, clip: bool = True) -> np.ndarray:
    """clean-fid's "clean" resizer: per-channel float32 PIL bicubic to ``size`` x ``size``.

    ``image`` is HxWx3 (uint8 or float, values in [0, 255]); returns float32 ``size x size x 3``,
    clipped to [0, 255] when ``clip`` (as clean-fid 0.1.35), never quantised.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    out = np.empty((size, size, 3), dtype=np.float32)
    for c in range(3):
        channel = Image.fromarray(np.ascontiguousarray(image[:, :, c], dtype=np.float32))  # mode "F"
        out[:, :, c] = np.asarray(channel.resize((size, size), resample=Image.Resampling.BICUBIC))
    if clip:
        np.clip(out, 0.0, 255.0, out=out)
    return out


def _identity(image: np.ndarray) -> np.ndarray:
    return image


def _dmd2_whole(image: np.ndarray) -> np.ndarray:
    square = Image.fromarray(center_crop_square(image))
    return np.asarray(square.resize((512, 512), resample=Image.Resampling.LANCZOS))


def _center299_patch(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    if h < INCEPTION_SIZE or w < INCEPTION_SIZE:
        raise ValueError(
            f"image is {w}x{h}; center299_patch needs both sides >= {INCEPTION_SIZE} "
            "(smaller images are rejected, not passed through)"
        )
    return center_crop(image, INCEPTION_SIZE, INCEPTION_SIZE)


@dataclass(frozen=True)
class Preset:
    """A preprocessing preset: a transform of the uint8 image applied before :func:`clean_resize`."""

    name: str
    transform: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    pre_resize: str | None  # recorded in the result
    crop: str | None  # "center" for patches
    patches_per_image: int | None


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("clean299", _identity, pre_resize=None, crop=None, patches_per_image=None),
        Preset(
            "dmd2_whole", _dmd2_whole, pre_resize="square_crop+lanczos512", crop=None, patches_per_image=None
        ),
        Preset("center299_patch", _center299_patch, pre_resize=None, crop="center", patches_per_image=1),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown FID preset {name!r}; expected one of {sorted(PRESETS)}") from None


def preprocess(image: np.ndarray, preset: str = "clean299") -> np.ndarray:
    """uint8 HxWx3 image -> float32 299x299x3 network input in [0, 255] for ``preset``."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.dtype} with shape {image.shape}")
    return clean_resize(get_preset(preset).transform(image))
