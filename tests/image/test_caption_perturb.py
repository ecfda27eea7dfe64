"""Caption perturbation: each axis makes the expected kind of change and nothing else, seeded and
case-preserving; the causal-LM perturber runs a real (tiny) transformers LM and validates its answers."""

from __future__ import annotations

import random
import re

import pytest
from mm_align.image.caption_perturb import (
    AXES,
    CausalLMConfig,
    CausalLMPerturber,
    RuleBasedPerturber,
    make_perturber,
    perturb_dataset,
)
from mm_align.image.toyworld.shapes import COLOURS, SHAPES, all_specs

RULES = RuleBasedPerturber()


def _all(caption: str, axis: str, n: int = 40) -> list:
    return [r for r in (RULES.perturb(caption, axis, s) for s in range(n)) if r is not None]


def _diff_words(a: str, b: str) -> tuple[list[str], list[str]]:
    wa, wb = a.split(), b.split()
    return [w for w in wa if w not in wb], [w for w in wb if w not in wa]


def test_attribute_swaps_change_one_colour_and_nothing_else():
    for r in _all("a red car parked on the street", "attributes"):
        assert r.operation == "swap_colour" and r.span == "red"
        removed, added = _diff_words(r.original, r.perturbed)
        assert [w for w in removed if w != "a"] == ["red"]  # "a red car" → "an orange car": the article agrees
        assert len([w for w in added if w != "an"]) == 1 and "red" not in added
    assert {r.operation for r in _all("a wooden chair in a painting", "attributes")} >= {"swap_material",
                                                                                          "swap_style"}
    # synonyms are never a replacement: grey for gray would not be a mismatch
    assert all(r.replacement not in ("gray", "grey") for r in _all("a gray cat", "attributes", 80))


def test_object_counts_and_plurals():
    results = _all("two dogs playing in the park", "objects", 120)
    counts = [r for r in results if r.operation == "change_count"]
    assert counts
    for r in counts:
        m = re.match(r"(\w+) (\w+) playing", r.perturbed)
        assert m and m.group(1) != "two"
        assert (m.group(2) == "dog") == (m.group(1) in ("a", "an"))  # plural agreement
    swaps = [r for r in results if r.operation == "swap_object"]
    animals = ("cats", "horses", "birds", "elephants", "giraffes", "zebras", "sheep", "cows", "bears")
    assert swaps and all(r.perturbed.split()[1] in animals for r in swaps)  # an animal for an animal
    adds = [r for r in _all("a cat on a sofa", "objects", 120) if r.operation == "add_object"]
    assert adds and all(" and a" in r.perturbed or " and an" in r.perturbed for r in adds)
    assert RULES.perturb("an apple", "objects", 0).perturbed.split()[0] in ("a", "an", "two", "three", "four",
                                                                            "five", "six")
    for r in _all("an apple", "objects"):
        words = r.perturbed.split()
        if r.operation == "swap_object":
            assert words[0] == ("an" if words[1][0] in "aeiou" else "a")  # the article agrees


def test_spatial_and_context():
    for r in _all("a cat sitting on the table", "spatial"):
        assert r.operation in ("swap_relation", "swap_motion") and r.perturbed != r.original
    assert any(r.perturbed.startswith("a cat sitting under") or "underneath" in r.perturbed or "beneath" in r.perturbed
               for r in _all("a cat sitting on the table", "spatial", 200))
    context = _all("a street at night", "context")
    times = [r for r in context if r.operation == "change_time"]
    assert times and all("at night" not in r.perturbed for r in times)
    places = [r for r in context if r.operation == "change_place"]
    assert places and all(re.match(r"(a|an) (\w+) at night", r.perturbed) for r in places)
    assert all(r.perturbed.startswith("an ") == (r.replacement[0] in "aeiou") for r in places)  # a/an agree
    world = _all("a red circle on a white background", "context")
    assert world and all(r.operation == "change_background" for r in world)
    assert all(re.match(r"a red circle on an? (\w+) background", r.perturbed).group(1) not in ("white", "red")
               for r in world)  # never the shape's own colour


def test_no_axis_applies_gives_none_and_case_is_kept():
    assert RULES.perturb("hello", None, 0) is None
    for axis in AXES:
        assert RULES.perturb("hello there", axis, 0) is None
    r = RULES.perturb("Red car", "attributes", 0)
    assert r.perturbed.split()[0][0].isupper() and r.perturbed.split()[1] == "car"
    with pytest.raises(ValueError, match="unknown axis"):
        RULES.perturb("a red car", "colour", 0)


