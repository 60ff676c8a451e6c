"""Fixed random convolutional features of shapes-world images, for Fréchet distances (a toy FID).

Why random features: FID needs an embedding in which the statistics of image sets can be compared.
For real images that is Inception-v3; for a 32x32 procedural world no pretrained network fits, and
training one would couple the metric to a model (and to its training run). A randomly initialised,
never trained convolutional network is the common substitute in small-scale studies: random
ReLU convolutions already respond to colour, edges, corners and blob size, and multi-scale pooling
keeps where things are. Such features are independent of every model the metric judges, cost
nothing to train, and need no weights file.

Reproducibility: the weights are drawn from numpy's PCG64 generator (``np.random.default_rng(seed)``),
never from torch's RNG, so the network is the same on any torch version and whatever torch's
global seed is. (numpy's normal-variate stream has not changed since 1.17; its policy would allow a
change, which ``tests/test_frechet.py`` would catch with pinned weight sums.) The forward pass runs
in float64 on the CPU, so features agree across machines to rounding error.

Network (``seed`` fixes all weights; replicate padding, so the image border is not an edge):
input 3x32x32 in [-1, 1] ->
conv3x3(3->32) ReLU [32x32] -> conv3x3(32->64, stride 2) ReLU [16x16] -> conv3x3(64->64, stride 2)
ReLU [8x8]. Features (``FEATURE_DIM`` = 416): global mean of layer 1 (32) and layer 2 (64); the
mean of layer 3 over each cell of a 2x2 grid (256, coarse layout: left/right/above/below); and the
global max of layer 3 (64, "is there such a part anywhere").
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from senseflow.metrics.shapes.evaluator import to_uint8

DEFAULT_SEED = 0
# (in_channels, out_channels, stride) of each 3x3 convolution.
LAYERS: tuple[tuple[int, int, int], ...] = ((3, 32, 1), (32, 64, 2), (64, 64, 2))
GRID = 2  # the last layer is average-pooled over a GRID x GRID grid of cells
FEATURE_DIM = LAYERS[0][1] + LAYERS[1][1] + LAYERS[2][1] * (GRID * GRID + 1)


@functools.lru_cache(maxsize=8)
def _weights(seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """He-normal conv weights and small biases, drawn from PCG64 in a fixed order."""
    rng = np.random.default_rng(seed)
    params = []
    for c_in, c_out, _ in LAYERS:
        fan_in = c_in * 9
        w = rng.standard_normal((c_out, c_in, 3, 3)) * np.sqrt(2.0 / fan_in)
        b = rng.standard_normal(c_out) * 0.1
        params.append((torch.from_numpy(w), torch.from_numpy(b)))
    return tuple(params)


def _as_uint8_nhwc(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 NHWC passes through; float NCHW in [-1, 1] is quantised by :func:`to_uint8` first."""
    if isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray) and images.dtype == np.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images NxHxWx3, got shape {images.shape}")
        return images
    is_float = (
        images.dtype.is_floating_point
        if isinstance(images, torch.Tensor)
        else np.issubdtype(np.asarray(images).dtype, np.floating)
    )
    if not is_float:
        raise TypeError("expected uint8 NHWC or float NCHW images")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected float images NCHW with 3 channels, got shape {tuple(images.shape)}")
    return to_uint8(images)


@torch.inference_mode()
def _forward(x: torch.Tensor, seed: int) -> torch.Tensor:
    pooled = []
    for i, ((w, b), (_, _, stride)) in enumerate(zip(_weights(seed), LAYERS, strict=True)):
        x = F.relu(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), w, b, stride=stride))
        if i < len(LAYERS) - 1:
            pooled.append(x.mean(dim=(2, 3)))
    pooled.append(F.adaptive_avg_pool2d(x, GRID).flatten(1))
    pooled.append(x.amax(dim=(2, 3)))
    return torch.cat(pooled, dim=1)


def extract_features(
    images: np.ndarray | torch.Tensor, batch_size: int = 64, seed: int = DEFAULT_SEED
) -> np.ndarray:
    """Features [N, FEATURE_DIM] (float64) of uint8 NHWC images or float NCHW images in [-1, 1].

    Float inputs go through :func:`senseflow.metrics.shapes.evaluator.to_uint8` first, so a model's output
    tensor and the PNG saved from it have identical features.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    data = _as_uint8_nhwc(images)
    out = np.empty((len(data), FEATURE_DIM), dtype=np.float64)
    for start in range(0, len(data), batch_size):
        chunk = torch.from_numpy(np.ascontiguousarray(data[start : start + batch_size]))
        x = chunk.permute(0, 3, 1, 2).to(torch.float64) / 127.5 - 1.0
        out[start : start + len(chunk)] = _forward(x, seed).numpy()
    return out
