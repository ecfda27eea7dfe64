"""MIA-DPO's rejection selection (mm_align.vlm.mia_dpo): the threshold table, the answer comparison, the rule on
hand-made Generation objects with known attention shares, random mode, and the region share of one-image formats
on the tiny LLaVA and Qwen2-VL, against a reference computed here from one full forward."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from mm_align.vlm.mia_augment import SourceItem, augment
from mm_align.vlm.mia_dpo import (
    THRESHOLDS,
    _token_centres,
    decide,
    default_attention_layer,
    match_random,
    normalise_answer,
    preference_pairs,
    region_share,
    same_answer,
    selection,
    threshold,
)
from mm_align.vlm.vlm_generation import Generation, render_prompt
from mm_align.vlm.vlm_loading import load_vlm
from mm_align.vlm.vlm_records import prompt_messages, vlm_example
from PIL import Image

from .tiny_vlms import make_tiny_llava, make_tiny_qwen2vl


def _pool(n: int = 10) -> list[SourceItem]:
    return [SourceItem(Image.new("RGB", (32, 32), (20 * i, 255 - 20 * i, 90)), "What colour is it?", f"colour {i}",
                       f"i{i}") for i in range(n)]


def test_threshold_table():
    assert THRESHOLDS == {"sequence": {2: 0.8, 3: 0.7, 4: 0.6, 5: 0.6},
                          "grid": {2: 0.7, 3: 0.6, 4: 0.5, 6: 0.4, 9: 0.3}, "pic_in_pic": {2: 0.8}}
    assert threshold("sequence", 5) == 0.6 and threshold("grid", 9) == 0.3 and threshold("pic_in_pic", 2) == 0.8
    with pytest.raises(ValueError, match="thresholds for \\[2, 3, 4, 6, 9\\] images, not 5"):
        threshold("grid", 5)
    with pytest.raises(ValueError, match="unknown MIA-DPO format 'mosaic'"):
        threshold("mosaic", 2)


def test_answer_comparison():
    assert normalise_answer("  The  Red circle. ") == "the red circle"
    assert same_answer("Red.", "red") and same_answer("\"blue!\"", "Blue")
    assert not same_answer("red circle", "red") and not same_answer("red", "rid")


@pytest.mark.parametrize("fmt,n", [(f, n) for f, table in THRESHOLDS.items() for n in table])
def test_rule_at_the_threshold(fmt, n):
    t = THRESHOLDS[fmt][n]
    assert decide(fmt, n, "blue", "red", t - 1e-6) is None  # under: rejected answer
    assert decide(fmt, n, "blue", "red", t) == "attention_above_threshold"  # strictly under only
    assert decide(fmt, n, "Red.", "red", 0.0) == "matches_ground_truth"
    assert decide(fmt, n, " . ", "red", 0.0) == "empty_answer"
    assert decide(fmt, n, "blue", "red", None) == "region_unavailable"
    assert decide(fmt, n, "blue", "red", 0.99, "random") is None  # random: attention ignored
    assert decide(fmt, n, "red", "red", 0.0, "random") == "matches_ground_truth"
    with pytest.raises(ValueError, match="rejection must be"):
        decide(fmt, n, "blue", "red", 0.1, "greedy")


def _sequence_sample(n: int, seed: int = 0):
    pool = _pool()
    return augment(pool[0], pool, "sequence", n, seed=seed)


@pytest.mark.parametrize("share,kept,reason", [(0.55, True, None), (0.65, False, "attention_above_threshold")])
def test_selection_on_known_shares(share, kept, reason):
    """A 4-image sequence (threshold 0.6): the target's share decides; the other images' shares do not."""
    s = _sequence_sample(4)
    k = s.augmentation["target"]
    shares = [(1 - share) / 3] * 4
    shares[k - 1] = share
    gen = Generation("colour 7", [5, 6], image_attention=shares, image_attention_mass=[x / 10 for x in shares])
    sel = selection(None, None, s, gen, layer=1)
    assert (sel.kept, sel.reason, sel.attention_rule) == (kept, reason, kept)
    assert sel.ratio == pytest.approx(share) and sel.threshold == 0.6
    rnd = selection(None, None, s, gen, layer=1, rejection="random")
    assert rnd.kept and rnd.reason is None and rnd.attention_rule == kept  # what the attention rule would do
    right = selection(None, None, s, Generation("Colour 0.", [1], shares, shares), layer=1)
    assert (right.kept, right.reason, right.ratio) == (False, "matches_ground_truth", None)
    empty = selection(None, None, s, Generation("", [], None, None), layer=1, rejection="random")
    assert (empty.kept, empty.reason) == (False, "empty_answer")


def test_pairs_and_matched_random():
    samples = [_sequence_sample(2, seed) for seed in range(8)]  # threshold 0.8
    sels = []
    for i, s in enumerate(samples):
        k = s.augmentation["target"]
        share = 0.5 if i < 3 else 0.9  # 3 the attention rule keeps, 5 it does not
        shares = [1 - share, share] if k == 2 else [share, 1 - share]
        sels.append(selection(None, None, s, Generation(f"wrong {i}", [1], shares, shares), 1, "random"))
    assert sum(x.kept for x in sels) == 8 and sum(x.attention_rule for x in sels) == 3
    matched = match_random(sels, seed=0)
    assert sum(x.kept for x in matched) == 3
    assert {x.reason for x in matched if not x.kept} == {"not_drawn"}
    assert [x.id for x in match_random(sels, seed=0)] == [x.id for x in matched]  # seeded
    drawn = {tuple(x.kept for x in match_random(sels, seed=s)) for s in range(10)}
    assert len(drawn) > 1  # random, not the attention rule's choice
    pairs = preference_pairs(samples, matched, "random")
    assert len(pairs) == 3
    for p in pairs:
        ex = vlm_example(p)
        assert ex.chosen == "colour 0" and ex.rejected.startswith("wrong") and len(ex.images) == 2
        assert p.meta["mia"]["rejection"] == "random" and p.meta["augmentation"]["format"] == "sequence"


def test_default_layer():
    model = SimpleNamespace(config=SimpleNamespace(text_config=SimpleNamespace(num_hidden_layers=32)))
    assert default_attention_layer(model) == 16  # LLaVA-1.5's layer 16 of 32
    assert default_attention_layer(SimpleNamespace(config=SimpleNamespace(text_config=None,
                                                                           num_hidden_layers=5))) == 2


def test_token_centres_follow_the_centre_crop():
    """A CLIP-style processor (shortest edge 24, centre crop 24) sees only the middle of a 2:1 canvas."""
    ip = SimpleNamespace(do_resize=True, size={"shortest_edge": 24}, do_center_crop=True,
                         crop_size={"height": 24, "width": 24})
    centres = _token_centres((200, 100), (2, 2), ip, fixed_grid=True)
    assert centres == [pytest.approx((75.0, 25.0)), pytest.approx((125.0, 25.0)), pytest.approx((75.0, 75.0)),
                       pytest.approx((125.0, 75.0))]
    whole = _token_centres((200, 100), (2, 2), ip, fixed_grid=False)  # Qwen2-VL-type: the whole image
    assert whole[0] == pytest.approx((50.0, 25.0)) and whole[3] == pytest.approx((150.0, 75.0))


@pytest.fixture(scope="module", params=["llava", "qwen2vl"])
def tiny(request, tmp_path_factory):
    build = {"llava": make_tiny_llava, "qwen2vl": make_tiny_qwen2vl}[request.param]
    model, processor = load_vlm(build(tmp_path_factory.mktemp(request.param) / "m"), attn_implementation="eager")
    return request.param, model, processor


@pytest.mark.parametrize("fmt", ["pic_in_pic", "grid"])
def test_region_share_matches_a_full_forward(tiny, fmt):
    """The region share from an independent forward: the tokens whose patch centre lies in the region, read off the
    token grid this test lays out itself (LLaVA: 4 × 4 over the 24 px square canvas; Qwen2-VL: image_grid_thw)."""
    family, model, processor = tiny
    pool = _pool()
    size = 24 if family == "llava" else 32
    s = augment(pool[1], pool, fmt, 2 if fmt == "pic_in_pic" else 4, seed=2, tile_size=size if fmt == "pic_in_pic"
                else 10, square=True)
    answer = [processor.tokenizer.convert_tokens_to_ids(w) for w in ("red", "circle")]
    got = region_share(model, processor, s, answer, layer=1)
    enc = processor(text=[render_prompt(processor, prompt_messages(s.prompt))], images=[s.images], return_tensors="pt",
                    add_special_tokens=False)
    ids = torch.cat([enc["input_ids"], torch.tensor([answer])], 1)
    inputs = {**enc, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "mm_token_type_ids" in enc:
        inputs["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros(1, 2, dtype=torch.long)], 1)
    with torch.no_grad():
        attn = model(**inputs, output_attentions=True).attentions[1][0].double().mean(0)
    L = enc["input_ids"].shape[1]
    pos = (enc["input_ids"][0] == processor.image_token_id).nonzero().flatten()
    per_token = attn[[L - 1, L], :][:, pos].mean(0)
    W, H = s.augmentation["canvas_size"]
    if family == "llava":
        rows = cols = 4
    else:
        _, h, w = enc["image_grid_thw"][0].tolist()
        rows, cols = h // 2, w // 2
    x0, y0, x1, y1 = s.augmentation["region_box"]
    inside = [x0 <= (c + 0.5) * W / cols < x1 and y0 <= (r + 0.5) * H / rows < y1
              for r in range(rows) for c in range(cols)]
    assert 0 < sum(inside) < rows * cols
    assert got == pytest.approx(float(per_token[torch.tensor(inside)].sum() / per_token.sum()), abs=1e-6)
    assert region_share(model, processor, s, [], layer=1) is None
