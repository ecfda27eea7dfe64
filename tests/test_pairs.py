"""The pair builder: unanimous multi-metric pairs (ALGORITHMS.md §7), every discard reason counted."""

import math

import pytest

from mm_align.data import BuiltPair, Candidate, MetricRule, build_pairs, unanimous_winner

Q = MetricRule("quality")  # higher is better
WER = MetricRule("wer", higher_is_better=False, margin=0.05)  # lower is better, must win by > 0.05


def C(group, sample, **scores):
    return Candidate(group, sample, scores)


def _ids(pair: BuiltPair):
    return pair.group, pair.chosen.sample, pair.rejected.sample


def test_single_rule_best_vs_worst_and_every_group_reason():
    candidates = [
        C("ok", "a", quality=0.2), C("ok", "b", quality=0.9), C("ok", "c", quality=0.5),
        C("alone", "d", quality=1.0),
        C("flat", "e", quality=0.7), C("flat", "f", quality=0.7),
        C("close", "g", quality=0.50), C("close", "h", quality=0.55),
    ]
    result = build_pairs(candidates, [MetricRule("quality", margin=0.1)])
    assert [_ids(p) for p in result.pairs] == [("ok", "b", "a")]
    assert result.pairs[0].gaps == {"quality": pytest.approx(0.7)}
    assert result.discarded == {"single_candidate": 1, "tie": 1, "below_margin": 1}
    assert result.examples == {"single_candidate": ["alone"], "tie": ["flat"], "below_margin": ["close"]}
    assert result.groups == 4


def test_margin_is_strict():
    rule = MetricRule("quality", margin=0.5)
    exactly = build_pairs([C("g", "a", quality=1.0), C("g", "b", quality=1.5)], [rule])
    assert exactly.pairs == [] and exactly.discarded == {"below_margin": 1}
    above = build_pairs([C("g", "a", quality=1.0), C("g", "b", quality=1.5001)], [rule])
    assert [_ids(p) for p in above.pairs] == [("g", "b", "a")]


def test_two_metrics_mixed_directions_need_unanimity():
    # q: higher is better; wer: lower is better with margin 0.05.
    # x is the best on quality but the worst on WER: it must never be paired either way.
    group = [
        C("g", "w", quality=4.0, wer=0.10),
        C("g", "l", quality=3.0, wer=0.30),
        C("g", "x", quality=4.5, wer=0.40),
    ]
    best = build_pairs(group, [Q, WER])
    assert [_ids(p) for p in best.pairs] == [("g", "w", "l")]
    assert best.pairs[0].gaps == {"quality": pytest.approx(1.0), "wer": pytest.approx(0.2)}  # positive = winner better
    assert best.discarded == {}
    every = build_pairs(group, [Q, WER], strategy="all_pairs")
    assert [_ids(p) for p in every.pairs] == [("g", "w", "l")]
    assert every.discarded == {"not_unanimous": 2}
    assert all("x" not in (p.chosen.sample, p.rejected.sample) for p in every.pairs)


def test_wins_on_one_metric_loses_on_the_other_is_never_paired():
    group = [C("g", "a", quality=5.0, wer=0.5), C("g", "b", quality=1.0, wer=0.1)]
    for strategy in ("best_vs_worst", "all_pairs"):
        result = build_pairs(group, [Q, WER], strategy=strategy)
        assert result.pairs == [] and result.discarded == {"not_unanimous": 1}
    assert unanimous_winner(group[0], group[1], [Q, WER]) == (None, "not_unanimous")


def test_per_metric_margins():
    # wer gap 0.02 <= 0.05: below the WER margin although quality wins by a lot
    group = [C("g", "a", quality=4.0, wer=0.10), C("g", "b", quality=3.0, wer=0.12)]
    assert build_pairs(group, [Q, WER]).discarded == {"below_margin": 1}
    loose = MetricRule("wer", higher_is_better=False, margin=0.01)
    assert [_ids(p) for p in build_pairs(group, [Q, loose]).pairs] == [("g", "a", "b")]


def test_tie_on_any_metric_is_never_a_win():
    group = [C("g", "a", quality=4.0, wer=0.2), C("g", "b", quality=3.0, wer=0.2)]
    assert unanimous_winner(group[0], group[1], [Q, WER]) == (None, "tie")
    result = build_pairs(group, [Q, WER], strategy="all_pairs")
    assert result.pairs == [] and result.discarded == {"tie": 1} and result.examples == {"tie": ["g"]}


