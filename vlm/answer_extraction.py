"""Reading the answer out of a VLM's free-text response: one documented rule per question kind.

A benchmark item (:class:`mm_align.vlm.bench_formats.BenchItem`) is ``"multiple_choice"``, ``"yes_no"`` or
``"open"``. The model's greedy response is turned into a canonical answer by :func:`extract_answer`, or into None
when no rule applies: an **unparsed** response, counted wrong and reported as ``unparsed`` by ``mm-align bench
vlm`` (never guessed: the MMMU reference scorer picks a random letter for an unparsable response; we do not, so a
rerun gives the same score and an unparsable model is visible as such).

**Multiple choice** (options ``A``, ``B``, ... in order; only letters of existing options count), the first rule
that matches wins:

1. a parenthesised letter anywhere, the first one: ``"(B)"``, ``"the answer is (b)"`` (any case);
2. an answer cue followed by a letter: ``"Answer: B"``, ``"answer is C"``, ``"final answer: (d)"`` (a lower-case
   letter only when no word follows it: ``"the answer is a circle"`` names no option);
3. the response starts with an upper-case letter followed by ``.``, ``)`` or ``:``: ``"B."``, ``"B) a circle"``,
   ``"C: red"``;
4. the whole response is one letter, with at most surrounding punctuation: ``"B"``, ``"b"``, ``" C. "``;
5. the text of exactly one option: the normalised response equals one option's normalised text, or else it
   contains exactly one option's normalised text as whole words (two options found, e.g. ``"red"`` and
   ``"red circle"`` in ``"a red circle"``, resolve to the longer only when it contains the shorter; any other
   tie is unparsed).

**Yes / no** (POPE, NLVR2, and other binary questions): the first word (whole word, any case) among ``yes``,
``no``, ``true``, ``false``; ``yes`` and ``true`` mean yes, ``no`` and ``false`` mean no. The canonical answer is
``"yes"`` or ``"no"``; a gold answer is canonicalised the same way (NLVR2's ``"true"`` / ``"false"``), so
:func:`is_correct` compares polarities.

**Open** (MMMU's open questions, Mantis-Eval's short answers): the normalised response (:func:`normalise`:
lower case, whitespace collapsed, surrounding punctuation and a final period removed); correct when it equals the
normalised gold answer or one of several gold answers. An empty response is unparsed.

Normalisation (:func:`normalise`) is the same for options, responses and gold answers.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["KINDS", "Kind", "Extraction", "option_letters", "normalise", "extract_choice", "extract_yes_no",
           "extract_open", "extract_answer", "canonical_gold", "is_correct"]

Kind = Literal["multiple_choice", "yes_no", "open"]
KINDS: tuple[str, ...] = ("multiple_choice", "yes_no", "open")

_YES_NO = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}
_YES_NO_WORD = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)
_PUNCT = string.punctuation + "“”‘’。，：；！？"


@dataclass(frozen=True)
class Extraction:
    """The answer read from a response.

    Args:
        answer: the canonical answer (an option letter, ``"yes"`` / ``"no"``, or normalised text), or None when the
            response is unparsed.
        rule: the rule that gave it (``"paren_letter"``, ``"answer_cue"``, ``"leading_letter"``, ``"lone_letter"``,
            ``"option_text"``, ``"yes_no_word"``, ``"open_text"``), or ``"unparsed"``.
    """

    answer: str | None
    rule: str

    @property
    def parsed(self) -> bool:
        return self.answer is not None


_UNPARSED = Extraction(None, "unparsed")


def option_letters(n: int) -> list[str]:
    """The letters of ``n`` options: ``A``, ``B``, ... (at most 26).

    Raises:
        ValueError: ``n`` is not in 1..26.
    """
    if not 1 <= n <= 26:
        raise ValueError(f"a multiple-choice question needs 1 to 26 options, got {n}")
    return [chr(ord("A") + i) for i in range(n)]


def normalise(text: str) -> str:
    """Lower case, whitespace collapsed to single spaces, surrounding punctuation and whitespace removed."""
    return " ".join(str(text).lower().split()).strip(_PUNCT + " ")


def _letter_group(letters: Sequence[str]) -> str:
    return "[" + "".join(letters) + "".join(letters).lower() + "]"


def extract_choice(response: str, options: Sequence[str]) -> Extraction:
    """The option letter a multiple-choice response names (module docstring, rules 1–5), or unparsed."""
    letters = option_letters(len(options))
    group = _letter_group(letters)
    text = str(response)
    m = re.search(rf"\(\s*({group})\s*\)", text)
    if m:
        return Extraction(m.group(1).upper(), "paren_letter")
    for m in re.finditer(rf"\banswer\s*(?:is\s*)?[:：]?\s*\(?\s*({group})(?![\w'])", text, re.IGNORECASE):
        # a lower-case letter only when nothing but punctuation follows it ("answer is a circle" is no letter)
        if m.group(1).isupper() or re.match(r"\s*(?:[).,;:!?]|$)", text[m.end():]):
            return Extraction(m.group(1).upper(), "answer_cue")
    m = re.match(rf"\s*([{''.join(letters)}])\s*[.):：]", text)
    if m:
        return Extraction(m.group(1), "leading_letter")
    stripped = text.strip(_PUNCT + " \t\n")
    if len(stripped) == 1 and stripped.upper() in letters:
        return Extraction(stripped.upper(), "lone_letter")
    return _by_option_text(text, options, letters)


def _has_words(text: str, words: str) -> bool:
    """Whether ``words`` occurs in ``text`` as whole words."""
    return re.search(rf"(?<!\w){re.escape(words)}(?!\w)", text) is not None


def _by_option_text(response: str, options: Sequence[str], letters: list[str]) -> Extraction:
    said = normalise(response)
    if not said:
        return _UNPARSED
    texts = [normalise(o) for o in options]
    equal = [letter for letter, t in zip(letters, texts) if t and t == said]
    if len(equal) == 1:
        return Extraction(equal[0], "option_text")
    if equal:  # two options with the same text: no way to tell them apart
        return _UNPARSED
    found = [(letter, t) for letter, t in zip(letters, texts) if t and _has_words(said, t)]
    if len(found) == 1:
        return Extraction(found[0][0], "option_text")
    if found:
        longest = max(found, key=lambda lt: len(lt[1]))
        if sum(1 for _, t in found if len(t) == len(longest[1])) == 1 and all(
                _has_words(longest[1], t) for _, t in found):
            return Extraction(longest[0], "option_text")
    return _UNPARSED


def extract_yes_no(response: str) -> Extraction:
    """``"yes"`` / ``"no"`` from the first yes / no / true / false word of the response, or unparsed."""
    m = _YES_NO_WORD.search(str(response))
    return Extraction(_YES_NO[m.group(1).lower()], "yes_no_word") if m else _UNPARSED


def extract_open(response: str) -> Extraction:
    """The normalised response text; unparsed when it is empty."""
    said = normalise(response)
    return Extraction(said, "open_text") if said else _UNPARSED


def extract_answer(response: str, kind: str, options: Sequence[str] | None = None) -> Extraction:
    """The answer of a response to a question of ``kind`` (module docstring).

    Args:
        response: the model's generated text.
        kind: ``"multiple_choice"``, ``"yes_no"`` or ``"open"``.
        options: the option texts (multiple choice only).

    Raises:
        ValueError: an unknown kind, or a multiple-choice question without options.
    """
    if kind == "multiple_choice":
        if not options:
            raise ValueError("a multiple-choice question needs its options to read the answer")
        return extract_choice(response, options)
    if kind == "yes_no":
        return extract_yes_no(response)
    if kind == "open":
        return extract_open(response)
    raise ValueError(f"unknown question kind {kind!r}; valid: {', '.join(KINDS)}")


def canonical_gold(answer: str | Sequence[str], kind: str) -> list[str]:
    """The gold answer(s) in the canonical form :func:`extract_answer` gives: upper-case letters, ``"yes"`` /
    ``"no"``, or normalised texts (several for an open question with alternatives).

    Raises:
        ValueError: a yes / no gold answer that is none of yes, no, true, false.
    """
    golds = [answer] if isinstance(answer, str) else list(answer)
    if kind == "multiple_choice":
        return [str(g).strip().strip("()").strip().upper() for g in golds]
    if kind == "yes_no":
        out = []
        for g in golds:
            key = normalise(g)
            if key not in _YES_NO:
                raise ValueError(f"a yes/no gold answer must be yes, no, true or false, got {g!r}")
            out.append(_YES_NO[key])
        return out
    return [normalise(g) for g in golds]


def is_correct(extraction: Extraction, answer: str | Sequence[str], kind: str) -> bool:
    """Whether an extracted answer matches the gold answer (an unparsed one never does)."""
    return extraction.answer is not None and extraction.answer in canonical_gold(answer, kind)
