"""benchmarks/timing.py: round orders, interleaved timing with a fake clock, medians and the two kinds of ratio.

Imported the way ``benchmarks/run.py`` imports a benchmark: ``benchmarks/`` on ``sys.path``, then by name
(appended, so that its modules shadow nothing for the other tests).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.append(str(BENCHMARKS))

timing = importlib.import_module("timing")


def test_alternating_reverses_odd_rounds():
    v = ("a", "b", "c")
    assert [timing.alternating(v, r) for r in range(3)] == [("a", "b", "c"), ("c", "b", "a"), ("a", "b", "c")]


def test_rotating_rotates_left_and_reverses_odd_rounds():
    v = ("a", "b", "c")
    # r=0: abc; r=1: bca reversed = acb; r=2: cab; r=3: abc reversed = cba
    assert [timing.rotating(v, r) for r in range(4)] == [("a", "b", "c"), ("a", "c", "b"), ("c", "a", "b"),
                                                         ("c", "b", "a")]


class _FakeClock:
    """A clock that only a step moves: variant ``v``'s n-th step (1-based, counted over all variants) takes
    ``cost[v] * n`` seconds."""

    def __init__(self, cost: dict[str, float]) -> None:
        self.now, self.n, self.cost, self.calls = 0.0, 0, cost, []

    def __call__(self) -> float:
        return self.now

    def step(self, v: str) -> None:
        self.n += 1
        self.now += self.cost[v] * self.n
        self.calls.append(v)


def test_time_rounds_interleaves_times_each_step_and_reports_each_round():
    clock = _FakeClock({"a": 1.0, "b": 10.0})
    seen = []
    times = timing.time_rounds(clock.step, ("a", "b"), 3, clock=clock,
                               after_round=lambda r, t: seen.append((r, {k: len(x) for k, x in t.items()})))
    assert clock.calls == ["a", "b", "b", "a", "a", "b"]  # alternating
    # steps n = 1..6: a1 = 1, b2 = 20, b3 = 30, a4 = 4, a5 = 5, b6 = 60
    assert times == {"a": [1.0, 4.0, 5.0], "b": [20.0, 30.0, 60.0]}
    assert seen == [(0, {"a": 1, "b": 1}), (1, {"a": 2, "b": 2}), (2, {"a": 3, "b": 3})]


def test_time_rounds_repeat_runs_consecutive_steps_of_a_variant():
    clock = _FakeClock({"a": 1.0, "b": 10.0})
    times = timing.time_rounds(clock.step, ("a", "b"), 2, repeat=2, order=timing.rotating, clock=clock)
    assert clock.calls == ["a", "a", "b", "b", "a", "a", "b", "b"]  # rotating, 2 variants: r=1 is ba reversed = ab
    assert times == {"a": [1.0, 2.0, 5.0, 6.0], "b": [30.0, 40.0, 70.0, 80.0]}


def test_warm_up_steps_each_variant_in_turn():
    calls = []
    timing.warm_up(calls.append, ("a", "b"), 2)
    assert calls == ["a", "a", "b", "b"]


def test_medians_fastest_and_the_two_kinds_of_ratio():
    times = {"a": [1.0, 3.0, 2.0], "b": [2.0, 2.0, 8.0]}

    def ratios(t):
        return {"a / b": t["a"] / t["b"]}

    assert timing.medians(times) == {"a": 2.0, "b": 2.0}
    assert timing.fastest(times) == {"a": 1.0, "b": 2.0}
    rounds = timing.per_round_ratios(times, ratios)
    assert rounds == [{"a / b": 0.5}, {"a / b": 1.5}, {"a / b": 0.25}]
    assert timing.median_of_ratios(rounds) == {"a / b": 0.5}  # median of 0.5, 1.5, 0.25
    assert ratios(timing.medians(times)) == {"a / b": 1.0}  # ratio of the medians 2 / 2


def test_format_times():
    assert timing.format_times({"a": 0.12345, "b": 2.0}) == "a 0.1235, b 2.0000"


@pytest.mark.parametrize("name", ["image_step", "speech_flow_step", "speech_token_step"])
def test_the_step_benchmarks_import_with_the_shared_timing(name):
    module = importlib.import_module(name)
    assert module.time_rounds is timing.time_rounds
