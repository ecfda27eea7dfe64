"""Statistics for before/after benchmarks: win rates with confidence intervals, means with intervals.

Win rate of A over B on a prompt set (FORMATS_AND_EVALUATORS.md): the same seed per prompt for both,
``#(score_A > score_B) / N``, ties counted for neither. Because a bounded score (an oracle that
gives 1.0 to every correct image) can tie on most prompts, the decisive win rate
``wins / (wins + losses)`` is reported too; both come with a 95% Wilson score interval
(Wilson 1927), which stays inside [0, 1] and is sound at small counts and rates near 0 or 1.

The mean difference of two systems scored on the same clips (``mm-align bench speech``) comes with a percentile
bootstrap interval of the paired differences (:func:`paired_bootstrap`, Efron & Tibshirani 1993), which assumes
no distribution of the differences (a speech metric's per-clip differences are often skewed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["WinRate", "win_rate", "wilson_interval", "mean_interval", "paired_bootstrap", "paired_comparison"]

Z95 = 1.959963984540054  # the two-sided 95% normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion: ``(p̂ + z²/2n ± z·sqrt(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n)``.

    Returns ``(0.0, 1.0)`` when ``n == 0``.
    """
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class WinRate:
    """A over B on N paired scores."""

    wins: int
    losses: int
    ties: int
    rate: float  # wins / N (ties count for neither)
    ci: tuple[float, float]  # Wilson 95% of wins / N
    decisive_rate: float  # wins / (wins + losses); 0.5 when every prompt ties
    decisive_ci: tuple[float, float]

    @property
    def n(self) -> int:
        return self.wins + self.losses + self.ties

    def to_dict(self) -> dict:
        return {**asdict(self), "n": self.n}


def win_rate(a: Sequence[float], b: Sequence[float], higher_is_better: bool = True, tol: float = 0.0) -> WinRate:
    """Win rate of scores ``a`` over ``b`` (same prompts, same seeds, in the same order).

    ``|a − b| <= tol`` is a tie. Raises ValueError when the lengths differ.
    """
    if len(a) != len(b):
        raise ValueError(f"win_rate needs paired scores: {len(a)} vs {len(b)}")
    sign = 1.0 if higher_is_better else -1.0
    wins = losses = ties = 0
    for x, y in zip(a, b):
        d = sign * (float(x) - float(y))
        if abs(d) <= tol:
            ties += 1
        elif d > 0:
            wins += 1
        else:
            losses += 1
    n = wins + losses + ties
    decisive = wins + losses
    return WinRate(
        wins, losses, ties,
        rate=wins / n if n else 0.0, ci=wilson_interval(wins, n),
        decisive_rate=wins / decisive if decisive else 0.5, decisive_ci=wilson_interval(wins, decisive),
    )


def mean_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the normal-approximation 95% interval of the mean (sample std / sqrt(n))."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = z * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_bootstrap(a: Sequence[float], b: Sequence[float], higher_is_better: bool = True, n_boot: int = 10000,
                     seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """The mean paired difference of ``a`` over ``b`` with a percentile bootstrap interval.

    The percentile bootstrap of a paired mean difference (Efron & Tibshirani, "An Introduction to the Bootstrap",
    1993, ch. 13): with oriented differences ``d_i = s · (a_i − b_i)`` (``s = +1`` when higher is better, ``−1``
    when lower is, so a positive difference always means ``a`` is better), ``n_boot`` resamples of the ``n``
    differences are drawn with replacement, and the interval is the ``(1 − level)/2`` and ``(1 + level)/2``
    quantiles of their means. Resampling the DIFFERENCES keeps the pairing (the same clip, the same seed, for
    both systems), so the clip-to-clip variance both share cancels. The resamples come from
    ``numpy.random.default_rng(seed)``: the same inputs and seed give the same interval.

    Args:
        a: the scores of the system compared, one per item.
        b: the scores of the reference system on the same items, in the same order.
        higher_is_better: the metric's direction.
        n_boot: bootstrap resamples.
        seed: the resampling seed.
        level: the interval's coverage, in (0, 1).

    Returns:
        ``{"mean_diff", "ci": [low, high], "n", "n_boot", "level", "seed"}``; ``mean_diff`` is the mean of the
        oriented differences (positive: ``a`` is better).

    Raises:
        ValueError: the lengths differ, there are no items, a score is not finite, or ``n_boot`` / ``level`` are
            out of range.
    """
    import numpy as np

    if len(a) != len(b):
        raise ValueError(f"paired_bootstrap needs paired scores: {len(a)} vs {len(b)}")
    n = len(a)
    if n == 0:
        raise ValueError("paired_bootstrap needs at least one pair of scores, got none")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    d = (np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) * (1.0 if higher_is_better else -1.0)
    if not np.all(np.isfinite(d)):
        raise ValueError(f"paired_bootstrap needs finite scores; pair(s) {np.flatnonzero(~np.isfinite(d)).tolist()} "
                         "are not")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    rows = max(1, 2_000_000 // n)  # resamples per draw: at most ~2M indices (16 MB) at a time
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        idx = rng.integers(0, n, size=(stop - start, n))  # (resamples, n) indices into d
        means[start:stop] = d[idx].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return {"mean_diff": float(d.mean()), "ci": [float(low), float(high)], "n": n, "n_boot": int(n_boot),
            "level": float(level), "seed": int(seed)}


def paired_comparison(a: Sequence[float], b: Sequence[float], higher_is_better: bool = True, n_boot: int = 10000,
                      seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """:func:`paired_bootstrap` of ``a`` over ``b``, flagged ``improved`` when the interval lies wholly above 0 and
    ``worse`` when wholly below (what every bench command reports per model and metric)."""
    vs = paired_bootstrap(a, b, higher_is_better=higher_is_better, n_boot=n_boot, seed=seed, level=level)
    return {**vs, "improved": vs["ci"][0] > 0, "worse": vs["ci"][1] < 0}
