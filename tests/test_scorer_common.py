"""Shared scorer machinery: tokenizer files, preprocessing primitives, checkpoint loading, open_clip
conversion (checked against the independent open_clip-style forward of ``tests/scorer_helpers.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from senseflow.metrics.scoring.checkpoints import (
    MissingWeightsError,
    ScorerLoadError,
    load_state_dict_file,
    sha256_weights,
)
from senseflow.metrics.scoring.clip_model import load_clip_model, open_clip_to_clip_state_dict
from senseflow.metrics.scoring.embeddings import embedding_from_output
from senseflow.metrics.scoring.images import (
    as_rgb_images,
    center_crop_offsets,
    pil_clip_transform,
    resized_shorter_side,
    tensor_resize_shorter,
)
from senseflow.metrics.scoring.tokenizer import (
    build_clip_bpe_files,
    bytes_to_unicode,
    clip_token_ids,
    load_clip_tokenizer,
)
from tests.scorer_helpers import (
    TINY,
    TINY_HEADS,
    TINY_IMAGE,
    clip_bpe_gz,
    make_clip_tokenizer,
    make_tiny_clip,
    normalise_np,
    open_clip_state_dict,
    random_images,
    reference_open_clip_image,
    reference_open_clip_text,
    requires_clip_bpe,
)


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    return make_clip_tokenizer(tmp_path_factory)


# ---- tokenizers ---------------------------------------------------------------------------------------


def test_bytes_to_unicode_is_the_byte_level_table():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("!")] == "!" and table[ord("~")] == "~" and table[0xFF] == "ÿ"
    assert table[0] == "\u0100" and table[ord(" ")] == "\u0120"  # "Ġ"
    assert table[0xAD] == chr(0x100 + 32 + 1 + 34)  # soft hyphen: after 0..32 and 127..160
    assert list(table)[:3] == [ord("!"), ord('"'), ord("#")]
    assert list(table.values())[188:190] == ["\u0100", "\u0101"]  # the remapped bytes follow the 188 kept


@requires_clip_bpe
def test_real_clip_bpe_files_and_ids(tmp_path):
    vocab_path, merges_path = build_clip_bpe_files(clip_bpe_gz(), tmp_path)
    vocab = json.loads(vocab_path.read_text("utf-8"))
    assert len(vocab) == 49408
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    merges = merges_path.read_text("utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
    tokenizer = load_clip_tokenizer(tmp_path)
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("A photo depicts ")["input_ids"] == [49406, 320, 1125, 29340, 49407]


def test_clip_token_ids_follow_open_clip_truncation(clip_tokenizer):
    sot, eot = clip_tokenizer.bos_token_id, clip_tokenizer.eos_token_id
    short, long = "a cat", " ".join(["cat"] * 120)
    ids = clip_token_ids(clip_tokenizer, [short, long])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    body = clip_tokenizer(short)["input_ids"]
    expected_short = [*body, *[0] * (77 - len(body))]
    assert ids[0].tolist() == expected_short
    full = clip_tokenizer(long, truncation=False, verbose=False)["input_ids"]
    assert len(full) > 77
    assert ids[1].tolist() == [sot, *full[1:76], eot]


def test_load_clip_tokenizer_requires_a_source(tmp_path):
    with pytest.raises(ScorerLoadError, match="no CLIP tokenizer"):
        load_clip_tokenizer(None, fallback_dir=tmp_path)


# ---- preprocessing primitives -------------------------------------------------------------------------


def test_center_crop_offsets_round_half_to_even_vs_floor():
    assert center_crop_offsets(1024, 1024, 299, 299) == (362, 362)
    assert center_crop_offsets(53, 50, 50, 50, "round") == (2, 0)  # round(1.5) = 2
    assert center_crop_offsets(53, 50, 50, 50, "floor") == (1, 0)
    assert center_crop_offsets(51, 55, 50, 50, "round") == (0, 2)  # round(0.5) = 0, round(2.5) = 2
    assert center_crop_offsets(51, 55, 50, 50, "floor") == (0, 2)
    with pytest.raises(ValueError):
        center_crop_offsets(10, 10, 11, 10)


def test_resized_shorter_side_truncates_the_long_side():
    assert resized_shorter_side(480, 640, 224) == (224, 298)  # 298.67 -> 298
    assert resized_shorter_side(640, 480, 224) == (298, 224)
    assert resized_shorter_side(100, 100, 224) == (224, 224)


def test_pil_clip_transform_by_hand():
    (image,) = random_images([(53, 40)], seed=3)
    got = pil_clip_transform(image, 32)
    resized = image.resize((32, 42), Image.Resampling.BICUBIC)  # shorter side 40 -> 32, 53 -> int(42.4)
    top = round((42 - 32) / 2)
    expected = normalise_np(np.asarray(resized)[top : top + 32])
    np.testing.assert_array_equal(got.numpy(), expected)


def test_tensor_resize_uses_interpolate_with_explicit_antialias():
    x = torch.rand(3, 45, 60)
    for antialias in (True, False):
        got = tensor_resize_shorter(x, 32, antialias=antialias)
        expected = F.interpolate(
            x[None], size=(32, 42), mode="bicubic", align_corners=False, antialias=antialias
        )
        torch.testing.assert_close(got, expected[0], rtol=0, atol=0)
    assert not torch.allclose(tensor_resize_shorter(x, 32, True), tensor_resize_shorter(x, 32, False))


def test_as_rgb_images_accepts_arrays_and_pil():
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (2, 8, 9, 3), dtype=np.uint8)
    out = as_rgb_images(batch)
    assert [im.size for im in out] == [(9, 8), (9, 8)]
    np.testing.assert_array_equal(np.asarray(out[1]), batch[1])
    rgba = Image.fromarray(rng.integers(0, 256, (4, 4, 4), dtype=np.uint8), "RGBA")
    gray = rng.integers(0, 256, (4, 4), dtype=np.uint8)
    assert [im.mode for im in as_rgb_images([rgba, gray])] == ["RGB", "RGB"]
    with pytest.raises(TypeError):
        as_rgb_images(batch.astype(np.float32))
    with pytest.raises(ValueError):
        as_rgb_images(batch[0])


def test_embedding_from_output_handles_transformers_4_and_5_returns():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    emb = torch.randn(2, 4)
    hidden = torch.randn(2, 3, 4)
    assert embedding_from_output(emb) is emb
    assert (
        embedding_from_output(BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=emb)) is emb
    )
    assert embedding_from_output((hidden, emb)) is emb
    with pytest.raises(TypeError):
        embedding_from_output({"x": emb})


def test_get_features_on_installed_transformers_are_projected():
    model = make_tiny_clip()
    ids = torch.tensor([[49406, 320, 49407, 0]])
    pixels = torch.randn(1, 3, TINY_IMAGE, TINY_IMAGE)
    with torch.no_grad():
        text = embedding_from_output(model.get_text_features(input_ids=ids))
        image = embedding_from_output(model.get_image_features(pixel_values=pixels))
        torch.testing.assert_close(text, model.text_projection(model.text_model(input_ids=ids).pooler_output))
        torch.testing.assert_close(image, model.visual_projection(model.vision_model(pixels).pooler_output))


# ---- checkpoints --------------------------------------------------------------------------------------


def test_load_state_dict_file_formats(tmp_path):
    from safetensors.torch import save_file

    sd = {"a.weight": torch.randn(2, 2), "b": torch.randn(3)}
    torch.save({"state_dict": sd, "epoch": 3, "name": "x"}, tmp_path / "wrapped.pt")
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pt")
    save_file(sd, str(tmp_path / "w.safetensors"))
    for name in ("wrapped.pt", "ddp.pt", "w.safetensors"):
        loaded = load_state_dict_file(tmp_path / name)
        assert sorted(loaded) == sorted(sd)
        torch.testing.assert_close(loaded["a.weight"], sd["a.weight"])
    with pytest.raises(ScorerLoadError, match="not found"):
        load_state_dict_file(tmp_path / "absent.pt")


class _Trap:
    """Unpickling it would create the marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_load_state_dict_file_refuses_pickled_code_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"state_dict": {"w": torch.ones(1)}, "obj": _Trap(marker)}, tmp_path / "pickled.pt")
    with pytest.raises(ScorerLoadError, match="safetensors"):
        load_state_dict_file(tmp_path / "pickled.pt")
    assert not marker.exists()


