"""Published configs of the language-model teachers: Qwen-Image, FLUX.2-dev, FLUX.2 klein base 4B / 9B
and Z-Image (the numbers of their ``config.json`` files).

Each network's parameter count on the meta device was checked against the size its authors state:
Qwen-Image's transformer 20.43 B ("20B"), FLUX.2-dev's 32.22 B ("32B"), klein base 4B's 3.88 B and 9B's
9.08 B, Z-Image's 6.15 B ("6B"); the text encoders Qwen2.5-VL-7B 8.29 B, Mistral-Small-3.1-24B 24.01 B,
Qwen3-4B 4.02 B and Qwen3-8B 8.19 B. The schedulers' settings decide no memory figure; Qwen-Image's and
Z-Image's are their folders' values, FLUX.2's are FLUX.1-dev's (the pipeline computes its own ``mu``).

``published_folders.py`` writes config-only folders from these for ``senseflow plan``, and
``family_memory.py`` counts their parameters.
"""

from __future__ import annotations

from typing import Any

QWEN_IMAGE = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
FLUX2_DEV = dict(
    patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
    num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=True,
)  # fmt: skip
# klein: FLUX.2-dev's blocks, fewer and narrower, no guidance embedding; the text width is three
# stacked hidden layers of its Qwen3 encoder (3 x 2560 and 3 x 4096)
FLUX2_KLEIN_BASE_4B = {
    **FLUX2_DEV, "num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24,
    "joint_attention_dim": 7680, "guidance_embeds": False,
}  # fmt: skip
FLUX2_KLEIN_BASE_9B = {
    **FLUX2_DEV, "num_layers": 8, "num_single_layers": 24, "num_attention_heads": 32,
    "joint_attention_dim": 12288, "guidance_embeds": False,
}  # fmt: skip
Z_IMAGE = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
    n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
    t_scale=1000.0, axes_dims=(32, 48, 48), axes_lens=(1024, 512, 512),
)  # fmt: skip

QWEN25_VL_7B_TEXT = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6, tie_word_embeddings=False,
)  # fmt: skip
QWEN25_VL_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
)  # fmt: skip
MISTRAL_SMALL_TEXT = dict(
    vocab_size=131072, hidden_size=5120, intermediate_size=32768, num_hidden_layers=40,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1e9, tie_word_embeddings=False,
)  # fmt: skip
PIXTRAL_VISION = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14,
    image_size=1540, head_dim=64,
)  # fmt: skip
QWEN3_4B = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, tie_word_embeddings=True, rope_theta=1e6,
)  # fmt: skip
QWEN3_8B = {**QWEN3_4B, "hidden_size": 4096, "intermediate_size": 12288, "tie_word_embeddings": False}

QWEN_IMAGE_SCHEDULER = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
    base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
)  # fmt: skip
FLUX2_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
    max_image_seq_len=4096, base_shift=0.5, max_shift=1.15,
)  # fmt: skip
Z_IMAGE_SCHEDULER = dict(num_train_timesteps=1000, shift=6.0, use_dynamic_shifting=False)


def text_config(kind: str) -> Any:
    """A transformers config object of one of the text encoders above."""
    from transformers import (
        Mistral3Config,
        MistralConfig,
        PixtralVisionConfig,
        Qwen2_5_VLConfig,
        Qwen3Config,
    )

    if kind == "qwen2.5-vl-7b":
        return Qwen2_5_VLConfig(text_config=QWEN25_VL_7B_TEXT, vision_config=QWEN25_VL_VISION)
    if kind == "mistral-small-3.1":
        return Mistral3Config(
            text_config=MistralConfig(**MISTRAL_SMALL_TEXT),
            vision_config=PixtralVisionConfig(**PIXTRAL_VISION),
            spatial_merge_size=2,
            multimodal_projector_bias=False,
            tie_word_embeddings=False,
        )
    if kind == "qwen3-4b":
        return Qwen3Config(**QWEN3_4B)
    if kind == "qwen3-8b":
        return Qwen3Config(**QWEN3_8B)
    raise ValueError(f"unknown text encoder {kind!r}")


# Pipeline folders in published_folders.py's layout: the network, the VAE (class and config), the
# scheduler and one language-model text encoder (class, config kind, tokenizer class and length).
LLM_TEACHERS: dict[str, dict[str, Any]] = {
    "qwen_image": dict(
        pipeline="QwenImagePipeline",
        network=("transformer", "QwenImageTransformer2DModel", QWEN_IMAGE),
        vae=("AutoencoderKLQwenImage", {}),
        scheduler=("FlowMatchEulerDiscreteScheduler", QWEN_IMAGE_SCHEDULER),
        text=("Qwen2_5_VLForConditionalGeneration", "qwen2.5-vl-7b", ("Qwen2Tokenizer", 32768)),
    ),
    "flux2_dev": dict(
        pipeline="Flux2Pipeline",
        network=("transformer", "Flux2Transformer2DModel", FLUX2_DEV),
        vae=("AutoencoderKLFlux2", {}),
        scheduler=("FlowMatchEulerDiscreteScheduler", FLUX2_SCHEDULER),
        text=("Mistral3ForConditionalGeneration", "mistral-small-3.1", ("PixtralProcessor", 131072)),
    ),
    "flux2_klein": dict(
        pipeline="Flux2KleinPipeline",
        network=("transformer", "Flux2Transformer2DModel", FLUX2_KLEIN_BASE_4B),
        vae=("AutoencoderKLFlux2", {}),
        scheduler=("FlowMatchEulerDiscreteScheduler", FLUX2_SCHEDULER),
        text=("Qwen3ForCausalLM", "qwen3-4b", ("Qwen2Tokenizer", 40960)),
    ),
    "flux2_klein_9b": dict(
        pipeline="Flux2KleinPipeline",
        network=("transformer", "Flux2Transformer2DModel", FLUX2_KLEIN_BASE_9B),
        vae=("AutoencoderKLFlux2", {}),
        scheduler=("FlowMatchEulerDiscreteScheduler", FLUX2_SCHEDULER),
        text=("Qwen3ForCausalLM", "qwen3-8b", ("Qwen2Tokenizer", 40960)),
    ),
    "z_image": dict(
        pipeline="ZImagePipeline",
        network=("transformer", "ZImageTransformer2DModel", Z_IMAGE),
        vae=("AutoencoderKL", "flux"),  # FLUX.1's autoencoder
        scheduler=("FlowMatchEulerDiscreteScheduler", Z_IMAGE_SCHEDULER),
        text=("Qwen3Model", "qwen3-4b", ("Qwen2Tokenizer", 40960)),
    ),
}
