"""The answer-extraction rules of mm_align.vlm.answer_extraction, case by case (module docstring)."""

from __future__ import annotations

import pytest
from mm_align.vlm.answer_extraction import (
    canonical_gold,
    extract_answer,
    extract_choice,
    extract_open,
    extract_yes_no,
    is_correct,
    normalise,
    option_letters,
)

OPTIONS = ["red", "green", "blue", "red circle"]


@pytest.mark.parametrize(
    ("response", "letter", "rule"),
    [
        ("(B)", "B", "paren_letter"),
        ("The answer is (c).", "C", "paren_letter"),
        ("I pick (d) here", "D", "paren_letter"),
        ("( A )", "A", "paren_letter"),
        ("(A) red, not (B)", "A", "paren_letter"),  # the first parenthesised letter
        ("Answer: C", "C", "answer_cue"),
        ("answer is B", "B", "answer_cue"),
        ("Final answer: D", "D", "answer_cue"),
        ("answer: b.", "B", "answer_cue"),
        ("B.", "B", "leading_letter"),
        ("C) blue", "C", "leading_letter"),
        ("  A: red", "A", "leading_letter"),
        ("b", "B", "lone_letter"),
        (" C. ", "C", "leading_letter"),
        ("D", "D", "lone_letter"),
        ("green", "B", "option_text"),
        ("Blue.", "C", "option_text"),
        ("I think it is green", "B", "option_text"),
        ("a red circle", "D", "option_text"),  # "red" and "red circle" found: the longer contains the shorter
        ("the answer is a red circle", "D", "option_text"),  # lower-case "a" followed by words is no letter
    ],
)
def test_multiple_choice_rules(response, letter, rule):
    got = extract_choice(response, OPTIONS)
    assert (got.answer, got.rule) == (letter, rule)
    assert got.parsed


@pytest.mark.parametrize(
    "response",
    ["", "   ", "nothing to see", "(E)", "Answer: F", "E.", "green and blue", "yellow", "purple square"],
)
def test_multiple_choice_unparsed(response):
    # letters past the last option, two options named, no option at all: unparsed, never guessed
    got = extract_choice(response, OPTIONS)
    assert got.answer is None and got.rule == "unparsed" and not got.parsed


def test_lone_lower_case_a_is_option_a_only_when_alone():
    assert extract_choice("a", ["x", "y"]).answer == "A"
    assert extract_choice("a dog", ["cat", "mouse"]).answer is None


def test_identical_option_texts_are_unparsed():
    assert extract_choice("red", ["red", "Red", "blue"]).answer is None


@pytest.mark.parametrize(
    ("response", "answer"),
    [("Yes", "yes"), ("yes.", "yes"), ("No, there is no dog.", "no"), ("There is no dog, yes", "no"),
     ("It is true.", "yes"), ("FALSE", "no"), ("I would say yes", "yes"), ("Nope, yes", "yes")],
)
def test_yes_no_first_word(response, answer):
    got = extract_yes_no(response)
    assert (got.answer, got.rule) == (answer, "yes_no_word")


@pytest.mark.parametrize("response", ["", "maybe", "eyes", "nothing", "untrue"])
def test_yes_no_unparsed(response):
    assert extract_yes_no(response).answer is None


def test_open_normalises_and_empty_is_unparsed():
    assert extract_open("  The  Red Circle. ").answer == "the red circle"
    assert extract_open(" ... ").answer is None
    assert normalise("“Hello,  World!”") == "hello, world"


def test_extract_answer_dispatch_and_errors():
    assert extract_answer("(A)", "multiple_choice", ["x", "y"]).answer == "A"
    assert extract_answer("yes", "yes_no").answer == "yes"
    assert extract_answer("Blue", "open").answer == "blue"
    with pytest.raises(ValueError, match="needs its options"):
        extract_answer("A", "multiple_choice", None)
    with pytest.raises(ValueError, match="unknown question kind 'essay'"):
        extract_answer("A", "essay")


def test_gold_canonicalisation_and_correctness():
    assert canonical_gold("(B)", "multiple_choice") == ["B"]
    assert canonical_gold("True", "yes_no") == ["yes"]
    assert canonical_gold(["3.5", "3.50 "], "open") == ["3.5", "3.50"]
    with pytest.raises(ValueError, match="yes, no, true or false"):
        canonical_gold("perhaps", "yes_no")
    assert is_correct(extract_choice("(B)", OPTIONS), "B", "multiple_choice")
    assert not is_correct(extract_choice("(A)", OPTIONS), "B", "multiple_choice")
    assert is_correct(extract_yes_no("False."), "false", "yes_no")  # NLVR2's true/false as polarity
    assert not is_correct(extract_yes_no("True"), "no", "yes_no")
    assert is_correct(extract_open("3.50"), ["3.5", "3.50"], "open")
    assert not is_correct(extract_choice("nothing", OPTIONS), "A", "multiple_choice")  # unparsed is wrong


def test_option_letters_bounds():
    assert option_letters(3) == ["A", "B", "C"]
    with pytest.raises(ValueError, match="1 to 26"):
        option_letters(0)
