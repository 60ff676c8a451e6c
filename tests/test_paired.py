"""Intervals and the paired test used to state accuracy margins, against hand-computed values."""

import math

import numpy as np
import pytest

from senseflow.metrics.paired import mcnemar_exact, wilson_interval


def test_wilson_interval_closed_form():
    # 8 of 10 at z = 1.959964: centre (0.8 + z²/20) / (1 + z²/10), half-width as in Wilson (1927).
    z = 1.959963984540054
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z * math.sqrt(0.8 * 0.2 / 10 + z * z / 400) / (1 + z * z / 10)
    assert wilson_interval(8, 10) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # published table value
    lo, hi = wilson_interval(0, 50)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(z * z / 50 / (1 + z * z / 50))
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_mcnemar_exact_by_hand():
    # 8 pairs right only for a, 1 only for b, 20 concordant: p = 2 * (C(9,0) + C(9,1)) / 2^9.
    a = np.array([True] * 8 + [False] + [True] * 10 + [False] * 10)
    b = np.array([False] * 8 + [True] + [True] * 10 + [False] * 10)
    test = mcnemar_exact(a, b)
    assert (test.n, test.a_right, test.b_right, test.a_only, test.b_only) == (29, 18, 11, 8, 1)
    assert test.p_value == pytest.approx(2 * (1 + 9) / 512)
    assert mcnemar_exact(a, a).p_value == 1.0  # no discordant pair: no evidence either way
    assert "exact McNemar p = 0.039" in test.summary("student", "teacher")
    with pytest.raises(ValueError, match="one length"):
        mcnemar_exact(a, b[:-1])
