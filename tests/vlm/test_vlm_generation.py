"""Batched greedy generation and the per-image attention share (mm_align.vlm.vlm_generation) on the tiny LLaVA and
Qwen2-VL models of tests/vlm/tiny_vlms, saved to a temp dir and loaded back through load_vlm.

The references are computed independently of the module: the answer of one unpadded prompt through a plain
``model.generate`` (so left padding and batching are checked), and the attention shares from ONE full forward over
prompt + answer with ``output_attentions`` (so the incremental, cached attentions of ``generate`` are checked).
"""

from __future__ import annotations

import pytest
import torch
from mm_align.vlm.vlm_generation import greedy_answers, greedy_generate, image_positions, render_prompt
from mm_align.vlm.vlm_loading import load_vlm
from mm_align.vlm.vlm_records import prompt_messages
from PIL import Image

from .tiny_vlms import TINY_VLM_BUILDERS

COLOURS = [(220, 30, 30), (30, 180, 60), (30, 60, 220), (230, 210, 40)]


@pytest.fixture(scope="module", params=sorted(TINY_VLM_BUILDERS))
def vlm(request, tmp_path_factory):
    path = TINY_VLM_BUILDERS[request.param](tmp_path_factory.mktemp(request.param) / "model")
    model, processor = load_vlm(path, attn_implementation="eager")
    return request.param, model, processor


def _image(i: int, size=(32, 24)) -> Image.Image:
    im = Image.new("RGB", size, (255, 255, 255))
    im.paste(COLOURS[i % 4], (4, 4, size[0] - 4, size[1] - 4))
    return im


def _prompts():
    """Prompts of different lengths and 1–3 images (different sizes for Qwen2-VL's varying token counts)."""
    return [
        (prompt_messages("<image>\nWhat colour is the shape?"), [_image(0)]),
        (prompt_messages("Image1: <image>\nImage2: <image>\nIn Image2, what colour is the shape?"),
         [_image(1), _image(2, (24, 40))]),
        (prompt_messages("<image> <image> <image> how many shapes are red?"), [_image(3), _image(0), _image(1)]),
        (prompt_messages("<image>\nIs it a circle or a square? Answer with one word please."), [_image(2)]),
    ]


