"""CLIP score as DMD2 computes it (evaluation spec §5), on transformers ``CLIPModel``.

Per (image, prompt) pair: ``cosine(image_embedding, text_embedding)`` — raw cosine, no ×100, no
clamp, no logit scale; the reported value is the mean over pairs.

* Image: centre crop to a square of side ``min(W, H)`` (torchvision offsets), ``resize((256, 256),
  LANCZOS)`` (``pre_resize="square_crop+lanczos256"``, the DMD2 default; ``"none"`` skips it), then
  the model's own transform on PIL: Resize(image_size, bicubic) → CenterCrop → ToTensor →
  Normalize(OpenAI mean/std).
* Text: OpenAI BPE, context 77, truncation that keeps EOT last, zero padding. With a prefix
  (default ``"A photo depicts "``), the prefix's own tokens without SOT/EOT (320, 1125, 29340 for
  the default) are inserted right after SOT, the row is cut back to 77 tokens, and a non-zero token
  at position 76 is replaced by EOT.
* Backbone (default open_clip ``ViT-g-14`` / ``laion2b_s12b_b42k``), pretrained tag, prefix and
  pre-resize are options recorded in :meth:`ClipScorer.protocol`. Weights: a ``from_pretrained``
  folder, or an open_clip ``open_clip_pytorch_model.bin`` converted on load.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    pil_center_crop,
    pil_clip_transform,
)
from senseflow.metrics.scoring.tokenizer import CLIP_CONTEXT_LENGTH, clip_token_ids

DMD2_PREFIX = "A photo depicts "
PRE_RESIZE_DMD2 = "square_crop+lanczos256"
PRE_RESIZE_NONE = "none"
PRE_RESIZE_SIDE = 256


def dmd2_pre_resize(image: Image.Image, side: int = PRE_RESIZE_SIDE) -> Image.Image:
    """Centre crop to a ``min(W, H)`` square, then ``resize((side, side), LANCZOS)``."""
    square = min(image.width, image.height)
    return pil_center_crop(image, square, square, "round").resize((side, side), Image.Resampling.LANCZOS)


def insert_prefix_tokens(token_ids: torch.Tensor, prefix_ids: Sequence[int], eot_id: int) -> torch.Tensor:
    """Insert ``prefix_ids`` after SOT in zero-padded rows of fixed length; force EOT if cut.

    ``[SOT, p1..pk, t1, ...]`` cut to the original length L; where the token at L-1 is non-zero
    (the row was full), it becomes ``eot_id``.
    """
    if token_ids.ndim != 2:
        raise ValueError(f"token_ids must be [B, L], got {tuple(token_ids.shape)}")
    length = token_ids.shape[1]
    prefix = torch.as_tensor(list(prefix_ids), dtype=token_ids.dtype, device=token_ids.device)
    prefix = prefix.unsqueeze(0).expand(token_ids.shape[0], -1)
    out = torch.cat([token_ids[:, :1], prefix, token_ids[:, 1:]], dim=1)[:, :length].clone()
    full = out[:, length - 1] != 0
    out[full, length - 1] = eot_id
    return out


class ClipScorer(PairScorer):
    """DMD2-protocol CLIP score on a transformers ``CLIPModel``."""

    metric = "clip_score"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        backbone: str = "ViT-g-14",
        pretrained: str | None = "laion2b_s12b_b42k",
        prefix: str | None = DMD2_PREFIX,
        pre_resize: str = PRE_RESIZE_DMD2,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "float32",
        weights_path: PathType | None = None,
        weights_sha256: str | None = None,
        source_format: str | None = None,
    ) -> None:
        super().__init__(device=device, dtype=dtype, weights_path=weights_path, weights_sha256=weights_sha256)
        if pre_resize not in (PRE_RESIZE_DMD2, PRE_RESIZE_NONE):
            raise ValueError(
                f"pre_resize must be {PRE_RESIZE_DMD2!r} or {PRE_RESIZE_NONE!r}, got {pre_resize!r}"
            )
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        check_text_pooling(model, tokenizer)
        self.tokenizer = tokenizer
        self.backbone = backbone
        self.pretrained = pretrained
        self.prefix = prefix or None
        self.pre_resize = pre_resize
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.source_format = source_format
        self.image_size = int(model.config.vision_config.image_size)
        self.context_length = int(
            getattr(model.config.text_config, "max_position_embeddings", CLIP_CONTEXT_LENGTH)
        )
        self.eot_id = int(tokenizer.eos_token_id)
        self.prefix_ids: list[int] = []
        if self.prefix:
            ids = list(tokenizer(self.prefix, add_special_tokens=True)["input_ids"])
            if ids[0] != tokenizer.bos_token_id or ids[-1] != self.eot_id:
                raise ValueError(f"tokenizer did not wrap {self.prefix!r} in SOT/EOT: {ids}")
            self.prefix_ids = ids[1:-1]

    @classmethod
    def from_path(
        cls,
        path: PathType,
        *,
        tokenizer: Any = None,
        backbone: str = "ViT-g-14",
        pretrained: str | None = "laion2b_s12b_b42k",
        prefix: str | None = DMD2_PREFIX,
        pre_resize: str = PRE_RESIZE_DMD2,
        arch: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "float32",
        weights_sha256: str | None = None,
        **convert_kwargs: Any,
    ) -> ClipScorer:
        """Load weights from ``path`` (folder or open_clip/transformers state-dict file).

        ``tokenizer``: a tokenizer object, a tokenizer folder or ``bpe_simple_vocab_16e6.txt.gz``;
        defaults to the model folder's tokenizer files. ``arch`` (open_clip files only) defaults to
        ``backbone``; ``convert_kwargs`` (``vision_heads``, ``text_heads``, ``hidden_act``,
        ``config``) go to :func:`~senseflow.metrics.scoring.clip_model.load_clip_model`.
        """
        loaded, tokenizer = load_clip_with_tokenizer(path, tokenizer, arch=arch or backbone, **convert_kwargs)
        return cls(
            loaded.model,
            tokenizer,
            backbone=backbone,
            pretrained=pretrained,
            prefix=prefix,
            pre_resize=pre_resize,
            device=device,
            dtype=dtype,
            weights_path=path,
            weights_sha256=weights_sha256,
            source_format=loaded.source_format,
        )

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[B, 3, S, S]`` float32 pixel values (CPU)."""
        tensors = []
        for image in images:
            if self.pre_resize == PRE_RESIZE_DMD2:
                image = dmd2_pre_resize(image)
            tensors.append(pil_clip_transform(image, self.image_size, self.image_mean, self.image_std))
        return torch.stack(tensors)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """``[B, 77]`` token ids, prefix inserted when configured."""
        ids = clip_token_ids(self.tokenizer, prompts, self.context_length)
        if self.prefix_ids:
            ids = insert_prefix_tokens(ids, self.prefix_ids, self.eot_id)
        return ids

    def image_embeds(self, images: list[Image.Image]) -> torch.Tensor:
        """L2-normalised float32 image embeddings ``[B, D]`` (also intra-prompt diversity's features)."""
        pixels = self.preprocess(images).to(device=self.device, dtype=self.dtype)
        return l2_normalise(clip_image_embeds(self.model, pixels).float())

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        ids = self.tokenize(prompts).to(self.device)
        image_emb = self.image_embeds(images)
        text_emb = l2_normalise(clip_text_embeds(self.model, ids).float())
        return (image_emb * text_emb).sum(dim=-1)

    def protocol(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "pretrained": self.pretrained,
            "prefix": self.prefix,
            "pre_resize": self.pre_resize,
            "backend": "transformers",
            "dtype": dtype_name(self.dtype),
            "weights_sha256": self.weights_sha256,
        }
