"""The adapter contract, checked for every family the registry can build.

A family that registers a builder must add a tiny folder fixture to ``FOLDERS``; the first test
fails until it does, so no family lands unchecked.
"""

from __future__ import annotations

import pytest
import torch

from senseflow.config import load_config
from senseflow.config.registry import available
from senseflow.families.tiny import FAMILIES
from senseflow.models import build_adapter
from senseflow.models.adapter import NETWORK_ROLES
from senseflow.models.batch import Batch
from senseflow.models.build import build_empty, build_networks, build_roles
from tests.family_helpers import RECIPES, RESOLUTION
from tests.trainer_helpers import RECIPE

# family -> (recipe, overrides); the toy family's folder is the tiny trained teacher, the others' the
# tiny_folder fixture's variant "a"
FOLDERS = {
    "toy": (RECIPE, []),
    **{family: (RECIPES[family], [f"data.resolution={RESOLUTION}"]) for family in FAMILIES},
}
PROMPTS = ["a small red circle", "a large blue square above a small green triangle"]


def test_every_buildable_family_has_a_contract_fixture():
    assert set(available("family")) <= set(FOLDERS), "add a tiny folder for the new family to FOLDERS"


@pytest.fixture(params=sorted(FOLDERS))
def family(request):
    recipe, overrides = FOLDERS[request.param]
    if request.param == "toy":
        folder = request.getfixturevalue("tiny_teacher_dir")
    else:
        folder = request.getfixturevalue("tiny_folder")(request.param, "a")
    cfg = load_config(recipe, [f"model.teacher={folder}", "data.batch_size=2", *overrides])
    return cfg, build_adapter(cfg)


def _stock(adapter, dtype):
    """The teacher network through the stock ``from_pretrained`` of its class."""
    cls, _ = adapter.network_spec("teacher")
    folder = adapter.weight_files()[0].parent
    return cls.from_pretrained(folder, torch_dtype=dtype)


