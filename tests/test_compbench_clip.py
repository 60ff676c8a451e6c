"""CLIP ViT-B/32 non-spatial scoring with a tiny random CLIPModel and a hand-made BPE vocabulary."""

from __future__ import annotations

import json
import string

import numpy as np
import pytest
import torch
from PIL import Image

from senseflow.metrics.compbench.clip_score import (
    PromptTooLong,
    load_clip_b32,
    preprocess_clip_image,
    score_clip,
)
from senseflow.metrics.compbench.layout import build_index
from senseflow.metrics.compbench.sidecar import Sidecar, SidecarEntry


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("tiny_clip")
    letters = string.ascii_lowercase
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters), ".</w>", ",</w>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    cfg = CLIPConfig(
        text_config={
            "vocab_size": len(tokens),
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 16,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).eval().save_pretrained(path)
    return path


def test_preprocess_clip_image_resize_and_centre_crop():
    pixels = np.zeros((60, 30, 3), dtype=np.uint8)
    pixels[:, :, 0] = np.arange(60)[:, None] * 4  # red encodes the row
    x = preprocess_clip_image(Image.fromarray(pixels), 20)
    assert x.shape == (3, 20, 20)
    # 30x60 -> 20x40 (short side 20), crop rows 10..29 of the resized image: the middle half
    red = x[0] * 0.26862954 + 0.48145466
    # resized row r samples source row (r + 0.5) * 1.5 - 0.5: rows 10 and 29 -> 15.25 and 43.75
    assert red[0, 10].item() == pytest.approx(15.25 * 4 / 255, abs=0.01)
    assert red[-1, 10].item() == pytest.approx(43.75 * 4 / 255, abs=0.01)
    assert (red[:, 0] - red[:, -1]).abs().max() < 1e-6  # columns untouched by the vertical gradient


def test_tokenisation_without_truncation(tiny_clip_dir):
    scorer = load_clip_b32(tiny_clip_dir, hash_weights=False)
    assert scorer.tokenize("a cab.") == [0, 28, 4, 2, 29, 54, 1]
    ok = " ".join(["a"] * 75)  # 75 + start + end = 77
    assert len(scorer.tokenize(ok)) == 77
    with pytest.raises(PromptTooLong, match="78 tokens"):
        scorer.tokenize(ok + " a")
    with pytest.raises(PromptTooLong):
        scorer([Image.new("RGB", (32, 32))], [ok + " a"])


def test_cosine_without_logit_scale(tiny_clip_dir):
    scorer = load_clip_b32(tiny_clip_dir)
    images = [Image.new("RGB", (40, 32), c) for c in ("orange", "teal", "orange")]
    texts = ["a fox", "a jay", "a jay"]
    got = scorer(images, texts)
    model = scorer.model
    with torch.no_grad():
        for image, text, value in zip(images, texts, got, strict=True):
            px = preprocess_clip_image(image, 32)[None]
            ids = torch.tensor([scorer.tokenize(text)])
            out = model(input_ids=ids, pixel_values=px)
            cosine = out.logits_per_image[0, 0] / model.logit_scale.exp()
            assert value == pytest.approx(cosine.item(), abs=1e-5)
            assert -1.0 <= value <= 1.0
    assert len(scorer.provenance["weights"]["model.safetensors"]) == 64
    assert scorer.provenance["context_length"] == 77 and scorer.provenance["image_size"] == 32


def test_score_clip_category_simple_and_complex(tiny_clip_dir, tmp_path):
    scorer = load_clip_b32(tiny_clip_dir, hash_weights=False)
    prompts = ["a sleepy fox naps under a tall oak", "a jay sings"]
    index = build_index("non_spatial", prompts, images_per_prompt=2)
    rng = np.random.default_rng(1)
    for e in index.entries:
        Image.fromarray(rng.integers(0, 256, (36, 48, 3), dtype=np.uint8)).save(tmp_path / e.image)
    simple = score_clip(scorer, index, tmp_path, batch_size=3)
    assert simple.n == 4 and simple.info["mode"] == "simple"
    with Image.open(tmp_path / "000002.png") as im:
        assert simple.records[2].score == pytest.approx(
            scorer([im.convert("RGB")], [prompts[1]])[0], abs=1e-6
        )
    sidecar = Sidecar(
        {
            prompts[0]: SidecarEntry((), None, None, "a fox naps under a oak"),
            prompts[1]: SidecarEntry((), None, None, "a jay sings"),
        }
    )
    complex_ = score_clip(scorer, index, tmp_path, sidecar=sidecar, complex_mode=True, metric="clip_action")
    assert complex_.records[0].details["text"] == "a fox naps under a oak"
    assert complex_.records[3].score == pytest.approx(simple.records[3].score, abs=1e-6)  # same text
    assert complex_.records[0].score != pytest.approx(simple.records[0].score, abs=1e-6)
    with pytest.raises(ValueError, match="sidecar"):
        score_clip(scorer, index, tmp_path, complex_mode=True)


def test_score_clip_accepts_any_callable(tmp_path):
    index = build_index("non_spatial", ["a jay sings"], images_per_prompt=2)
    for e in index.entries:
        Image.new("RGB", (8, 8)).save(tmp_path / e.image)
    result = score_clip(lambda ims, txts: [0.25] * len(ims), index, tmp_path, backend={"backend": "stub"})
    assert result.value == 0.25 and result.info["model"] == {"backend": "stub"}


def test_missing_model_names_logical_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="compbench/clip-vit-base-patch32"):
        load_clip_b32(tmp_path)
