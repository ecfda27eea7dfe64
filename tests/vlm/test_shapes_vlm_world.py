"""The shapes VLM world: splits by scene spec, determinism, answers that the rendered pixels bear out, benchmark files
that ``bench vlm``'s reader reads back and its extraction scores, and the shipped tiny LLaVA (loads through
``load_vlm``, answers held-out dev questions above chance, fits the size budget)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from mm_align.image.toyworld.shapes import COLOURS, PALETTE, ShapeSpec, oracle_scores
from mm_align.vlm.answer_extraction import extract_answer, is_correct
from mm_align.vlm.bench import item_messages, item_text
from mm_align.vlm.bench_formats import read_benchmark
from mm_align.vlm.toyworld import shapes_vlm as world
from mm_align.vlm.vlm_records import load_image

TORCH_THREADS = 2


def _nearest(rgb: np.ndarray, names: list[str]) -> str:
    table = np.array([PALETTE[n] for n in names], dtype=np.float32)
    return names[int(((table - rgb.astype(np.float32)) ** 2).sum(1).argmin())]


def _pixel(image, position: str) -> np.ndarray:
    ax, ay = world._ANCHORS[position]  # noqa: SLF001 - the test reads the world's own layout
    a = np.asarray(image)
    return a[int(ay * a.shape[0]), int(ax * a.shape[1])]


def test_splits_are_disjoint_by_scene_spec_and_cover_every_attribute():
    scenes = {s: world.sample_scenes(s, 400) for s in world.SPLITS}
    keys = {s: {sc.key for sc, _ in v} for s, v in scenes.items()}
    assert all(len(k) == 400 for k in keys.values())  # distinct within a split
    assert not keys["train"] & keys["dev"] and not keys["train"] & keys["test"] and not keys["dev"] & keys["test"]
    for split, v in scenes.items():
        assert all(world.scene_split(sc) == split for sc, _ in v)
    train = [sc for sc, _ in scenes["train"]]
    assert {o.colour for sc in train for o in sc.objects} == set(COLOURS)
    assert {sc.background for sc in train} == set(PALETTE)
    assert {len(sc.objects) for sc in train} == {1, 2, 3}


def test_items_and_images_are_deterministic():
    a, b = world.qa_items("dev", 30), world.qa_items("dev", 30)
    assert a == b
    assert world.qa_items("dev", 10) == a[: len(world.qa_items("dev", 10))]  # a prefix of a larger draw
    assert np.array_equal(np.asarray(world.item_image(a[7])), np.asarray(world.item_image(b[7])))
    assert world.qa_items("dev", 30, seed=1) != a
    assert len({it.id for it in a}) == len(a)
    assert {it.kind for it in a} == set(world.QUESTION_KINDS)


def test_answers_agree_with_the_rendered_pixels():
    items = world.qa_items("test", 80)
    for it in items:
        image = world.item_image(it)
        assert image.size == (world.IMAGE_SIZE, world.IMAGE_SIZE)
        corner = np.asarray(image)[1, 1]
        assert _nearest(corner, list(PALETTE)) == it.scene.background, it
        # every anchor is covered by its shape: the colour there names the shape, the empty anchors the background
        seen = {p: _nearest(_pixel(image, p), list(PALETTE)) for p in world.POSITIONS}
        shapes_seen = [p for p, c in seen.items() if c != it.scene.background]
        if it.kind == "background":
            assert it.answer == it.scene.background
        elif it.kind == "count":
            assert it.answer == str(len(shapes_seen)), it
        elif it.kind == "colour":
            target = [o for o in it.scene.objects if it.subject in ("", o.shape)]
            assert len(target) == 1 and seen[target[0].position] == it.answer, it
        elif it.kind == "position":
            colour, shape = it.subject.split()
            assert seen[it.answer] == colour, it
            assert it.scene.find(colour=colour, shape=shape).position == it.answer
        elif it.kind == "shape":
            obj = [o for o in it.scene.objects if it.subject in ("", o.position)]
            assert len(obj) == 1 and obj[0].shape == it.answer
            if len(it.scene.objects) == 1:  # the image world's oracle reads the drawn shape
                verdict = oracle_scores(image, ShapeSpec(obj[0].colour, it.answer, it.scene.background))
                assert verdict.all_correct, (it, verdict)
        assert it.answer in it.options and len(set(it.options)) == len(it.options)


def test_scene_boxes_cover_their_shapes_and_patch_labels_name_what_lies_under_each_patch():
    from mm_align.vlm.toyworld.train_shapes_vlm import MODEL_CFG, _colour_names, caption_text, patch_labels

    grid = MODEL_CFG["vision"]["image_size"] // MODEL_CFG["vision"]["patch_size"]
    colours = _colour_names()
    scenes = world.sample_scenes("train", 40)
    for scene, seed in scenes:
        boxes = world.scene_boxes(scene, seed)
        assert boxes == world.scene_boxes(scene, seed) and len(boxes) == len(scene.objects)
        image = np.asarray(world.render_scene(scene, seed))
        for o, (x0, y0, x1, y1) in zip(scene.objects, boxes):
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            centre = image[int((y0 + y1) / 2 * image.shape[0]), int((x0 + x1) / 2 * image.shape[1])]
            assert _nearest(centre, list(PALETTE)) == o.colour, (scene, o)  # every shape covers its box's centre
        labels = patch_labels(scene, seed)
        assert len(labels) == grid * grid
        assert all(row[3] == colours.index(scene.background) for row in labels)
        for o in scene.objects:  # each object owns at least one patch, labelled with its attributes
            own = [row for row in labels if row[2] == world.POSITIONS.index(o.position) + 1]
            assert own and all(row[0] == colours.index(o.colour) for row in own), (scene, o, labels)
        assert {row[2] for row in labels} - {0} == {world.POSITIONS.index(o.position) + 1 for o in scene.objects}
        assert all(row[1] == 0 and row[0] == colours.index(scene.background) for row in labels if row[2] == 0)
        text = caption_text(scene)
        assert text.startswith(f"{scene.background} background.")
        assert all(f"{o.position}: {o.colour} {o.shape}." in text for o in scene.objects)


def test_bad_scenes_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="background's colour"):
        world.Scene.of("red", [world.SceneObject("red", "circle", "left")])
    with pytest.raises(ValueError, match="different positions"):
        world.Scene.of("white", [world.SceneObject("red", "circle", "left"),
                                 world.SceneObject("blue", "square", "left")])
    with pytest.raises(ValueError, match="unknown shapes-VLM split"):
        world.sample_scenes("validation", 3)
    with pytest.raises(ValueError, match="held out"):
        world.write_single_benchmark("/nonexistent", ("train",))


def test_single_image_benchmark_reads_back_through_bench_formats(tmp_path):
    out = world.write_single_benchmark(tmp_path / "single", ("dev", "test"), n_scenes=8)
    items = world.qa_items("dev", 8)
    bench = read_benchmark("mantis", out, split="dev")
    assert [b.id for b in bench.items] == [it.id for it in items]
    assert read_benchmark("mantis", out, split="test").items[0].id.startswith("test-")
    for b, it in zip(bench.items, items):
        assert b.kind == "multiple_choice" and b.subset == it.kind and b.options == list(it.options)
        assert b.answer == it.answer_letter and b.question == f"<image>\n{it.question}"
        assert np.array_equal(np.asarray(load_image(b.images[0])), np.asarray(world.item_image(it)))
        # the short answer a model gives is scored as the gold option
        assert is_correct(extract_answer(it.answer, b.kind, b.options), b.answer, b.kind)
        wrong = next(o for o in b.options if o != it.answer)
        assert not is_correct(extract_answer(wrong, b.kind, b.options), b.answer, b.kind)


def test_multi_image_benchmarks_use_distractors_of_the_same_split(tmp_path):
    pytest.importorskip("mm_align.vlm.mia_augment", reason="mm_align.vlm.mia_augment is another helper's module")
    paths = world.write_multi_benchmarks(tmp_path / "multi", ("dev",), n_items=6)
    assert set(paths) == set(world.MULTI_FORMATS)
    dev_keys = {sc.key for sc, _ in world.sample_scenes("dev", 200)}
    for fmt, path in paths.items():
        bench = read_benchmark("mantis", path, split="dev")
        made = world.multi_items("dev", fmt, 6)
        assert [b.id for b in bench.items] == [m.id for m in made]
        for b, m in zip(bench.items, made):
            assert b.subset == f"{fmt}-{m.n_images}" and b.answer == "ABCD"[list(m.options).index(m.answer)]
            assert m.answer == m.source.answer and m.source.split == "dev"
            assert all(sc.key in dev_keys and sc.key != m.source.scene.key for sc in m.distractor_scenes)
            assert len(m.distractor_scenes) == m.n_images - 1
            n_marks = item_text(b).count("<image>")
            assert n_marks == len(b.images) == (m.n_images if fmt == "sequence" else 1)
            cue = "For the image in the center" if fmt == "pic_in_pic" else f"In Image{m.augmentation['target']}"
            assert cue in b.question
        assert {m.n_images for m in made} == set(world.MULTI_IMAGE_COUNTS[fmt])


def test_shipped_size_and_resolver():
    path = world.shapes_vlm_dir()
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert 0 < total <= 15 * 2**20, total
    assert world.resolve_vlm("shapes-vlm") == str(path) and world.resolve_vlm("other/model") == "other/model"


def _binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def test_shipped_model_loads_and_reads_the_background_of_dev_scenes():
    from mm_align.vlm.vlm_generation import greedy_generate
    from mm_align.vlm.vlm_loading import load_vlm

    model, processor = load_vlm(world.shapes_vlm_dir())
    items = world.qa_items("dev", 30, kinds=("background",))
    gens = greedy_generate(model, processor, [(item_messages(read_item(it)), [world.item_image(it)]) for it in items],
                           max_new_tokens=4, batch_size=15)
    hits = sum(is_correct(extract_answer(g.text, "multiple_choice", it.options), it.answer_letter, "multiple_choice")
               for g, it in zip(gens, items))
    assert _binomial_tail(hits, len(items), 1 / world.N_OPTIONS) < 1e-4, hits


def test_shipped_model_loads_and_answers_dev_questions_above_chance():
    from mm_align.vlm.bench_formats import BenchItem
    from mm_align.vlm.vlm_generation import greedy_generate
    from mm_align.vlm.vlm_loading import load_vlm

    model, processor = load_vlm(world.shapes_vlm_dir())
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    items = world.qa_items("dev", 16)
    bench = [BenchItem(it.id, [world.item_image(it)], f"<image>\n{it.question}", list(it.options), it.answer_letter,
                       "multiple_choice") for it in items]
    gens = greedy_generate(model, processor, [(item_messages(b), b.images) for b in bench], max_new_tokens=4,
                           batch_size=16)
    correct = [is_correct(extract_answer(g.text, b.kind, b.options), b.answer, b.kind) for g, b in zip(gens, bench)]
    chance = float(np.mean([1 / len(b.options) for b in bench]))
    # one-sided binomial test against guessing among the options, at 1e-4
    assert _binomial_tail(sum(correct), len(correct), chance) < 1e-4, (sum(correct), len(correct), chance)
    # open-form questions (the bare question, as MIA-DPO prompts ask them): exact answers, against guessing among
    # the kind's possible answers
    sample = random.Random(0).sample(items, 30)
    open_gens = greedy_generate(model, processor, [([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": it.question}]}], [world.item_image(it)]) for it in sample],
        max_new_tokens=4, batch_size=30)
    hits = sum(g.text == it.answer for g, it in zip(open_gens, sample))
    guess = float(np.mean([1 / len(world.answer_space(it.kind)) for it in sample]))
    assert _binomial_tail(hits, len(sample), guess) < 1e-4, (hits, len(sample), guess)


def test_shipped_tokenizer_knows_every_word_of_the_world_prompts():
    pytest.importorskip("mm_align.vlm.mia_augment", reason="mm_align.vlm.mia_augment is another helper's module")
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(world.shapes_vlm_dir())
    tok = processor.tokenizer
    texts = []
    for it in world.qa_items("dev", 20):
        texts.append(item_text(read_item(it)))
    for fmt in world.MULTI_FORMATS:
        texts += [m.question for m in world.multi_items("dev", fmt, 3)]
    for text in texts:
        rendered = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": text}]}],
                                                 tokenize=False, add_generation_prompt=True)
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, (text, tok.convert_ids_to_tokens(ids))


def read_item(it: world.QAItem):
    from mm_align.vlm.bench_formats import BenchItem

    return BenchItem(it.id, [None], f"<image>\n{it.question}", list(it.options), it.answer_letter, "multiple_choice")
