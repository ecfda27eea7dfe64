"""Statistics for before/after benchmarks: win rates with confidence intervals, means with intervals.

Win rate of A over B on a prompt set (FORMATS_AND_EVALUATORS.md): the same seed per prompt for both,
``#(score_A > score_B) / N``, ties counted for neither. Because a bounded score (an oracle that
gives 1.0 to every correct image) can tie on most prompts, the decisive win rate
``wins / (wins + losses)`` is reported too; both come with a 95% Wilson score interval
(Wilson 1927), which stays inside [0, 1] and is sound at small counts and rates near 0 or 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["WinRate", "win_rate", "wilson_interval", "mean_interval"]

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
