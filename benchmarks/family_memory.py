"""Memory a SenseFlow run holds per GPU for each real family, computed from the published configs.

Every network is built from its published config on the meta device (no memory, no download), so
the parameter counts are exact for the diffusers and transformers classes senseflow loads. The
per-GPU figure is what a rank keeps resident besides activations:

* teacher (frozen) in ``precision.teacher_dtype``;
* generator and fake score in ``precision.param_dtype``, their gradients in the same dtype, and
  AdamW's two moments (fp32: 8 bytes per parameter; 8-bit AdamW: 2 bytes);
* text encoders (bf16) unless the run reads a text cache, and the VAE in fp32.

FSDP2 shards the three networks (and their optimiser states) over the ranks; text encoders and the
VAE are whole on every rank. Activations depend on resolution, batch and gradient checkpointing
and are not counted: they need a GPU to measure.

    python benchmarks/family_memory.py            # prints the table docs/families.md quotes
"""

from __future__ import annotations

import argparse

from accelerate import init_empty_weights
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

GIB = 1024**3

# Published configs of the real teachers' components (the numbers of their config.json files).
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SD35_LARGE = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=38,
    attention_head_dim=64,
    num_attention_heads=38,
    joint_attention_dim=4096,
    caption_projection_dim=2432,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
    qk_norm="rms_norm",
)
SD35_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    qk_norm="rms_norm",
    dual_attention_layers=tuple(range(13)),
)
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
CLIP_L = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768
)
CLIP_G = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=20,
    projection_dim=1280,
)
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
)
VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
)


def count(build) -> int:
    with init_empty_weights():
        model = build()
    return sum(p.numel() for p in model.parameters())


def families() -> dict[str, dict[str, int]]:
    clip_l = count(lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)))
    clip_l_proj = count(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)))
    clip_g = count(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)))
    t5 = count(lambda: T5EncoderModel(T5Config(**T5_XXL)))
    return {
        "sdxl": {
            "network": count(lambda: UNet2DConditionModel(**SDXL_UNET)),
            "text": clip_l + clip_g,
            "vae": count(lambda: AutoencoderKL(**VAE, latent_channels=4)),
        },
        "sd35_large": {
            "network": count(lambda: SD3Transformer2DModel(**SD35_LARGE)),
            "text": clip_l_proj + clip_g + t5,
            "vae": count(lambda: AutoencoderKL(**VAE, latent_channels=16)),
        },
        "sd35_medium": {
            "network": count(lambda: SD3Transformer2DModel(**SD35_MEDIUM)),
            "text": clip_l_proj + clip_g + t5,
            "vae": count(lambda: AutoencoderKL(**VAE, latent_channels=16)),
        },
        "flux_dev": {
            "network": count(lambda: FluxTransformer2DModel(**FLUX_DEV)),
            "text": clip_l + t5,
            "vae": count(lambda: AutoencoderKL(**VAE, latent_channels=16)),
        },
    }


def per_gpu(counts: dict[str, int], ranks: int, param_bytes: int, adam_bytes: int, text_cache: bool) -> float:
    """Resident GiB per GPU (activations excluded)."""
    n = counts["network"]
    sharded = n * 2 + 2 * n * (param_bytes + param_bytes + adam_bytes)  # teacher bf16; G and fake
    whole = (0 if text_cache else counts["text"] * 2) + counts["vae"] * 4
    return (sharded / ranks + whole) / GIB


STRATEGIES = [
    ("1 GPU, fp32 master, AdamW", 1, 4, 8, False),
    ("1 GPU, bf16 weights, 8-bit AdamW, text cache", 1, 2, 2, True),
    ("FSDP2 x8, fp32 master, AdamW", 8, 4, 8, False),
    ("FSDP2 x8, fp32 master, AdamW, text cache", 8, 4, 8, True),
    ("FSDP2 x8, bf16 weights, 8-bit AdamW, text cache", 8, 2, 2, True),
]


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    table = families()
    print("| family | network params | text encoders | VAE |")
    print("|---|---|---|---|")
    for name, c in table.items():
        print(f"| {name} | {c['network'] / 1e9:.3f} B | {c['text'] / 1e9:.3f} B | {c['vae'] / 1e6:.1f} M |")
    print()
    print("| strategy | " + " | ".join(table) + " |")
    print("|---|" + "---|" * len(table))
    for label, ranks, pbytes, abytes, cached in STRATEGIES:
        cells = [f"{per_gpu(c, ranks, pbytes, abytes, cached):.1f}" for c in table.values()]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("\nGiB per GPU, resident weights + gradients + optimiser states (activations excluded).")


if __name__ == "__main__":
    main()
