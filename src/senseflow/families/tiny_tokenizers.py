"""Offline tokenizers of the real classes for the tiny teachers (nothing is downloaded).

``CLIPTokenizer`` and ``Qwen2Tokenizer`` are byte-level BPEs with the 256 byte symbols and merges for a
few words; ``T5TokenizerFast`` is a hand-made Unigram vocabulary; the Qwen tokenizer carries the ChatML
special tokens and a chat template written here, as the language-model pipelines apply one.
"""

from __future__ import annotations

from typing import Any

from transformers import CLIPTokenizer, T5TokenizerFast

# Words the CLIP BPE gets merges for, so tokens are not only single bytes.
_CLIP_WORDS = ("a", "photo", "of", "the", "cat", "dog", "red", "blue", "on", "with")
# Whole-word pieces of the T5 Unigram vocabulary (any other word falls back to characters).
T5_WORDS = ("a", "photo", "of", "the", "cat", "dog", "red", "blue", "green", "on", "in", "with", "and")


def bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 / CLIP byte-to-symbol map: printable bytes map to themselves, the rest upward of U+0100."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            symbols.append(256 + extra)
            extra += 1
    return {b: chr(s) for b, s in zip(printable, symbols, strict=True)}


def clip_tokenizer(pad_token: str) -> CLIPTokenizer:
    """A byte-level CLIP BPE with the real vocabulary's layout: bytes, bytes + ``</w>``, merges, specials."""
    byte_symbols = list(bytes_to_unicode().values())
    tokens = [*byte_symbols, *(s + "</w>" for s in byte_symbols)]
    merges: list[tuple[str, str]] = []
    for word in _CLIP_WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        merged = parts[0]
        for part in parts[1:]:
            pair = (merged, part)
            merged += part
            if pair not in merges:
                merges.append(pair)
                tokens.append(merged)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def t5_tokenizer() -> T5TokenizerFast:
    """A T5 Unigram tokenizer (ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2) over words and single characters."""
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0 - 0.1 * i) for i, w in enumerate(T5_WORDS)]
    pieces += [("▁" + c, -7.0) for c in chars]
    pieces += [(c, -8.0) for c in chars]
    unique: dict[str, float] = {}
    for piece, score in pieces:  # one id per piece, at its first place ("▁a" is a word and a character)
        unique.setdefault(piece, score)
    return T5TokenizerFast(vocab=list(unique.items()), extra_ids=0, model_max_length=512)


# ChatML special tokens (the Qwen tokenizers' layout); ``<|endoftext|>`` pads.
CHATML_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# A ChatML chat template written for the tiny tokenizers: the roles' turns, the assistant's opening
# with ``add_generation_prompt`` and an empty thinking block when ``enable_thinking`` is false (the
# keyword the Qwen3 pipelines pass). Real folders bring their own template; parity holds for any.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}{{ part['text'] }}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def qwen_tokenizer(max_length: int = 512) -> Any:
    """A byte-level BPE ``Qwen2Tokenizer`` (the class of Qwen-Image's, FLUX.2 klein's and Z-Image's
    tokenizers): the 256 byte symbols, merges for a few words, the ChatML special tokens and a chat
    template."""
    from transformers import Qwen2Tokenizer

    tokens = list(bytes_to_unicode().values())
    merges: list[tuple[str, str]] = []
    for word in T5_WORDS:
        merged = word[0]
        for part in word[1:]:
            if (merged, part) not in merges:
                merges.append((merged, part))
                tokens.append(merged + part)
            merged += part
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": list(CHATML_TOKENS[1:])})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