def test_unanimous_winner_orientation():
    a, b = C("g", "a", quality=1.0, wer=0.5), C("g", "b", quality=2.0, wer=0.1)
    assert unanimous_winner(a, b, [Q, WER]) == ("b", None)
    assert unanimous_winner(b, a, [Q, WER]) == ("a", None)


def test_best_vs_worst_vs_all_pairs_counts():
    group = [C("g", "a", quality=1.0), C("g", "b", quality=2.0), C("g", "c", quality=2.0), C("g", "d", quality=3.0)]
    best = build_pairs(group, [Q])
    assert [_ids(p) for p in best.pairs] == [("g", "d", "a")] and best.discarded == {}
    every = build_pairs(group, [Q], strategy="all_pairs")
    assert [_ids(p) for p in every.pairs] == [
        ("g", "b", "a"), ("g", "c", "a"), ("g", "d", "a"), ("g", "d", "b"), ("g", "d", "c")
    ]
    assert every.discarded == {"tie": 1}


def test_multi_rule_best_vs_worst_picks_largest_first_rule_gap_ties_by_input_order():
    group = [
        C("g", "a", quality=1.0, wer=0.9),
        C("g", "b", quality=3.0, wer=0.5),
        C("g", "c", quality=3.0, wer=0.5),  # same as b: b comes first in the input
        C("g", "d", quality=2.0, wer=0.2),
    ]
    (pair,) = build_pairs(group, [Q, WER]).pairs
    assert _ids(pair) == ("g", "b", "a")


def test_failed_group_counted_under_its_best_worst_pair_reason():
    # best on quality = a, worst = c: a vs c is not unanimous; b vs c is a tie on wer
    group = [C("g", "a", quality=3.0, wer=0.9), C("g", "b", quality=2.0, wer=0.1), C("g", "c", quality=1.0, wer=0.1)]
    result = build_pairs(group, [Q, WER])
    assert result.pairs == [] and result.discarded == {"not_unanimous": 1}


def test_non_finite_and_missing_metric_candidates_are_dropped_and_counted():
    candidates = [
        C("g", "nan", quality=math.nan, wer=0.1),
        C("g", "inf", quality=1.0, wer=math.inf),
        C("g", "a", quality=2.0, wer=0.1),
        C("g", "b", quality=1.0, wer=0.5),
        C("h", "no_wer", quality=2.0),
        C("h", "c", quality=1.0, wer=0.5),
    ]
    result = build_pairs(candidates, [Q, WER])
    assert [_ids(p) for p in result.pairs] == [("g", "a", "b")]
    assert result.discarded == {"non_finite_score": 2, "missing_metric": 1, "single_candidate": 1}
    assert result.examples["missing_metric"] == ["h"] and result.examples["non_finite_score"] == ["g"]


def test_deterministic_order_groups_by_first_appearance_then_input_order():
    candidates = [
        C("z", "z0", quality=0.0), C("a", "a0", quality=1.0), C("z", "z1", quality=2.0),
        C("a", "a1", quality=0.0), C("a", "a2", quality=0.5), C("z", "z2", quality=1.0),
    ]
    first = build_pairs(candidates, [Q], strategy="all_pairs")
    assert [_ids(p) for p in first.pairs] == [
        ("z", "z1", "z0"), ("z", "z2", "z0"), ("z", "z1", "z2"),
        ("a", "a0", "a1"), ("a", "a0", "a2"), ("a", "a2", "a1"),
    ]
    again = build_pairs(iter(candidates), [Q], strategy="all_pairs")
    assert [_ids(p) for p in again.pairs] == [_ids(p) for p in first.pairs]
    assert [p.group for p in build_pairs(candidates, [Q]).pairs] == ["z", "a"]


def test_examples_are_capped_at_five_and_summary_lists_reasons():
    result = build_pairs([C(f"p{i}", "s", quality=1.0) for i in range(7)], [Q])
    assert result.discarded == {"single_candidate": 7}
    assert result.examples["single_candidate"] == ["p0", "p1", "p2", "p3", "p4"]
    text = result.summary()
    assert "kept 0 pairs from 7 groups" in text and "single_candidate: 7" in text


@pytest.mark.parametrize(
    "rules,match",
    [
        ([], "at least one"),
        ([Q, MetricRule("quality", higher_is_better=False)], "duplicate"),
        ([MetricRule("quality", margin=-0.1)], "margin"),
        ([MetricRule("quality", margin=math.nan)], "margin"),
    ],
)
def test_rule_validation(rules, match):
    with pytest.raises(ValueError, match=match):
        build_pairs([C("g", "a", quality=1.0)], rules)


def test_unknown_strategy():
    with pytest.raises(ValueError, match="best_vs_worst, all_pairs"):
        build_pairs([], [Q], strategy="random")
