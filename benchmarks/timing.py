"""Timing rounds for the step benchmarks: interleaved rounds, medians, and ratios two ways.

A round runs one step of each variant back to back, in an order that changes between rounds (``alternating``
or ``rotating``), so drift and bursts of load on a shared machine hit every variant alike. Two ways to turn the
times into ratios, both reported by the benchmarks:

- the ratio of the medians: ``ratios(medians(times))``;
- the median over rounds of each round's own ratio: ``median_of_ratios(per_round_ratios(times, ratios))``. The
  steps of a round ran at the same time, so this pairs them; under right-skewed bursts of load the median of one
  long step exceeds the sum of the medians of two short ones, which biases the ratio of medians.

Imported as ``timing``: ``benchmarks/run.py`` and ``python benchmarks/NAME.py`` both put ``benchmarks/`` on
``sys.path``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

Order = Callable[[tuple[str, ...], int], tuple[str, ...]]
Ratios = Callable[[dict[str, float]], dict[str, float]]


def alternating(variants: tuple[str, ...], r: int) -> tuple[str, ...]:
    """The order of round ``r``: ``variants`` in even rounds, reversed in odd ones."""
    return variants if r % 2 == 0 else variants[::-1]


def rotating(variants: tuple[str, ...], r: int) -> tuple[str, ...]:
    """The order of round ``r``: ``variants`` rotated left by ``r``, reversed in odd rounds (so no variant always
    follows the same one)."""
    k = r % len(variants)
    order = variants[k:] + variants[:k]
    return order if r % 2 == 0 else order[::-1]


def warm_up(step: Callable[[str], None], variants: Sequence[str], steps: int) -> None:
    """``steps`` untimed steps of each variant, one variant after the other."""
    for v in variants:
        for _ in range(steps):
            step(v)


def time_rounds(
    step: Callable[[str], None],
    variants: tuple[str, ...],
    rounds: int,
    *,
    order: Order = alternating,
    repeat: int = 1,
    clock: Callable[[], float] = time.perf_counter,
    after_round: Callable[[int, dict[str, list[float]]], None] | None = None,
) -> dict[str, list[float]]:
    """Times of ``step(variant)`` in ``rounds`` interleaved rounds.

    Args:
        step: runs one step of the variant it is given (and waits for it to finish).
        variants: the variants, in the order of the result's keys.
        rounds: how many rounds.
        order: the order of round ``r``, as ``order(variants, r)``.
        repeat: consecutive steps of each variant per round (the i-th times of the variants are then no longer
            one round: per-round ratios want ``repeat=1``).
        clock: the clock read before and after each step (``time.perf_counter``: wall time;
            ``time.process_time``: CPU time).
        after_round: called as ``after_round(r, times)`` after round ``r`` (0-based), e.g. to log progress.

    Returns:
        ``{variant: [seconds per step, in the order run]}``, ``rounds * repeat`` times per variant.
    """
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(rounds):
        for v in order(variants, r):
            for _ in range(repeat):
                t0 = clock()
                step(v)
                times[v].append(clock() - t0)
        if after_round is not None:
            after_round(r, times)
    return times


def medians(times: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """The median time of each variant."""
    return {v: statistics.median(t) for v, t in times.items()}


def fastest(times: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """The fastest time of each variant."""
    return {v: min(t) for v, t in times.items()}


def per_round_ratios(times: Mapping[str, Sequence[float]], ratios: Ratios) -> list[dict[str, float]]:
    """``ratios`` of each round's own times: round ``i`` is the ``i``-th time of every variant."""
    n = min(len(t) for t in times.values())
    return [ratios({v: t[i] for v, t in times.items()}) for i in range(n)]


def median_of_ratios(rounds: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The median over rounds of each ratio (``rounds`` from :func:`per_round_ratios`)."""
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def format_times(seconds: Mapping[str, float]) -> str:
    """``"variant 0.1234, ..."``: one time per variant, for a progress line."""
    return ", ".join(f"{v} {t:.4f}" for v, t in seconds.items())
