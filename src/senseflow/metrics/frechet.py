"""Fréchet distance between Gaussian fits of two feature sets: the core of FID.

``FID = ||mu1 - mu2||² + tr(C1 + C2 - 2 (C1 C2)^½)`` is the squared 2-Wasserstein distance between
the Gaussians N(mu1, C1) and N(mu2, C2) fitted to two sets of features (Inception-v3 pool features
for real FID, :mod:`senseflow.metrics.shapes.features` in the toy world). Nothing here depends on where the
features come from.

* :class:`FeatureStats` accumulates the mean and covariance of a feature stream in float64, batch by
  batch, and merges partial statistics (from several workers or files) exactly, using the pairwise
  update of Chan, Golub and LeVeque for the centred sums, which avoids the cancellation that
  accumulating raw sums of squares suffers.
* :func:`frechet_distance` computes the distance from means and covariances with
  ``scipy.linalg.sqrtm``; when the product of the covariances is singular (for example fewer
  samples than dimensions) and the square root comes out non-finite or inaccurate, ``eps`` is added
  to both diagonals and the root taken again, the usual remedy in FID implementations.

Covariances are unbiased (divided by ``n - 1``), as ``np.cov`` and the common FID implementations do.
"""

from __future__ import annotations

import warnings
from os import PathLike

import numpy as np
from scipy import linalg

# ||X @ X - A||_F / ||A||_F above which a computed square root X of A is not trusted (and the eps
# fallback is used). A root of a well-conditioned product is accurate to ~1e-12; roots of singular
# products that do not exist come out with errors of order 1.
SQRTM_RELATIVE_TOLERANCE = 1e-5

# Largest imaginary part allowed on the diagonal of the square root, relative to the largest real
# diagonal entry (or 1, whichever is larger), before it is dropped. Rounding in the Schur method gives
# tiny imaginary parts on positive semi-definite inputs; large ones mean the covariances are not
# valid (not symmetric positive semi-definite) and the distance would be meaningless.
MAX_RELATIVE_IMAGINARY = 1e-3


