"""T2I-CompBench non-spatial (and complex "action"): CLIP ViT-B/32 image-text cosine.

Reference: OpenAI ``clip.load("ViT-B/32")`` (fp16 weights on CUDA). Re-implemented on transformers
``CLIPModel`` (``openai/clip-vit-base-patch32``, the same weights) loaded from a local folder, or on any
callable with the :data:`ClipScoreFn` signature (e.g. an open_clip or OpenAI-package wrapper in a parity
environment). Record the backend and dtype.

* Image: shorter side resized to 224 (PIL bicubic), centre crop 224 (offsets ``int(round((H - 224) / 2))``),
  RGB, ``ToTensor``, OpenAI normalisation.
* Text: the full prompt (complex category: the prompt without adjectives, from the sidecar), tokenised
  **without truncation**; more than 77 tokens including start and end is an error (:class:`PromptTooLong`),
  as upstream.
* Score: cosine of the L2-normalised image and text features; no logit scale.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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

# Name and path under the weights root as in senseflow.metrics.weights.MANIFEST.
LOGICAL_NAME = "compbench.clip_vit_b32"
RELPATH = "compbench/clip-vit-base-patch32/"
UPSTREAM = "Hugging Face repository openai/clip-vit-base-patch32 (OpenAI CLIP ViT-B/32)"
CLIP_IMAGE_SIZE = 224
CONTEXT_LENGTH = 77
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# (images, texts) -> one cosine per pair.
ClipScoreFn = Callable[[Sequence[Image.Image], Sequence[str]], Sequence[float]]


class PromptTooLong(ValueError):
    """A prompt needs more than the context length (77) tokens; upstream refuses it too."""


def preprocess_clip_image(image: Image.Image, size: int = CLIP_IMAGE_SIZE) -> torch.Tensor:
    """OpenAI CLIP preprocessing re-implemented on PIL: float32 CHW tensor of ``size``²."""
    image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)  # half to even
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255.0)
    return (x - torch.tensor(OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_STD).view(3, 1, 1)


def _features(out: Any) -> torch.Tensor:
    """Projected features: the tensor (transformers 4) or the output's ``pooler_output`` (transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@dataclass
class ClipScorer:
    """transformers ``CLIPModel`` + tokenizer; calling it gives the cosine of each (image, text) pair."""

    model: Any
    tokenizer: Any
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    context_length: int = CONTEXT_LENGTH
    image_size: int = CLIP_IMAGE_SIZE
    provenance: dict[str, Any] = field(default_factory=dict)

    def tokenize(self, text: str) -> list[int]:
        """Token ids with start and end tokens, no truncation; :class:`PromptTooLong` beyond the context."""
        ids = list(self.tokenizer(text, truncation=False, padding=False)["input_ids"])
        if len(ids) > self.context_length:
            raise PromptTooLong(
                f"prompt needs {len(ids)} tokens, more than the CLIP context length "
                f"{self.context_length}: {text!r}"
            )
        return ids

    @torch.inference_mode()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text features, one forward per text (no padding, so pooling is unambiguous)."""
        feats = []
        for text in texts:
            ids = torch.tensor([self.tokenize(text)], dtype=torch.long, device=self.device)
            f = _features(self.model.get_text_features(input_ids=ids)).float()
            feats.append(f / f.norm(dim=-1, keepdim=True))
        return torch.cat(feats).cpu()

    @torch.inference_mode()
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        f = _features(self.model.get_image_features(pixel_values=pixel_values)).float()
        return (f / f.norm(dim=-1, keepdim=True)).cpu()

    def __call__(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[float]:
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images for {len(texts)} texts")
        unique = list(dict.fromkeys(texts))
        text_feats = dict(zip(unique, self.text_features(unique), strict=True))
        image_feats = self.image_features(
            torch.stack([preprocess_clip_image(im, self.image_size) for im in images])
        )
        return [float(image_feats[i] @ text_feats[t]) for i, t in enumerate(texts)]


def load_clip_b32(
    model_path: str | PathLike,
    tokenizer_path: str | PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    hash_weights: bool = True,
) -> ClipScorer:
    """Load transformers ``CLIPModel`` and ``CLIPTokenizer`` from local folders (never the hub)."""
    from transformers import CLIPModel, CLIPTokenizer

    model_path = Path(model_path)
    if not (model_path / "config.json").is_file():
        raise FileNotFoundError(
            f"weights {LOGICAL_NAME!r} ({RELPATH} under the weights root): no model at {model_path} "
            f"(expected config.json and weights; upstream: {UPSTREAM})"
        )
    tok_path = Path(tokenizer_path) if tokenizer_path is not None else model_path
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_path), local_files_only=True)
    model = (
        CLIPModel.from_pretrained(str(model_path), local_files_only=True)
        .to(device=device, dtype=dtype)
        .eval()
    )
    weights = sorted(p for p in model_path.iterdir() if p.suffix in (".safetensors", ".bin"))
    context = int(model.config.text_config.max_position_embeddings)
    image_size = int(model.config.vision_config.image_size)
    provenance = {
        "logical_name": LOGICAL_NAME,
        "model_path": str(model_path),
        "tokenizer_path": str(tok_path),
        "weights": {p.name: (sha256_file(p) if hash_weights else None) for p in weights},
        "context_length": context,
        "image_size": image_size,
        "backend": "transformers",
        "dtype": str(dtype).removeprefix("torch."),
    }
    return ClipScorer(model, tokenizer, torch.device(device), dtype, context, image_size, provenance)


def score_clip(
    scorer: ClipScoreFn,
    index: CompBenchIndex,
    images_dir: str | PathLike,
    sidecar: Sidecar | None = None,
    complex_mode: bool = False,
    batch_size: int = 32,
    metric: str = "clip",
    backend: Mapping[str, Any] | None = None,
) -> CategoryScores:
    """CLIP cosine of every image in ``index`` with its prompt (complex: the adjective-free prompt).

    ``backend`` describes a plain-callable scorer for the record (a :class:`ClipScorer` brings its own).
    """
    images_dir = Path(images_dir)
    texts = {}
    for e in index.entries:
        if complex_mode:
            if sidecar is None:
                raise ValueError("complex mode needs the sidecar (adjective-free prompts)")
            text = sidecar[e.prompt].prompt_without_adj
            if text is None:
                raise ValueError(f"sidecar has no prompt_without_adj for {e.prompt!r}")
            texts[e.idx] = text
        else:
            texts[e.idx] = e.prompt
    scores: dict[int, float] = {}
    entries = list(index.entries)
    for start in range(0, len(entries), batch_size):
        batch = entries[start : start + batch_size]
        images = []
        for e in batch:
            with Image.open(images_dir / e.image) as im:
                images.append(im.convert("RGB"))
        values = scorer(images, [texts[e.idx] for e in batch])
        for e, v in zip(batch, values, strict=True):
            scores[e.idx] = float(v)
    details = {e.idx: {"text": texts[e.idx]} for e in entries}
    info: dict[str, Any] = {"mode": "complex" if complex_mode else "simple"}
    info["model"] = dict(getattr(scorer, "provenance", {}) or {}) if backend is None else dict(backend)
    return CategoryScores(index.category, metric, records_from_scores(index, metric, scores, details), info)
