"""The VFM discriminator (``gan.type: vfm``) on a tiny random DINOv2 and a tiny CLIP, no downloads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from senseflow.config.method import GANConfig
from senseflow.families.tiny_vfm import write_tiny_clip, write_tiny_dinov2
from senseflow.models.batch import Conditioning
from senseflow.models.vfm import (
    REFERENCE_KEY,
    TEXT_KEY,
    BatchNormLocal,
    CLIPTextEmbedder,
    build_vfm,
    sn_conv,
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vfm")
    return write_tiny_dinov2(root / "dino"), write_tiny_clip(root / "clip")


def _gan(folders, **extra):
    dino, clip = folders
    return GANConfig(
        type="vfm",
        weight=0.5,
        time_weight="alpha_sq",
        backbone=str(dino),
        text_encoder=str(clip),
        feature_blocks=extra.pop("feature_blocks", [0, 2, 3]),
        **extra,
    )


def _cond(disc, n, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(n, 3, h, w, generator=g) * 2 - 1
    return disc.conditioning([f"prompt {i}" for i in range(n)], None, lambda: ref)


@pytest.mark.parametrize(("size", "input_size"), [((32, 32), None), ((40, 56), None), ((40, 56), 32)])
def test_logit_count_follows_the_grid_and_the_input_policy(folders, size, input_size):
    disc = build_vfm(_gan(folders, input_size=input_size), None, None)
    h, w = size if input_size is None else (input_size, input_size)
    grid = (h // 8, w // 8)
    side = grid
    for _ in range(3):  # three stride-2 convs, padding 1
        side = ((side[0] + 1) // 2, (side[1] + 1) // 2)
    x = torch.rand(2, 3, *size) * 2 - 1
    logits = disc(x, _cond(disc, 2, *size))
    assert logits.shape == (2, 4 * side[0] * side[1])  # 3 blocks + the embedding map
    maps = disc.backbone(x if input_size is None else F.interpolate(x, size=(h, w), mode="area"))
    assert len(maps) == 4 and all(m.shape == (2, 32, *grid) for m in maps)


def test_maps_are_the_hidden_states_with_cls_added(folders):
    """Against transformers' own forward at the native grid (where no interpolation happens)."""
    disc = build_vfm(_gan(folders), None, None)
    model = disc.backbone.model
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    maps = disc.backbone(x)
    mean, std = disc.backbone.mean, disc.backbone.std
    hidden = model(pixel_values=((x + 1) / 2 - mean) / std, output_hidden_states=True).hidden_states
    for m, layer in zip(maps, [0, 1, 3, 4], strict=True):  # embeddings, then blocks 0, 2, 3 (+1 offset)
        tokens = hidden[layer]
        expected = (tokens[:, 1:] + tokens[:, :1]).transpose(1, 2).reshape(1, 32, 4, 4)
        torch.testing.assert_close(m, expected, rtol=1e-5, atol=1e-5)


def test_batch_norm_local_and_spectral_norm_by_hand():
    bn = BatchNormLocal(3)
    x = torch.randn(16, 3, 5)
    y = bn(x)
    for start in (0, 8):  # two groups of 8 samples, statistics over samples and positions
        group = x[start : start + 8]
        mean = group.mean(dim=(0, 2), keepdim=True)
        var = group.var(dim=(0, 2), keepdim=True, unbiased=False)
        torch.testing.assert_close(y[start : start + 8], (group - mean) / torch.sqrt(var + 1e-5))
    conv = sn_conv(4, 6, 3)
    for _ in range(50):  # power iterations converge to the largest singular value
        conv(torch.randn(1, 4, 5, 5))
    weight = conv.parametrizations.weight.original.detach().reshape(6, -1)
    sigma = torch.linalg.matrix_norm(weight, ord=2)
    torch.testing.assert_close(conv.weight.reshape(6, -1), weight / sigma, rtol=1e-3, atol=1e-4)


def test_real_and_fake_are_judged_in_separate_passes(folders):
    disc = build_vfm(_gan(folders), None, None).eval()  # eval: no power iteration between the calls
    real, fake = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1
    cond = _cond(disc, 3, 32, 32)
    separate = torch.cat([disc(real, cond), disc(fake, cond)])
    both = torch.cat([real, fake])
    torch.testing.assert_close(disc(both, cond.cat(cond), groups=2), separate)
    assert not torch.allclose(disc(both, cond.cat(cond)), separate)  # one pass shares the statistics


