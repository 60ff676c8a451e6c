"""Coverage and diversity of image sets on feature vectors: k-NN precision and recall, and the mean
pairwise distance of the images of one prompt (intra-prompt diversity).

**Precision and recall** (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
Assessing Generative Models"). Each set approximates its distribution's support by the union of
hyperspheres around its points, the radius of point ``φ`` being the distance to its k-th nearest
neighbour in its own set (the point itself not counted):

    f(φ, Φ) = 1  if  ‖φ − φ'‖₂ ≤ NN_k(φ', Φ) for at least one φ' ∈ Φ,  else 0
    precision(Φ_r, Φ_g) = mean over φ_g ∈ Φ_g of f(φ_g, Φ_r)
    recall(Φ_r, Φ_g)    = mean over φ_r ∈ Φ_r of f(φ_r, Φ_g)

with Φ_r the reference's (teacher's) features and Φ_g the model's. Precision is the share of the
model's samples that fall on the reference's manifold (fidelity); recall the share of the
reference's samples that fall on the model's (coverage, i.e. no mode dropped).

**Intra-prompt diversity**: for the ``K`` images of one prompt (``K`` seeds), the mean Euclidean
distance over the ``K (K − 1) / 2`` unordered pairs of their features, averaged over prompts.

Distances are computed in float64 from ``‖a‖² + ‖b‖² − 2 a·b`` (clamped at 0), after subtracting
the reference's mean from both sets (distances do not change; the cancellation error shrinks), in
row chunks of ``chunk_size``: memory is ``chunk_size × N`` doubles, so 5,000 × 5,000 points of
dimension 2,048 need ~40 MB of distances at the default chunk of 1,024 rows besides the features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_CHUNK",
    "DEFAULT_K",
    "PrecisionRecall",
    "intra_prompt_diversity",
    "knn_radii",
    "mean_pairwise_distance",
    "precision_recall",
    "within_spheres",
]

DEFAULT_K = 3
DEFAULT_CHUNK = 1024


def _as_points(x: np.ndarray | Sequence[Sequence[float]], name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]  # a list of scalars is a set of 1-d points
    if a.ndim != 2 or len(a) == 0:
        raise ValueError(f"{name}: expected a non-empty [N, D] array of features, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: features hold NaN or infinite values")
    return a


def _check_chunk(chunk_size: int) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def _distances(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """Euclidean distances [len(a), len(b)] (``b_sq``: squared norms of ``b``)."""
    d2 = np.einsum("ij,ij->i", a, a)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.maximum(d2, 0.0))


def knn_radii(features: np.ndarray, k: int = DEFAULT_K, chunk_size: int = DEFAULT_CHUNK) -> np.ndarray:
    """Per point, the distance to its k-th nearest neighbour among the *other* points of the set.

    The point's own zero distance is the smallest of its row, so the k-th neighbour is the
    (k+1)-th smallest distance of the row (duplicates of the point count as neighbours at 0).
    """
    x = _as_points(features, "features")
    _check_chunk(chunk_size)
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if len(x) <= k:
        raise ValueError(f"the k-th nearest neighbour needs more than k = {k} points, got {len(x)}")
    x = x - x.mean(axis=0)
    sq = np.einsum("ij,ij->i", x, x)
    radii = np.empty(len(x), dtype=np.float64)
    for start in range(0, len(x), chunk_size):
        d = _distances(x[start : start + chunk_size], x, sq)
        rows = np.arange(len(d))
        d[rows, start + rows] = 0.0  # exactly zero to itself, whatever the rounding
        radii[start : start + len(d)] = np.partition(d, k, axis=1)[:, k]
    return radii


def within_spheres(
    queries: np.ndarray,
    centres: np.ndarray,
    radii: np.ndarray,
    chunk_size: int = DEFAULT_CHUNK,
    shift: np.ndarray | None = None,
) -> np.ndarray:
    """Per query, whether it lies in at least one closed ball ``‖q − c_j‖ ≤ r_j`` (bool [len(queries)])."""
    q, c = _as_points(queries, "queries"), _as_points(centres, "centres")
    _check_chunk(chunk_size)
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"queries have dimension {q.shape[1]}, centres {c.shape[1]}")
    radii = np.asarray(radii, dtype=np.float64)
    if radii.shape != (len(c),):
        raise ValueError(f"expected {len(c)} radii, got shape {radii.shape}")
    shift = c.mean(axis=0) if shift is None else shift
    q, c = q - shift, c - shift
    c_sq = np.einsum("ij,ij->i", c, c)
    inside = np.empty(len(q), dtype=bool)
    for start in range(0, len(q), chunk_size):
        d = _distances(q[start : start + chunk_size], c, c_sq)
        inside[start : start + len(d)] = (d <= radii[None, :]).any(axis=1)
    return inside


@dataclass(frozen=True)
class PrecisionRecall:
    """Kynkäänniemi et al.'s precision and recall of a model's features against a reference's."""

    precision: float
    recall: float
    k: int
    n_model: int
    n_reference: int

    def record(self) -> dict[str, float | int | list[int] | str]:
        return {
            "precision": self.precision,
            "recall": self.recall,
            "k": self.k,
            "n": [self.n_model, self.n_reference],
            "distance": "euclidean",
        }


def precision_recall(
    reference: np.ndarray, model: np.ndarray, k: int = DEFAULT_K, chunk_size: int = DEFAULT_CHUNK
) -> PrecisionRecall:
    """Precision (model samples inside the reference's k-NN balls) and recall (reference samples
    inside the model's k-NN balls); both sets need more than ``k`` points and the same dimension."""
    ref, gen = _as_points(reference, "reference"), _as_points(model, "model")
    if ref.shape[1] != gen.shape[1]:
        raise ValueError(f"reference features have dimension {ref.shape[1]}, model features {gen.shape[1]}")
    shift = ref.mean(axis=0)
    ref_radii = knn_radii(ref, k, chunk_size)
    gen_radii = knn_radii(gen, k, chunk_size)
    precision = within_spheres(gen, ref, ref_radii, chunk_size, shift).mean()
    recall = within_spheres(ref, gen, gen_radii, chunk_size, shift).mean()
    return PrecisionRecall(float(precision), float(recall), int(k), len(gen), len(ref))


def mean_pairwise_distance(features: np.ndarray) -> float:
    """Mean Euclidean distance over the unordered pairs of rows of ``features`` (at least two rows)."""
    x = _as_points(features, "features")
    if len(x) < 2:
        raise ValueError(f"a pairwise distance needs at least 2 points, got {len(x)}")
    x = x - x.mean(axis=0)
    sq = np.einsum("ij,ij->i", x, x)
    d = _distances(x, x, sq)
    upper = np.triu_indices(len(x), k=1)
    return float(d[upper].mean())


def intra_prompt_diversity(groups: Sequence[np.ndarray] | np.ndarray) -> tuple[float, list[float]]:
    """(mean over prompts, per-prompt values) of :func:`mean_pairwise_distance` of each prompt's
    features; ``groups`` is [P, K, D] or a list of P arrays [K_p, D] (K_p >= 2)."""
    if len(groups) == 0:
        raise ValueError("intra-prompt diversity needs at least one prompt")
    per_prompt = [mean_pairwise_distance(g) for g in groups]
    return float(np.mean(per_prompt)), per_prompt
