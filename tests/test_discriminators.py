"""Discriminators: the input-space interface, and DMD2's head on the fake score (spec §8.2)."""

import pytest
import torch

from senseflow.config import load_config
from senseflow.method import nonsaturating_d_loss, nonsaturating_g_loss
from senseflow.models import build_adapter
from senseflow.models.build import build_networks
from senseflow.models.discriminators import (
    Discriminator,
    FakeScoreHeadDiscriminator,
    ProjectedDiscriminator,
    build_discriminator,
    head_block,
)
from tests.trainer_helpers import RECIPE

DMD2 = ["method.gan.type=dmd2_head", "method.gan.weight=5e-3", "method.gan.time_weight=constant"]


@pytest.fixture(scope="module")
def setup(tiny_teacher_dir):
    cfg = load_config(RECIPE, [f"model.teacher={tiny_teacher_dir}", *DMD2])
    adapter = build_adapter(cfg)
    nets = build_networks(adapter)
    torch.manual_seed(0)
    disc = build_discriminator(cfg.method.gan, adapter, nets.fake_score)
    return cfg, adapter, nets.fake_score, disc


def _inputs(adapter, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *adapter.sample_shape(8)), generator=g)
    level = adapter.param.level_from_grid(torch.randint(0, adapter.param.grid_max + 1, (n,), generator=g))
    noise = torch.randn(x.shape, generator=g)
    cond = adapter.encode_prompts(["a small red circle", "a large blue square", ""][:n])
    return x, cond, level, noise


def _zero_grads(*modules):
    for m in modules:
        for p in m.parameters():
            p.grad = None


def test_build_and_input_spaces(setup, tiny_teacher_dir):
    _, adapter, fake, disc = setup
    assert isinstance(disc, FakeScoreHeadDiscriminator) and isinstance(disc, Discriminator)
    assert disc.input_space == "model" and disc.noised and disc.loss == "nonsaturating"
    toy_gan = load_config(RECIPE, [f"model.teacher={tiny_teacher_dir}"]).method.gan
    toy = build_discriminator(toy_gan, adapter, fake)
    assert isinstance(toy, ProjectedDiscriminator) and isinstance(toy, Discriminator)
    assert toy.input_space == "pixels" and not toy.noised and toy.loss == "hinge"
    none = load_config(RECIPE, [f"model.teacher={tiny_teacher_dir}", "method.gan.type=none"])
    assert build_discriminator(none.method.gan, adapter, fake) is None
    vfm = load_config(
        RECIPE,
        [f"model.teacher={tiny_teacher_dir}", "method.gan.type=vfm", "method.gan.time_weight=alpha_sq"],
    )
    with pytest.raises(FileNotFoundError, match=r"method\.gan\.backbone: 'facebook/dinov2-large'"):
        build_discriminator(vfm.method.gan, adapter, fake)  # the VFM's backbone is not on this machine


def test_head_is_the_only_state_and_trainable_part(setup):
    _, _, fake, disc = setup
    keys = set(disc.state_dict())
    assert keys and all(k.startswith(("head.", "out.")) for k in keys)
    head_ids = {id(p) for p in disc.trainable_parameters()}
    assert head_ids == {id(p) for p in disc.parameters()}
    assert not head_ids & {id(p) for p in fake.parameters()}


def test_block_choice(setup, tiny_teacher_dir):
    cfg, adapter, fake, _ = setup
    assert head_block(cfg.method.gan) is None  # the VFM list (default): the middle block
    one = load_config(RECIPE, [f"model.teacher={tiny_teacher_dir}", *DMD2, "method.gan.feature_blocks=[0]"])
    assert head_block(one.method.gan) == 0
    assert FakeScoreHeadDiscriminator(adapter, fake).feature_block == len(fake.transformer_blocks) // 2
    with pytest.raises(ValueError, match="out of range"):
        FakeScoreHeadDiscriminator(adapter, fake, block=len(fake.transformer_blocks))


def test_logits_shape_and_hook_is_removed(setup):
    _, adapter, fake, disc = setup
    x, cond, level, noise = _inputs(adapter)
    logits = disc(x, cond, level, noise)
    assert logits.shape == (3, 1) and torch.isfinite(logits).all()
    block = fake.transformer_blocks[disc.feature_block]
    assert not block._forward_hooks
    assert all(p.requires_grad for p in fake.parameters())  # the freeze is undone


def test_features_are_the_hooked_block_output(setup):
    _, adapter, fake, disc = setup
    x, cond, level, noise = _inputs(adapter)
    x_t = adapter.param.add_noise(x, noise, level)
    seen = []
    handle = fake.transformer_blocks[disc.feature_block].register_forward_hook(
        lambda _m, _i, out: seen.append(out[-1])
    )
    with torch.no_grad():
        feats = disc.features(x_t, level, cond)
    handle.remove()
    torch.testing.assert_close(feats, seen[0])
    assert feats.shape[0] == 3 and feats.shape[-1] == fake.inner_dim


def test_d_loss_trains_the_head_only(setup):
    _, adapter, fake, disc = setup
    _zero_grads(fake, disc)
    x, cond, level, noise = _inputs(adapter)
    logits = disc(torch.cat([x, x.flip(0)]), cond.cat(cond), level.repeat(2), noise.repeat(2, 1, 1, 1))
    real, fake_logits = logits.chunk(2)
    nonsaturating_d_loss(real, fake_logits).backward()
    assert all(p.grad is not None for p in disc.trainable_parameters())
    assert any(p.grad.abs().sum() > 0 for p in disc.trainable_parameters())
    assert all(p.grad is None for p in fake.parameters()), "D's loss must not reach the fake score"


def test_g_loss_reaches_x0_through_the_fake_network_but_not_its_weights(setup):
    _, adapter, fake, disc = setup
    _zero_grads(fake, disc)
    x, cond, level, noise = _inputs(adapter)
    x0 = x.clone().requires_grad_(True)
    nonsaturating_g_loss(disc(x0, cond, level, noise)).backward()
    assert x0.grad is not None and torch.isfinite(x0.grad).all() and x0.grad.abs().sum() > 0
    assert all(p.grad is None for p in fake.parameters())
    assert all(p.grad is not None for p in disc.trainable_parameters())
