"""Win rates and Wilson intervals against hand-computed values."""

from __future__ import annotations

import math

import pytest

from mm_align.stats import mean_interval, wilson_interval, win_rate


def test_wilson_interval_hand_values():
    # n = 10, 7 successes: p = .7, z² = 3.8415; centre = (.7 + .19207)/1.38415 = .64449;
    # half = 1.96·sqrt(.021 + .0096037)/1.38415 = .24772 → (.39677, .89221)
    low, high = wilson_interval(7, 10)
    assert low == pytest.approx(0.39677, abs=1e-4) and high == pytest.approx(0.89221, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(0, 20)
    assert low == 0.0 and 0 < high < 0.2  # never below 0
    low, high = wilson_interval(20, 20)
    assert high == pytest.approx(1.0) and low > 0.8


def test_win_rate_counts_ties_for_neither():
    a = [1.0, 2.0, 3.0, 4.0, 5.0]
    b = [0.5, 2.0, 3.5, 1.0, 5.0]
    w = win_rate(a, b)
    assert (w.wins, w.losses, w.ties, w.n) == (2, 1, 2, 5)
    assert w.rate == pytest.approx(2 / 5) and w.decisive_rate == pytest.approx(2 / 3)
    assert w.ci == wilson_interval(2, 5) and w.decisive_ci == wilson_interval(2, 3)
    lower = win_rate(a, b, higher_is_better=False)
    assert (lower.wins, lower.losses) == (1, 2)
    assert win_rate([1.0], [1.05], tol=0.1).ties == 1
    with pytest.raises(ValueError, match="paired"):
        win_rate([1.0], [1.0, 2.0])
    assert win_rate([1.0, 1.0], [1.0, 1.0]).decisive_rate == 0.5


def test_mean_interval():
    mean, low, high = mean_interval([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(5 / 3)
    assert mean == 2.5 and high - mean == pytest.approx(1.959964 * sd / 2, rel=1e-5)
    assert math.isnan(mean_interval([])[0])
