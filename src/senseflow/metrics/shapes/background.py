"""The background of shapes-world images: its colour cast and its texture where no object is drawn.

The renderer paints a flat ``BACKGROUND``; a generator's background can drift in colour (a cast)
and carry a pattern (a texture), which compositional accuracy and FID barely register. Both are
measured on the pixels the evaluator labels background that lie more than ``MARGIN_PIXELS`` from any
object or off-palette pixel (anti-aliased edges and halos are not background):

* ``offset_rgb``: mean of ``pixel - BACKGROUND`` per channel over those pixels, in 0-255 units;
  ``green_cast`` is its green entry minus the mean of red and blue (a neutral grey shift is 0);
* ``texture``: RMS over those pixels and channels of ``pixel - mean of its 3x3 neighbourhood``, the
  high-frequency part a flat background lacks (0 for a flat one; 8a/9 for a checkerboard of ±a).
  The neighbourhood of a pixel next to the margin can reach an object's faint anti-aliased fringe
  (coverage below one half, so labelled background), which gives clean renders a small texture
  (about 0.2 to 1.2 levels): the renders' row of a report is this measure's floor.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from senseflow.families.toy.world import BACKGROUND
from senseflow.metrics.shapes.evaluator import BACKGROUND_LABEL, label_pixels

__all__ = ["MARGIN_PIXELS", "BackgroundStats", "background_stats"]

MARGIN_PIXELS = 1  # background pixels this close to a non-background pixel are left out


@dataclass(frozen=True)
class BackgroundStats:
    offset_rgb: tuple[float, float, float] | None
    green_cast: float | None
    texture: float | None
    fraction: float  # share of all pixels that were measured

    def record(self) -> dict:
        return asdict(self)


def background_stats(images: np.ndarray) -> BackgroundStats:
    """Colour cast and texture of the background of uint8 NHWC RGB images (pooled over pixels)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
    ring = np.ones((3, 3), dtype=bool)
    offsets, residuals = [], []
    for image in images:
        labels, _ = label_pixels(image)
        keep = labels == BACKGROUND_LABEL
        if MARGIN_PIXELS:
            keep = ndimage.binary_erosion(keep, structure=ring, iterations=MARGIN_PIXELS, border_value=1)
        x = image.astype(np.float64)
        local = ndimage.uniform_filter(x, size=(3, 3, 1), mode="mirror")
        offsets.append(x[keep] - np.asarray(BACKGROUND, dtype=np.float64))
        residuals.append((x - local)[keep])
    offset, residual = np.concatenate(offsets), np.concatenate(residuals)
    fraction = len(offset) / (images.shape[0] * images.shape[1] * images.shape[2])
    if len(offset) == 0:
        return BackgroundStats(None, None, None, 0.0)
    r, g, b = (float(v) for v in offset.mean(axis=0))
    return BackgroundStats(
        offset_rgb=(r, g, b),
        green_cast=g - (r + b) / 2,
        texture=float(np.sqrt(np.mean(residual**2))),
        fraction=float(fraction),
    )
