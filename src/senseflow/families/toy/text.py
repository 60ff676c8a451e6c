"""The shapes world's text encoder: a frozen, seeded CLIP text tower over the grammar's vocabulary.

Why a randomly initialised (never trained) transformer rather than a learned one: it needs no data
and no download, it is reproducible bit-for-bit from a seed, and its causal self-attention plus
position embeddings keep word order, so "a red circle left of a blue square" and "a blue circle
left of a red square" get different embeddings (a bag of word vectors would not). It is a real
``transformers.CLIPTextModelWithProjection`` saved with ``save_pretrained`` next to a real
tokenizer, so the teacher folder is loaded exactly like a diffusers pipeline's text encoder, and
it yields the two tensors real teachers consume: a token sequence and a pooled vector.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

from senseflow.families.toy.world import vocabulary

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
# transformers treats eos_token_id == 2 as the legacy "argmax of ids" pooling rule, so EOS must not be 2.
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)


@dataclass(frozen=True)
class TextEncoderSpec:
    """Architecture of the frozen toy text encoder (fields are recipe fields of the teacher recipe)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_length: int = 16
    projection_dim: int = 64
    seed: int = 0


def build_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *vocabulary()))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=max_length,
    )


def build_text_encoder(
    spec: TextEncoderSpec, tokenizer: PreTrainedTokenizerFast
) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        max_position_embeddings=spec.max_length,
        projection_dim=spec.projection_dim,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = CLIPTextModelWithProjection(config)
    return model.eval().requires_grad_(False)


def save_text_encoder(spec: TextEncoderSpec, folder: Path) -> None:
    """Write ``tokenizer/`` and ``text_encoder/`` into a teacher folder, as in a diffusers pipeline."""
    tokenizer = build_tokenizer(spec.max_length)
    build_text_encoder(spec, tokenizer).save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")


class PromptEncoder:
    """Loads tokenizer + text encoder from a teacher folder and turns prompts into (tokens, pooled)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer")
        self.model = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder").eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=False,
            return_tensors="pt",
        )
        if batch.input_ids.shape[1] > self.tokenizer.model_max_length:
            raise ValueError(f"a prompt is longer than {self.tokenizer.model_max_length} tokens: {prompts}")
        out = self.model(input_ids=batch.input_ids.to(self.model.device))
        return out.last_hidden_state, out.text_embeds
