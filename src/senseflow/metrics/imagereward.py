"""ImageReward on transformers' BLIP modules (evaluation spec §8).

ImageReward = BLIP ViT image encoder → BERT text encoder with cross-attention to the image tokens
→ an MLP head on the text ``[CLS]`` state → ``(r - mean) / std``.

* Vision: transformers ``BlipVisionModel`` (ViT with fused ``qkv``, GELU, LayerNorm eps 1e-6 as
  BLIP's ViT); sizes are read from the checkpoint (ViT-L/16 at 224 px for ``ImageReward.pt``),
  heads = width / 64 unless given.
* Text: transformers ``BlipTextModel`` (BLIP's ``med.py`` BERT: no token-type embeddings,
  cross-attention in every layer) built from ``med_config.json`` with the cross-attention width set
  to the vision width; run as an encoder (bidirectional mask) with ``encoder_hidden_states`` = all
  image tokens and an all-ones image mask.
* Head (``mlp.layers``): Linear(768→1024), Dropout, Linear(1024→128), Dropout, Linear(128→64),
  Dropout, Linear(64→16), Linear(16→1), **no activations**, applied to
  ``last_hidden_state[:, 0].float()``.
* Reward = ``(r - 0.16717362830052426) / 1.0333394966054072``.
* Tokenizer: BERT uncased WordPiece from a local folder plus BLIP's ``[DEC]`` (bos, id 30522) and
  ``[ENC]`` (additional special, id 30523); ``padding="max_length", truncation=True,
  max_length=35``; the first token stays ``[CLS]``.
* Image: Resize(224, bicubic, PIL) → CenterCrop(224) → RGB → ToTensor → Normalize(OpenAI).

``ImageReward.pt`` (plain state dict, or ``{'state_dict': ...}``) is mapped onto these modules by
:func:`imagereward_key_rules`; missing keys raise, unexpected ones (e.g. BLIP's unused
``vision_proj``/``text_proj``) are logged.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from senseflow.metrics.scoring.base import PairScorer, dtype_name
from senseflow.metrics.scoring.checkpoints import (
    KeyRule,
    LoadReport,
    MissingWeightsError,
    PathType,
    ScorerLoadError,
    apply_key_rules,
    load_converted,
    load_state_dict_file,
)
from senseflow.metrics.scoring.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, pil_clip_transform
from senseflow.metrics.weights import sha256_file

logger = logging.getLogger(__name__)

IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_LENGTH = 35
IMAGEREWARD_IMAGE_SIZE = 224
BLIP_VIT_LAYER_NORM_EPS = 1e-6
HEAD_WIDTHS = (1024, 128, 64, 16, 1)
HEAD_DROPOUTS = (0.2, 0.2, 0.1)

_VISION_PREFIX = "blip.visual_encoder."
_TEXT_PREFIX = "blip.text_encoder."
_VIT_BLOCK = (
    ("norm1.weight", "layer_norm1.weight"),
    ("norm1.bias", "layer_norm1.bias"),
    ("attn.qkv.weight", "self_attn.qkv.weight"),
    ("attn.qkv.bias", "self_attn.qkv.bias"),
    ("attn.proj.weight", "self_attn.projection.weight"),
    ("attn.proj.bias", "self_attn.projection.bias"),
    ("norm2.weight", "layer_norm2.weight"),
    ("norm2.bias", "layer_norm2.bias"),
    ("mlp.fc1.weight", "mlp.fc1.weight"),
    ("mlp.fc1.bias", "mlp.fc1.bias"),
    ("mlp.fc2.weight", "mlp.fc2.weight"),
    ("mlp.fc2.bias", "mlp.fc2.bias"),
)
_IGNORABLE = re.compile(r".*position_ids$")


class ImageRewardHead(nn.Module):
    """The reward MLP; ``layers`` indices (0, 2, 4, 6, 7 are Linear) match ``ImageReward.pt``."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        w = HEAD_WIDTHS
        p = HEAD_DROPOUTS
        self.layers = nn.Sequential(
            nn.Linear(input_size, w[0]),
            nn.Dropout(p[0]),
            nn.Linear(w[0], w[1]),
            nn.Dropout(p[1]),
            nn.Linear(w[1], w[2]),
            nn.Dropout(p[2]),
            nn.Linear(w[2], w[3]),
            nn.Linear(w[3], w[4]),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ImageRewardModel(nn.Module):
    """BLIP vision + cross-attending text encoder + reward head."""

    def __init__(self, vision_config: Any, text_config: Any) -> None:
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        if not text_config.is_decoder:
            raise ValueError("the text config must have is_decoder=True (builds the cross-attention layers)")
        if text_config.encoder_hidden_size != vision_config.hidden_size:
            raise ValueError("cross-attention width must equal the vision width")
        self.vision_model = BlipVisionModel(vision_config)
        self.text_model = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = ImageRewardHead(text_config.hidden_size)

    def raw_reward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """``mlp(text [CLS] state)`` before normalisation, shape ``[B]``."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
            return_dict=True,
        )
        features = text.last_hidden_state[:, 0, :].float()
        return self.mlp(features.to(self.mlp.layers[0].weight.dtype)).float().reshape(-1)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        return (self.raw_reward(pixel_values, input_ids, attention_mask) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def text_config_from_med_config(med_config: Mapping[str, Any], vision_width: int) -> Any:
    """``BlipTextConfig`` from BLIP's ``med_config.json``; cross-attention width = ``vision_width``."""
    from transformers import BlipTextConfig

    if not med_config.get("add_cross_attention", False):
        raise ScorerLoadError("med_config.json must have add_cross_attention=true for ImageReward")
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "hidden_act",
        "layer_norm_eps",
        "pad_token_id",
    )
    absent = [k for k in keys[:6] if k not in med_config]
    if absent:
        raise ScorerLoadError(f"med_config.json lacks {', '.join(absent)}")
    kwargs = {k: med_config[k] for k in keys if k in med_config}
    return BlipTextConfig(
        **kwargs,
        encoder_hidden_size=int(vision_width),
        is_decoder=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def vision_config_from_state_dict(
    state: Mapping[str, torch.Tensor],
    num_heads: int | None = None,
    layer_norm_eps: float = BLIP_VIT_LAYER_NORM_EPS,
) -> Any:
    """``BlipVisionConfig`` with sizes read from ``blip.visual_encoder.*`` tensor shapes."""
    from transformers import BlipVisionConfig

    needed = [
        f"{_VISION_PREFIX}{k}" for k in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight")
    ]
    absent = [k for k in needed if k not in state]
    if absent:
        raise MissingWeightsError("ImageReward checkpoint", absent)
    conv = state[f"{_VISION_PREFIX}patch_embed.proj.weight"]
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    grid = math.isqrt(state[f"{_VISION_PREFIX}pos_embed"].shape[1] - 1)
    pattern = re.compile(re.escape(_VISION_PREFIX) + r"blocks\.(\d+)\.")
    layers = 1 + max(int(m.group(1)) for k in state if (m := pattern.match(k)))
    heads = int(num_heads or width // 64)
    if heads <= 0 or width % heads:
        raise ScorerLoadError(f"vision width {width} is not divisible into {heads} heads; pass vision_heads=")
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=int(state[f"{_VISION_PREFIX}blocks.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=layer_norm_eps,
        attention_dropout=0.0,
    )


def imagereward_key_rules(model: ImageRewardModel) -> list[KeyRule]:
    """``ImageReward.pt`` name → this module's name, for every parameter of ``model``."""
    rules = [
        KeyRule(f"{_VISION_PREFIX}cls_token", "vision_model.embeddings.class_embedding"),
        KeyRule(f"{_VISION_PREFIX}pos_embed", "vision_model.embeddings.position_embedding"),
        KeyRule(f"{_VISION_PREFIX}patch_embed.proj.weight", "vision_model.embeddings.patch_embedding.weight"),
        KeyRule(f"{_VISION_PREFIX}patch_embed.proj.bias", "vision_model.embeddings.patch_embedding.bias"),
        KeyRule(f"{_VISION_PREFIX}norm.weight", "vision_model.post_layernorm.weight"),
        KeyRule(f"{_VISION_PREFIX}norm.bias", "vision_model.post_layernorm.bias"),
    ]
    for i in range(model.vision_model.config.num_hidden_layers):
        rules += [
            KeyRule(f"{_VISION_PREFIX}blocks.{i}.{s}", f"vision_model.encoder.layers.{i}.{d}")
            for s, d in _VIT_BLOCK
        ]
    # The text encoder keeps BLIP's med.py names; only the prefix changes.
    for name in model.text_model.state_dict():
        if not name.endswith("position_ids"):
            rules.append(KeyRule(f"{_TEXT_PREFIX}{name}", f"text_model.{name}"))
    for name in model.mlp.state_dict():
        rules.append(KeyRule(f"mlp.{name}", f"mlp.{name}"))
    return rules


def build_blip_tokenizer(tokenizer_dir: PathType) -> Any:
    """bert-base-uncased WordPiece from a local folder, plus BLIP's ``[DEC]`` and ``[ENC]``."""
    from transformers import BertTokenizer

    path = Path(tokenizer_dir)
    if not (path / "vocab.txt").is_file() and not (path / "tokenizer.json").is_file():
        raise ScorerLoadError(f"{path}: no BERT tokenizer files (vocab.txt or tokenizer.json)")
    tokenizer = BertTokenizer.from_pretrained(str(path), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _resolve_checkpoint(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for name in ("ImageReward.pt", "model.safetensors"):
            if (path / name).is_file():
                return path / name
    raise ScorerLoadError(
        f"ImageReward weights not found at {path} (a file, or a folder with ImageReward.pt)"
    )


def load_imagereward_model(
    ckpt: PathType,
    med_config: PathType | Mapping[str, Any],
    *,
    vision_heads: int | None = None,
) -> tuple[ImageRewardModel, LoadReport]:
    """Build the model from ``med_config`` and checkpoint shapes; load ``ckpt`` by name mapping."""
    ckpt_path = _resolve_checkpoint(Path(ckpt))
    state = load_state_dict_file(ckpt_path)
    if isinstance(med_config, (str, PathLike)):
        med_config = json.loads(Path(med_config).read_text())
    vision_config = vision_config_from_state_dict(state, vision_heads)
    model = ImageRewardModel(
        vision_config, text_config_from_med_config(med_config, vision_config.hidden_size)
    )
    converted, report = apply_key_rules(
        state,
        imagereward_key_rules(model),
        source=str(ckpt_path),
        source_format="imagereward",
        ignorable=lambda k: bool(_IGNORABLE.match(k)),
    )
    load_converted(model, converted, report)
    return model.eval(), report


class ImageRewardScorer(PairScorer):
    """ImageReward v1.0 normalised reward per (image, prompt) pair."""

    metric = "imagereward"

    def __init__(
        self,
        model: ImageRewardModel,
        tokenizer: Any,
        *,
        max_length: int = IMAGEREWARD_MAX_LENGTH,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "float32",
        weights_path: PathType | None = None,
        weights_sha256: str | None = None,
        med_config_sha256: str | None = None,
        tokenizer_vocab_sha256: str | None = None,
    ) -> None:
        super().__init__(device=device, dtype=dtype, weights_path=weights_path, weights_sha256=weights_sha256)
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.model.mlp.float()  # the head runs on float features, as upstream
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.image_size = int(model.vision_model.config.image_size)
        self.med_config_sha256 = med_config_sha256
        self.tokenizer_vocab_sha256 = tokenizer_vocab_sha256

    @classmethod
    def from_path(
        cls,
        ckpt: PathType,
        med_config: PathType | None = None,
        tokenizer_dir: PathType | None = None,
        *,
        tokenizer: Any = None,
        vision_heads: int | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "float32",
        weights_sha256: str | None = None,
    ) -> ImageRewardScorer:
        """``ckpt``: ``ImageReward.pt`` (or a folder holding it); ``med_config`` defaults to the
        ``med_config.json`` beside it; ``tokenizer_dir``: a bert-base-uncased tokenizer folder
        (or pass ``tokenizer=`` to inject a ready tokenizer)."""
        ckpt_path = _resolve_checkpoint(Path(ckpt))
        if med_config is None:
            med_config = ckpt_path.parent / "med_config.json"
        med_config = Path(med_config)
        if not med_config.is_file():
            raise ScorerLoadError(f"med_config.json not found: {med_config}")
        if tokenizer is None:
            if tokenizer_dir is None:
                raise ScorerLoadError(
                    "ImageReward needs tokenizer_dir= (bert-base-uncased files) or tokenizer="
                )
            tokenizer = build_blip_tokenizer(tokenizer_dir)
        vocab_sha = None
        if tokenizer_dir is not None:
            for name in ("vocab.txt", "tokenizer.json"):
                if (Path(tokenizer_dir) / name).is_file():
                    vocab_sha = sha256_file(Path(tokenizer_dir) / name)
                    break
        model, _ = load_imagereward_model(ckpt_path, med_config, vision_heads=vision_heads)
        return cls(
            model,
            tokenizer,
            device=device,
            dtype=dtype,
            weights_path=ckpt_path,
            weights_sha256=weights_sha256,
            med_config_sha256=sha256_file(med_config),
            tokenizer_vocab_sha256=vocab_sha,
        )

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack(
            [
                pil_clip_transform(image, self.image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
                for image in images
            ]
        )

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = self.preprocess(images).to(device=self.device, dtype=self.dtype)
        text = self.tokenize(prompts)
        return self.model(pixels, text["input_ids"].to(self.device), text["attention_mask"].to(self.device))

    def protocol(self) -> dict[str, Any]:
        return {
            "weights_sha256": self.weights_sha256,
            "med_config_sha256": self.med_config_sha256,
            "tokenizer_vocab_sha256": self.tokenizer_vocab_sha256,
            "reward_mean": IMAGEREWARD_MEAN,
            "reward_std": IMAGEREWARD_STD,
            "backend": "transformers",
            "dtype": dtype_name(self.dtype),
        }
