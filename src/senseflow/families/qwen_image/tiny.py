"""Tiny random ``QwenImagePipeline`` folders of the real classes, for tests and benchmarks.

Two variants with different shapes and settings: ``a`` is the base model's layout shrunk (4 latent
channels, an 8x VAE, dynamic shifting with a stretch to a terminal σ as Qwen-Image's scheduler has);
``b`` has 8 latent channels, a 4x VAE, a wider text encoder and network, other shift values and no
terminal stretch. Both have their own per-channel latent statistics. The tokenizer is the offline
Qwen2 tokenizer of :func:`senseflow.families.tiny.qwen_tokenizer`.
"""

from __future__ import annotations

from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from senseflow.families.tiny import _seeded, _unzero
from senseflow.families.tiny_tokenizers import qwen_tokenizer

_VARIANTS = {
    "a": dict(
        text=dict(hidden=32, heads=2, kv_heads=1, mrope=(2, 3, 3), positions=1024),
        tokenizer_length=1024,
        network=dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6)),
        vae=dict(base_dim=8, dim_mult=(1, 2, 2, 2), temperal_downsample=(False, True, True)),
        latents_mean=(0.25, -0.5, 0.125, 0.75),
        latents_std=(1.5, 0.75, 2.0, 1.25),
        scheduler=dict(
            use_dynamic_shifting=True,
            base_image_seq_len=16,
            max_image_seq_len=256,
            base_shift=0.5,
            max_shift=0.9,
            shift_terminal=0.02,
        ),
    ),
    "b": dict(
        text=dict(hidden=48, heads=4, kv_heads=2, mrope=(2, 2, 2), positions=2048),
        tokenizer_length=512,
        network=dict(num_layers=2, num_attention_heads=2, attention_head_dim=24, axes_dims_rope=(8, 8, 8)),
        vae=dict(base_dim=8, dim_mult=(1, 2, 2), temperal_downsample=(False, True)),
        latents_mean=(-0.25, 0.5, 0.0, 0.375, -0.75, 0.25, 1.0, -0.125),
        latents_std=(0.5, 1.25, 2.5, 0.875, 1.5, 3.0, 0.625, 1.75),
        scheduler=dict(
            use_dynamic_shifting=True,
            base_image_seq_len=32,
            max_image_seq_len=1024,
            base_shift=0.3,
            max_shift=1.2,
        ),
    ),
}


def _text_encoder(tokenizer, hidden: int, heads: int, kv_heads: int, mrope, positions: int):
    """A two-layer Qwen2.5-VL (its vision tower one tiny block) on the tokenizer's vocabulary;
    ``mrope`` splits the rotary half-width of a head into the temporal, height and width sections."""
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=positions,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope)},
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
            eos_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=hidden,
            fullatt_block_indexes=[0],
        ),
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_pipeline(variant: str, seed: int) -> QwenImagePipeline:
    """The (unsaved) stock pipeline of one variant; the same (variant, seed) gives the same weights."""
    if variant not in _VARIANTS:
        raise ValueError(f"no tiny 'qwen_image' variant {variant!r}; known: {', '.join(_VARIANTS)}")
    v = _VARIANTS[variant]
    latent = len(v["latents_mean"])
    tokenizer = qwen_tokenizer(v["tokenizer_length"])
    with _seeded(seed, "text_encoder"):
        text_encoder = _text_encoder(tokenizer, **v["text"])
    with _seeded(seed, "transformer"):
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * latent,  # 2x2 packing of the latent
            out_channels=latent,
            joint_attention_dim=v["text"]["hidden"],
            **v["network"],
        )
        _unzero(transformer.eval())
    with _seeded(seed, "vae"):
        vae = AutoencoderKLQwenImage(
            z_dim=latent,
            num_res_blocks=1,
            latents_mean=list(v["latents_mean"]),
            latents_std=list(v["latents_std"]),
            **{k: list(x) if isinstance(x, tuple) else x for k, x in v["vae"].items()},
        ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **v["scheduler"])
    return QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
