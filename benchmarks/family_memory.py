"""Memory a SenseFlow run holds per GPU for each real family, computed from the published configs.

Every network is built from its published config (held in ``published_folders.py``) on the meta
device (no memory, no download), so the parameter counts are exact for the diffusers and
transformers classes senseflow loads. The per-GPU figure is what a rank keeps resident besides activations:

* teacher (frozen) in ``precision.teacher_dtype``;
* generator and fake score in ``precision.param_dtype``, their gradients in the same dtype, and
  AdamW's two moments (fp32: 8 bytes per parameter; 8-bit AdamW: 2 bytes);
* text encoders (bf16) unless the run reads a text cache, and the VAE in fp32.

FSDP2 shards the three networks (and their optimiser states) over the ranks; text encoders and the
VAE are whole on every rank. Activations depend on resolution, batch and gradient checkpointing
and are not counted here; ``senseflow plan`` (docs/scale.md) adds them.

    python benchmarks/family_memory.py            # prints the table docs/families.md quotes
"""

from __future__ import annotations

import argparse

from accelerate import init_empty_weights
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from published_folders import CLIP_G, CLIP_L, FLUX_DEV, SD35_LARGE, SD35_MEDIUM, SDXL_UNET, T5_XXL, VAE
from published_llm_teachers import LLM_TEACHERS, text_config
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

GIB = 1024**3


def count(build) -> int:
    # buffers on meta too: with real buffers the T5 encoder's embedding is not tied to its shared
    # table on meta and would be counted twice (131.6 M parameters for T5-XXL)
    with init_empty_weights(include_buffers=True):
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
        **{name: llm_family(spec) for name, spec in LLM_TEACHERS.items()},
    }


def llm_family(spec: dict) -> dict[str, int]:
    """The counts of a language-model teacher (published_llm_teachers.py)."""
    import diffusers
    import transformers

    _, network_class, network_cfg = spec["network"]
    vae_class, vae_cfg = spec["vae"]
    vae_cfg = {**VAE, "latent_channels": 16} if vae_cfg == "flux" else vae_cfg
    text_class, text_kind, _ = spec["text"]
    return {
        "network": count(lambda: getattr(diffusers, network_class)(**network_cfg)),
        "text": count(lambda: getattr(transformers, text_class)(text_config(text_kind))),
        "vae": count(lambda: getattr(diffusers, vae_class)(**vae_cfg)),
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
