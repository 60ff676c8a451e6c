"""The :class:`PairScorer` base and its dtype/device helpers.

:class:`PairScorer` batches, validates inputs, runs under ``inference_mode`` and builds the
result-record entry (``value`` plus the protocol fields of spec §12).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from senseflow.metrics.scoring.checkpoints import PathType, sha256_weights
from senseflow.metrics.scoring.images import ImagesInput, as_rgb_images

logger = logging.getLogger(__name__)


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class PairScorer(ABC):
    """Scores (image, prompt) pairs; subclasses implement :meth:`_score_batch` and :meth:`protocol`."""

    metric = "pair_score"
    default_batch_size = 16

    def __init__(
        self,
        *,
        device: str | torch.device | None,
        dtype: str | torch.dtype,
        weights_path: PathType | None,
        weights_sha256: str | None,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.weights_path = Path(weights_path) if weights_path is not None else None
        self._weights_sha256 = weights_sha256

    @property
    def weights_sha256(self) -> str | None:
        """sha256 of the weights (given at load time, or computed once on first access)."""
        if self._weights_sha256 is None and self.weights_path is not None:
            self._weights_sha256 = sha256_weights(self.weights_path)
            logger.info("%s weights %s sha256 %s", self.metric, self.weights_path, self._weights_sha256)
        return self._weights_sha256

    @abstractmethod
    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """One score per (image, prompt) pair of the batch."""

    @abstractmethod
    def protocol(self) -> dict[str, Any]:
        """The protocol fields of the result record (backbone, dtype, weights sha256, ...)."""

    def score(self, images: ImagesInput, prompts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """One score per (image, prompt) pair, as a float64 array of length ``len(images)``."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, one per image")
        pil_images = as_rgb_images(images)
        prompts = [str(p) for p in prompts]
        if len(pil_images) != len(prompts):
            raise ValueError(f"{len(pil_images)} images but {len(prompts)} prompts")
        batch_size = batch_size or self.default_batch_size
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                stop = start + batch_size
                values = self._score_batch(pil_images[start:stop], prompts[start:stop])
                chunks.append(values.detach().to(torch.float64).cpu().numpy().reshape(-1))
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float64)

    def result(self, scores: Sequence[float] | np.ndarray) -> dict[str, Any]:
        """The result-record entry (spec §12): ``value`` (mean score) plus the protocol fields."""
        scores = np.asarray(scores, dtype=np.float64)
        value = float(scores.mean()) if scores.size else None
        return {"value": value, "n": int(scores.size), **self.protocol()}
