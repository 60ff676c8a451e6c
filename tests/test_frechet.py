"""Fréchet distance core (metrics.frechet) and the toy world's random conv features (toy.features)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

import senseflow.metrics.frechet as frechet
from senseflow.families.toy.render import render
from senseflow.families.toy.world import all_scenes
from senseflow.metrics import FeatureStats, fid_from_features, fid_from_stats, frechet_distance
from senseflow.metrics.shapes.features import FEATURE_DIM, _weights, extract_features


def _random_cov(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _trace_sqrt_product(c1: np.ndarray, c2: np.ndarray) -> float:
    """tr((C1 C2)^½) as the sum of square roots of the eigenvalues of C1^½ C2 C1^½ (symmetric)."""
    w, v = np.linalg.eigh(c1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ c2 @ root1), 0, None)).sum())


# --- closed forms -------------------------------------------------------------------------------


def test_one_dimensional_closed_form():
    # N(1, 4) vs N(-2, 9): (1 - -2)² + 4 + 9 - 2 * sqrt(36) = 9 + 1 = 10
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[9.0]])) == (
        pytest.approx(10.0, abs=1e-12)
    )
    assert frechet_distance(1.0, 4.0, -2.0, 9.0) == pytest.approx(10.0, abs=1e-12)


def test_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
    v1, v2 = rng.uniform(0.1, 3.0, 8), rng.uniform(0.1, 3.0, 8)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_general_covariances_match_the_symmetric_formula():
    rng = np.random.default_rng(1)
    c1, c2 = _random_cov(rng, 20), _random_cov(rng, 20)
    mu1, mu2 = rng.standard_normal(20), rng.standard_normal(20)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * _trace_sqrt_product(c1, c2)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-9)


def test_identical_sets_and_symmetry():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((500, 16)) @ rng.standard_normal((16, 16))
    b = rng.standard_normal((400, 16)) * 2.0 + 0.5
    assert abs(fid_from_features(a, a)) < 1e-8
    assert fid_from_features(a, b) == pytest.approx(fid_from_features(b, a), rel=1e-9)
    assert fid_from_features(a, b) > 1.0


def test_singular_covariances_fewer_samples_than_dims():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((20, 64))
    b = rng.standard_normal((30, 64)) + 0.1
    value = fid_from_features(a, b)
    assert np.isfinite(value)
    sa, sb = FeatureStats.from_features(a), FeatureStats.from_features(b)
    expected = (
        np.sum((sa.mean - sb.mean) ** 2)
        + np.trace(sa.cov)
        + np.trace(sb.cov)
        - 2 * _trace_sqrt_product(sa.cov, sb.cov)
    )
    assert value == pytest.approx(expected, rel=1e-6)
    # Square roots of the zero eigenvalues are only accurate to ~sqrt(rounding): relative check.
    assert abs(fid_from_features(a, a)) < 1e-6 * np.trace(sa.cov)


def test_eps_fallback_when_the_square_root_fails(monkeypatch):
    rng = np.random.default_rng(4)
    c1, c2 = _random_cov(rng, 6), _random_cov(rng, 6)
    mu = np.zeros(6)
    real_sqrtm = frechet.linalg.sqrtm
    calls = []

    def flaky(a):
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(frechet.linalg, "sqrtm", flaky)
    eps = 1e-3
    value = frechet_distance(mu, c1, mu, c2, eps=eps)
    assert len(calls) == 2
    assert np.allclose(calls[1], (c1 + eps * np.eye(6)) @ (c2 + eps * np.eye(6)))
    expected = (
        np.trace(c1) + np.trace(c2) - 2 * _trace_sqrt_product(c1 + eps * np.eye(6), c2 + eps * np.eye(6))
    )
    assert value == pytest.approx(expected, rel=1e-9)


def test_invalid_inputs_raise():
    eye = np.eye(3)
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(np.zeros(3), -eye, np.zeros(3), eye)  # not PSD: sqrt(-I) = iI
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), eye, np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.array([np.nan, 0, 0]), eye, np.zeros(3), eye)


# --- streaming statistics ----------------------------------------------------------------------


def test_streaming_update_equals_one_batch():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1000, 12)) * 3.0 + 1e4  # large offset: tests the centred updates
    stats = FeatureStats()
    for chunk in np.split(x, [1, 1, 100, 333, 777]):  # includes an empty and a one-sample chunk
        stats.update(chunk)
    assert stats.n == 1000 and stats.dim == 12
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)
    whole = FeatureStats.from_features(x)
    np.testing.assert_allclose(stats.cov, whole.cov, rtol=1e-9, atol=1e-9)


def test_merge_equals_union():
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((300, 5)), rng.standard_normal((50, 5)) + 2.0
    sa, sb = FeatureStats.from_features(a), FeatureStats.from_features(b)
    merged = sa.merge(sb)
    union = FeatureStats.from_features(np.concatenate([a, b]))
    assert merged.n == 350 and sa.n == 300 and sb.n == 50  # operands unchanged
    np.testing.assert_allclose(merged.mean, union.mean, rtol=1e-12)
    np.testing.assert_allclose(merged.cov, union.cov, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(FeatureStats().merge(sa).cov, sa.cov)
    np.testing.assert_allclose(sa.merge(FeatureStats(5)).cov, sa.cov)


def test_stats_accept_torch_save_load_and_validate(tmp_path):
    x = np.random.default_rng(7).standard_normal((40, 4))
    stats = FeatureStats().update(torch.from_numpy(x).float())
    np.testing.assert_allclose(stats.cov, np.cov(x.astype(np.float32), rowvar=False), rtol=1e-5)
    stats.save(tmp_path / "stats.npz")
    loaded = FeatureStats.load(tmp_path / "stats.npz")
    assert loaded.n == stats.n
    np.testing.assert_array_equal(loaded.cov, stats.cov)
    assert fid_from_stats(loaded, stats) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError):
        stats.update(np.zeros((3, 5)))  # wrong dimension
    with pytest.raises(ValueError):
        FeatureStats().update(np.zeros((1, 4))).cov  # noqa: B018 - one sample has no covariance
    with pytest.raises(ValueError):
        FeatureStats().update(np.zeros(4))  # not [batch, dim]


# --- toy features ------------------------------------------------------------------------------


def _renders(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scenes = all_scenes()
    out = []
    for i in rng.integers(len(scenes), size=n):
        for _ in range(20):  # render() rarely gives up placing two large objects; redraw
            try:
                out.append(render(scenes[i], rng)[0])
                break
            except RuntimeError:
                continue
    return np.stack(out)


@pytest.fixture(scope="module")
def render_sets() -> tuple[np.ndarray, np.ndarray]:
    return _renders(1000, 11), _renders(1000, 12)


def test_feature_weights_are_pinned():
    # The PCG64 stream fixes the network; these values catch a change of stream or of draw order.
    sums = [(float(w.sum()), float(b.sum())) for w, b in _weights(0)]
    expected = [
        (-4.951627672837884, -0.5093596327154941),
        (13.764873240421961, -0.2556153771356917),
        (-8.589830687346263, 0.12473689764931145),
    ]
    np.testing.assert_allclose(sums, expected, rtol=1e-12)


def test_features_shape_and_determinism(render_sets):
    images = render_sets[0][:100]
    torch.manual_seed(0)
    first = extract_features(images)
    torch.manual_seed(12345)
    torch.rand(10)
    second = extract_features(images, batch_size=7)
    assert first.shape == (100, FEATURE_DIM) and first.dtype == np.float64
    assert 256 <= FEATURE_DIM <= 512
    np.testing.assert_allclose(first, second, rtol=1e-12, atol=1e-12)
    assert not np.allclose(first, extract_features(images, seed=1))
    # A float NCHW tensor in [-1, 1] is quantised first: same features as its uint8 image.
    as_float = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    np.testing.assert_allclose(extract_features(as_float), first, rtol=1e-12, atol=1e-12)
    assert extract_features(images[:0]).shape == (0, FEATURE_DIM)


def test_fid_separates_renders_from_corruptions(render_sets):
    a, b = render_sets
    fa, fb = extract_features(a), extract_features(b)
    same = fid_from_features(fa, fb)
    rng = np.random.default_rng(13)
    noise = rng.integers(0, 256, size=b.shape, dtype=np.uint8)
    channel_shuffled = b[..., [1, 2, 0]]  # RGB -> GBR: colours leave the palette
    blurred = np.clip(np.rint(ndimage.gaussian_filter(b.astype(np.float64), (0, 1.0, 1.0, 0))), 0, 255)
    others = {
        "uniform noise": fid_from_features(fa, extract_features(noise)),
        "channel-shuffled": fid_from_features(fa, extract_features(channel_shuffled)),
        "blurred (sigma 1)": fid_from_features(fa, extract_features(blurred.astype(np.uint8))),
    }
    print(f"\nFID render vs render: {same:.4f}; " + "; ".join(f"vs {k}: {v:.4f}" for k, v in others.items()))
    assert same >= 0.0
    for name, value in others.items():
        assert value > 4 * same, name
    assert others["uniform noise"] > 100 * same