def test_seeded_and_never_the_original_on_the_shapes_world():
    prompts = [s.prompt for s in all_specs()]
    a, counts = perturb_dataset(prompts, RULES, seed=7)
    b, _ = perturb_dataset(prompts, RULES, seed=7)
    c, _ = perturb_dataset(prompts, RULES, seed=8)
    assert [x.perturbed for x in a] == [x.perturbed for x in b]
    assert [x.perturbed for x in a] != [x.perturbed for x in c]
    assert "unperturbable" not in counts and sum(counts.values()) == len(prompts)
    assert len({x.axis for x in a}) == 4  # every axis applies to the world's prompts
    for x in a:
        assert x.perturbed != x.original
    shapes_changed = [x for x in a if x.operation == "swap_object"]
    assert all(x.replacement in SHAPES or x.replacement.split()[-1] in SHAPES or x.replacement in
               ("pentagon", "star", "heart", "hexagon", "rectangle", "oval") for x in shapes_changed)
    restricted, counts = perturb_dataset(prompts[:50], RULES, seed=0, axes=["attributes"])
    assert set(counts) == {"attributes"} and all(x.span in COLOURS for x in restricted)


def test_make_perturber_specs():
    assert isinstance(make_perturber("rule"), RuleBasedPerturber)
    only = make_perturber({"type": "rule", "axes": ["spatial"]})
    assert only.perturb("a dog on a red sofa", None, 0).axis == "spatial"
    with pytest.raises(ValueError, match="unknown perturber type"):
        make_perturber({"type": "gpt"})
    with pytest.raises(ValueError, match="axes"):
        make_perturber({"type": "rule", "axes": ["colour"]})
    with pytest.raises(ValueError):
        make_perturber({"type": "rule", "colour": ["red"]})  # a misspelt key is named, not ignored


def test_operations_restrict_the_edits():
    swaps = make_perturber({"type": "rule", "axes": ["objects", "attributes"],
                            "operations": ["swap_object", "swap_colour"]})
    caption = "a red circle on a blue background"
    got = [swaps.perturb(caption, None, s) for s in range(60)]
    assert {x.operation for x in got} == {"swap_object", "swap_colour"}  # never a count change or an added object
    for x in got:
        changed = [(a, b) for a, b in zip(caption.split(), x.perturbed.split()) if a != b]
        assert len(x.perturbed.split()) == 7 and len(changed) == 1 and changed[0][0] in ("red", "circle")
    # without the filter the objects axis also changes counts and adds objects
    assert {"change_count", "add_object"} <= {x.operation for x in _all(caption, "objects")}
    assert swaps.perturb("a dog and two cats", "objects", 0).operation == "swap_object"
    with pytest.raises(ValueError, match="change_background"):  # an edit of an axis not drawn from
        make_perturber({"type": "rule", "axes": ["objects"], "operations": ["change_background"]})
    with pytest.raises(ValueError, match="not edits"):
        make_perturber({"type": "rule", "operations": ["swap_colours"]})


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A randomly initialised GPT-2 with a word-level tokenizer, saved and loaded back by path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("lm")
    words = ["<unk>", "<eos>", "a", "red", "blue", "circle", "square", "on", "white", "background", "caption", ":",
             "new", "rewrite", "this", "image"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(root)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_positions=256, n_embd=16, n_layer=1, n_head=2,
                               eos_token_id=1, bos_token_id=1)).save_pretrained(root)
    return root


def test_causal_lm_perturber_runs_a_real_model(tiny_lm):
    lm = CausalLMPerturber(CausalLMConfig(pretrained=str(tiny_lm), max_new_tokens=6))
    caption = "a red circle on a white background"
    raw = lm.generate(lm.instruction(caption, "attributes"), seed=0)
    assert isinstance(raw, str)
    assert lm.generate(lm.instruction(caption, "attributes"), seed=0) == raw  # greedy: deterministic
    result = lm.perturb(caption, "attributes", 0)
    assert result is None or (result.perturbed != caption and result.operation == "llm_rewrite")
    fallback = CausalLMPerturber(CausalLMConfig(pretrained=str(tiny_lm), max_new_tokens=6, fallback=True))
    fallback.generate = lambda prompt, seed: caption  # an LM that repeats the caption is rejected ...
    r = fallback.perturb(caption, "attributes", 0)
    assert r is not None and r.operation == "swap_colour"  # ... and the rules answer instead
    assert isinstance(make_perturber(str(tiny_lm)), CausalLMPerturber)
    spec = make_perturber({"type": "causal_lm", "pretrained": str(tiny_lm), "temperature": 0.7})
    assert spec.config.temperature == 0.7


def test_llm_answers_are_cleaned_and_validated(tiny_lm):
    lm = CausalLMPerturber(CausalLMConfig(pretrained=str(tiny_lm)))
    caption = "a red circle on a white background"
    answers = {
        'New caption: "a blue circle on a white background"\nextra': "a blue circle on a white background",
        "\n\n  Caption: a red square on a white background": "a red square on a white background",
        "A RED CIRCLE ON A WHITE BACKGROUND": None,  # the original: not a mismatch
        "": None,
        "word " * 200: None,  # far too long
    }
    for answer, expected in answers.items():
        assert lm.parse(caption, answer) == expected
    lm.generate = lambda prompt, seed: '"a blue circle on a white background"'
    result = lm.perturb(caption, "attributes", random.Random(0))
    assert result.perturbed == "a blue circle on a white background" and result.axis == "attributes"
    assert "colour" in lm.instruction(caption, "attributes") and caption in lm.instruction(caption, "context")
