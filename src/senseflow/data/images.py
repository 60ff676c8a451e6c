"""One image, from bytes or a file to a square training crop: decode, resize, crop, check.

Every image kind goes through :func:`load_image` then :func:`resize_and_crop`, so geometry and
metadata mean the same thing for every source. The image is resized (bicubic, antialiased) so that
its short side equals the resolution, then cropped square: at the center (``(H - R) // 2``,
``(W - R) // 2``) or at a position drawn from the generator the caller passes. The crop's top-left
corner is in the resized image's pixels, and the original size is the decoded image's (after its
EXIF orientation), as SDXL's micro-conditioning expects.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class BadImage(Exception):
    """An image that cannot be used: unreadable, truncated or too small. Streams skip it."""


@dataclass(frozen=True)
class Crop:
    """A square crop of an image resized to ``resolution`` on its short side."""

    original_size: tuple[int, int]  # (h, w) of the decoded image
    resized_size: tuple[int, int]  # (h, w) after resizing
    top_left: tuple[int, int]  # (top, left) in resized pixels


def load_image(source: bytes | str | Path, min_side: int) -> Image.Image:
    """The decoded RGB image (EXIF orientation applied); :class:`BadImage` when it cannot be read in
    full or its short side is below ``min_side``."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()  # a truncated file fails here, not later
            rgb = image.convert("RGB")
    except Exception as exc:  # PIL raises many kinds (OSError, SyntaxError, ValueError, bomb errors)
        raise BadImage(f"unreadable ({type(exc).__name__}: {exc})") from None
    if min(rgb.size) < min_side:
        raise BadImage(f"too small ({rgb.width}x{rgb.height}; short side below {min_side})")
    return rgb


def crop_geometry(
    height: int, width: int, resolution: int, random: np.random.Generator | None = None
) -> Crop:
    """Where the square crop of an ``height`` x ``width`` image falls: resized so the short side is
    ``resolution`` (the long side rounded), then centered, or placed by ``random`` when given."""
    scale = resolution / min(height, width)
    new_h = resolution if height <= width else max(resolution, round(height * scale))
    new_w = resolution if width <= height else max(resolution, round(width * scale))
    if random is None:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    else:
        top = int(random.integers(0, new_h - resolution + 1))
        left = int(random.integers(0, new_w - resolution + 1))
    return Crop((height, width), (new_h, new_w), (top, left))


def resize_and_crop(
    image: Image.Image, resolution: int, random: np.random.Generator | None = None
) -> tuple[torch.Tensor, Crop]:
    """The square crop as float32 CHW in [-1, 1], and where it was taken."""
    crop = crop_geometry(image.height, image.width, resolution, random)
    (new_h, new_w), (top, left) = crop.resized_size, crop.top_left
    if (new_h, new_w) != (image.height, image.width):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=None)
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    return pixels.permute(2, 0, 1).float().div(127.5).sub(1.0), crop
