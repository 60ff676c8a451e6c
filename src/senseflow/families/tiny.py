"""Tiny, randomly initialised teachers of every family in the stock diffusers folder layout.

Tests and benchmarks need teacher folders that the stock pipelines (``StableDiffusionXLPipeline``,
``StableDiffusion3Pipeline``, ``FluxPipeline``) and the project's own loaders read exactly as they
read the real ones, without a model hub. Each folder is written by the pipeline's own
``save_pretrained``, so ``model_index.json``, the component sub-folders, config names and weight
file names are the real ones; only the sizes are tiny.

Every family has at least two variants with different, non-default configs (latent channels, VAE
factor, scaling and shift factors, text-encoder widths, scheduler settings, network shapes), so a
loader that assumes any of them instead of reading the folder fails on one. The prediction types
used are ``epsilon`` (SDXL "a"), ``v_prediction`` (SDXL "b") and flow matching (the others). SDXL,
SD 3.5 and FLUX.1 are built here; the language-model families' builders sit in
``families/<family>/tiny.py``.

The tokenizers are real ``CLIPTokenizer`` / ``T5TokenizerFast`` / ``Qwen2Tokenizer`` objects built
offline from vocabularies written in ``tiny_tokenizers.py``, so nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import importlib
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from senseflow.families.tiny_tokenizers import clip_tokenizer, t5_tokenizer

FAMILIES = ("sdxl", "sd3", "flux", "qwen_image", "flux2", "flux2_klein", "z_image")

# Dtype stored under a weight variant's name (as the hub's fp16 / bf16 variants hold half tensors).
_VARIANT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# ---------------------------------------------------------------------------------------------
# Components


@contextlib.contextmanager
def _seeded(seed: int, component: str) -> Iterator[None]:
    """Seed torch for one component (its own stream, so equal configs never share weights) and restore
    the caller's random state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{seed}/{component}".encode()))
        yield


def _unzero(model: nn.Module) -> nn.Module:
    """Give zero-initialised weight matrices (zero output projections) small random values, so the
    output depends on every input; a no-op for the classes and versions that init them randomly."""
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1 and not param.any():
                param.normal_(0.0, 0.02)
    return model


def _clip_text(
    cls: type[CLIPTextModel] | type[CLIPTextModelWithProjection],
    tokenizer: CLIPTokenizer,
    hidden: int,
    layers: int,
    heads: int,
    projection: int,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # CLIP pools at the first eos token
        pad_token_id=tokenizer.pad_token_id,
    )
    return cls(config).eval()


def _t5_text(tokenizer: T5TokenizerFast, d_model: int, heads: int, layers: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // heads,
        d_ff=2 * d_model,
        num_layers=layers,
        num_heads=heads,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval()


def _vae(
    levels: int, latent_channels: int, scaling: float, shift: float | None, **extra: Any
) -> AutoencoderKL:
    """An AutoencoderKL that downsamples by ``2 ** (levels - 1)``, as the pipelines' ``vae_scale_factor``."""
    widths = (8, 16, 16, 16)[:levels]
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=widths,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling,
        shift_factor=shift,
        **extra,
    ).eval()


# ---------------------------------------------------------------------------------------------
# Families


