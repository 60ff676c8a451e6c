"""DiffAugment (spec §8.1, §12.14): pure functions of (x, params), params drawn up front."""

import pytest
import torch

from senseflow.config import load_config
from senseflow.families.toy.adapter import ToyAdapter
from senseflow.method.diffaug import (
    BRIGHTNESS_RANGE,
    CONTRAST_RANGE,
    CUTOUT_RATIO,
    SATURATION_RANGE,
    TRANSLATION_RATIO,
    diffaug,
    draw_diffaug_params,
    neutral_diffaug_params,
)
from senseflow.train.draws import draw_step
from tests.trainer_helpers import RECIPE

ALL = ["color", "translation", "cutout"]
SHAPE = (3, 16, 12)


def _x(n=4, seed=0):
    return torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("policy", [["color"], ["translation"], ["cutout"], ALL])
def test_shapes(policy):
    params = draw_diffaug_params(policy, 4, SHAPE, torch.Generator().manual_seed(0))
    for v in params.values():
        assert v.shape[0] == 4
    assert diffaug(_x(), params).shape == (4, *SHAPE)


def test_param_ranges_are_the_documented_defaults():
    n = 2000
    p = draw_diffaug_params(ALL, n, SHAPE, torch.Generator().manual_seed(1))
    for key, (lo, hi) in (
        ("brightness", BRIGHTNESS_RANGE),
        ("saturation", SATURATION_RANGE),
        ("contrast", CONTRAST_RANGE),
    ):
        assert p[key].min() >= lo and p[key].max() < hi
        assert p[key].min() < lo + 0.05 and p[key].max() > hi - 0.05
    sy, sx = int(SHAPE[1] * TRANSLATION_RATIO + 0.5), int(SHAPE[2] * TRANSLATION_RATIO + 0.5)
    assert set(p["translation"][:, 0].tolist()) == set(range(-sy, sy + 1))
    assert set(p["translation"][:, 1].tolist()) == set(range(-sx, sx + 1))
    ch, cw = int(SHAPE[1] * CUTOUT_RATIO + 0.5), int(SHAPE[2] * CUTOUT_RATIO + 0.5)
    assert (p["cutout"][:, 2] == ch).all() and (p["cutout"][:, 3] == cw).all()
    assert p["cutout"][:, 0].min() == 0 and p["cutout"][:, 0].max() == SHAPE[1] - 1 + (1 - ch % 2)


def test_deterministic_from_params_and_generator():
    a = draw_diffaug_params(ALL, 4, SHAPE, torch.Generator().manual_seed(3))
    b = draw_diffaug_params(ALL, 4, SHAPE, torch.Generator().manual_seed(3))
    for k in a:
        assert torch.equal(a[k], b[k])
    x = _x()
    assert torch.equal(diffaug(x, a), diffaug(x, b))
    # Separate draws per sample: the samples do not share parameters.
    assert a["brightness"].unique().numel() == 4


def test_neutral_params_are_the_identity():
    x = _x()
    for policy in (["color"], ["translation"], ["cutout"], ALL):
        torch.testing.assert_close(diffaug(x, neutral_diffaug_params(policy, 4)), x)


def test_translation_shifts_and_zero_fills():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    out = diffaug(x, {"translation": torch.tensor([[1, -1]])})
    expected = torch.zeros_like(x)
    expected[0, 0, :3, 1:] = x[0, 0, 1:, :3]  # out[i, j] = x[i + 1, j - 1]
    assert torch.equal(out, expected)


def test_cutout_zeroes_the_box_clipped_to_the_image():
    x = torch.ones(2, 2, 6, 6)
    box = torch.tensor([[3, 3, 2, 4], [0, 0, 3, 3]])  # centre (y, x), height, width
    out = diffaug(x, {"cutout": box})
    assert (out[0, :, 2:4, 1:5] == 0).all() and out[0].sum() == 2 * (36 - 8)
    assert (out[1, :, 0:2, 0:2] == 0).all() and out[1].sum() == 2 * (36 - 4)  # rows/cols -1..1 clipped


def test_color_factors():
    x = _x(2)
    out = diffaug(
        x,
        {"brightness": torch.tensor([0.25, 0.0]), "saturation": torch.ones(2), "contrast": torch.ones(2)},
    )
    torch.testing.assert_close(out, x + torch.tensor([0.25, 0.0]).view(2, 1, 1, 1))
    gray = diffaug(x, {"brightness": torch.zeros(2), "saturation": torch.zeros(2), "contrast": torch.ones(2)})
    torch.testing.assert_close(gray, x.mean(1, keepdim=True).expand_as(x))
    flat = diffaug(x, {"brightness": torch.zeros(2), "saturation": torch.ones(2), "contrast": torch.zeros(2)})
    torch.testing.assert_close(flat, x.mean((1, 2, 3), keepdim=True).expand_as(x))


def test_gradients_flow_to_x():
    x = _x().requires_grad_(True)
    params = draw_diffaug_params(ALL, 4, SHAPE, torch.Generator().manual_seed(5))
    (diffaug(x, params) * torch.randn(4, *SHAPE)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_rejects_unknown_policy_and_bad_shapes():
    with pytest.raises(ValueError, match="policies"):
        draw_diffaug_params(["flip"], 2, SHAPE)
    with pytest.raises(ValueError, match="N, C, H, W"):
        diffaug(torch.zeros(2, 3, 4), neutral_diffaug_params(ALL, 2))
    with pytest.raises(ValueError, match="samples"):
        diffaug(torch.zeros(3, *SHAPE), neutral_diffaug_params(ALL, 2))


def test_step_draws_are_global_then_sliced(tiny_teacher_dir):
    """Discriminator draws follow the draws rule: one global draw, each rank takes its slice."""
    cfg = load_config(
        RECIPE, [f"model.teacher={tiny_teacher_dir}", "method.gan.diffaug=[color,translation,cutout]"]
    )
    adapter = ToyAdapter(tiny_teacher_dir, cfg.model.anchors, cfg.model.cfg_convention)
    levels = adapter.param.anchor_levels(adapter.anchors)
    args = (cfg.method, adapter.param, levels, (3, 8, 8), 4, 2, 0, 7)
    plain = draw_step(*args)
    full = draw_step(*args, disc_shape=(3, 8, 8), disc_noised=True)
    assert plain.disc_real is None and torch.equal(plain.fake_noise, full.fake_noise)  # earlier draws kept
    assert full.disc_real.level.shape == (4,) and full.disc_real.noise.shape == (4, 3, 8, 8)
    assert not torch.equal(full.disc_real.aug["brightness"], full.disc_fake.aug["brightness"])
    part = full.slice(2, 4)
    for role in ("disc_real", "disc_fake", "disc_gen"):
        whole, mine = getattr(full, role), getattr(part, role)
        assert torch.equal(mine.noise, whole.noise[2:4]) and torch.equal(mine.level, whole.level[2:4])
        for k in whole.aug:
            assert torch.equal(mine.aug[k], whole.aug[k][2:4])
    both = full.disc_real.cat(full.disc_fake)
    assert both.noise.shape[0] == 8 and torch.equal(both.aug["cutout"][4:], full.disc_fake.aug["cutout"])
