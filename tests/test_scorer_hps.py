"""HPSv2 on tiny open_clip-named checkpoints: version handling, tensor-resize preprocessing order,
``{'state_dict': ...}`` loading, cosine without logit scale, missing keys, protocol fields."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from senseflow.metrics.hps import HPSv2Scorer, hps_preprocess
from senseflow.metrics.scoring.checkpoints import MissingWeightsError
from senseflow.metrics.scoring.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from senseflow.metrics.scoring.tokenizer import clip_token_ids
from tests.scorer_helpers import (
    TINY_HEADS,
    TINY_IMAGE,
    cosine,
    make_clip_tokenizer,
    make_tiny_clip,
    normalise_np,
    open_clip_state_dict,
    random_images,
    reference_open_clip_image,
    reference_open_clip_text,
)

PROMPTS = ["a watercolor fox", "a lighthouse at night, highly detailed " * 10, "x"]
SHAPES = [(45, 60), (64, 40), (33, 33)]


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    return make_clip_tokenizer(tmp_path_factory)


@pytest.fixture(scope="module")
def hps_file(tmp_path_factory):
    """A tiny HPS-style checkpoint: ``{'state_dict': <open_clip names>}`` plus a non-tensor entry."""
    folder = tmp_path_factory.mktemp("hps")
    sd = open_clip_state_dict(seed=11)
    path = folder / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": sd, "epoch": 9}, path)
    return path, sd


def hand_hps_pixels(image: Image.Image, antialias: bool = True) -> torch.Tensor:
    """ToTensor → bicubic tensor resize (shorter side 32) → centre crop → Normalize, by hand."""
    x = torch.from_numpy(np.asarray(image).astype(np.float32) / np.float32(255)).permute(2, 0, 1)
    h, w = x.shape[1:]
    new_h, new_w = (TINY_IMAGE, int(TINY_IMAGE * w / h)) if h <= w else (int(TINY_IMAGE * h / w), TINY_IMAGE)
    x = F.interpolate(x[None], size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=antialias)[
        0
    ]
    top, left = round((new_h - TINY_IMAGE) / 2), round((new_w - TINY_IMAGE) / 2)
    x = x[:, top : top + TINY_IMAGE, left : left + TINY_IMAGE]
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def test_hps_preprocess_is_tensor_resize_after_to_tensor():
    images = random_images(SHAPES, seed=4)
    for image in images:
        for antialias in (True, False):
            got = hps_preprocess(image, TINY_IMAGE, antialias)
            torch.testing.assert_close(got, hand_hps_pixels(image, antialias), rtol=0, atol=1e-6)
    # the order matters: resizing the uint8 PIL image first gives different pixels
    image = images[0]
    pil_first = image.resize((int(TINY_IMAGE * 60 / 45), TINY_IMAGE), Image.BICUBIC)
    left = round((pil_first.width - TINY_IMAGE) / 2)
    pil_first = normalise_np(np.asarray(pil_first)[:, left : left + TINY_IMAGE])
    assert not np.allclose(hps_preprocess(image, TINY_IMAGE, True).numpy(), pil_first, atol=1e-3)
    assert not torch.allclose(
        hps_preprocess(image, TINY_IMAGE, True), hps_preprocess(image, TINY_IMAGE, False)
    )


def test_hps_version_is_required_and_checked(hps_file, clip_tokenizer):
    path, _ = hps_file
    with pytest.raises(TypeError):
        HPSv2Scorer.from_path(path, tokenizer=clip_tokenizer)  # no silent default
    with pytest.raises(ValueError, match="version"):
        HPSv2Scorer.from_path(path, version="v2", tokenizer=clip_tokenizer)
    with pytest.raises(ValueError, match=r"v2\.1 weights file but version='v2\.0'"):
        HPSv2Scorer.from_path(path, version="v2.0", tokenizer=clip_tokenizer)


def test_hps_score_matches_reference_cosine(hps_file, clip_tokenizer):
    path, sd = hps_file
    scorer = HPSv2Scorer.from_path(
        path,
        version="v2.1",
        tokenizer=clip_tokenizer,
        vision_heads=TINY_HEADS,
        text_heads=TINY_HEADS,
        device="cpu",
    )
    images = random_images(SHAPES, seed=5)
    got = scorer.score(images, PROMPTS, batch_size=2)
    pixels = torch.stack([hand_hps_pixels(im) for im in images])
    ids = clip_token_ids(clip_tokenizer, PROMPTS)
    expected = cosine(reference_open_clip_image(sd, pixels), reference_open_clip_text(sd, ids)).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert np.all(np.abs(got) <= 1)  # logit_scale (log 100 here) is not applied
    assert float(scorer.model.logit_scale.detach()) == pytest.approx(math.log(100.0))


def test_hps_protocol_fields(hps_file, clip_tokenizer):
    path, _ = hps_file
    scorer = HPSv2Scorer.from_path(
        path,
        version="v2.1",
        tokenizer=clip_tokenizer,
        antialias=False,
        vision_heads=4,
        text_heads=4,
        device="cpu",
    )
    record = scorer.result([0.25, 0.35])
    assert record == {
        "value": pytest.approx(0.30),
        "n": 2,
        "version": "v2.1",
        "tensor_resize_antialias": False,
        "backend": "transformers",
        "dtype": "float32",
        "weights_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def test_hps_missing_key_is_reported(tmp_path, clip_tokenizer):
    sd = open_clip_state_dict(seed=12)
    del sd["visual.proj"]
    path = tmp_path / "HPS_v2_compressed.pt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(MissingWeightsError, match=r"visual\.proj"):
        HPSv2Scorer.from_path(path, version="v2.0", tokenizer=clip_tokenizer, vision_heads=4, text_heads=4)


def test_hps_from_pretrained_folder(tmp_path, clip_tokenizer):
    model = make_tiny_clip(seed=13, tokenizer=clip_tokenizer)
    model.save_pretrained(tmp_path)
    scorer = HPSv2Scorer.from_path(tmp_path, version="v2.0", tokenizer=clip_tokenizer, device="cpu")
    images = random_images(SHAPES[:2], seed=6)
    pixels = torch.stack([hand_hps_pixels(im) for im in images])
    ids = clip_token_ids(clip_tokenizer, PROMPTS[:2])
    with torch.no_grad():
        expected = cosine(
            model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output),
            model.text_projection(model.text_model(input_ids=ids).pooler_output),
        )
    np.testing.assert_allclose(scorer.score(images, PROMPTS[:2]), expected.numpy(), atol=1e-6)