def _sdxl(variant: str, seed: int) -> StableDiffusionXLPipeline:
    if variant == "a":  # the SDXL base layout, shrunk
        hid1, hid2, proj2, time_dim, latent = 32, 32, 32, 8, 4
        unet_extra = dict(
            sample_size=32,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 1),
            use_linear_projection=True,
            norm_num_groups=32,
        )
        vae_args = dict(levels=4, latent_channels=latent, scaling=0.13025, shift=None)
        scheduler = EulerDiscreteScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            prediction_type="epsilon",
            timestep_spacing="leading",
            steps_offset=1,
        )
        force_zeros = True
    elif variant == "b":  # three levels, wider second encoder, 8 latent channels, 4x VAE, v-prediction
        hid1, hid2, proj2, time_dim, latent = 32, 48, 40, 4, 8
        unet_extra = dict(
            sample_size=16,
            block_out_channels=(32, 32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4, 8),
            transformer_layers_per_block=(1, 1, 2),
            use_linear_projection=False,
            norm_num_groups=16,
        )
        vae_args = dict(levels=3, latent_channels=latent, scaling=0.5, shift=None)
        scheduler = EulerDiscreteScheduler(
            num_train_timesteps=1000,
            beta_start=0.0001,
            beta_end=0.02,
            beta_schedule="linear",
            prediction_type="v_prediction",
            timestep_spacing="trailing",
            steps_offset=0,
        )
        force_zeros = False
    else:
        raise _unknown("sdxl", variant)
    tokenizer = clip_tokenizer(pad_token="<|endoftext|>")
    tokenizer_2 = clip_tokenizer(pad_token="!")  # the real SDXL tokenizer_2 pads with "!"
    with _seeded(seed, "text_encoder"):
        text_encoder = _clip_text(CLIPTextModel, tokenizer, hid1, 2, 4, hid1)
    with _seeded(seed, "text_encoder_2"):
        text_encoder_2 = _clip_text(CLIPTextModelWithProjection, tokenizer_2, hid2, 2, 4, proj2)
    with _seeded(seed, "unet"):
        unet = UNet2DConditionModel(
            in_channels=latent,
            out_channels=latent,
            cross_attention_dim=hid1 + hid2,  # the pipeline concatenates both encoders' hidden states
            addition_embed_type="text_time",
            addition_time_embed_dim=time_dim,
            projection_class_embeddings_input_dim=6 * time_dim + proj2,  # 6 time ids + pooled text
            **unet_extra,
        )
        _unzero(unet.eval())
    with _seeded(seed, "vae"):
        vae = _vae(**vae_args)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=force_zeros,
        add_watermarker=False,
    )


def _sd3(variant: str, seed: int) -> StableDiffusion3Pipeline:
    # The pipeline concatenates the two CLIP hidden states on the feature axis and zero-pads them to the
    # T5 width (joint_attention_dim), so their widths must sum to at most that; the pooled vector is
    # the concatenation of both projections (pooled_projection_dim).
    if variant == "a":  # SD 3 layout: 24 CLIP features padded to 32
        clip_l, clip_g, proj_l, proj_g, joint, t5_heads, latent = 8, 16, 32, 32, 32, 4, 4
        transformer_extra = dict(
            sample_size=32, num_layers=2, attention_head_dim=16, num_attention_heads=2, pos_embed_max_size=32
        )
        vae_args = dict(levels=4, latent_channels=latent, scaling=1.5305, shift=0.0609)
        shift = 3.0
    elif variant == "b":  # SD 3.5 Medium layout: dual attention in block 0, RMS qk-norm, 8 latent channels
        clip_l, clip_g, proj_l, proj_g, joint, t5_heads, latent = 16, 24, 16, 32, 48, 4, 8
        transformer_extra = dict(
            sample_size=16,
            num_layers=3,
            attention_head_dim=8,
            num_attention_heads=4,
            pos_embed_max_size=16,
            qk_norm="rms_norm",
            dual_attention_layers=(0,),
        )
        vae_args = dict(levels=3, latent_channels=latent, scaling=0.75, shift=-0.125)
        shift = 2.0
    else:
        raise _unknown("sd3", variant)
    inner = transformer_extra["num_attention_heads"] * transformer_extra["attention_head_dim"]
    tokenizer = clip_tokenizer(pad_token="<|endoftext|>")
    tokenizer_2 = clip_tokenizer(pad_token="!")
    tokenizer_3 = t5_tokenizer()
    with _seeded(seed, "text_encoder"):
        text_encoder = _clip_text(CLIPTextModelWithProjection, tokenizer, clip_l, 2, 2, proj_l)
    with _seeded(seed, "text_encoder_2"):
        text_encoder_2 = _clip_text(CLIPTextModelWithProjection, tokenizer_2, clip_g, 2, 4, proj_g)
    with _seeded(seed, "text_encoder_3"):
        text_encoder_3 = _t5_text(tokenizer_3, joint, t5_heads, 2)
    with _seeded(seed, "transformer"):
        transformer = SD3Transformer2DModel(
            patch_size=2,
            in_channels=latent,
            out_channels=latent,
            joint_attention_dim=joint,
            caption_projection_dim=inner,  # the context stream runs at the transformer's width
            pooled_projection_dim=proj_l + proj_g,
            **transformer_extra,
        )
        _unzero(transformer.eval())
    with _seeded(seed, "vae"):
        vae = _vae(**vae_args)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _flux(variant: str, seed: int) -> FluxPipeline:
    # The CLIP pooled output (its hidden width) is FLUX's pooled projection; T5 sets joint_attention_dim.
    if variant == "a":  # FLUX.1-dev layout: dynamic shift from the token count, FLUX VAE factors
        clip_hidden, joint, latent = 32, 32, 4
        transformer_extra = dict(
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            axes_dims_rope=(4, 4, 8),
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
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_image_seq_len=16,
            max_image_seq_len=256,
            base_shift=0.5,
            max_shift=1.15,
        )
    elif variant == "b":  # deeper, head dim 24, 8 latent channels, 4x VAE, static shift
        clip_hidden, joint, latent = 48, 48, 8
        transformer_extra = dict(
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=24,
            num_attention_heads=2,
            axes_dims_rope=(4, 10, 10),
        )
        vae_args = dict(levels=3, latent_channels=latent, scaling=0.5, shift=0.05)
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False
        )
    else:
        raise _unknown("flux", variant)
    tokenizer = clip_tokenizer(pad_token="<|endoftext|>")
    tokenizer_2 = t5_tokenizer()
    with _seeded(seed, "text_encoder"):
        text_encoder = _clip_text(CLIPTextModel, tokenizer, clip_hidden, 2, 4, clip_hidden)
    with _seeded(seed, "text_encoder_2"):
        text_encoder_2 = _t5_text(tokenizer_2, joint, 4, 2)
    with _seeded(seed, "transformer"):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * latent,  # 2x2 packing of the latent
            joint_attention_dim=joint,
            pooled_projection_dim=clip_hidden,
            guidance_embeds=True,
            **transformer_extra,
        )
        _unzero(transformer.eval())
    with _seeded(seed, "vae"):
        vae = _vae(**vae_args)
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


