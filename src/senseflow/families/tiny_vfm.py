"""Tiny random folders of the VFM discriminator's parts: a ``Dinov2Model`` backbone and a CLIP model
with its tokenizer, in the layouts ``huggingface-cli download`` writes (for tests and benchmarks; the
teachers' tiny folders are in :mod:`senseflow.families.tiny`)."""

from __future__ import annotations

import json
from pathlib import Path

from senseflow.families.tiny import _seeded
from senseflow.families.tiny_tokenizers import clip_tokenizer


def write_tiny_dinov2(
    folder: str | Path, *, hidden: int = 32, layers: int = 4, patch: int = 8, image: int = 32, seed: int = 0
) -> Path:
    """A tiny random ``Dinov2Model`` folder (config, safetensors and the image processor's statistics),
    laid out as ``huggingface-cli download facebook/dinov2-*`` writes it: the VFM backbone of tests."""
    from transformers import Dinov2Config, Dinov2Model

    folder = Path(folder)
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 16),
        intermediate_size=2 * hidden,
        patch_size=patch,
        image_size=image,
    )
    with _seeded(seed, "dinov2"):
        Dinov2Model(config).save_pretrained(folder, safe_serialization=True)
    from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    stats = {"image_mean": IMAGENET_DEFAULT_MEAN, "image_std": IMAGENET_DEFAULT_STD}  # DINOv2's processor
    (folder / "preprocessor_config.json").write_text(json.dumps(stats))
    return folder


def write_tiny_clip(folder: str | Path, *, hidden: int = 32, projection: int = 24, seed: int = 0) -> Path:
    """A tiny random ``CLIPModel`` (text and vision towers) with a CLIP tokenizer, in the layout of
    ``openai/clip-vit-large-patch14``: the VFM discriminator's text encoder in tests."""
    from transformers import CLIPConfig, CLIPModel

    folder = Path(folder)
    tokenizer = clip_tokenizer("<|endoftext|>")
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        image_size=32,
        patch_size=8,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    with _seeded(seed, "clip"):
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
