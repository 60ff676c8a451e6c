"""CLIP score (DMD2 protocol) on tiny random CLIP models: formula, preprocessing, prefix tokens."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from PIL import Image

from senseflow.metrics.clip_score import (
    DMD2_PREFIX,
    PRE_RESIZE_DMD2,
    ClipScorer,
    dmd2_pre_resize,
    insert_prefix_tokens,
)
from tests.scorer_helpers import (
    TINY_HEADS,
    TINY_IMAGE,
    cosine,
    make_clip_tokenizer,
    make_real_clip_tokenizer,
    make_tiny_clip,
    normalise_np,
    open_clip_state_dict,
    random_images,
    reference_open_clip_image,
    reference_open_clip_text,
)

PROMPTS = ["a cat on a mat", "two dogs", "a red car parked by a very long wall " * 12]
SHAPES = [(70, 50), (53, 64), (40, 40)]


def hand_pixels(image: Image.Image, pre_resize: bool = True) -> torch.Tensor:
    """DMD2 square crop + LANCZOS 256, then Resize/CenterCrop to 32 and Normalize, by hand."""
    array = np.asarray(image)
    if pre_resize:
        h, w = array.shape[:2]
        side = min(h, w)
        top, left = round((h - side) / 2), round((w - side) / 2)
        image = Image.fromarray(array[top : top + side, left : left + side]).resize((256, 256), Image.LANCZOS)
        image = image.resize((TINY_IMAGE, TINY_IMAGE), Image.BICUBIC)  # square: no crop left to do
        return torch.from_numpy(normalise_np(np.asarray(image)))
    h, w = array.shape[:2]
    short = min(h, w)
    new_h, new_w = (TINY_IMAGE, int(TINY_IMAGE * w / h)) if h <= w else (int(TINY_IMAGE * h / w), TINY_IMAGE)
    resized = np.asarray(image.resize((new_w, new_h), Image.BICUBIC))
    assert short > 0
    top, left = round((new_h - TINY_IMAGE) / 2), round((new_w - TINY_IMAGE) / 2)
    return torch.from_numpy(normalise_np(resized[top : top + TINY_IMAGE, left : left + TINY_IMAGE]))


def hand_token_ids(tokenizer, prompt: str, prefix: str | None) -> list[int]:
    """[SOT] + prefix + prompt tokens + [EOT], cut to 77 with EOT last, zero padded (spec §5)."""
    sot, eot = tokenizer.bos_token_id, tokenizer.eos_token_id
    body = tokenizer(prompt, truncation=False, verbose=False)["input_ids"][1:-1]
    if len(body) > 75:  # open_clip truncation of the prompt alone, before the prefix goes in
        body = body[:75]
    pre = tokenizer(prefix)["input_ids"][1:-1] if prefix else []
    ids = [sot, *pre, *body, eot]
    if len(ids) > 77:
        ids = [*ids[:76], eot]
    return ids + [0] * (77 - len(ids))


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    return make_clip_tokenizer(tmp_path_factory)


@pytest.fixture(scope="module")
def real_clip_tokenizer(tmp_path_factory):
    return make_real_clip_tokenizer(tmp_path_factory)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, clip_tokenizer):
    folder = tmp_path_factory.mktemp("tiny_clip")
    make_tiny_clip(seed=0, logit_scale=math.log(100.0), tokenizer=clip_tokenizer).save_pretrained(folder)
    clip_tokenizer.save_pretrained(folder)
    return folder


def test_insert_prefix_tokens_by_hand():
    eot = 9
    rows = torch.tensor(
        [
            [8, 1, 2, 9, 0, 0, 0, 0],  # room: nothing cut
            [8, 1, 2, 3, 9, 0, 0, 0],  # the inserted tokens push EOT to the last slot
            [8, 1, 2, 3, 4, 9, 0, 0],  # EOT cut off: last slot forced to EOT
            [8, 1, 2, 3, 4, 5, 6, 9],  # full row
        ]
    )
    out = insert_prefix_tokens(rows, [70, 71, 72], eot)
    assert out.tolist() == [
        [8, 70, 71, 72, 1, 2, 9, 0],
        [8, 70, 71, 72, 1, 2, 3, 9],
        [8, 70, 71, 72, 1, 2, 3, 9],
        [8, 70, 71, 72, 1, 2, 3, 9],
    ]
    assert rows[0].tolist() == [8, 1, 2, 9, 0, 0, 0, 0]  # input untouched


def test_dmd2_tokens_with_real_bpe(real_clip_tokenizer):
    scorer_tokens = ClipScorer(make_tiny_clip(), real_clip_tokenizer, device="cpu").tokenize
    cat = " ".join(["cat"] * 100)
    ids = scorer_tokens(["a cat", cat, " ".join(["cat"] * 71), " ".join(["cat"] * 74)])
    sot, eot, pre = 49406, 49407, [320, 1125, 29340]
    assert ids[0].tolist() == [sot, *pre, 320, 2368, eot] + [0] * 70
    assert ids[1].tolist() == [sot, *pre, *[2368] * 72, eot]
    assert ids[2].tolist() == [sot, *pre, *[2368] * 71, eot, 0]  # 76 tokens: position 76 stays 0
    assert ids[3].tolist() == [sot, *pre, *[2368] * 72, eot]  # 74 + 5 > 77: EOT forced at 76
    plain = ClipScorer(make_tiny_clip(), real_clip_tokenizer, prefix=None, device="cpu").tokenize(
        ["a cat", cat]
    )
    assert plain[0].tolist()[:4] == [sot, 320, 2368, eot] and plain[1].tolist() == [sot, *[2368] * 75, eot]


def test_clip_score_matches_hand_computation(clip_dir, clip_tokenizer):
    scorer = ClipScorer.from_path(clip_dir, device="cpu")
    images = random_images(SHAPES, seed=1)
    got = scorer.score(images, PROMPTS, batch_size=2)
    model = make_tiny_clip(seed=0, tokenizer=clip_tokenizer)
    pixels = torch.stack([hand_pixels(im) for im in images])
    ids = torch.tensor([hand_token_ids(clip_tokenizer, p, DMD2_PREFIX) for p in PROMPTS])
    torch.testing.assert_close(scorer.tokenize(PROMPTS), ids, rtol=0, atol=0)
    torch.testing.assert_close(scorer.preprocess(images), pixels, rtol=0, atol=0)
    with torch.no_grad():
        image_emb = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text_emb = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    expected = cosine(image_emb, text_emb).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert got.dtype == np.float64 and np.all(np.abs(got) <= 1)  # raw cosine: no logit scale, no x100


def test_clip_score_options_no_prefix_no_pre_resize(clip_dir, clip_tokenizer):
    scorer = ClipScorer.from_path(clip_dir, prefix=None, pre_resize="none", device="cpu")
    images = random_images(SHAPES, seed=2)
    model = make_tiny_clip(seed=0, tokenizer=clip_tokenizer)
    pixels = torch.stack([hand_pixels(im, pre_resize=False) for im in images])
    ids = torch.tensor([hand_token_ids(clip_tokenizer, p, None) for p in PROMPTS])
    torch.testing.assert_close(scorer.preprocess(images), pixels, rtol=0, atol=0)
    with torch.no_grad():
        expected = cosine(model.get_image_features(pixel_values=pixels).pooler_output,
                          model.get_text_features(input_ids=ids).pooler_output)  # fmt: skip
    np.testing.assert_allclose(scorer.score(images, PROMPTS), expected.numpy(), atol=1e-6)
    record = scorer.result(scorer.score(images, PROMPTS))
    assert record["prefix"] is None and record["pre_resize"] == "none"
    with pytest.raises(ValueError, match="pre_resize"):
        ClipScorer.from_path(clip_dir, pre_resize="lanczos512", device="cpu")


def test_clip_score_protocol_fields(clip_dir):
    scorer = ClipScorer.from_path(clip_dir, device="cpu")
    scores = scorer.score(np.stack([np.asarray(im) for im in random_images([(40, 40)] * 2)]), ["a", "b"])
    record = scorer.result(scores)
    digest = hashlib.sha256((clip_dir / "model.safetensors").read_bytes()).hexdigest()
    assert record == {
        "value": pytest.approx(scores.mean()),
        "n": 2,
        "backbone": "ViT-g-14",
        "pretrained": "laion2b_s12b_b42k",
        "prefix": "A photo depicts ",
        "pre_resize": PRE_RESIZE_DMD2,
        "backend": "transformers",
        "dtype": "float32",
        "weights_sha256": digest,
    }


def test_clip_score_batching_and_input_checks(clip_dir):
    scorer = ClipScorer.from_path(clip_dir, device="cpu")
    images = random_images(SHAPES, seed=5)
    np.testing.assert_allclose(
        scorer.score(images, PROMPTS, batch_size=1), scorer.score(images, PROMPTS), atol=1e-6
    )
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        scorer.score(images, PROMPTS[:2])
    with pytest.raises(TypeError):
        scorer.score(images[:1], "a cat")
    assert scorer.score([], []).shape == (0,)


def test_clip_score_from_open_clip_file(tmp_path, clip_tokenizer):
    sd = open_clip_state_dict(seed=7)
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    scorer = ClipScorer.from_path(
        tmp_path / "open_clip_pytorch_model.bin",
        tokenizer=clip_tokenizer,
        vision_heads=TINY_HEADS,
        text_heads=TINY_HEADS,
        device="cpu",
    )
    images = random_images(SHAPES, seed=3)
    pixels = torch.stack([hand_pixels(im) for im in images])
    ids = torch.tensor([hand_token_ids(clip_tokenizer, p, DMD2_PREFIX) for p in PROMPTS])
    expected = cosine(reference_open_clip_image(sd, pixels), reference_open_clip_text(sd, ids))
    np.testing.assert_allclose(scorer.score(images, PROMPTS), expected.numpy(), atol=1e-5)
    assert scorer.source_format == "open_clip"


def test_dmd2_pre_resize_crops_centre_square():
    image = Image.fromarray(np.arange(7 * 4 * 3, dtype=np.uint8).reshape(7, 4, 3))
    out = dmd2_pre_resize(image, side=4)  # 7x4 -> rows round(1.5)=2 .. 5, then a same-size resize
    np.testing.assert_array_equal(np.asarray(out), np.asarray(image)[2:6])


def test_clip_score_bfloat16_runs_and_is_recorded(clip_dir):
    images = random_images(SHAPES, seed=8)
    fp32 = ClipScorer.from_path(clip_dir, device="cpu").score(images, PROMPTS)
    bf16 = ClipScorer.from_path(clip_dir, device="cpu", dtype="bfloat16")
    assert bf16.protocol()["dtype"] == "bfloat16"
    np.testing.assert_allclose(bf16.score(images, PROMPTS), fp32, atol=0.05)
