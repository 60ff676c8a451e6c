"""Shared image handling (metrics.image_io): quantisation rules, PNG files, folder listing, centre crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from senseflow.metrics.image_io import (
    DEFAULT_QUANTISATION,
    center_crop,
    center_crop_offsets,
    center_crop_square,
    list_images,
    load_rgb,
    quantise,
    save_png,
    save_pngs,
)
from senseflow.metrics.shapes.evaluator import to_uint8

# --- quantisation -----------------------------------------------------------------------------------


def test_default_rule_is_truncation_as_dmd2():
    assert DEFAULT_QUANTISATION == "truncate"
    x = torch.tensor([0.0]).reshape(1, 1, 1)
    assert quantise(x).item() == 127  # 127.5 truncated


@pytest.mark.parametrize(
    ("value", "truncated", "rounded"),
    [
        (-1.0, 0, 0),
        (1.0, 255, 255),
        (0.0, 127, 128),  # 127.5: truncation drops it, round-half-to-even goes to 128
        (-0.5, 63, 64),  # 63.75
        (1 / 127.5 - 1, None, 1),  # 0.99999... in float32
        (2.5, 255, 255),  # saturates
        (-7.0, 0, 0),
    ],
)
def test_rules_on_known_values(value, truncated, rounded):
    x = torch.full((1, 3, 1, 1), value)
    if truncated is not None:
        assert quantise(x, "truncate").ravel().tolist() == [truncated] * 3
    assert quantise(x, "round").ravel().tolist() == [rounded] * 3


def test_rules_match_independent_numpy_formulas():
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0)) * 0.8
    xn = x.numpy()  # float32
    truncated = np.clip((xn + np.float32(1)) * np.float32(127.5), 0, 255).astype(np.uint8)
    rounded = np.rint((np.clip(xn, -1, 1) + np.float32(1)) * np.float32(127.5)).astype(np.uint8)
    assert np.array_equal(quantise(x, "truncate"), truncated.transpose(0, 2, 3, 1))
    assert np.array_equal(quantise(x, "round"), rounded.transpose(0, 2, 3, 1))


def test_round_rule_is_the_toy_worlds_to_uint8():
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 1.2
    for t in (x, x.double(), x.to(torch.bfloat16)):
        assert np.array_equal(quantise(t, "round"), to_uint8(t))
    assert np.array_equal(quantise(x[0], "round"), to_uint8(x[0]))


def test_truncation_is_not_the_inverse_of_the_standard_normalisation_but_rounding_is():
    levels = torch.arange(256, dtype=torch.float32)
    x = (levels / 127.5 - 1).reshape(1, 1, 1, 256).expand(1, 3, 1, 256)
    assert np.array_equal(quantise(x, "round")[0, 0, :, 0], levels.numpy().astype(np.uint8))
    truncated = quantise(x, "truncate")[0, 0, :, 0].astype(int)
    lost = levels.numpy().astype(int) - truncated
    assert set(np.unique(lost)) <= {0, 1} and lost.sum() > 0  # some levels land one below


def test_layout_input_types_and_errors():
    x = np.zeros((2, 3, 4, 5), dtype=np.float64)
    assert quantise(x).shape == (2, 4, 5, 3) and quantise(x).dtype == np.uint8
    assert quantise(x[0]).shape == (4, 5, 3)
    assert quantise(x).flags.c_contiguous
    with pytest.raises(ValueError, match="rule"):
        quantise(x, "floor")
    with pytest.raises(ValueError, match="NCHW"):
        quantise(np.zeros((4, 5)))
    with pytest.raises(ValueError, match="non-finite"):
        quantise(torch.full((1, 3, 2, 2), float("nan")))


# --- PNG files and folders --------------------------------------------------------------------------


def test_png_round_trip_is_lossless(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    path = save_png(tmp_path / "sub" / "a.png", image)
    back = load_rgb(path)
    assert back.dtype == np.uint8 and np.array_equal(back, image)
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["a.png"]  # no temporary left


def test_save_png_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "a.png", np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "a.png", np.zeros((4, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="PNG"):
        save_png(tmp_path / "a.jpg", np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="paths"):
        save_pngs(np.zeros((2, 4, 4, 3), dtype=np.uint8), [tmp_path / "a.png"])


def test_load_rgb_converts_other_modes(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((3, 4), 200, dtype=np.uint8), mode="L").save(tmp_path / "g.png")
    Image.fromarray(np.full((3, 4, 4), 9, dtype=np.uint8), mode="RGBA").save(tmp_path / "rgba.png")
    assert load_rgb(tmp_path / "g.png").shape == (3, 4, 3)
    assert np.all(load_rgb(tmp_path / "g.png") == 200)
    assert np.all(load_rgb(tmp_path / "rgba.png") == 9)


def test_list_images_order_filter_and_errors(tmp_path):
    image = np.zeros((2, 2, 3), dtype=np.uint8)
    for name in ("b/10.png", "a.PNG", "b/2.png", "c.jpg", "Z.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")  # listing looks at names only
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "stats.npz").write_bytes(b"")
    (tmp_path / ".partial.png").write_bytes(b"")
    (tmp_path / ".hidden").mkdir()
    save_png(tmp_path / ".hidden" / "x.png", image)
    (tmp_path / "d.png").mkdir()  # a folder named like an image
    rel = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert rel == ["Z.png", "a.PNG", "b/10.png", "b/2.png", "c.jpg"]  # code-point order of POSIX paths
    assert [p.name for p in list_images(tmp_path, recursive=False)] == ["Z.png", "a.PNG", "c.jpg"]
    with pytest.raises(FileNotFoundError, match="missing"):
        list_images(tmp_path / "missing")


# --- centre crops -----------------------------------------------------------------------------------


def test_center_crop_offsets_follow_torchvision_rounding():
    assert center_crop_offsets(1024, 1024, 299, 299) == (362, 362)  # 362.5 -> 362 (half to even)
    assert center_crop_offsets(300, 301, 299, 299) == (0, 1)  # 0.5 -> 0, 1.0 -> 1
    assert center_crop_offsets(302, 304, 299, 299) == (2, 2)  # 1.5 -> 2, 2.5 -> 2
    assert center_crop_offsets(299, 299, 299, 299) == (0, 0)
    with pytest.raises(ValueError, match="cannot crop"):
        center_crop_offsets(298, 1024, 299, 299)


def test_center_crop_and_square_crop():
    rows, cols = np.meshgrid(np.arange(600), np.arange(800), indexing="ij")
    image = np.stack([rows % 256, cols % 256, (rows // 256) * 16 + cols // 256], axis=2).astype(np.uint8)
    crop = center_crop(image, 299)
    assert crop.shape == (299, 299, 3)
    assert np.array_equal(crop, image[150:449, 250:549])  # (600-299)/2 = 150.5 -> 150; 250.5 -> 250
    assert not np.shares_memory(crop, image)
    assert np.array_equal(center_crop(image, 100, 200), image[250:350, 300:500])
    square = center_crop_square(image)
    assert np.array_equal(square, image[:, 100:700])
    assert np.array_equal(center_crop_square(image.transpose(1, 0, 2)), image.transpose(1, 0, 2)[100:700])
    with pytest.raises(ValueError, match="cannot crop"):
        center_crop(image, 601)