_BUILDERS: dict[str, Any] = {
    "sdxl": _sdxl,
    "sd3": _sd3,
    "flux": _flux,
    # the later families keep their builders beside their adapters: (variant, seed) -> pipeline
    "qwen_image": "senseflow.families.qwen_image.tiny:tiny_pipeline",
    "flux2": "senseflow.families.flux2.tiny:tiny_dev_pipeline",
    "flux2_klein": "senseflow.families.flux2.tiny:tiny_klein_pipeline",
    "z_image": "senseflow.families.z_image.tiny:tiny_pipeline",
}


def _builder(family: str) -> Any:
    builder = _BUILDERS[family]
    if isinstance(builder, str):
        module, name = builder.split(":")
        builder = getattr(importlib.import_module(module), name)
    return builder


_VARIANTS = {f: ("a", "b") for f in FAMILIES}


def _unknown(family: str, variant: str) -> ValueError:
    return ValueError(f"no tiny {family!r} variant {variant!r}; known: {', '.join(_VARIANTS[family])}")


def tiny_variants(family: str) -> tuple[str, ...]:
    """The variant names of one family (each a differently shaped teacher)."""
    if family not in _VARIANTS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return _VARIANTS[family]


def write_tiny_teacher(
    folder: str | Path,
    family: str,
    variant: str = "a",
    *,
    seed: int = 0,
    weight_variant: str | None = None,
) -> Path:
    """Write a tiny random teacher of ``family`` / ``variant`` to ``folder`` with the pipeline's own
    ``save_pretrained`` and return the folder.

    The same (family, variant, seed) always gives the same weights. ``weight_variant`` (e.g. "fp16")
    names the weight files as that diffusers variant (``*.fp16.safetensors``), holding tensors of that
    dtype for "fp16" / "bf16", so a loader's ``variant`` handling can be tested.
    """
    if variant not in tiny_variants(family):
        raise _unknown(family, variant)
    pipe = _builder(family)(variant, seed)
    dtype = _VARIANT_DTYPES.get(weight_variant or "")
    if dtype is not None:
        pipe.to(dtype=dtype)
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True, variant=weight_variant)
    return folder