def test_only_the_heads_learn_and_the_generator_gets_gradient(folders):
    disc = build_vfm(_gan(folders), None, None)
    frozen = {k: v.clone() for k, v in disc.backbone.model.state_dict().items()}
    assert all(not p.requires_grad for p in disc.backbone.parameters())
    assert {id(p) for p in disc.trainable_parameters()} == {id(p) for p in disc.heads.parameters()}
    opt = torch.optim.Adam(disc.trainable_parameters(), lr=1e-2)
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    cond = _cond(disc, 2, 32, 32)
    for _ in range(3):
        opt.zero_grad()
        loss = F.relu(1 - disc(x, cond)).mean()
        loss.backward()
        opt.step()
    assert x.grad is not None and x.grad.abs().sum() > 0  # through the frozen backbone to the image
    for k, v in disc.backbone.model.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert all(p.grad is None for p in disc.backbone.parameters())


def test_text_embedding_is_clips_projected_features_normalised(folders):
    from transformers import CLIPModel, CLIPTokenizer

    _, clip = folders
    embedder = CLIPTextEmbedder(clip)
    prompts = ["a red cat", "a photo of the dog"]
    text = embedder.encode(prompts).tensors["text"]
    model, tokenizer = CLIPModel.from_pretrained(clip), CLIPTokenizer.from_pretrained(clip)
    ids = tokenizer(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():  # by hand: the end token's final state, layer-normed, projected, normalised
        hidden = model.text_model(input_ids=ids).last_hidden_state
        end = (ids == tokenizer.eos_token_id).int().argmax(dim=-1)
        pooled = hidden[torch.arange(2), end]
        features = model.text_projection(pooled)
    torch.testing.assert_close(text, features / features.norm(dim=-1, keepdim=True), rtol=1e-5, atol=1e-6)
    assert torch.allclose(text.norm(dim=-1), torch.ones(2))


def test_missing_folders_and_bad_blocks_are_one_clear_error(folders, tmp_path):
    _, clip = folders
    with pytest.raises(
        FileNotFoundError, match=r"method\.gan\.backbone: .*is not a folder|method\.gan\.backbone"
    ):
        build_vfm(_gan((tmp_path / "nope", clip)), None, None)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json .*dinov2-large"):
        build_vfm(_gan((empty, clip)), None, None)
    with pytest.raises(ValueError, match=r"feature_blocks: \[9\] out of range"):
        build_vfm(_gan(folders, feature_blocks=[1, 9]), None, None)
    with pytest.raises(ValueError, match="reference_encoder"):
        build_vfm(_gan(folders, reference_encoder="clip"), None, None)


def test_another_backbone_size_works_unchanged(tmp_path, folders):
    _, clip = folders
    dino = write_tiny_dinov2(tmp_path / "dino_b", hidden=48, layers=6, patch=4)
    disc = build_vfm(_gan((dino, clip), feature_blocks=[1, 4, 5]), None, None)
    logits = disc(torch.rand(2, 3, 16, 16) * 2 - 1, _cond(disc, 2, 16, 16))
    assert logits.shape == (2, 4) and math.isfinite(logits.sum().item())


def test_conditioning_reads_the_text_cache_group(folders, tmp_path):
    from senseflow.models.text_cache import TextCache
    from senseflow.models.text_cache_write import write_tensor_group

    disc = build_vfm(_gan(folders), None, None)
    prompts = ["a red cat", "a blue dog", ""]
    base = {"family": "stand-in"}  # the adapter's group, which the VFM's is added to
    zeros = lambda p: {"x": torch.zeros(len(p), 2)}  # noqa: E731
    write_tensor_group(tmp_path / "cache", "text", base, zeros, prompts, progress=False)
    identity = disc.text.identity()
    write_tensor_group(tmp_path / "cache", "vfm", identity, disc.text.encode, prompts, progress=False)
    cache = TextCache.open(tmp_path / "cache", identity=base)
    disc.text_cache = cache
    cached = disc.conditioning(prompts[:2], None, lambda: torch.zeros(2, 3, 8, 8))
    live = disc.text.encode(prompts[:2]).tensors["text"]
    torch.testing.assert_close(cached.tensors[TEXT_KEY], live)
    assert cached.tensors[REFERENCE_KEY].shape == (2, 3, 8, 8)
    assert isinstance(cached, Conditioning)


def test_recipe_refusals(folders):
    from senseflow.config.errors import ConfigError  # noqa: F401  (GANConfig raises pydantic errors)

    with pytest.raises(ValueError, match="official_grad_leak"):
        GANConfig(type="none", official_grad_leak=True)
    with pytest.raises(ValueError, match="official_grad_leak"):
        GANConfig(type="dmd2_head", weight=1.0, official_grad_leak=True)
    GANConfig(type="dmd2_head", weight=1.0, official_grad_leak=True, head_trains_fake=False)
    with pytest.raises(ValueError, match="distinct block indices"):
        build_vfm(_gan(folders, feature_blocks=[1, 1]), None, None)
