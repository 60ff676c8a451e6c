"""PickScore on a tiny CLIPModel: logit_scale.exp() × cosine, the PIL image-processor semantics
(checked against transformers' own PIL backend when it is importable), tokenisation and loading."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from senseflow.metrics.pickscore import PickScoreScorer, PilClipImageProcessor
from senseflow.metrics.scoring.checkpoints import ScorerLoadError
from senseflow.metrics.scoring.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from tests.scorer_helpers import TINY_IMAGE, cosine, make_clip_tokenizer, make_tiny_clip, random_images

PROMPTS = ["a corgi wearing sunglasses", "an astronaut riding a horse on the moon, 4k, " * 8, "tree"]
SHAPES = [(53, 50), (37, 90), (40, 40)]
LOGIT_SCALE = 3.0  # exp(3) ≈ 20.09, deliberately not the usual 100


def processor_config(legacy: bool) -> dict:
    """Like the LAION ViT-H-14 preprocessor_config.json, at the tiny model's 32 px."""
    size = TINY_IMAGE if legacy else {"shortest_edge": TINY_IMAGE}
    crop = TINY_IMAGE if legacy else {"height": TINY_IMAGE, "width": TINY_IMAGE}
    return {
        "crop_size": crop,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "resample": 3,
        "size": size,
    }


@pytest.fixture(scope="module")
def pickscore_dirs(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("pickscore_model")
    processor_dir = tmp_path_factory.mktemp("pickscore_processor")
    tokenizer = make_clip_tokenizer(tmp_path_factory)
    make_tiny_clip(seed=21, logit_scale=LOGIT_SCALE, tokenizer=tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(processor_dir)
    (processor_dir / "preprocessor_config.json").write_text(json.dumps(processor_config(legacy=True)))
    return model_dir, processor_dir


def hand_pixels(image) -> np.ndarray:
    """transformers' PIL pipeline by hand: shortest edge 32 (bicubic), floored centre crop,
    uint8 → float64 × (1/255) → float32, (x - mean) / std."""
    w, h = image.size
    new_h, new_w = (TINY_IMAGE, int(TINY_IMAGE * w / h)) if h <= w else (int(TINY_IMAGE * h / w), TINY_IMAGE)
    array = np.asarray(image.resize((new_w, new_h), resample=3)).transpose(2, 0, 1)
    top, left = (new_h - TINY_IMAGE) // 2, (new_w - TINY_IMAGE) // 2
    array = array[:, top : top + TINY_IMAGE, left : left + TINY_IMAGE]
    x = (array.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(OPENAI_CLIP_MEAN, np.float32)[:, None, None]
    std = np.asarray(OPENAI_CLIP_STD, np.float32)[:, None, None]
    return (x - mean) / std


def test_processor_config_styles_and_hand_pipeline():
    legacy = PilClipImageProcessor.from_config(processor_config(legacy=True))
    modern = PilClipImageProcessor.from_config(processor_config(legacy=False))
    assert legacy == modern
    assert (legacy.shortest_edge, legacy.crop_hw, legacy.resample) == (TINY_IMAGE, (32, 32), 3)
    for image in random_images(SHAPES, seed=7):
        np.testing.assert_array_equal(legacy(image), hand_pixels(image))
    with pytest.raises(ScorerLoadError):
        PilClipImageProcessor.from_config({"size": {"longest_edge": 9}})


def test_processor_matches_transformers_pil_backend():
    module = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    reference = module.CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE}, crop_size={"height": TINY_IMAGE, "width": TINY_IMAGE}
    )
    ours = PilClipImageProcessor.from_config(processor_config(legacy=False))
    images = random_images(SHAPES, seed=8)
    expected = reference(images=images, return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(ours.batch(images).numpy(), expected)


def test_pickscore_formula_is_scaled_cosine(pickscore_dirs):
    model_dir, processor_dir = pickscore_dirs
    scorer = PickScoreScorer.from_path(model_dir, processor_dir, device="cpu")
    images = random_images(SHAPES, seed=9)
    got = scorer.score(images, PROMPTS)
    model = make_tiny_clip(seed=21, tokenizer=scorer.tokenizer)
    pixels = torch.from_numpy(np.stack([hand_pixels(im) for im in images]))
    text = scorer.tokenizer(PROMPTS, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_emb = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        text_emb = model.text_projection(
            model.text_model(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output
        )
    expected = math.exp(LOGIT_SCALE) * cosine(image_emb, text_emb).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert scorer.logit_scale == pytest.approx(math.exp(LOGIT_SCALE))


def test_pickscore_truncates_to_77_and_is_batch_independent(pickscore_dirs):
    model_dir, processor_dir = pickscore_dirs
    scorer = PickScoreScorer.from_path(model_dir, processor_dir, device="cpu")
    ids = scorer.tokenize(PROMPTS)["input_ids"]
    assert ids.shape[1] == 77 and ids[1, -1].item() == scorer.tokenizer.eos_token_id
    images = random_images(SHAPES, seed=10)
    together = scorer.score(images, PROMPTS, batch_size=3)
    alone = scorer.score(images, PROMPTS, batch_size=1)  # different padding lengths
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)


def test_pickscore_protocol_and_loading_errors(pickscore_dirs, tmp_path):
    model_dir, processor_dir = pickscore_dirs
    scorer = PickScoreScorer.from_path(model_dir, processor_dir, device="cpu")
    record = scorer.result(np.array([20.0, 22.0]))
    assert record == {
        "value": pytest.approx(21.0),
        "n": 2,
        "image_processor_backend": "pil",
        "logit_scale": pytest.approx(math.exp(LOGIT_SCALE)),
        "backend": "transformers",
        "dtype": "float32",
        "weights_sha256": hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest(),
    }
    with pytest.raises(ScorerLoadError, match=r"preprocessor_config\.json"):
        PickScoreScorer.from_path(model_dir, tmp_path, device="cpu")