def test_sha256_weights_file_and_folder(tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "model.safetensors").write_bytes(b"abc")
    (tmp_path / "one" / "config.json").write_text("{}")
    digest = hashlib.sha256(b"abc").hexdigest()
    assert (
        sha256_weights(tmp_path / "one") == digest == sha256_weights(tmp_path / "one" / "model.safetensors")
    )
    (tmp_path / "one" / "open_clip_pytorch_model.bin").write_bytes(b"other format")
    assert sha256_weights(tmp_path / "one") == digest  # only what from_pretrained loads
    shards = tmp_path / "shards"
    shards.mkdir()
    for name, data in (("a-1.safetensors", b"def"), ("a-2.safetensors", b"ghi")):
        (shards / name).write_bytes(data)
    index = {"weight_map": {"x": "a-2.safetensors", "y": "a-1.safetensors", "z": "a-2.safetensors"}}
    (shards / "model.safetensors.index.json").write_text(json.dumps(index))
    lines = "".join(
        f"{n}  {hashlib.sha256(d).hexdigest()}\n"
        for n, d in (("a-1.safetensors", b"def"), ("a-2.safetensors", b"ghi"))
    )
    assert sha256_weights(shards) == hashlib.sha256(lines.encode()).hexdigest()


# ---- open_clip conversion -----------------------------------------------------------------------------