def test_build_on_meta_has_no_weights_and_real_buffers(family):
    _, adapter = family
    for role in NETWORK_ROLES:
        net = build_empty(adapter, role, torch.float32)
        assert all(p.is_meta for p in net.parameters()), role
        assert not any(b.is_meta for b in net.buffers()), role
        assert all(p.requires_grad == (role != "teacher") for p in net.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_build_then_load_equals_from_pretrained(family, dtype):
    _, adapter = family
    nets = build_roles(adapter, NETWORK_ROLES, dtype, dtype, "cpu")
    reference = _stock(adapter, dtype).state_dict()
    for role, net in nets.items():
        state = net.state_dict()
        kept = adapter.initial_weights(role, reference)  # a family may drop entries for its student
        assert state.keys() == kept.keys(), role
        reference = {k: v for k, v in reference.items() if k in kept}
        for name, value in reference.items():
            assert state[name].dtype == value.dtype, (role, name)
            assert torch.equal(state[name], value), (role, name)
        # the buffers a config-only build computes equal the stock model's
        stock_buffers = dict(_stock(adapter, dtype).named_buffers())
        for name, b in net.named_buffers():
            assert torch.equal(b, stock_buffers[name]), (role, name)


def test_forward_guidance_and_sampling_levels(family):
    cfg, adapter = family
    nets = build_networks(adapter)
    shape = adapter.sample_shape(cfg.data.resolution)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    level = adapter.param.anchor_levels(adapter.anchors)[:2]
    cond = adapter.encode_prompts(PROMPTS)
    with torch.no_grad():
        if adapter.guidance_kind == "embedding":  # guidance is an input: guided = one pass with it
            scale = torch.tensor([2.0, 5.0])
            out = adapter.forward(nets.teacher, x, level, cond, guidance=scale)
            guided = adapter.guided_predict(nets.teacher, x, level, cond, scale)
        else:  # CFG at guidance 1 = the conditional output
            out = adapter.forward(nets.teacher, x, level, cond)
            guided = adapter.guided_predict(nets.teacher, x, level, cond, torch.ones(2))
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(guided, out, rtol=1e-5, atol=1e-5)
    levels = adapter.sampling_levels(4)
    assert levels.shape == (5,) and bool((levels[:-1] > levels[1:]).all())
    clean = adapter.param.clean_level(1)
    assert levels[-1].item() == clean.item()


def test_codec_and_cached_batches_give_the_same_inputs(family):
    cfg, adapter = family
    images = torch.rand(2, 3, cfg.data.resolution, cfg.data.resolution) * 2 - 1
    latents = adapter.encode_pixels(images)
    x = adapter.to_model(latents)
    assert tuple(x.shape[1:]) == adapter.sample_shape(cfg.data.resolution)
    assert adapter.decode(x).shape == images.shape
    from_images = adapter.model_inputs(Batch(prompts=PROMPTS, images=images))
    from_latents = adapter.model_inputs(Batch(prompts=PROMPTS, latents=latents))
    torch.testing.assert_close(from_images, from_latents)
    cached = adapter.conditioning(Batch(PROMPTS, images=images, conditioning=adapter.encode_prompts(PROMPTS)))
    fresh = adapter.conditioning(Batch(PROMPTS, images=images))
    for key, value in fresh.tensors.items():
        torch.testing.assert_close(cached.tensors[key], value)


def test_decode_in_chunks_equals_one_pass(family):
    cfg, adapter = family
    x = torch.randn(5, *adapter.sample_shape(cfg.data.resolution))
    whole = adapter.decode_model(x)
    adapter.decode_chunk = 2
    # a VAE's convolutions may take another kernel path for another batch size: equal to float noise
    torch.testing.assert_close(adapter.decode(x), whole, rtol=1e-4, atol=1e-4)


def test_shard_units_and_feature_taps_fit_the_network(family):
    cfg, adapter = family
    nets = build_networks(adapter)
    assert adapter.shard_units(nets.generator)
    taps = adapter.feature_taps(nets.fake_score)
    assert taps
    captured = []
    handles = [t.module.register_forward_hook(lambda m, i, o: captured.append(o)) for t in taps]
    x = torch.randn(1, *adapter.sample_shape(cfg.data.resolution))
    with torch.no_grad():
        adapter.forward(
            nets.fake_score,
            x,
            adapter.param.anchor_levels(adapter.anchors)[:1],
            adapter.encode_prompts(PROMPTS[:1]),
        )
    for h in handles:
        h.remove()
    for tap, out in zip(taps, captured, strict=True):
        feat = out[-1] if isinstance(out, tuple) else out
        width = feat.shape[1] if feat.ndim == 4 else feat.shape[-1]
        assert width == tap.width


def test_bf16_build_keeps_non_persistent_buffers_as_from_pretrained_does(tmp_path):
    """A config-computed table (here SD3's position embedding without ``pos_embed_max_size``, a
    non-persistent buffer) stays float32 in a bf16 build, as ``from_pretrained(torch_dtype=bf16)``
    leaves it; what the state dict holds is cast."""
    from diffusers import SD3Transformer2DModel

    from senseflow.models.adapter import FamilyAdapter
    from senseflow.models.build import safetensors_files

    config = dict(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        pos_embed_max_size=None,
    )
    torch.manual_seed(0)
    SD3Transformer2DModel(**config).save_pretrained(tmp_path / "transformer")

    class Folder(FamilyAdapter):
        def network_spec(self, role):
            return SD3Transformer2DModel, config

        def weight_files(self):
            return safetensors_files(tmp_path / "transformer")

        def encode_text(self, prompts): ...  # building and loading need neither

        def predict(self, net, x_t, level, cond, guidance=None): ...

        def sampling_levels(self, steps): ...

        def sample_shape(self, resolution):
            return (4, resolution // 8, resolution // 8)

    built = build_roles(Folder(), ("teacher",), torch.bfloat16, torch.bfloat16, "cpu")["teacher"]
    stock = SD3Transformer2DModel.from_pretrained(tmp_path / "transformer", torch_dtype=torch.bfloat16)
    stock_buffers = dict(stock.named_buffers())
    assert stock_buffers, "the case needs a buffer"
    for name, b in built.named_buffers():
        assert b.dtype == stock_buffers[name].dtype and torch.equal(b, stock_buffers[name]), name
    for name, p in stock.state_dict().items():
        assert torch.equal(built.state_dict()[name], p), name


def test_weights_that_do_not_fit_the_config_are_one_clear_error(family):
    _, adapter = family
    from senseflow.models.build import build_empty, materialise, read_weights

    state = adapter.initial_weights("generator", read_weights(adapter.weight_files()))
    state.pop(next(iter(state)))
    state["extra.weight"] = torch.zeros(1)
    net = build_empty(adapter, "generator", torch.float32)
    with pytest.raises(
        ValueError, match=r"generator: the teacher's weights do not fit .*1 missing.*1 unexpected"
    ):
        materialise(net, torch.device("cpu"), state, what="generator")
