"""HPSv2 (v2.0 / v2.1) on transformers ``CLIPModel`` (evaluation spec §6).

The model is open_clip's ``ViT-H-14`` with the HPS weights (``HPS_v2_compressed.pt`` or
``HPS_v2.1_compressed.pt``: ``{'state_dict': <open_clip names>}``), converted on load to a
``CLIPModel``. The two versions differ only in the weights file; ``version`` must be given.

* Image (HPS's validation transform; order matters): ToTensor → Resize(224, bicubic) **on the
  tensor**, ``interpolate(align_corners=False, antialias=<flag>)`` with the flag explicit and
  recorded → CenterCrop(224) → Normalize(OpenAI mean/std).
* Text: open_clip tokenizer rules (OpenAI BPE, context 77, EOT kept last on truncation).
* Score: ``cosine(image_features, text_features)`` per pair (the diagonal of the normalised
  ``image @ text.T``), no logit scale.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from senseflow.metrics.scoring.base import PairScorer, dtype_name
from senseflow.metrics.scoring.checkpoints import PathType
from senseflow.metrics.scoring.clip_model import load_clip_with_tokenizer
from senseflow.metrics.scoring.embeddings import (
    check_text_pooling,
    clip_image_embeds,
    clip_text_embeds,
    l2_normalise,
)
from senseflow.metrics.scoring.images import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    normalise_chw,
    tensor_center_crop,
    tensor_resize_shorter,
    to_float_tensor,
)
from senseflow.metrics.scoring.tokenizer import CLIP_CONTEXT_LENGTH, clip_token_ids

logger = logging.getLogger(__name__)

HPS_VERSIONS = ("v2.0", "v2.1")
HPS_WEIGHT_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_ARCH = "ViT-H-14"


def hps_preprocess(image: Image.Image, size: int, antialias: bool) -> torch.Tensor:
    """ToTensor → tensor Resize(size, bicubic, antialias) → CenterCrop(size) → Normalize (OpenAI)."""
    x = tensor_resize_shorter(to_float_tensor(image), size, antialias=antialias, mode="bicubic")
    return normalise_chw(tensor_center_crop(x, size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


class HPSv2Scorer(PairScorer):
    """Human Preference Score v2 on a transformers ``CLIPModel``."""

    metric = "hpsv2"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        version: str,
        antialias: bool = True,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "float32",
        weights_path: PathType | None = None,
        weights_sha256: str | None = None,
        source_format: str | None = None,
    ) -> None:
        super().__init__(device=device, dtype=dtype, weights_path=weights_path, weights_sha256=weights_sha256)
        if version not in HPS_VERSIONS:
            raise ValueError(f"hps version must be one of {HPS_VERSIONS}, got {version!r}")
        if not isinstance(antialias, bool):
            raise TypeError("antialias must be True or False (it is recorded)")
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        check_text_pooling(model, tokenizer)
        self.tokenizer = tokenizer
        self.version = version
        self.antialias = antialias
        self.source_format = source_format
        self.image_size = int(model.config.vision_config.image_size)
        self.context_length = int(
            getattr(model.config.text_config, "max_position_embeddings", CLIP_CONTEXT_LENGTH)
        )

    @classmethod
    def from_path(
        cls,
        path: PathType,
        *,
        version: str,
        tokenizer: Any = None,
        antialias: bool = True,
        arch: str = HPS_ARCH,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "float32",
        weights_sha256: str | None = None,
        **convert_kwargs: Any,
    ) -> HPSv2Scorer:
        """Load ``HPS_v2*_compressed.pt`` (or a converted ``from_pretrained`` folder).

        ``version`` is required ("v2.0" or "v2.1"); a file named like the other version's file
        is refused. ``tokenizer``: tokenizer object, folder or ``bpe_simple_vocab_16e6.txt.gz``.
        """
        if version not in HPS_VERSIONS:
            raise ValueError(f"hps version must be one of {HPS_VERSIONS}, got {version!r}")
        name = Path(path).name
        for other, filename in HPS_WEIGHT_FILES.items():
            if other != version and name == filename:
                raise ValueError(f"{path} is the HPS {other} weights file but version={version!r}")
        loaded, tokenizer = load_clip_with_tokenizer(path, tokenizer, arch=arch, **convert_kwargs)
        return cls(
            loaded.model,
            tokenizer,
            version=version,
            antialias=antialias,
            device=device,
            dtype=dtype,
            weights_path=path,
            weights_sha256=weights_sha256,
            source_format=loaded.source_format,
        )

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([hps_preprocess(image, self.image_size, self.antialias) for image in images])

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return clip_token_ids(self.tokenizer, prompts, self.context_length)

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = self.preprocess(images).to(device=self.device, dtype=self.dtype)
        ids = self.tokenize(prompts).to(self.device)
        image_emb = l2_normalise(clip_image_embeds(self.model, pixels).float())
        text_emb = l2_normalise(clip_text_embeds(self.model, ids).float())
        return (image_emb * text_emb).sum(dim=-1)

    def protocol(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "tensor_resize_antialias": self.antialias,
            "backend": "transformers",
            "dtype": dtype_name(self.dtype),
            "weights_sha256": self.weights_sha256,
        }
