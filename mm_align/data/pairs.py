"""Build preference pairs from scored candidates (sample N per prompt, score each, pair them).

A pair (w, l) is kept only when w beats l on EVERY metric by more than that metric's margin:
unanimous, no weighted sum (GenSR-Pref, ALGORITHMS.md §7 — single-metric pairs improve their own
metric and degrade the others). Equal scores on any metric are a tie: never a win. Everything that
is discarded is counted by reason:

- ``"missing_metric"``: a candidate lacks a rule's metric (the candidate is dropped; counted per candidate);
- ``"non_finite_score"``: a candidate has a NaN/inf (or non-numeric) score (dropped; counted per candidate);
- ``"single_candidate"``: a group with fewer than 2 usable candidates (counted per group);
- ``"tie"``: equal scores on some metric;
- ``"below_margin"``: one candidate is better on every metric, but not by more than some margin;
- ``"not_unanimous"``: each candidate wins on some metric.

The last three are counted per group (``best_vs_worst``) or per candidate pair (``all_pairs``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

logger = logging.getLogger(__name__)

__all__ = [
    "Candidate",
    "MetricRule",
    "BuiltPair",
    "PairBuildResult",
    "build_pairs",
    "unanimous_winner",
    "compare",
    "DISCARD_REASONS",
]

DISCARD_REASONS = ("single_candidate", "tie", "below_margin", "not_unanimous", "non_finite_score", "missing_metric")
_MAX_EXAMPLES = 5


@dataclass
class Candidate:
    """One generated sample and its scores.

    Args:
        group: Pairs are built within a group (e.g. the prompt id).
        sample: The sample itself or a reference to it (path, text, id).
        scores: Metric name -> score.
    """

    group: str
    sample: Any
    scores: dict[str, float]


@dataclass
class MetricRule:
    """How one metric decides a winner.

    Args:
        name: The metric (a key of :attr:`Candidate.scores`).
        higher_is_better: ``False`` for errors and distances (WER, log-spectral distance).
        margin: The winner must beat the loser by MORE than this (strictly), so 0 means a strict win.
    """

    name: str
    higher_is_better: bool = True
    margin: float = 0.0


@dataclass
class BuiltPair:
    """A kept pair; ``gaps[metric]`` is oriented so that positive means the chosen one is better."""

    group: str
    chosen: Candidate
    rejected: Candidate
    gaps: dict[str, float]


@dataclass
class PairBuildResult:
    """The kept pairs and everything discarded, counted by reason (see the module docstring)."""

    pairs: list[BuiltPair] = field(default_factory=list)
    discarded: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> up to 5 group ids
    groups: int = 0

    def _count(self, reason: str, group: Any) -> None:
        self.discarded[reason] = self.discarded.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < _MAX_EXAMPLES and str(group) not in ex:
            ex.append(str(group))

    def summary(self) -> str:
        """Human-readable lines: how many pairs were kept from how many groups, then each discard reason.

        Returns:
            `str`: e.g. ``"kept 3 pairs from 5 groups\\ndiscarded:\\n  tie: 1 (e.g. p2)"``.
        """
        lines = [f"kept {len(self.pairs)} pairs from {self.groups} groups"]
        if self.discarded:
            lines.append("discarded:")
            for reason, n in self.discarded.items():
                lines.append(f"  {reason}: {n} (e.g. {', '.join(self.examples.get(reason, []))})")
        return "\n".join(lines)


def _gap(a: Candidate, b: Candidate, rule: MetricRule) -> float:
    """How much better ``a`` is than ``b`` on ``rule`` (positive: ``a`` better)."""
    d = float(a.scores[rule.name]) - float(b.scores[rule.name])
    return d if rule.higher_is_better else -d


def unanimous_winner(
    a: Candidate, b: Candidate, rules: Sequence[MetricRule]
) -> tuple[Literal["a", "b"] | None, str | None]:
    """Which of two candidates beats the other on every rule by more than its margin.

    Args:
        a: A candidate with every rule's metric (finite scores).
        b: Another one.
        rules: The metrics; all must agree.

    Returns:
        ``("a", None)`` or ``("b", None)`` for a unanimous winner, else ``(None, reason)`` with reason
        ``"tie"`` (equal on some metric; takes precedence), ``"not_unanimous"`` (each wins on some
        metric) or ``"below_margin"`` (one is better everywhere, not by more than every margin).
    """
    gaps = [_gap(a, b, r) for r in rules]
    if any(g == 0 for g in gaps):
        return None, "tie"
    if not (all(g > 0 for g in gaps) or all(g < 0 for g in gaps)):
        return None, "not_unanimous"
    sign = 1.0 if gaps[0] > 0 else -1.0
    if all(sign * g > r.margin for g, r in zip(gaps, rules)):
        return ("a" if sign > 0 else "b"), None
    return None, "below_margin"


compare = unanimous_winner  # the name this function had in the first commit


def _validate(rules: Sequence[MetricRule], strategy: str) -> None:
    if not rules:
        raise ValueError("build_pairs needs at least one MetricRule")
    names = [r.name for r in rules]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate metric names in rules: {duplicates}")
    for r in rules:
        if not math.isfinite(r.margin) or r.margin < 0:
            raise ValueError(f"metric '{r.name}': margin must be a finite number >= 0, got {r.margin}")
    if strategy not in ("best_vs_worst", "all_pairs"):
        raise ValueError(f"unknown strategy '{strategy}'; valid: best_vs_worst, all_pairs")


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _built(group: str, w: Candidate, l: Candidate, rules: Sequence[MetricRule]) -> BuiltPair:
    return BuiltPair(group, w, l, {r.name: _gap(w, l, r) for r in rules})


def build_pairs(
    candidates: Iterable[Candidate],
    rules: list[MetricRule],
    strategy: Literal["best_vs_worst", "all_pairs"] = "best_vs_worst",
) -> PairBuildResult:
    """Build pairs within each group, keeping a pair only when its winner beats its loser on every rule.

    Args:
        candidates: Scored candidates; their ``group`` says which may be paired.
        rules: The metrics, each with its direction and margin. All must agree (unanimity).
        strategy: ``"best_vs_worst"``: at most one pair per group. With one rule it is the group's best
            against its worst (the first in input order among equal scores); with several, among all
            ordered pairs that satisfy every rule, the one with the largest gap on the FIRST rule (ties:
            the pair found first in input order). A group with no valid pair is counted once, under the
            reason of its (first-rule best, first-rule worst) pair. ``"all_pairs"``: every unordered pair
            that satisfies every rule, oriented winner first; each failing pair is counted.

    Returns:
        :class:`PairBuildResult`: pairs in group order of first appearance, then input order; discard
        counts and example group ids per reason.

    Raises:
        ValueError: No rules, duplicate metric names, a negative or non-finite margin, an unknown strategy.
    """
    _validate(rules, strategy)
    result = PairBuildResult()
    groups: dict[str, list[Candidate]] = {}
    for c in candidates:
        members = groups.setdefault(c.group, [])
        missing = [r.name for r in rules if r.name not in c.scores]
        if missing:
            logger.debug("group %s: candidate %r lacks metric(s) %s; dropped", c.group, c.sample, missing)
            result._count("missing_metric", c.group)
            continue
        bad = [r.name for r in rules if not _finite(c.scores[r.name])]
        if bad:
            logger.debug("group %s: candidate %r has non-finite %s; dropped", c.group, c.sample, bad)
            result._count("non_finite_score", c.group)
            continue
        members.append(c)
    result.groups = len(groups)
    first = rules[0]
    for gid, members in groups.items():
        if len(members) < 2:
            result._count("single_candidate", gid)
            continue
        if strategy == "all_pairs":
            for i, a in enumerate(members):
                for b in members[i + 1 :]:
                    winner, reason = unanimous_winner(a, b, rules)
                    if winner is None:
                        result._count(reason or "tie", gid)
                    else:
                        result.pairs.append(_built(gid, *((a, b) if winner == "a" else (b, a)), rules))
            continue
        best: tuple[float, Candidate, Candidate] | None = None
        for i, a in enumerate(members):
            for b in members[i + 1 :]:
                winner, _ = unanimous_winner(a, b, rules)
                if winner is None:
                    continue
                w, l = (a, b) if winner == "a" else (b, a)
                g = _gap(w, l, first)
                if best is None or g > best[0]:
                    best = (g, w, l)
        if best is not None:
            result.pairs.append(_built(gid, best[1], best[2], rules))
            continue
        sign = 1.0 if first.higher_is_better else -1.0
        top = max(members, key=lambda c: sign * float(c.scores[first.name]))
        bottom = min(members, key=lambda c: sign * float(c.scores[first.name]))
        reason = "tie" if top is bottom else unanimous_winner(top, bottom, rules)[1]
        result._count(reason or "tie", gid)
    if result.discarded:
        logger.info("%s", result.summary())
    return result
