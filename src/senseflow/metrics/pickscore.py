"""PickScore_v1 on transformers ``CLIPModel`` (evaluation spec §7).

Per pair: ``logit_scale.exp() * cosine(text_embedding, image_embedding)`` (≈ 100·cosine), as the
model card computes ``model.logit_scale.exp() * (text_embs @ image_embs.T)`` on L2-normalised
embeddings.

* Model: ``yuvalkirstain/PickScore_v1`` as a ``from_pretrained`` folder (``local_files_only``).
* Processor: the preprocessor/tokenizer files of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
  Images go through a project implementation of transformers' **PIL** CLIP image-processor backend
  (the one transformers < 5 used by default), parameterised by that folder's
  ``preprocessor_config.json``: PIL resize of the shortest edge (bicubic), centre crop with floored
  offsets, ``uint8 → float64 × rescale_factor → float32``, normalise. Recorded as ``"pil"``.
* Text: ``padding=True, truncation=True, max_length=77`` with the folder's tokenizer, attention mask
  passed to the text model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from senseflow.metrics.scoring.base import PairScorer, dtype_name
from senseflow.metrics.scoring.checkpoints import PathType, ScorerLoadError
from senseflow.metrics.scoring.clip_model import load_clip_model
from senseflow.metrics.scoring.embeddings import (
    check_text_pooling,
    clip_image_embeds,
    clip_text_embeds,
    l2_normalise,
)
from senseflow.metrics.scoring.images import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    center_crop_offsets,
    resized_shorter_side,
)

PICKSCORE_MAX_LENGTH = 77


@dataclass(frozen=True)
class PilClipImageProcessor:
    """transformers' CLIP image processor (PIL backend) semantics, re-implemented."""

    shortest_edge: int | None = 224
    resize_hw: tuple[int, int] | None = None  # used instead of shortest_edge when set
    crop_hw: tuple[int, int] = (224, 224)
    resample: int = Image.Resampling.BICUBIC
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_convert_rgb: bool = True

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> PilClipImageProcessor:
        """From a ``preprocessor_config.json`` dict (int or dict ``size``/``crop_size``)."""
        kwargs: dict[str, Any] = {}
        size = config.get("size")
        if isinstance(size, int):
            kwargs["shortest_edge"] = size
        elif isinstance(size, Mapping):
            if "shortest_edge" in size:
                kwargs["shortest_edge"] = int(size["shortest_edge"])
            elif "height" in size and "width" in size:
                kwargs["shortest_edge"], kwargs["resize_hw"] = None, (int(size["height"]), int(size["width"]))
            else:
                raise ScorerLoadError(f"unsupported image processor size {size!r}")
        crop = config.get("crop_size")
        if isinstance(crop, int):
            kwargs["crop_hw"] = (crop, crop)
        elif isinstance(crop, Mapping):
            kwargs["crop_hw"] = (int(crop["height"]), int(crop["width"]))
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb"):
            if key in config and config[key] is not None:
                kwargs[key] = bool(config[key])
        if config.get("resample") is not None:
            kwargs["resample"] = int(config["resample"])
        if config.get("rescale_factor") is not None:
            kwargs["rescale_factor"] = float(config["rescale_factor"])
        for key in ("image_mean", "image_std"):
            if config.get(key) is not None:
                kwargs[key] = tuple(float(v) for v in config[key])
        return cls(**kwargs)

    @classmethod
    def from_dir(cls, path: PathType) -> PilClipImageProcessor:
        config_path = Path(path) / "preprocessor_config.json"
        if not config_path.is_file():
            raise ScorerLoadError(f"{path}: no preprocessor_config.json")
        return cls.from_config(json.loads(config_path.read_text()))

    def __call__(self, image: Image.Image) -> np.ndarray:
        """CHW float32 pixel values for one image."""
        if self.do_convert_rgb and image.mode != "RGB":
            image = image.convert("RGB")
        if self.do_resize:
            if self.resize_hw is not None:
                height, width = self.resize_hw
            else:
                height, width = resized_shorter_side(image.height, image.width, int(self.shortest_edge))
            image = image.resize((width, height), resample=self.resample)
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[..., None]
        array = np.ascontiguousarray(array.transpose(2, 0, 1))
        if self.do_center_crop:
            crop_h, crop_w = self.crop_hw
            top, left = center_crop_offsets(array.shape[1], array.shape[2], crop_h, crop_w, "floor")
            array = array[:, top : top + crop_h, left : left + crop_w]
        if self.do_rescale:
            array = (array.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            array = array.astype(np.float32) if not np.issubdtype(array.dtype, np.floating) else array
            mean = np.asarray(self.image_mean, dtype=array.dtype)[:, None, None]
            std = np.asarray(self.image_std, dtype=array.dtype)[:, None, None]
            array = (array - mean) / std
        return array.astype(np.float32, copy=False)

    def batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self(image) for image in images]))