def test_open_clip_conversion_matches_reference_forward(tmp_path):
    sd = open_clip_state_dict(seed=1)
    sd["attn_mask"] = torch.zeros(77, 77)  # a buffer some exports carry: ignored
    torch.save({"state_dict": sd}, tmp_path / "oc.pt")
    loaded = load_clip_model(tmp_path / "oc.pt", vision_heads=TINY_HEADS, text_heads=TINY_HEADS)
    model = loaded.model
    assert loaded.source_format == "open_clip" and loaded.report.ignored == ["attn_mask"]
    cfg = model.config
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size, cfg.projection_dim) == (32, 8, 24)
    assert cfg.text_config.hidden_act == "gelu" and cfg.text_config.intermediate_size == 2 * TINY
    pixels = torch.randn(2, 3, TINY_IMAGE, TINY_IMAGE)
    ids = torch.zeros(2, 77, dtype=torch.long)
    ids[0, :4] = torch.tensor([49406, 320, 2368, 49407])
    ids[1, :6] = torch.tensor([49406, 9, 99, 999, 5, 49407])
    with torch.no_grad():
        image = embedding_from_output(model.get_image_features(pixel_values=pixels))
        text = embedding_from_output(model.get_text_features(input_ids=ids))
        torch.testing.assert_close(image, reference_open_clip_image(sd, pixels), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(text, reference_open_clip_text(sd, ids), rtol=1e-4, atol=1e-5)
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(100.0))


def test_open_clip_conversion_reports_missing_keys_by_source_name():
    sd = open_clip_state_dict()
    del sd["visual.transformer.resblocks.1.attn.in_proj_weight"]
    del sd["ln_final.bias"]
    _, _, report = open_clip_to_clip_state_dict(sd, vision_heads=4, text_heads=4)
    assert set(report.missing) == {"visual.transformer.resblocks.1.attn.in_proj_weight", "ln_final.bias"}
    with pytest.raises(MissingWeightsError, match=r"2 missing key\(s\).*ln_final\.bias"):
        report.check()


def test_open_clip_conversion_needs_heads_and_logs_unexpected(caplog):
    sd = open_clip_state_dict()
    with pytest.raises(ScorerLoadError, match="arch"):
        open_clip_to_clip_state_dict(sd)
    with pytest.raises(ScorerLoadError, match="unknown open_clip architecture"):
        open_clip_to_clip_state_dict(sd, arch="ViT-Q-99")
    sd["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(TINY)
    _, _, report = open_clip_to_clip_state_dict(sd, arch="ViT-H-14")
    with caplog.at_level(logging.WARNING):
        report.check()
    assert report.unexpected == ["visual.transformer.resblocks.0.ls_1.gamma"]
    assert "ls_1.gamma" in caplog.text


def test_from_pretrained_folder_missing_key_is_reported(tmp_path):
    from safetensors.torch import load_file, save_file

    make_tiny_clip().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["visual_projection.weight"]
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(MissingWeightsError, match=r"visual_projection\.weight"):
        load_clip_model(tmp_path)


def test_transformers_named_state_dict_file(tmp_path):
    model = make_tiny_clip(seed=4)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "clip.pt")
    (tmp_path / "cfg.json").write_text(model.config.to_json_string())
    with pytest.raises(ScorerLoadError, match="config="):
        load_clip_model(tmp_path / "clip.pt")
    loaded = load_clip_model(tmp_path / "clip.pt", config=tmp_path / "cfg.json")
    assert loaded.source_format == "transformers_state_dict"
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value)
    partial = {k: v for k, v in model.state_dict().items() if k != "text_projection.weight"}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(MissingWeightsError, match=r"text_projection\.weight"):
        load_clip_model(tmp_path / "partial.pt", config=model.config)
