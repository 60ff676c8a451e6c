"""Image inputs and CLIP preprocessing on PIL images and tensors.

:func:`as_rgb_images` accepts PIL images or uint8 HWC/NHWC arrays. The resize and centre-crop
helpers reproduce torchvision's semantics on PIL images (shorter side to ``size``, the longer one
truncated; crop offsets rounded half-to-even) or transformers' (crop offsets floored), selected
explicitly by the caller. :func:`tensor_resize_shorter` is torchvision's tensor resize
(``interpolate(..., align_corners=False, antialias=<flag>)``, no clamping on float tensors).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# OpenAI CLIP normalisation constants (spec §3).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImagesInput = Sequence[Image.Image] | Sequence[np.ndarray] | np.ndarray


def as_rgb_images(images: ImagesInput) -> list[Image.Image]:
    """PIL images or uint8 arrays (one NHWC array, or a list of HWC/HW arrays) → RGB PIL images."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"an image array must be NHWC, got shape {images.shape}")
        images = list(images)
    out = []
    for i, image in enumerate(images):
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8:
                raise TypeError(f"image {i}: arrays must be uint8, got {image.dtype}")
            if image.ndim == 3 and image.shape[-1] == 1:
                image = image[..., 0]
            if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
                raise ValueError(f"image {i}: expected HW, HWC with C in (1, 3, 4), got {image.shape}")
            image = Image.fromarray(image)
        elif not isinstance(image, Image.Image):
            raise TypeError(f"image {i}: expected a PIL image or a uint8 array, got {type(image).__name__}")
        out.append(image if image.mode == "RGB" else image.convert("RGB"))
    return out


def resized_shorter_side(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side to ``size``; the longer side is truncated.

    Same rule in torchvision's ``Resize(int)`` and transformers' ``shortest_edge`` resize.
    """
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def center_crop_offsets(
    height: int, width: int, crop_height: int, crop_width: int, rounding: str = "round"
) -> tuple[int, int]:
    """(top, left) of a centred crop.

    ``rounding="round"``: torchvision, ``int(round((H - h) / 2))`` with Python's half-to-even round.
    ``rounding="floor"``: transformers' image processors, ``(H - h) // 2``.
    """
    if crop_height > height or crop_width > width:
        raise ValueError(f"crop {crop_height}x{crop_width} larger than the image {height}x{width}")
    if rounding == "round":
        return round((height - crop_height) / 2.0), round((width - crop_width) / 2.0)
    if rounding == "floor":
        return (height - crop_height) // 2, (width - crop_width) // 2
    raise ValueError(f"rounding must be 'round' or 'floor', got {rounding!r}")


def pil_center_crop(
    image: Image.Image, crop_height: int, crop_width: int, rounding: str = "round"
) -> Image.Image:
    top, left = center_crop_offsets(image.height, image.width, crop_height, crop_width, rounding)
    return image.crop((left, top, left + crop_width, top + crop_height))


def pil_resize_shorter(
    image: Image.Image, size: int, resample: int = Image.Resampling.BICUBIC
) -> Image.Image:
    """torchvision ``Resize(size)`` on a PIL image: ``image.resize((w, h), resample)``."""
    height, width = resized_shorter_side(image.height, image.width, size)
    return image.resize((width, height), resample)


def to_float_tensor(image: Image.Image) -> torch.Tensor:
    """torchvision ``ToTensor`` on an RGB uint8 image: CHW float32 in [0, 1]."""
    array = np.array(image, dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).to(torch.float32).div(255)


def normalise_chw(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - mean_t) / std_t


def pil_clip_transform(
    image: Image.Image,
    size: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    resample: int = Image.Resampling.BICUBIC,
) -> torch.Tensor:
    """OpenAI CLIP / open_clip validation transform on PIL (torchvision semantics).

    Resize(size, bicubic) → CenterCrop(size) (offsets rounded) → RGB → ToTensor → Normalize.
    """
    image = pil_center_crop(pil_resize_shorter(image, size, resample), size, size, "round")
    return normalise_chw(to_float_tensor(image.convert("RGB")), mean, std)


def tensor_resize_shorter(x: torch.Tensor, size: int, antialias: bool, mode: str = "bicubic") -> torch.Tensor:
    """torchvision ``Resize(size)`` on a float CHW/NCHW tensor (no clamping for float tensors)."""
    squeeze = x.ndim == 3
    if squeeze:
        x = x.unsqueeze(0)
    height, width = resized_shorter_side(x.shape[-2], x.shape[-1], size)
    align = False if mode in ("bilinear", "bicubic") else None
    out = F.interpolate(x, size=(height, width), mode=mode, align_corners=align, antialias=antialias)
    return out[0] if squeeze else out


def tensor_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    top, left = center_crop_offsets(x.shape[-2], x.shape[-1], size, size, "round")
    return x[..., top : top + size, left : left + size]
