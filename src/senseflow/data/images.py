"""One image, from bytes or a file to a square training crop: decode, resize, crop, check.

Every image kind goes through :func:`load_image` then :func:`resize_and_crop`, so geometry and
metadata mean the same thing for every source. The image is resized (bicubic, antialiased) so that
its short side equals the resolution, then cropped square: at the center (``(H - R) // 2``,
``(W - R) // 2``) or at a position drawn from the generator the caller passes. The crop's top-left
corner is in the resized image's pixels, and the original size is the decoded image's (after its
EXIF orientation), as SDXL's micro-conditioning expects.

Images with more than 8 bits per channel (16-bit grayscale PNGs: modes ``I;16*``; 32-bit integer
``I``; float ``F``) are rescaled to 8 bits before the RGB conversion, which would otherwise clip
every value above 255 to white: ``I;16*`` by its range 0..65535; ``I`` and ``F`` by the smallest
of 1 (``F`` only), 255 and 65535 that holds the image's largest value (16-bit PNGs open as ``I`` in
some Pillow versions), or by that value when it exceeds 65535; negative values become 0.
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
    """An image that cannot be used: unreadable, truncated or too small. Streams skip it.

    ``short_side``: the decoded image's short side when it was refused as too small, else None."""

    def __init__(self, message: str, short_side: int | None = None):
        super().__init__(message)
        self.short_side = short_side


@dataclass(frozen=True)
class Crop:
    """A square crop of an image resized to ``resolution`` on its short side."""

    original_size: tuple[int, int]  # (h, w) of the decoded image
    resized_size: tuple[int, int]  # (h, w) after resizing
    top_left: tuple[int, int]  # (top, left) in resized pixels


_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def to_8bit(image: Image.Image) -> Image.Image:
    """A single-channel image of more than 8 bits as mode ``L`` (see the module's note); any other
    image as it is."""
    if image.mode not in _WIDE_MODES:
        return image
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        top = 65535.0
    else:
        peak = float(values.max()) if values.size else 0.0
        ranges = ((1.0,) if image.mode == "F" else ()) + (255.0, 65535.0)
        top = next((r for r in ranges if peak <= r), peak)
    values = np.nan_to_num(values, nan=0.0, posinf=top, neginf=0.0)
    scaled = np.clip(values, 0.0, top) * (255.0 / top)
    return Image.fromarray(np.rint(scaled).astype(np.uint8))


def load_image(source: bytes | str | Path, min_side: int) -> Image.Image:
    """The decoded RGB image (EXIF orientation applied); :class:`BadImage` when it cannot be read in
    full or its short side is below ``min_side``."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()  # a truncated file fails here, not later
            rgb = to_8bit(image).convert("RGB")
    except Exception as exc:  # PIL raises many kinds (OSError, SyntaxError, ValueError, bomb errors)
        raise BadImage(f"unreadable ({type(exc).__name__}: {exc})") from None
    if min(rgb.size) < min_side:
        raise BadImage(
            f"too small ({rgb.width}x{rgb.height}; short side below {min_side})", short_side=min(rgb.size)
        )
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
