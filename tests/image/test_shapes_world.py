"""The shapes world: splits, renderer determinism, and an oracle that is right on true images and
rejects every wrong attribute."""

from __future__ import annotations

import numpy as np
import pytest
from mm_align.image.toyworld.shapes import (
    BACKGROUNDS,
    COLOURS,
    PALETTE,
    SHAPES,
    ShapesOracle,
    ShapeSpec,
    all_specs,
    oracle_scores,
    parse_prompt,
    render,
    split_specs,
)
from PIL import Image, ImageFilter


def test_splits_are_disjoint_fixed_and_cover_every_attribute():
    train, held = split_specs("train"), split_specs("heldout")
    assert len(train) == len(held) == 200 and len(all_specs()) == 400
    assert not set(train) & set(held)
    assert split_specs("train") == train  # fixed order
    assert {s.colour for s in train} == set(COLOURS) and {s.shape for s in train} == set(SHAPES)
    assert {s.background for s in train} == set(BACKGROUNDS)
    assert all(s.background != s.colour for s in all_specs())
    with pytest.raises(ValueError, match="split"):
        split_specs("val")


def test_prompts_round_trip_and_bad_prompts_are_named():
    for s in all_specs()[:50]:
        assert parse_prompt(s.prompt) == s
    with pytest.raises(ValueError, match="not a shapes-world prompt: 'a red dog"):
        parse_prompt("a red dog on a white background")


def test_render_is_deterministic_and_seeded():
    s = ShapeSpec("red", "circle", "white")
    a, b, c = render(s, 32, 1), render(s, 32, 1), render(s, 32, 2)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))
    assert a.size == (32, 32)


def test_oracle_is_right_on_every_true_image():
    for i, s in enumerate(all_specs()):
        o = oracle_scores(render(s, 32, i), s.prompt)
        assert o.all_correct, (s, o)
        assert o.colour > 0.8 and o.background > 0.95 and o.shape == 1.0


@pytest.mark.parametrize("attribute", ["colour", "shape", "background"])
def test_oracle_rejects_each_wrong_attribute(attribute):
    rng = np.random.default_rng(0)
    for i, s in enumerate(all_specs()[::7]):
        image = render(s, 32, i)
        if attribute == "colour":
            options = [c for c in COLOURS if c not in (s.colour, s.background)]
            wrong = ShapeSpec(str(rng.choice(options)), s.shape, s.background)
        elif attribute == "shape":
            wrong = ShapeSpec(s.colour, str(rng.choice([x for x in SHAPES if x != s.shape])), s.background)
        else:
            wrong = ShapeSpec(s.colour, s.shape, str(rng.choice([b for b in PALETTE if b not in (s.background,
                                                                                                 s.colour)])))
        o = oracle_scores(image, wrong)
        assert not o.correct[attribute], (s, wrong, o)
        assert o.mean < oracle_scores(image, s).mean


def test_oracle_on_an_empty_image_and_as_an_evaluator():
    blank = Image.new("RGB", (32, 32), PALETTE["white"])
    o = oracle_scores(blank, "a red circle on a white background")
    assert o.colour == 0 and o.shape == 0 and o.background == 1 and not o.all_correct
    s = all_specs()[3]
    scores = ShapesOracle().score([render(s, 32, 0), blank], [s.prompt, s.prompt])
    assert scores.shape == (2,) and scores[0] == pytest.approx(oracle_scores(render(s, 32, 0), s).mean)
    assert scores[0] > scores[1]


def test_attribute_oracle_counts_right_attributes_so_equally_right_images_tie():
    from mm_align.image.evaluators import build_scorers

    s = ShapeSpec("red", "circle", "white")
    right, other_seed = render(s, 32, 0), render(s, 32, 1).filter(ImageFilter.GaussianBlur(1.2))
    wrong_colour = render(ShapeSpec("blue", "circle", "white"), 32, 0)
    wrong_two = render(ShapeSpec("blue", "square", "white"), 32, 0)
    blank = Image.new("RGB", (32, 32), PALETTE["white"])
    (judge,) = build_scorers(["shapes_oracle_attributes"])
    assert judge.name == "shapes_oracle_attributes" and judge.higher_is_better
    scores = judge.score([right, other_seed, wrong_colour, wrong_two, blank], [s.prompt] * 5)
    assert scores.tolist() == [3.0, 3.0, 2.0, 1.0, 1.0]
    continuous = ShapesOracle().score([right, other_seed], [s.prompt] * 2)
    assert continuous[0] != continuous[1]  # the continuous score would call this pair a win for one side
