"""Image handling shared by every metric: quantisation, PNG files, folder listing, centre crops.

Every writer of images that a metric will compare (teacher, students, reference sets) turns model
outputs into bytes with :func:`quantise`, and every reader decodes with :func:`load_rgb`, so two
image sets differ only in what the models drew. Mixing quantisation rules biases FID, so the rule is
recorded in the result (``images.quantisation``).

Rules, for model outputs ``x`` in [-1, 1] (computed on the CPU in float32, whatever the input dtype
or device, so a tensor gives the same bytes on every machine):

* ``"truncate"`` (default, as DMD2): ``uint8(clamp((x + 1) * 127.5, 0, 255))``, the cast dropping the
  fraction.
* ``"round"`` (as diffusers' ``numpy_to_pil``): ``round((clamp(x, -1, 1) + 1) * 127.5)``, half to even.

Truncation is not the inverse of ``v / 127.5 - 1``: float32 rounding can land just below an integer,
which truncates one level down; ``"round"`` maps every such value back exactly.

Images are stored as PNG (lossless; JPEG shifts FID), RGB uint8, and decoded as
``PIL.Image.open(p).convert("RGB")``. Centre crops follow torchvision's PIL semantics (offsets
``int(round((H - h) / 2))``, Python's round-half-to-even) without importing torchvision.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from PIL import Image

QUANTISATION_RULES = ("truncate", "round")
DEFAULT_QUANTISATION = "truncate"

# Suffixes (lower case) that list_images treats as images.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"})


def quantise(x: torch.Tensor | np.ndarray, rule: str = DEFAULT_QUANTISATION) -> np.ndarray:
    """Model output in [-1, 1], NCHW (or CHW), to uint8 NHWC (HWC) by ``rule`` (see module doc).

    Values outside [-1, 1] saturate at 0 and 255. Non-finite values raise ValueError.
    """
    if rule not in QUANTISATION_RULES:
        raise ValueError(f"unknown quantisation rule {rule!r}; expected one of {QUANTISATION_RULES}")
    t = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float32)
    if t.ndim not in (3, 4):
        raise ValueError(f"expected NCHW or CHW, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("model output holds non-finite values")
    if rule == "truncate":
        q = ((t + 1.0) * 127.5).clamp(0.0, 255.0).to(torch.uint8)  # the cast truncates
    else:
        q = torch.round((t.clamp(-1.0, 1.0) + 1.0) * 127.5).to(torch.uint8)
    q = q.permute(0, 2, 3, 1) if q.ndim == 4 else q.permute(1, 2, 0)
    return np.ascontiguousarray(q.numpy())


def _check_rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.dtype} with shape {image.shape}")
    return image


def save_png(path: str | PathLike, image: np.ndarray) -> Path:
    """Write an HxWx3 uint8 image as an RGB PNG, atomically (temporary file, then rename)."""
    image = _check_rgb_uint8(image)
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"images are stored as PNG; got the file name {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_pngs(images: np.ndarray | Sequence[np.ndarray], paths: Sequence[str | PathLike]) -> list[Path]:
    """Write a batch of HxWx3 uint8 images (e.g. the output of :func:`quantise`) to ``paths``."""
    if len(images) != len(paths):
        raise ValueError(f"{len(images)} images but {len(paths)} paths")
    return [save_png(p, im) for im, p in zip(images, paths, strict=True)]


def load_rgb(path: str | PathLike) -> np.ndarray:
    """Decode an image file to an HxWx3 uint8 array, as ``Image.open(path).convert("RGB")``."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def list_images(folder: str | PathLike, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (by suffix, any case), sorted by their POSIX path relative to it.

    The order does not depend on the file system's listing order, so per-image features line up
    across runs and machines. Hidden files (names starting with ``.``, e.g. partial writes) are
    skipped. A missing folder raises FileNotFoundError; an empty one gives an empty list.
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    candidates = root.rglob("*") if recursive else root.iterdir()
    files = [
        p
        for p in candidates
        if p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p.is_file()
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def center_crop_offsets(height: int, width: int, crop_height: int, crop_width: int) -> tuple[int, int]:
    """(top, left) of a centre crop, torchvision's rule: ``int(round((H - h) / 2))`` per axis."""
    if crop_height > height or crop_width > width:
        raise ValueError(f"cannot crop {crop_height}x{crop_width} from a {height}x{width} image")
    return round((height - crop_height) / 2.0), round((width - crop_width) / 2.0)


def center_crop(image: np.ndarray, crop_height: int, crop_width: int | None = None) -> np.ndarray:
    """Centre ``crop_height`` x ``crop_width`` crop of an HxW[xC] array (a copy).

    Smaller images raise ValueError (torchvision would pad them; the metrics reject them instead).
    """
    crop_width = crop_height if crop_width is None else crop_width
    h, w = image.shape[:2]
    top, left = center_crop_offsets(h, w, crop_height, crop_width)
    return np.array(image[top : top + crop_height, left : left + crop_width])


def center_crop_square(image: np.ndarray) -> np.ndarray:
    """Centre crop to a square of side min(H, W) (DMD2's crop to the short edge)."""
    side = min(image.shape[:2])
    return center_crop(image, side, side)
