"""Is one generator's accuracy really higher than another's? Intervals and a paired test.

When two generators draw the same prompts with the same seeds, each image pair is judged on the same
task, so the comparison is paired: only the pairs where exactly one of them is right carry
information (McNemar's test). The exact form (a binomial test on those discordant pairs) holds at
the small counts that low accuracies give.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (scipy's); stays inside [0, 1], sensible at 0 or n."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, {n}], got {successes}")
    ci = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


@dataclass(frozen=True)
class PairedTest:
    """Outcome of comparing two paired boolean verdicts ``a`` and ``b`` per item."""

    n: int
    a_right: int
    b_right: int
    a_only: int  # items a got right and b wrong
    b_only: int  # items b got right and a wrong
    p_value: float  # exact two-sided McNemar test

    def summary(self, a_name: str, b_name: str) -> str:
        lo_a, hi_a = wilson_interval(self.a_right, self.n)
        lo_b, hi_b = wilson_interval(self.b_right, self.n)
        return (
            f"{a_name} {100 * self.a_right / self.n:.1f} % [{100 * lo_a:.1f}, {100 * hi_a:.1f}] vs "
            f"{b_name} {100 * self.b_right / self.n:.1f} % [{100 * lo_b:.1f}, {100 * hi_b:.1f}] "
            f"(95 % Wilson intervals, N = {self.n}); right only for the {a_name}: {self.a_only}, "
            f"only for the {b_name}: {self.b_only}; exact McNemar p = {self.p_value:.2g}"
        )


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> PairedTest:
    """Exact McNemar test of paired verdicts (True = right): binomial(min(a_only, b_only); n_disc, 1/2)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"expected two non-empty 1-d verdict arrays of one length, got {a.shape}, {b.shape}")
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    discordant = a_only + b_only
    p = 1.0 if discordant == 0 else float(binomtest(min(a_only, b_only), discordant, 0.5).pvalue)
    return PairedTest(int(a.size), int(a.sum()), int(b.sum()), a_only, b_only, p)
