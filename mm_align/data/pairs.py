"""Build preference pairs from scored candidates (sample N per prompt, score, pair).

A pair (w, l) is kept only when w beats l on EVERY metric by more than that metric's margin
(unanimous, no weighted sum; GenSR-Pref, ALGORITHMS.md §7). Equal scores are ties: never a win,
dropped and counted. Everything discarded is counted by reason.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Candidate", "MetricRule", "BuiltPair", "PairBuildResult", "build_pairs", "compare"]


@dataclass
class Candidate:
    group: str  # pairs are built within a group (e.g. one prompt)
    sample: Any
    scores: dict[str, float]


@dataclass
class MetricRule:
    name: str
    higher_is_better: bool = True
    margin: float = 0.0  # the winner must beat the loser by MORE than this


@dataclass
class BuiltPair:
    group: str
    chosen: Candidate
    rejected: Candidate
    gaps: dict[str, float]  # oriented: positive = the chosen is better


@dataclass
class PairBuildResult:
    pairs: list[BuiltPair]
    discarded: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    groups: int = 0

    def _count(self, reason: str, group: str) -> None:
        self.discarded[reason] = self.discarded.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 5 and group not in ex:
            ex.append(group)

    def summary(self) -> str:
        lines = [f"kept {len(self.pairs)} pairs from {self.groups} groups"]
        for reason, n in sorted(self.discarded.items()):
            lines.append(f"  discarded ({reason}): {n}  e.g. {', '.join(self.examples.get(reason, []))}")
        return "\n".join(lines)


def _gap(a: Candidate, b: Candidate, rule: MetricRule) -> float:
    d = a.scores[rule.name] - b.scores[rule.name]
    return d if rule.higher_is_better else -d


def compare(a: Candidate, b: Candidate, rules: list[MetricRule]) -> tuple[Literal["a", "b"] | None, str]:
    """Which of ``a``, ``b`` wins unanimously, or None and why (tie, below_margin, not_unanimous)."""
    gaps = [_gap(a, b, r) for r in rules]
    if any(g == 0 for g in gaps):
        return None, "tie"
    if all(g > 0 for g in gaps) or all(g < 0 for g in gaps):
        sign = 1 if gaps[0] > 0 else -1
        if all(sign * g > r.margin for g, r in zip(gaps, rules)):
            return ("a" if sign > 0 else "b"), ""
        return None, "below_margin"
    return None, "not_unanimous"


def _validate(rules: list[MetricRule]) -> None:
    if not rules:
        raise ValueError("build_pairs needs at least one MetricRule")
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate metric names in rules: {names}")
    for r in rules:
        if r.margin < 0:
            raise ValueError(f"metric '{r.name}': margin must be >= 0, got {r.margin}")


def build_pairs(
    candidates: Iterable[Candidate],
    rules: list[MetricRule],
    strategy: Literal["best_vs_worst", "all_pairs"] = "best_vs_worst",
) -> PairBuildResult:
    """Pairs within each group, kept only when the winner beats the loser on every rule.

    ``best_vs_worst``: one pair per group — among the ordered pairs that pass every rule, the one
    with the largest gap on the FIRST rule (ties: input order); if none passes, the group counts
    under the reason of its (first-rule best, first-rule worst) pair. ``all_pairs``: every
    unordered pair that passes, each failure counted per pair. Candidates with a missing or
    non-finite score are dropped and counted.
    """
    _validate(rules)
    if strategy not in ("best_vs_worst", "all_pairs"):
        raise ValueError(f"unknown strategy '{strategy}'; valid: best_vs_worst, all_pairs")
    groups: dict[str, list[Candidate]] = {}
    result = PairBuildResult([])
    for c in candidates:
        group = groups.setdefault(c.group, [])
        if any(r.name not in c.scores for r in rules):
            result._count("missing_metric", c.group)
            continue
        if any(not math.isfinite(float(c.scores[r.name])) for r in rules):
            result._count("non_finite_score", c.group)
            continue
        group.append(c)
    result.groups = len(groups)
    first = rules[0]
    for gid, members in groups.items():
        if len(members) < 2:
            result._count("single_candidate", gid)
            continue
        if strategy == "all_pairs":
            for i in range(len(members)):
                for j in range(i + 1, len(members)):
                    a, b = members[i], members[j]
                    winner, reason = compare(a, b, rules)
                    if winner is None:
                        result._count(reason, gid)
                        continue
                    w, l = (a, b) if winner == "a" else (b, a)
                    result.pairs.append(BuiltPair(gid, w, l, {r.name: _gap(w, l, r) for r in rules}))
            continue
        best: tuple[float, Candidate, Candidate] | None = None
        for i, a in enumerate(members):
            for b in members[i + 1 :]:
                winner, _ = compare(a, b, rules)
                if winner is None:
                    continue
                w, l = (a, b) if winner == "a" else (b, a)
                g = _gap(w, l, first)
                if best is None or g > best[0]:
                    best = (g, w, l)
        if best is None:
            key = (lambda c: c.scores[first.name]) if first.higher_is_better else (lambda c: -c.scores[first.name])
            top = max(members, key=key)
            bottom = min(members, key=key)
            _, reason = compare(top, bottom, rules) if top is not bottom else (None, "tie")
            result._count(reason or "tie", gid)
            continue
        _, w, l = best
        result.pairs.append(BuiltPair(gid, w, l, {r.name: _gap(w, l, r) for r in rules}))
    return result
