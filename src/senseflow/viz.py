"""Image grids people can look at: padded, upscaled with nearest neighbour, optional row labels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PAD = 2
PAD_COLOUR = (255, 255, 255)
LABEL_WIDTH = 210
LABEL_COLOUR = (0, 0, 0)


def image_grid(images: np.ndarray, ncols: int, scale: int = 4) -> Image.Image:
    """Tile NHWC uint8 images into a grid with white padding, each upscaled ``scale`` times."""
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"expected NHWC uint8 images, got shape {images.shape} dtype {images.dtype}")
    n, h, w, _ = images.shape
    nrows = -(-n // ncols)
    cell_h, cell_w = h * scale + PAD, w * scale + PAD
    canvas = Image.new("RGB", (ncols * cell_w + PAD, nrows * cell_h + PAD), PAD_COLOUR)
    for i, img in enumerate(images):
        tile = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(tile, (PAD + (i % ncols) * cell_w, PAD + (i // ncols) * cell_h))
    return canvas


def labelled_rows(rows: Sequence[np.ndarray], labels: Sequence[str], scale: int = 4) -> Image.Image:
    """One grid row per entry of ``rows`` (each NHWC uint8, same N), with its label on the left."""
    if len(rows) != len(labels):
        raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
    ncols = rows[0].shape[0]
    grid = image_grid(np.concatenate(list(rows)), ncols, scale)
    canvas = Image.new("RGB", (grid.width + LABEL_WIDTH, grid.height), PAD_COLOUR)
    canvas.paste(grid, (LABEL_WIDTH, 0))
    draw = ImageDraw.Draw(canvas)
    row_h = (grid.height - PAD) / len(rows)
    for r, label in enumerate(labels):
        draw.text((4, int(r * row_h + row_h / 2 - 6)), label, fill=LABEL_COLOUR)
    return canvas


def save_image(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