def _single_reference(model, processor, messages, images, max_new_tokens):
    """One prompt, no padding, plain generate: the answer's token ids up to the first EOS."""
    enc = processor(text=[render_prompt(processor, messages)], images=[images], add_special_tokens=False,
                    return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    ids = out[0, enc["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {processor.tokenizer.eos_token_id}
    return ids[:next((k for k, t in enumerate(ids) if t in eos), len(ids))], enc


def test_batched_equals_one_by_one_and_is_deterministic(vlm):
    _, model, processor = vlm
    prompts = _prompts()
    batched = greedy_generate(model, processor, prompts, max_new_tokens=6, batch_size=4)
    again = greedy_generate(model, processor, prompts, max_new_tokens=6, batch_size=3)
    assert [g.token_ids for g in batched] == [g.token_ids for g in again]
    for (messages, images), gen in zip(prompts, batched):
        ref, _ = _single_reference(model, processor, messages, images, 6)
        assert gen.token_ids == ref
        assert len(gen.token_ids) <= 6 and gen.image_attention is None
        assert gen.text == processor.tokenizer.decode(ref, skip_special_tokens=True).strip()
    assert greedy_answers(model, processor, prompts, max_new_tokens=6, batch_size=2) == [g.text for g in batched]
    assert any(g.token_ids for g in batched)  # the tiny models do answer something


@pytest.mark.parametrize("layer", [0, -1])
def test_attention_share_matches_a_full_forward(vlm, layer):
    _, model, processor = vlm
    prompts = _prompts()
    gens = greedy_generate(model, processor, prompts, max_new_tokens=5, batch_size=4, attention_layer=layer)
    checked = 0
    for (messages, images), gen in zip(prompts, gens):
        if not gen.token_ids:
            assert gen.image_attention is None
            continue
        assert len(gen.image_attention) == len(images)
        assert sum(gen.image_attention) == pytest.approx(1.0, abs=1e-9)
        assert all(0.0 <= m <= 1.0 for m in gen.image_attention_mass)
        # reference: one forward over prompt + answer, the attention of each answer token's producing query
        _, enc = _single_reference(model, processor, messages, images, 5)
        prompt_len = enc["input_ids"].shape[1]
        answer = torch.tensor([gen.token_ids])
        inputs = dict(enc)
        inputs["input_ids"] = torch.cat([enc["input_ids"], answer], 1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        if "mm_token_type_ids" in enc:
            inputs["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(answer)], 1)
        with torch.no_grad():
            attn = model(**inputs, output_attentions=True).attentions[layer][0].double().mean(0)  # (T, T)
        ids = enc["input_ids"][0]
        image_id = processor.image_token_id
        if "image_grid_thw" in enc:  # Qwen2-VL-type: tokens per image from the grid
            merge = processor.image_processor.merge_size
            counts = [int(t * h * w) // merge ** 2 for t, h, w in enc["image_grid_thw"].tolist()]
        else:
            counts = [int((ids == image_id).sum()) // len(images)] * len(images)
        positions = (ids == image_id).nonzero().flatten().tolist()
        spans, start = [], 0
        for c in counts:
            spans.append(positions[start:start + c])
            start += c
        queries = [prompt_len - 1 + k for k in range(len(gen.token_ids))]
        mass = [sum(float(attn[q, s].sum()) for q in queries) / len(queries) for s in spans]
        assert gen.image_attention_mass == pytest.approx(mass, abs=1e-5)
        assert gen.image_attention == pytest.approx([m / sum(mass) for m in mass], abs=1e-5)
        checked += 1
    assert checked >= 1


def test_attention_switches_to_eager(tmp_path):
    path = TINY_VLM_BUILDERS["llava"](tmp_path / "m")
    model, processor = load_vlm(path, attn_implementation="sdpa")
    gens = greedy_generate(model, processor, _prompts()[:2], max_new_tokens=3, attention_layer=1)
    assert model.config._attn_implementation == "eager"
    assert all(g.image_attention is None or len(g.image_attention) == n for g, n in zip(gens, (1, 2)))


def test_image_positions_splits():
    ids = torch.tensor([1, 9, 9, 9, 9, 2, 9, 9, 9, 9, 3])
    assert image_positions(ids, 9, 2) == [[1, 2, 3, 4], [6, 7, 8, 9]]  # equal parts
    assert image_positions(ids, 9, 2, counts=[3, 5]) == [[1, 2, 3], [4, 6, 7, 8, 9]]  # the processor's counts
    runs = torch.tensor([9, 9, 0, 9, 9, 9, 0])
    assert image_positions(runs, 9, 2) == [[0, 1], [3, 4, 5]]  # 5 tokens: not equal parts, but two runs
    with pytest.raises(ValueError, match="cannot split 5 image tokens"):
        image_positions(runs, 9, 3)
    with pytest.raises(ValueError, match="has 8 image tokens but its images account for 9"):
        image_positions(ids, 9, 2, counts=[4, 5])


def test_bad_prompts(vlm):
    _, model, processor = vlm
    with pytest.raises(ValueError, match="bench.json:3: the messages hold 2 image placeholder"):
        greedy_generate(model, processor, [(prompt_messages("<image><image> hi"), [_image(0)])],
                        origins=["bench.json:3"])
    with pytest.raises(ValueError, match="attention_layer 7 is out of range for a model with 2 layers"):
        greedy_generate(model, processor, _prompts()[:1], max_new_tokens=8, attention_layer=7)
    with pytest.raises(ValueError, match="max_new_tokens and batch_size must be >= 1"):
        greedy_generate(model, processor, _prompts()[:1], batch_size=0)