class PickScoreScorer(PairScorer):
    """PickScore_v1: ``exp(logit_scale) · cosine`` per pair."""

    metric = "pickscore"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        image_processor: PilClipImageProcessor | None = None,
        *,
        max_length: int = PICKSCORE_MAX_LENGTH,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "float32",
        weights_path: PathType | None = None,
        weights_sha256: str | None = None,
        source_format: str | None = None,
    ) -> None:
        super().__init__(device=device, dtype=dtype, weights_path=weights_path, weights_sha256=weights_sha256)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        check_text_pooling(model, tokenizer)
        self.tokenizer = tokenizer
        self.image_processor = image_processor or PilClipImageProcessor()
        self.max_length = max_length
        self.source_format = source_format

    @classmethod
    def from_path(
        cls,
        model_path: PathType,
        processor_dir: PathType | None = None,
        *,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "float32",
        weights_sha256: str | None = None,
        **load_kwargs: Any,
    ) -> PickScoreScorer:
        """Model from ``model_path`` (``from_pretrained`` folder, or a state-dict file with ``config=``).

        ``processor_dir``: folder with ``preprocessor_config.json`` and tokenizer files (defaults to
        the model folder). ``tokenizer`` overrides the folder's tokenizer (object or folder).
        """
        from transformers import AutoTokenizer

        loaded = load_clip_model(model_path, **load_kwargs)
        folder = Path(processor_dir) if processor_dir is not None else Path(model_path)
        if not folder.is_dir():
            raise ScorerLoadError(
                "PickScore needs processor_dir= (preprocessor_config.json + tokenizer files)"
            )
        processor = PilClipImageProcessor.from_dir(folder)
        if tokenizer is None:
            tokenizer = folder
        if isinstance(tokenizer, (str, PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
        return cls(
            loaded.model,
            tokenizer,
            processor,
            device=device,
            dtype=dtype,
            weights_path=model_path,
            weights_sha256=weights_sha256,
            source_format=loaded.source_format,
        )

    @property
    def logit_scale(self) -> float:
        """The factor applied to the cosine: ``exp(model.logit_scale)``."""
        return float(self.model.logit_scale.detach().float().exp().item())

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded.get("attention_mask")}

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = self.image_processor.batch(images).to(device=self.device, dtype=self.dtype)
        text = self.tokenize(prompts)
        mask = text["attention_mask"]
        image_emb = l2_normalise(clip_image_embeds(self.model, pixels).float())
        text_emb = l2_normalise(
            clip_text_embeds(
                self.model, text["input_ids"].to(self.device), None if mask is None else mask.to(self.device)
            ).float()
        )
        scale = self.model.logit_scale.float().exp()
        return scale * (text_emb * image_emb).sum(dim=-1)

    def protocol(self) -> dict[str, Any]:
        return {
            "image_processor_backend": "pil",
            "logit_scale": self.logit_scale,
            "backend": "transformers",
            "dtype": dtype_name(self.dtype),
            "weights_sha256": self.weights_sha256,
        }
