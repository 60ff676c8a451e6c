"""Tiny random FLUX.2 folders (``Flux2Pipeline``, ``Flux2KleinPipeline``) of the real classes, for tests.

The text encoders are deep enough for the layers the pipelines read by default (hidden states 10, 20
and 30 of Mistral 3; 9, 18 and 27 of Qwen3), so the stock ``encode_prompt`` runs unchanged on them.
FLUX.2-dev's tokenizer component is a ``PixtralProcessor`` in the real folder; that class needs
torchvision, so the tiny folder holds the tokenizer alone in its place: the pipeline's text-only
prompt encoding calls the same ``apply_chat_template`` on either.
"""

from __future__ import annotations

import re
from typing import Any

from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    PixtralVisionConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from senseflow.families.tiny import _seeded, _unknown, _unzero
from senseflow.families.tiny_tokenizers import T5_WORDS, bytes_to_unicode, qwen_tokenizer

# The special tokens of Mistral's instruction format, and the image tokens a Pixtral processor names.
MISTRAL_SPECIAL = (
    *("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"),
    *("[IMG]", "[IMG_BREAK]", "[IMG_END]"),
)
# A chat template written for the tiny tokenizer: the system turn and user turns in Mistral's
# bracket tokens, content given as a string or as a list of text parts (as the pipeline gives it).
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['content'] is string %}{% set text = m['content'] %}"
    "{% else %}{% set text = m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join('') %}{% endif %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)


def mistral_tokenizer(max_length: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE, Mistral's special tokens and a chat template. Its merges make whole tokens of a
    few prompt words and of the words of the pipeline's system message (with and without the space
    before them), so the encoding of a short prompt fits in a few dozen tokens."""
    symbols = bytes_to_unicode()
    words = sorted({*T5_WORDS, *re.findall(r"[A-Za-z]+", SYSTEM_MESSAGE)})
    tokens = list(symbols.values())
    merges: list[tuple[str, str]] = []
    for word in [symbols[ord(" ")] + w for w in words] + words:  # spaced words merge first
        merged = word[0]
        for part in word[1:]:
            if (merged, part) not in merges:
                merges.append((merged, part))
                tokens.append(merged + part)
            merged += part
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys([*specials, *tokens]))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=max_length,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(MISTRAL_SPECIAL)})
    tokenizer.chat_template = MISTRAL_TEMPLATE
    return tokenizer


def _vae(levels: int, latent: int, eps: float, quant: bool, seed: int) -> AutoencoderKLFlux2:
    """An AutoencoderKLFlux2 downsampling by ``2 ** (levels - 1)``, with batch-norm statistics that are
    not the identity (so the pipelines' normalisation is exercised)."""
    with _seeded(seed, "vae"):
        vae = AutoencoderKLFlux2(
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=(8, 16, 16, 16)[:levels],
            layers_per_block=1,
            latent_channels=latent,
            norm_num_groups=8,
            sample_size=64,
            use_quant_conv=quant,
            use_post_quant_conv=quant,
            batch_norm_eps=eps,
        ).eval()
        vae.bn.running_mean.normal_(0.0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def _transformer(latent: int, text_width: int, guidance: bool, seed: int, **extra: Any):
    with _seeded(seed, "transformer"):
        net = Flux2Transformer2DModel(
            patch_size=1,
            in_channels=4 * latent,  # 2x2 patches of the VAE latent
            joint_attention_dim=3 * text_width,  # the pipelines stack three hidden layers
            guidance_embeds=guidance,
            **extra,
        )
        return _unzero(net.eval())


_TRANSFORMER = {
    "a": dict(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        axes_dims_rope=(4, 4, 4, 4),
        timestep_guidance_channels=32,
    ),
    "b": dict(  # deeper, head dim 24, other rope split and theta, narrower MLP
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=24,
        num_attention_heads=2,
        axes_dims_rope=(4, 8, 8, 4),
        rope_theta=1000,
        mlp_ratio=2.0,
        timestep_guidance_channels=64,
    ),
}
# (text width, text layers, VAE levels, VAE latent channels, batch-norm eps, quant convs)
_SHAPES = {"a": (16, 31, 4, 4, 1e-4, True), "b": (24, 33, 3, 8, 1e-3, False)}


def _scheduler(variant: str) -> FlowMatchEulerDiscreteScheduler:
    if variant == "a":  # the FLUX.2 folders' layout: dynamic shifting (the pipelines pass their own mu)
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_image_seq_len=256,
            max_image_seq_len=4096,
            base_shift=0.5,
            max_shift=1.15,
        )
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=2.0, use_dynamic_shifting=False)


def tiny_dev_pipeline(variant: str, seed: int) -> Flux2Pipeline:
    """FLUX.2-dev's layout: Mistral 3 text encoder, guidance embedding."""
    if variant not in _SHAPES:
        raise _unknown("flux2", variant)
    width, layers, levels, latent, eps, quant = _SHAPES[variant]
    tokenizer = mistral_tokenizer()
    text = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=width // 2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = PixtralVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=8
    )
    config = Mistral3Config(
        text_config=text,
        vision_config=vision,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
    )
    with _seeded(seed, "text_encoder"):
        text_encoder = Mistral3ForConditionalGeneration(config).eval()
    return Flux2Pipeline(
        scheduler=_scheduler(variant),
        vae=_vae(levels, latent, eps, quant, seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=_transformer(latent, width, True, seed, **_TRANSFORMER[variant]),
    )


def tiny_klein_pipeline(variant: str, seed: int) -> Flux2KleinPipeline:
    """FLUX.2 klein base's layout: Qwen3 text encoder, no guidance embedding (CFG), not distilled."""
    if variant not in _SHAPES:
        raise _unknown("flux2_klein", variant)
    width, layers, levels, latent, eps, quant = _SHAPES[variant]
    layers -= 3  # Qwen3's default layers stop at 27
    tokenizer = qwen_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=width // 2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _seeded(seed, "text_encoder"):
        text_encoder = Qwen3ForCausalLM(config).eval()
    return Flux2KleinPipeline(
        scheduler=_scheduler(variant),
        vae=_vae(levels, latent, eps, quant, seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=_transformer(latent, width, False, seed, **_TRANSFORMER[variant]),
        is_distilled=False,
    )
