"""Tiny random ``ZImagePipeline`` folders of the real classes (``senseflow.families.tiny``'s builder).

Variant "a" has Z-Image's layout shrunk: a static shift of 6 (the base model's scheduler), the FLUX
autoencoder's factors, qk-norm. Variant "b" differs wherever the adapter reads something: dynamic
shifting (μ from the token count), 8 latent channels and a 4x autoencoder, another width, head size,
RoPE split and time scale, no qk-norm, one refiner layer and a deeper text encoder.
"""

from __future__ import annotations

from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from senseflow.families.tiny import _seeded, _unknown, _unzero, _vae
from senseflow.families.tiny_tokenizers import qwen_tokenizer

# RoPE table lengths (frame axis, height, width): the frame axis numbers the caption tokens (up to the
# tokenizer's 512 plus Z-Image's padding to 32), so it must be longer than the longest caption.
AXES_LENS = (1024, 64, 64)


def _text_encoder(vocab: int, hidden: int, layers: int, heads: int, kv_heads: int) -> Qwen3Model:
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=1024,
    )
    return Qwen3Model(config).eval()


def tiny_pipeline(variant: str, seed: int) -> ZImagePipeline:
    """An unsaved tiny ``ZImagePipeline`` of ``variant`` ("a" or "b")."""
    if variant == "a":
        text_hidden, text_layers, latent = 32, 2, 4
        transformer_extra = dict(
            dim=32,
            n_layers=2,
            n_refiner_layers=2,
            n_heads=2,
            n_kv_heads=2,
            qk_norm=True,
            axes_dims=(4, 6, 6),
            rope_theta=256.0,
        )
        vae_args = dict(
            levels=4,
            latent_channels=latent,
            scaling=0.3611,
            shift=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=6.0, use_dynamic_shifting=False
        )
    elif variant == "b":
        text_hidden, text_layers, latent = 48, 3, 8
        transformer_extra = dict(
            dim=48,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            qk_norm=False,
            axes_dims=(8, 8, 8),
            rope_theta=100.0,
            t_scale=500.0,
        )
        vae_args = dict(levels=3, latent_channels=latent, scaling=0.5, shift=0.05)
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            use_dynamic_shifting=True,
            base_image_seq_len=256,
            max_image_seq_len=4096,
            base_shift=0.3,
            max_shift=1.5,
        )
    else:
        raise _unknown("z_image", variant)
    tokenizer = qwen_tokenizer()
    with _seeded(seed, "text_encoder"):
        text_encoder = _text_encoder(len(tokenizer), text_hidden, text_layers, 2, 1)
    with _seeded(seed, "transformer"):
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=latent,
            cap_feat_dim=text_hidden,
            axes_lens=AXES_LENS,
            **transformer_extra,
        )
        _unzero(transformer.eval())
    with _seeded(seed, "vae"):
        vae = _vae(**vae_args)
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