class FeatureStats:
    """Streaming mean and covariance of D-dimensional features, accumulated in float64."""

    def __init__(self, dim: int | None = None) -> None:
        self._n = 0
        self._dim = dim
        self._mean: np.ndarray | None = None if dim is None else np.zeros(dim)
        self._m2: np.ndarray | None = None if dim is None else np.zeros((dim, dim))

    @classmethod
    def from_features(cls, features: np.ndarray) -> FeatureStats:
        return cls().update(features)

    @classmethod
    def _from_moments(cls, n: int, mean: np.ndarray, m2: np.ndarray) -> FeatureStats:
        stats = cls(dim=len(mean))
        stats._n, stats._mean, stats._m2 = int(n), np.array(mean, np.float64), np.array(m2, np.float64)
        return stats

    def _combine(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        if self._dim is None:
            self._dim = len(mean)
        elif len(mean) != self._dim:
            raise ValueError(f"feature dimension {len(mean)} does not match the statistics' {self._dim}")
        if n == 0:
            return
        if self._n == 0:
            self._n, self._mean, self._m2 = n, mean.copy(), m2.copy()
            return
        total = self._n + n
        delta = mean - self._mean
        self._m2 = self._m2 + m2 + np.outer(delta, delta) * (self._n * n / total)
        self._mean = self._mean + delta * (n / total)
        self._n = total

    def update(self, batch: np.ndarray) -> FeatureStats:
        """Add a batch of features [B, D] (a torch tensor is fine too); returns ``self``."""
        if hasattr(batch, "detach"):  # torch tensor, without importing torch here
            batch = batch.detach().cpu().double().numpy()
        batch = np.asarray(batch, dtype=np.float64)
        if batch.ndim != 2:
            raise ValueError(f"expected a [batch, dim] array, got shape {batch.shape}")
        if not np.isfinite(batch).all():
            raise ValueError("features hold non-finite values")
        mean = batch.mean(axis=0) if len(batch) else np.zeros(batch.shape[1])
        centred = batch - mean
        self._combine(len(batch), mean, centred.T @ centred)
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """New statistics of the union of both streams; neither operand changes."""
        out = FeatureStats(self._dim)
        if self._n:
            out._combine(self._n, self._mean, self._m2)
        if other._dim is not None:
            out._combine(other._n, other._mean if other._n else np.zeros(other._dim), other._m2)
        return out

    @property
    def n(self) -> int:
        return self._n

    @property
    def dim(self) -> int | None:
        return self._dim

    @property
    def mean(self) -> np.ndarray:
        if self._n == 0:
            raise ValueError("no features accumulated")
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        """Unbiased covariance (divided by n - 1); needs at least two samples."""
        if self._n < 2:
            raise ValueError(f"a covariance needs at least 2 samples, have {self._n}")
        return self._m2 / (self._n - 1)

    def save(self, path: str | PathLike) -> None:
        """Write to an ``.npz`` file (n, mean, and the centred sum of squares for exact merging)."""
        if self._n == 0:
            raise ValueError("no features accumulated")
        np.savez(path, n=np.int64(self._n), mean=self._mean, m2=self._m2)

    @classmethod
    def load(cls, path: str | PathLike) -> FeatureStats:
        with np.load(path) as data:
            return cls._from_moments(int(data["n"]), data["mean"], data["m2"])

    def __repr__(self) -> str:
        return f"FeatureStats(n={self._n}, dim={self._dim})"


def _sqrtm(a: np.ndarray) -> np.ndarray | None:
    """Principal square root of ``a``, or None when it is non-finite or does not square back to ``a``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singularity warnings: the checks below decide
        try:
            root = linalg.sqrtm(a)
        except (linalg.LinAlgError, ValueError):
            return None
    if not np.isfinite(root).all():
        return None
    scale = max(float(np.linalg.norm(a)), np.finfo(np.float64).tiny)
    if float(np.linalg.norm(root @ root - a)) / scale > SQRTM_RELATIVE_TOLERANCE:
        return None
    return root


def frechet_distance(
    mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance ``||mu1 - mu2||² + tr(C1 + C2 - 2 (C1 C2)^½)`` between two Gaussians.

    When ``(C1 C2)^½`` cannot be computed accurately (singular product), ``eps * I`` is added to both
    covariances and it is computed again. Imaginary parts from rounding are dropped; large ones raise
    ValueError. The result can be a tiny negative number (rounding) for identical inputs.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    cov1 = np.atleast_2d(np.asarray(cov1, dtype=np.float64))
    cov2 = np.atleast_2d(np.asarray(cov2, dtype=np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, cov1 {cov1.shape}, mu2 {mu2.shape}, cov2 {cov2.shape}"
        )
    for name, arr in (("mu1", mu1), ("mu2", mu2), ("cov1", cov1), ("cov2", cov2)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} holds non-finite values")

    root = _sqrtm(cov1 @ cov2)
    if root is None:
        offset = np.eye(d) * eps
        root = _sqrtm((cov1 + offset) @ (cov2 + offset))
        if root is None:
            raise ValueError(f"cannot compute the square root of C1 C2, even with eps={eps} added")
    if np.iscomplexobj(root):
        diag = np.diagonal(root)
        limit = MAX_RELATIVE_IMAGINARY * max(1.0, float(np.abs(diag.real).max()))
        if float(np.abs(diag.imag).max()) > limit:
            raise ValueError(
                f"(C1 C2)^½ has a large imaginary component ({np.abs(diag.imag).max():.3g}); "
                "are the covariances symmetric positive semi-definite?"
            )
        root = root.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * np.trace(root))


def fid_from_stats(a: FeatureStats, b: FeatureStats, eps: float = 1e-6) -> float:
    return frechet_distance(a.mean, a.cov, b.mean, b.cov, eps=eps)


def fid_from_features(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussian fits of two feature sets [N, D] and [M, D]."""
    return fid_from_stats(FeatureStats.from_features(a), FeatureStats.from_features(b), eps=eps)
