"""CLIP BPE tokenizer files and tokenisation.

:func:`bytes_to_unicode` and :func:`build_clip_bpe_files` turn OpenAI CLIP's
``bpe_simple_vocab_16e6.txt.gz`` into the ``vocab.json``/``merges.txt`` pair that
:class:`transformers.CLIPTokenizer` reads; :func:`clip_token_ids` tokenises with the open_clip /
OpenAI ``tokenize`` rules (context 77, truncation that keeps EOT last, zero padding).
"""

from __future__ import annotations

import functools
import gzip
import json
import tempfile
from collections.abc import Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import torch

from senseflow.metrics.scoring.checkpoints import PathType, ScorerLoadError

CLIP_CONTEXT_LENGTH = 77
CLIP_SOT_TOKEN = "<|startoftext|>"
CLIP_EOT_TOKEN = "<|endoftext|>"


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte → printable-character table of GPT-2/CLIP byte-level BPE.

    Bytes that are printable, non-space Latin-1 characters map to themselves, in three ranges
    ("!".."~", "¡".."¬", "®".."ÿ"); the remaining 68 bytes map, in increasing byte order, to
    U+0100, U+0101, ... The dict is ordered as the vocabulary orders it: the three ranges first,
    then the remapped bytes.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in kept}
    next_code = 256
    for b in range(256):
        if b not in table:
            table[b] = chr(next_code)
            next_code += 1
    return table


def build_clip_bpe_files(bpe_gz: PathType, out_dir: PathType) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` for :class:`transformers.CLIPTokenizer`.

    Input: OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (shipped e.g. inside the open-clip-torch
    wheel). Lines 1..48894 of the decompressed text are the merges (line 0 is a header); the
    vocabulary is the 256 byte symbols, the same with ``</w>``, each merge's concatenation, then
    ``<|startoftext|>`` and ``<|endoftext|>``: 49,408 entries, ids = positions.
    """
    with gzip.open(bpe_gz, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges]
    vocab_list += [CLIP_SOT_TOKEN, CLIP_EOT_TOKEN]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = out_dir / "vocab.json", out_dir / "merges.txt"
    vocab_path.write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab_list)}, ensure_ascii=False), "utf-8"
    )
    merges_path.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), "utf-8")
    return vocab_path, merges_path


def load_clip_tokenizer(source: Any, *, fallback_dir: PathType | None = None) -> Any:
    """A CLIP BPE tokenizer from a tokenizer object, a tokenizer folder or a ``bpe_simple_vocab`` gz.

    ``source=None`` uses ``fallback_dir`` (e.g. a ``from_pretrained`` model folder that carries its
    tokenizer files). Folders load with ``local_files_only=True``.
    """
    from transformers import AutoTokenizer, CLIPTokenizer

    if source is None:
        if fallback_dir is None or not _has_tokenizer_files(Path(fallback_dir)):
            raise ScorerLoadError(
                "no CLIP tokenizer: pass tokenizer=<folder with vocab.json+merges.txt or tokenizer.json>, "
                "a bpe_simple_vocab_16e6.txt.gz file, or a tokenizer object"
            )
        source = fallback_dir
    if not isinstance(source, (str, PathLike)):
        return source
    path = Path(source)
    if path.is_dir():
        if not _has_tokenizer_files(path):
            raise ScorerLoadError(f"{path}: no tokenizer files (vocab.json+merges.txt or tokenizer.json)")
        if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        vocab, merges = path / "vocab.json", path / "merges.txt"
        return CLIPTokenizer(str(vocab), str(merges), model_max_length=CLIP_CONTEXT_LENGTH)
    if path.is_file() and path.name.endswith(".gz"):
        with tempfile.TemporaryDirectory() as tmp:
            vocab, merges = build_clip_bpe_files(path, tmp)
            return CLIPTokenizer(str(vocab), str(merges), model_max_length=CLIP_CONTEXT_LENGTH)
    raise ScorerLoadError(f"{path}: not a tokenizer folder or a .gz BPE vocabulary")


def _has_tokenizer_files(path: Path) -> bool:
    return (path / "tokenizer.json").is_file() or (
        (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    )


def clip_token_ids(
    tokenizer: Any, prompts: Sequence[str], context_length: int = CLIP_CONTEXT_LENGTH
) -> torch.Tensor:
    """Token ids as OpenAI/open_clip ``tokenize`` makes them: ``[B, context_length]`` int64.

    ``[SOT] + BPE(prompt) + [EOT]``; a longer sequence is cut to ``context_length`` and its last
    token set to EOT; shorter ones are padded with 0.
    """
    eot = tokenizer.eos_token_id
    if eot is None:
        raise ValueError("the CLIP tokenizer has no eos_token_id")
    encoded = tokenizer(list(prompts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    out = torch.zeros(len(encoded), context_length, dtype=torch.long)
    for row, ids in enumerate(encoded):
        ids = list(ids)
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = eot
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out
