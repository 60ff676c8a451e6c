"""``senseflow.metrics.shapes.background``: colour cast and texture of the background, checked
against closed forms (flat shift, checkerboard, single bump) and a hand count of measured pixels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from senseflow.families.toy.render import render_batch
from senseflow.families.toy.world import BACKGROUND, COLOURS, parse_prompt
from senseflow.metrics.shapes.background import background_stats
from senseflow.metrics.shapes.evaluator import BACKGROUND_LABEL, label_pixels

BG = np.asarray(BACKGROUND, dtype=np.int64)


def _flat(shift: tuple[int, int, int], h: int = 12, w: int = 10) -> np.ndarray:
    image = np.empty((1, h, w, 3), dtype=np.int64)
    image[:] = BG + np.asarray(shift)
    return image.astype(np.uint8)


def _checkerboard(a: int, h: int = 9, w: int = 11) -> np.ndarray:
    sign = np.where((np.arange(h)[:, None] + np.arange(w)[None, :]) % 2 == 0, 1, -1)
    image = BG + a * sign[..., None]
    return image[None].astype(np.uint8)


def test_flat_shift_gives_exact_offset_and_green_cast():
    stats = background_stats(_flat((3, 9, -2)))
    assert stats.offset_rgb == pytest.approx((3.0, 9.0, -2.0), abs=1e-12)
    assert stats.green_cast == pytest.approx(9 - (3 + -2) / 2, abs=1e-12)
    assert stats.texture == pytest.approx(0.0, abs=1e-12)
    assert stats.fraction == 1.0


def test_neutral_grey_shift_has_no_green_cast():
    stats = background_stats(_flat((5, 5, 5)))
    assert stats.offset_rgb == pytest.approx((5.0, 5.0, 5.0), abs=1e-12)
    assert stats.green_cast == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("a", [2, 6])
def test_checkerboard_texture_is_eight_ninths_of_amplitude(a):
    image = _checkerboard(a)
    labels, _ = label_pixels(image[0])
    assert (labels == BACKGROUND_LABEL).all()  # the premise: still all background
    stats = background_stats(image)
    # 3x3 mean at any pixel is ±a/9 (5 same-sign pixels, 4 opposite; mirror borders keep the pattern)
    assert stats.texture == pytest.approx(8 * a / 9, rel=1e-12)
    # 9 * 11 pixels: one more +a than -a, so the pooled offset is a / 99 per channel
    assert stats.offset_rgb == pytest.approx((a / 99,) * 3, abs=1e-12)
    assert stats.fraction == 1.0


def test_checkerboard_with_equal_counts_has_zero_offset():
    stats = background_stats(_checkerboard(6, h=8, w=10))
    assert stats.offset_rgb == pytest.approx((0.0, 0.0, 0.0), abs=1e-12)
    assert stats.green_cast == pytest.approx(0.0, abs=1e-12)
    assert stats.texture == pytest.approx(48 / 9, rel=1e-12)


def test_single_bump_texture_matches_hand_rms():
    h, w, a = 7, 8, 6
    image = _flat((0, 0, 0), h, w).astype(np.int64)
    image[0, 3, 4] += a
    stats = background_stats(image.astype(np.uint8))
    # bump pixel: a - a/9; its 8 neighbours: -a/9; the rest 0 (all channels alike)
    rms = math.sqrt(((8 * a / 9) ** 2 + 8 * (a / 9) ** 2) / (h * w))
    assert stats.texture == pytest.approx(rms, rel=1e-12)
    assert stats.offset_rgb == pytest.approx((a / (h * w),) * 3, abs=1e-12)


def test_render_has_no_offset_and_fraction_matches_hand_count():
    images = render_batch([parse_prompt("a large red circle")], np.random.default_rng(0))
    stats = background_stats(images)
    labels, _ = label_pixels(images[0])
    keep = ndimage.binary_erosion(
        labels == BACKGROUND_LABEL, structure=np.ones((3, 3), dtype=bool), border_value=1
    )
    h, w = images.shape[1:3]
    assert 0 < keep.sum() < h * w
    assert stats.fraction == pytest.approx(keep.sum() / (h * w), abs=1e-15)
    assert stats.fraction < 1
    # every measured pixel is exactly the renderer's background
    assert (images[0][keep] == BG).all()
    assert stats.offset_rgb == pytest.approx((0.0, 0.0, 0.0), abs=1e-12)
    assert stats.green_cast == pytest.approx(0.0, abs=1e-12)


def test_render_texture_is_the_small_documented_floor():
    """Measured pixels next to the margin see the object's faint anti-aliased fringe in their 3x3
    window (documented in the module): a clean render's texture is small but not zero, and comes only
    from pixels whose window reaches a non-flat pixel."""
    images = render_batch([parse_prompt("a large red circle")], np.random.default_rng(0))
    texture = background_stats(images).texture
    assert 0 < texture < 1.5
    flat = np.zeros_like(images[0])
    flat[:] = BACKGROUND
    assert background_stats(flat[None]).texture == 0.0


def test_batch_is_pooled_over_pixels():
    a, b = _flat((3, 9, -2), 6, 6), _flat((-1, -3, 4), 6, 6)
    stats = background_stats(np.concatenate([a, b]))
    assert stats.offset_rgb == pytest.approx((1.0, 3.0, 1.0), abs=1e-12)
    assert stats.green_cast == pytest.approx(3.0 - 1.0, abs=1e-12)
    # a second image with no background halves the measured share but not the offset
    red = np.empty((1, 6, 6, 3), dtype=np.uint8)
    red[:] = COLOURS["red"]
    stats = background_stats(np.concatenate([a, red]))
    assert stats.fraction == 0.5
    assert stats.offset_rgb == pytest.approx((3.0, 9.0, -2.0), abs=1e-12)


@pytest.mark.parametrize(
    "images",
    [
        np.full((1, 4, 4, 3), 28.0, dtype=np.float32),
        np.full((4, 4, 3), 28, dtype=np.uint8),
        np.full((1, 4, 4, 4), 28, dtype=np.uint8),
        np.full((1, 4, 4, 3), 28, dtype=np.int64),
    ],
    ids=["float", "no-batch-axis", "four-channels", "int64"],
)
def test_bad_input_raises(images):
    with pytest.raises(ValueError, match="uint8"):
        background_stats(images)


@pytest.mark.parametrize(
    "rgb", [COLOURS["red"], COLOURS["blue"], (255, 0, 0)], ids=["red", "blue", "pure-red"]
)
def test_all_palette_colour_has_no_background(rgb):
    image = np.empty((2, 8, 8, 3), dtype=np.uint8)
    image[:] = rgb
    stats = background_stats(image)
    assert stats.offset_rgb is None
    assert stats.green_cast is None
    assert stats.texture is None
    assert stats.fraction == 0.0
    assert stats.record() == {"offset_rgb": None, "green_cast": None, "texture": None, "fraction": 0.0}
