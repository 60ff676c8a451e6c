"""ImageReward on a tiny checkpoint with ImageReward.pt parameter names, against an independent
BLIP forward written here (ViT with fused qkv, BERT with cross-attention, linear head, mean/std)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from senseflow.metrics.imagereward import (
    IMAGEREWARD_MEAN,
    IMAGEREWARD_STD,
    ImageRewardHead,
    ImageRewardScorer,
    build_blip_tokenizer,
    imagereward_key_rules,
    load_imagereward_model,
    vision_config_from_state_dict,
)
from senseflow.metrics.scoring.checkpoints import MissingWeightsError, ScorerLoadError
from tests.scorer_helpers import (
    TINY_IMAGE,
    bert_vocab_txt,
    normalise_np,
    random_images,
    requires_bert_vocab,
)

WIDTH = 32  # vision and text width (cross-attention width = vision width)
HEADS = 4
LAYERS = 2
INTER = 64
MAX_POS = 40
VOCAB = 30524  # bert-base-uncased 30522 + [DEC] + [ENC]
PROMPTS = ["a cat sitting on a red sofa", "a bowl of fruit, oil painting " * 8, "no"]
SHAPES = [(50, 70), (64, 48), (32, 32)]

MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": WIDTH,
    "initializer_range": 0.02,
    "intermediate_size": INTER,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": MAX_POS,
    "model_type": "bert",
    "num_attention_heads": HEADS,
    "num_hidden_layers": LAYERS,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": VOCAB,
    "encoder_width": 768,  # overridden by the vision width, as upstream does
    "add_cross_attention": True,
}


def ir_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under ImageReward.pt's names (BLIP ViT + med.py BERT + head + unused BLIP extras)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    def lin(name, out_f, in_f, scale=0.2):
        sd[f"{name}.weight"] = rnd(out_f, in_f, scale=scale)
        sd[f"{name}.bias"] = rnd(out_f, scale=0.05)

    def norm(name):
        sd[f"{name}.weight"] = 1 + rnd(WIDTH, scale=0.1)
        sd[f"{name}.bias"] = rnd(WIDTH, scale=0.1)

    sd: dict[str, torch.Tensor] = {}
    v = "blip.visual_encoder"
    grid = TINY_IMAGE // 8
    sd[f"{v}.cls_token"] = rnd(1, 1, WIDTH)
    sd[f"{v}.pos_embed"] = rnd(1, grid * grid + 1, WIDTH)
    sd[f"{v}.patch_embed.proj.weight"] = rnd(WIDTH, 3, 8, 8, scale=0.05)
    sd[f"{v}.patch_embed.proj.bias"] = rnd(WIDTH, scale=0.05)
    for i in range(LAYERS):
        b = f"{v}.blocks.{i}"
        norm(f"{b}.norm1")
        lin(f"{b}.attn.qkv", 3 * WIDTH, WIDTH)
        lin(f"{b}.attn.proj", WIDTH, WIDTH)
        norm(f"{b}.norm2")
        lin(f"{b}.mlp.fc1", INTER, WIDTH)
        lin(f"{b}.mlp.fc2", WIDTH, INTER)
    norm(f"{v}.norm")
    t = "blip.text_encoder"
    sd[f"{t}.embeddings.word_embeddings.weight"] = rnd(VOCAB, WIDTH, scale=0.5)
    sd[f"{t}.embeddings.position_embeddings.weight"] = rnd(MAX_POS, WIDTH, scale=0.5)
    sd[f"{t}.embeddings.position_ids"] = torch.arange(MAX_POS)[None]
    norm(f"{t}.embeddings.LayerNorm")
    for i in range(LAYERS):
        layer = f"{t}.encoder.layer.{i}"
        for part in ("attention", "crossattention"):
            for proj in ("query", "key", "value"):
                lin(f"{layer}.{part}.self.{proj}", WIDTH, WIDTH)
            lin(f"{layer}.{part}.output.dense", WIDTH, WIDTH)
            norm(f"{layer}.{part}.output.LayerNorm")
        lin(f"{layer}.intermediate.dense", INTER, WIDTH)
        lin(f"{layer}.output.dense", WIDTH, INTER)
        norm(f"{layer}.output.LayerNorm")
    for index, (out_f, in_f) in zip(
        (0, 2, 4, 6, 7), ((1024, WIDTH), (128, 1024), (64, 128), (16, 64), (1, 16)), strict=True
    ):
        lin(f"mlp.layers.{index}", out_f, in_f, scale=in_f**-0.5)
    lin("blip.vision_proj", 16, WIDTH)  # in BLIP_Pretrain, unused for scoring
    lin("blip.text_proj", 16, WIDTH)
    return sd


def _heads(x, n):
    b, length, width = x.shape
    return x.view(b, length, n, width // n).transpose(1, 2)


def ref_vision(sd, pixels):
    v = "blip.visual_encoder"
    x = F.conv2d(pixels, sd[f"{v}.patch_embed.proj.weight"], sd[f"{v}.patch_embed.proj.bias"], stride=8)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd[f"{v}.cls_token"].expand(x.shape[0], 1, WIDTH), x], dim=1) + sd[f"{v}.pos_embed"]
    for i in range(LAYERS):
        b = f"{v}.blocks.{i}"
        h = F.layer_norm(x, (WIDTH,), sd[f"{b}.norm1.weight"], sd[f"{b}.norm1.bias"], eps=1e-6)
        qkv = F.linear(h, sd[f"{b}.attn.qkv.weight"], sd[f"{b}.attn.qkv.bias"])
        qkv = qkv.reshape(x.shape[0], x.shape[1], 3, HEADS, WIDTH // HEADS).permute(2, 0, 3, 1, 4)
        att = torch.softmax(qkv[0] @ qkv[1].transpose(-2, -1) * (WIDTH // HEADS) ** -0.5, dim=-1) @ qkv[2]
        att = att.transpose(1, 2).reshape(x.shape)
        x = x + F.linear(att, sd[f"{b}.attn.proj.weight"], sd[f"{b}.attn.proj.bias"])
        h = F.layer_norm(x, (WIDTH,), sd[f"{b}.norm2.weight"], sd[f"{b}.norm2.bias"], eps=1e-6)
        h = F.linear(
            F.gelu(F.linear(h, sd[f"{b}.mlp.fc1.weight"], sd[f"{b}.mlp.fc1.bias"])), *_wb(sd, f"{b}.mlp.fc2")
        )
        x = x + h
    return F.layer_norm(x, (WIDTH,), sd[f"{v}.norm.weight"], sd[f"{v}.norm.bias"], eps=1e-6)


def _wb(sd, name):
    return sd[f"{name}.weight"], sd[f"{name}.bias"]


def _bert_attention(sd, p, hidden, context, additive_mask):
    q = _heads(F.linear(hidden, *_wb(sd, f"{p}.self.query")), HEADS)
    k = _heads(F.linear(context, *_wb(sd, f"{p}.self.key")), HEADS)
    v = _heads(F.linear(context, *_wb(sd, f"{p}.self.value")), HEADS)
    scores = q @ k.transpose(-2, -1) / (WIDTH // HEADS) ** 0.5 + additive_mask
    out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(hidden.shape)
    out = F.linear(out, *_wb(sd, f"{p}.output.dense")) + hidden
    return F.layer_norm(out, (WIDTH,), *_wb(sd, f"{p}.output.LayerNorm"), eps=1e-12)


def ref_reward(sd, pixels, ids, mask):
    """BLIP ImageReward scoring from the checkpoint tensors: normalised reward per pair."""
    image = ref_vision(sd, pixels)
    t = "blip.text_encoder"
    x = (
        sd[f"{t}.embeddings.word_embeddings.weight"][ids]
        + sd[f"{t}.embeddings.position_embeddings.weight"][: ids.shape[1]]
    )
    x = F.layer_norm(x, (WIDTH,), *_wb(sd, f"{t}.embeddings.LayerNorm"), eps=1e-12)
    text_mask = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(LAYERS):
        layer = f"{t}.encoder.layer.{i}"
        x = _bert_attention(sd, f"{layer}.attention", x, x, text_mask)
        x = _bert_attention(sd, f"{layer}.crossattention", x, image, 0.0)
        inter = F.gelu(F.linear(x, *_wb(sd, f"{layer}.intermediate.dense")))
        out = F.linear(inter, *_wb(sd, f"{layer}.output.dense")) + x
        x = F.layer_norm(out, (WIDTH,), *_wb(sd, f"{layer}.output.LayerNorm"), eps=1e-12)
    r = x[:, 0]
    for index in (0, 2, 4, 6, 7):  # no activations between the linear layers
        r = F.linear(r, *_wb(sd, f"mlp.layers.{index}"))
    return ((r - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).reshape(-1)


def hand_pixels(image):
    """Resize(32, bicubic) on PIL → CenterCrop(32) (rounded offsets) → ToTensor → Normalize."""
    w, h = image.size
    new_h, new_w = (TINY_IMAGE, int(TINY_IMAGE * w / h)) if h <= w else (int(TINY_IMAGE * h / w), TINY_IMAGE)
    array = np.asarray(image.resize((new_w, new_h), 3))
    top, left = round((new_h - TINY_IMAGE) / 2), round((new_w - TINY_IMAGE) / 2)
    return torch.from_numpy(normalise_np(array[top : top + TINY_IMAGE, left : left + TINY_IMAGE]))


def generated_bert_vocab() -> list[str]:
    """A stand-in bert-base-uncased layout (special ids 0/100/101/102/103, 30,522 entries)."""
    words = sorted({w for p in PROMPTS for w in p.replace(",", " , ").split()}) + list(
        "abcdefghijklmnopqrstuvwxyz,"
    )
    vocab = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [w for w in dict.fromkeys(words) if w not in vocab]
    return vocab + [f"[filler{i}]" for i in range(30522 - len(vocab))]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert_tokenizer")
    real = bert_vocab_txt()
    if real is not None:
        shutil.copy(real, folder / "vocab.txt")
    else:
        (folder / "vocab.txt").write_text("\n".join(generated_bert_vocab()) + "\n", "utf-8")
    return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return build_blip_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def ir_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagereward")
    sd = ir_state_dict(seed=31)
    torch.save(sd, folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(MED_CONFIG))
    return folder, sd


def _scorer(ir_dir, tokenizer_dir, tokenizer):
    folder, _ = ir_dir
    return ImageRewardScorer.from_path(
        folder / "ImageReward.pt",
        tokenizer_dir=tokenizer_dir,
        tokenizer=tokenizer,
        vision_heads=HEADS,
        device="cpu",
    )


@requires_bert_vocab
def test_blip_tokenizer_real_ids(ir_dir, tokenizer_dir, tokenizer):
    assert tokenizer.convert_tokens_to_ids(["[PAD]", "[CLS]", "[SEP]", "yes", "no"]) == [
        0,
        101,
        102,
        2748,
        2053,
    ]
    assert tokenizer.bos_token_id == 30522 and tokenizer.convert_tokens_to_ids("[ENC]") == 30523
    assert len(tokenizer) == VOCAB
    out = _scorer(ir_dir, tokenizer_dir, tokenizer).tokenize(["A Cat", "cat " * 60])
    assert out["input_ids"].shape == (2, 35)
    assert out["input_ids"][0, :4].tolist() == [101, 1037, 4937, 102] and out["input_ids"][0, 4:].eq(0).all()
    assert out["attention_mask"][0].tolist() == [1] * 4 + [0] * 31
    assert out["input_ids"][1, 0].item() == 101 and out["input_ids"][1, -1].item() == 102


def test_imagereward_matches_reference_forward(ir_dir, tokenizer_dir, tokenizer):
    _, sd = ir_dir
    scorer = _scorer(ir_dir, tokenizer_dir, tokenizer)
    images = random_images(SHAPES, seed=12)
    got = scorer.score(images, PROMPTS, batch_size=2)
    pixels = torch.stack([hand_pixels(im) for im in images])
    torch.testing.assert_close(scorer.preprocess(images), pixels, rtol=0, atol=0)
    text = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert text["input_ids"][:, 0].eq(tokenizer.cls_token_id).all()  # [CLS] first, no [ENC] swap
    expected = ref_reward(sd, pixels, text["input_ids"], text["attention_mask"])
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-5, atol=1e-5)
    assert np.ptp(got) > 1e-3  # the pairs score differently


def test_imagereward_normalisation_constants(ir_dir, tokenizer_dir, tokenizer):
    scorer = _scorer(ir_dir, tokenizer_dir, tokenizer)
    images = random_images(SHAPES[:2], seed=13)
    pixels = scorer.preprocess(images)
    text = scorer.tokenize(PROMPTS[:2])
    with torch.no_grad():
        raw = scorer.model.raw_reward(pixels, text["input_ids"], text["attention_mask"])
    expected = (raw.double() - 0.16717362830052426) / 1.0333394966054072
    np.testing.assert_allclose(scorer.score(images, PROMPTS[:2]), expected.numpy(), rtol=1e-6, atol=1e-6)


def test_imagereward_state_dict_wrapper_and_folder(ir_dir, tokenizer_dir, tokenizer, tmp_path):
    folder, sd = ir_dir
    torch.save({"state_dict": sd}, tmp_path / "ImageReward.pt")
    shutil.copy(folder / "med_config.json", tmp_path / "med_config.json")
    wrapped = ImageRewardScorer.from_path(
        tmp_path, tokenizer_dir=tokenizer_dir, tokenizer=tokenizer, vision_heads=HEADS, device="cpu"
    )
    images = random_images(SHAPES, seed=14)
    reference = _scorer(ir_dir, tokenizer_dir, tokenizer).score(images, PROMPTS)
    np.testing.assert_allclose(wrapped.score(images, PROMPTS), reference, rtol=0, atol=1e-6)


def test_imagereward_missing_and_unexpected_keys(ir_dir, tmp_path, caplog):
    folder, sd = ir_dir
    with caplog.at_level(logging.WARNING):
        _, report = load_imagereward_model(
            folder / "ImageReward.pt", folder / "med_config.json", vision_heads=HEADS
        )
    assert sorted(report.unexpected) == sorted(
        ["blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias"]
    )
    assert report.ignored == ["blip.text_encoder.embeddings.position_ids"] and not report.missing
    assert "blip.vision_proj.weight" in caplog.text
    broken = dict(sd)
    del broken["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    del broken["mlp.layers.7.bias"]
    torch.save(broken, tmp_path / "ImageReward.pt")
    with pytest.raises(MissingWeightsError, match=r"crossattention\.self\.key\.weight") as err:
        load_imagereward_model(tmp_path / "ImageReward.pt", MED_CONFIG, vision_heads=HEADS)
    assert set(err.value.missing) == {
        "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight",
        "mlp.layers.7.bias",
    }


def test_imagereward_config_and_rule_coverage(ir_dir):
    folder, _ = ir_dir
    vit_l = {
        "blip.visual_encoder.patch_embed.proj.weight": torch.empty(1024, 3, 16, 16),
        "blip.visual_encoder.pos_embed": torch.empty(1, 197, 1024),
        "blip.visual_encoder.blocks.23.mlp.fc1.weight": torch.empty(4096, 1024),
        "blip.visual_encoder.blocks.0.mlp.fc1.weight": torch.empty(4096, 1024),
    }
    vc = vision_config_from_state_dict(vit_l)  # ImageReward.pt's ViT-L/16 at 224 px, heads = width / 64
    shape = (vc.hidden_size, vc.num_attention_heads, vc.num_hidden_layers, vc.image_size, vc.patch_size)
    assert shape == (1024, 16, 24, 224, 16)
    model, _ = load_imagereward_model(folder / "ImageReward.pt", MED_CONFIG, vision_heads=HEADS)
    vc, tc = model.vision_model.config, model.text_model.config
    assert (vc.hidden_size, vc.num_hidden_layers, vc.image_size, vc.patch_size) == (WIDTH, LAYERS, 32, 8)
    assert vc.layer_norm_eps == 1e-6 and tc.encoder_hidden_size == WIDTH and tc.vocab_size == VOCAB
    targets = {rule.dst for rule in imagereward_key_rules(model)}
    assert targets == {k for k in model.state_dict() if not k.endswith("position_ids")}
    with pytest.raises(ScorerLoadError, match="add_cross_attention"):
        load_imagereward_model(
            folder / "ImageReward.pt", {**MED_CONFIG, "add_cross_attention": False}, vision_heads=HEADS
        )
    with pytest.raises(ScorerLoadError, match="vision_heads="):
        load_imagereward_model(folder / "ImageReward.pt", MED_CONFIG)  # 32 // 64 = 0 heads


def test_imagereward_head_is_linear_without_activations():
    head = ImageRewardHead(WIDTH)
    kinds = [type(m).__name__ for m in head.layers]
    assert kinds == ["Linear", "Dropout", "Linear", "Dropout", "Linear", "Dropout", "Linear", "Linear"]
    assert [m.p for m in head.layers if isinstance(m, nn.Dropout)] == [0.2, 0.2, 0.1]
    assert [m.out_features for m in head.layers if isinstance(m, nn.Linear)] == [1024, 128, 64, 16, 1]
    head.eval()
    a, b = torch.randn(2, WIDTH, dtype=torch.float64), torch.randn(2, WIDTH, dtype=torch.float64)
    head.double()
    zero = head(torch.zeros(2, WIDTH, dtype=torch.float64))
    torch.testing.assert_close(head(a + b) - zero, (head(a) - zero) + (head(b) - zero))  # affine


def test_imagereward_protocol_fields(ir_dir, tokenizer_dir, tokenizer):
    folder, _ = ir_dir
    record = _scorer(ir_dir, tokenizer_dir, tokenizer).result([0.5, 1.5])

    def digest(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert record == {
        "value": pytest.approx(1.0),
        "n": 2,
        "weights_sha256": digest(folder / "ImageReward.pt"),
        "med_config_sha256": digest(folder / "med_config.json"),
        "tokenizer_vocab_sha256": digest(tokenizer_dir / "vocab.txt"),
        "reward_mean": IMAGEREWARD_MEAN,
        "reward_std": IMAGEREWARD_STD,
        "backend": "transformers",
        "dtype": "float32",
    }
    with pytest.raises(ScorerLoadError, match="tokenizer_dir"):
        ImageRewardScorer.from_path(folder / "ImageReward.pt")


def test_imagereward_bfloat16_keeps_a_float32_head(ir_dir, tokenizer_dir, tokenizer):
    folder, _ = ir_dir
    images = random_images(SHAPES, seed=15)
    fp32 = _scorer(ir_dir, tokenizer_dir, tokenizer).score(images, PROMPTS)
    bf16 = ImageRewardScorer.from_path(
        folder / "ImageReward.pt", tokenizer=tokenizer, vision_heads=HEADS, device="cpu", dtype="bfloat16"
    )
    assert bf16.model.mlp.layers[0].weight.dtype == torch.float32
    assert bf16.model.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert bf16.protocol()["dtype"] == "bfloat16" and bf16.protocol()["tokenizer_vocab_sha256"] is None
    np.testing.assert_allclose(bf16.score(images, PROMPTS), fp32, atol=0.15)
