"""The paired percentile bootstrap (Efron & Tibshirani 1993) on hand-checkable cases."""

from __future__ import annotations

import math

import pytest

from mm_align.stats import paired_bootstrap


def test_constant_difference_collapses_the_interval():
    # every d_i = a_i − b_i = 0.5: every resample's mean is 0.5, so the interval is [0.5, 0.5]
    a = [1.5, 2.5, 3.5, 10.5]
    b = [1.0, 2.0, 3.0, 10.0]
    r = paired_bootstrap(a, b, n_boot=500)
    assert r["mean_diff"] == 0.5 and r["ci"] == [0.5, 0.5]
    assert (r["n"], r["n_boot"], r["level"], r["seed"]) == (4, 500, 0.95, 0)
    # a single pair: the one difference, with no spread
    assert paired_bootstrap([3.0], [1.0])["ci"] == [2.0, 2.0]


def test_symmetric_differences_give_an_interval_around_zero():
    # d = (−1, +1) × 10: mean 0; a resample's mean is (2k − 20)/20 for k ~ Binomial(20, ½), sd = 1/sqrt(20) ≈ 0.224,
    # so the 95% interval is about ±0.45 and holds 0
    b = [0.0] * 20
    a = [-1.0, 1.0] * 10
    r = paired_bootstrap(a, b)
    low, high = r["ci"]
    assert r["mean_diff"] == 0.0 and low < 0.0 < high
    assert low == pytest.approx(-0.45, abs=0.06) and high == pytest.approx(0.45, abs=0.06)
    # every resample mean is a multiple of 1/20 in [−1, 1], hence so are the percentiles
    assert -1.0 <= low and high <= 1.0 and math.isclose(low * 20, round(low * 20), abs_tol=1e-9)


def test_lower_is_better_flips_the_orientation():
    # WER-like: a makes fewer errors, so a is better and the oriented difference is positive
    a = [0.1, 0.2, 0.15]
    b = [0.3, 0.4, 0.35]
    higher = paired_bootstrap(a, b)
    lower = paired_bootstrap(a, b, higher_is_better=False)
    assert higher["mean_diff"] == pytest.approx(-0.2) and lower["mean_diff"] == pytest.approx(0.2)
    assert lower["ci"] == pytest.approx([-higher["ci"][1], -higher["ci"][0]])
    assert lower["ci"][0] > 0  # every difference is +0.2: improved


def test_deterministic_with_the_seed_and_ordered():
    a = [0.3, 1.2, -0.4, 2.2, 0.9, 1.7, 0.1, -0.2]
    b = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    first = paired_bootstrap(a, b, n_boot=2000, seed=3)
    assert paired_bootstrap(a, b, n_boot=2000, seed=3) == first
    other = paired_bootstrap(a, b, n_boot=2000, seed=4)
    assert other["mean_diff"] == first["mean_diff"] and other["ci"] != first["ci"]
    low, high = first["ci"]
    assert low <= first["mean_diff"] <= high
    narrow = paired_bootstrap(a, b, n_boot=2000, seed=3, level=0.5)["ci"]
    assert low <= narrow[0] <= narrow[1] <= high  # a lower level, a narrower interval


def test_errors():
    with pytest.raises(ValueError, match="paired scores: 2 vs 1"):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least one pair"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="level"):
        paired_bootstrap([1.0], [1.0], level=1.0)
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap([1.0], [1.0], n_boot=0)


def test_paired_comparison_flags_the_side_of_zero():
    from mm_align.stats import paired_comparison

    better = paired_comparison([1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0], n_boot=200)
    assert better["mean_diff"] == 1.0 and better["improved"] and not better["worse"]
    lower_better = paired_comparison([1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0], higher_is_better=False, n_boot=200)
    assert lower_better["worse"] and not lower_better["improved"]
