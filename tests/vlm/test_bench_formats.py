"""The VLM benchmark readers (mm_align.vlm.bench_formats) on small copies written here in each published layout.

The parquet fixtures are written by ``datasets`` with ``Image()`` features (so each image is stored exactly as the
Hugging Face copies store it, a ``{"bytes", "path"}`` struct), in the published file trees: MMMU one folder per
subject with ``<split>-00000-of-00001.parquet``, BLINK one folder per subtask, Mantis-Eval ``mantis_eval/``,
MuirBench ``data/``; NLVR2 and POPE as their JSON-lines files beside image folders. The writers are imported by
test_bench_vlm.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mm_align.vlm.bench_formats import NO_ANSWER, format_of, read_benchmark
from mm_align.vlm.vlm_records import IMAGE_TOKEN, load_image
from PIL import Image

from mm_align.data.records import DataError

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 40)}


def pil(colour: str, size: int = 16) -> Image.Image:
    """A small image of one colour with a white border (a distinct PNG per colour)."""
    im = Image.new("RGB", (size, size), (255, 255, 255))
    im.paste(COLOURS[colour], (2, 2, size - 2, size - 2))
    return im


def _parquet(path: Path, rows: list[dict], features: dict) -> Path:
    from datasets import Dataset, Features

    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows, features=Features(features)).to_parquet(str(path))
    return path


def write_mmmu(root: Path) -> Path:
    """Two subjects (validation: 3 + 1 rows, one without an answer) and a dev file that a validation read skips."""
    from datasets import Image as HFImage
    from datasets import Value

    feats = {"id": Value("string"), "question": Value("string"), "options": Value("string"),
             "explanation": Value("string"), **{f"image_{k}": HFImage() for k in range(1, 8)},
             "img_type": Value("string"), "answer": Value("string"), "topic_difficulty": Value("string"),
             "question_type": Value("string"), "subfield": Value("string")}

    def row(i, subject, question, options, answer, qtype, images):
        r = {"id": f"validation_{subject}_{i}", "question": question, "options": options, "explanation": "",
             "img_type": "['Photos']", "answer": answer, "topic_difficulty": "Easy", "question_type": qtype,
             "subfield": subject}
        r.update({f"image_{k}": images.get(k) for k in range(1, 8)})
        return r

    _parquet(root / "Accounting" / "validation-00000-of-00001.parquet", [
        row(1, "Accounting", "<image 1> What colour is the square?", "['red', 'blue', 'the colour of <image 2>']",
            "A", "multiple-choice", {1: pil("red"), 2: pil("green")}),
        row(2, "Accounting", "Name the colour of <image 1>.", "[]", "red", "open", {1: pil("red")}),
        row(3, "Accounting", "Which is <image 1>?", "['red', 'blue']", "", "multiple-choice", {1: pil("blue")}),
    ], feats)
    _parquet(root / "Art" / "validation-00000-of-00001.parquet", [
        row(1, "Art", "Compare <image 2> and <image 1>.", "['same', 'different']", "B", "multiple-choice",
            {1: pil("yellow"), 2: pil("blue")}),
    ], feats)
    _parquet(root / "Art" / "dev-00000-of-00001.parquet", [
        row(9, "Art", "dev question <image 1>", "['x', 'y']", "A", "multiple-choice", {1: pil("red")}),
    ], feats)
    return root


def write_blink(root: Path) -> Path:
    """Two subtasks (val): Counting with one image, Jigsaw with three; and a test file that a val read skips."""
    from datasets import Image as HFImage
    from datasets import List, Value

    feats = {"idx": Value("string"), "question": Value("string"), "sub_task": Value("string"),
             **{f"image_{k}": HFImage() for k in range(1, 5)}, "choices": List(Value("string")),
             "answer": Value("string"), "prompt": Value("string"), "explanation": Value("string")}

    def row(idx, sub, question, choices, answer, images):
        r = {"idx": idx, "question": question, "sub_task": sub, "choices": choices, "answer": answer,
             "prompt": f"{question}\nSelect from the following choices.", "explanation": ""}
        r.update({f"image_{k}": images[k - 1] if k <= len(images) else None for k in range(1, 5)})
        return r

    _parquet(root / "Counting" / "val-00000-of-00001.parquet", [
        row("val_Counting_1", "Counting", "How many squares are there?", ["1", "2", "3"], "(A)", [pil("red")]),
        row("val_Counting_2", "Counting", "How many circles are there?", ["0", "1"], "(B)", [pil("blue")]),
    ], feats)
    _parquet(root / "Jigsaw" / "val-00000-of-00001.parquet", [
        row("val_Jigsaw_1", "Jigsaw", "Which piece fits?", ["the second image", "the third image"], "(B)",
            [pil("red"), pil("green"), pil("blue")]),
    ], feats)
    _parquet(root / "Jigsaw" / "test-00000-of-00001.parquet", [
        row("test_Jigsaw_1", "Jigsaw", "Which piece fits?", ["x", "y"], "", [pil("red")]),
    ], feats)
    return root


def write_mantis(root: Path) -> Path:
    """mantis_eval/test: a multiple-choice row with letter-prefixed options and a short-answer row."""
    from datasets import Image as HFImage
    from datasets import List, Value

    feats = {"id": Value("string"), "question_type": Value("string"), "question": Value("string"),
             "images": List(HFImage()), "options": List(Value("string")), "answer": Value("string"),
             "data_source": Value("string"), "category": Value("string")}
    return _parquet(root / "mantis_eval" / "test-00000-of-00001.parquet", [
        {"id": "m1", "question_type": "multi-choice", "question": "<image> <image> Which image is red?",
         "images": [pil("blue"), pil("red")], "options": ["(A) the first", "(B) the second"], "answer": "(B)",
         "data_source": "synthetic", "category": "colour"},
        {"id": "m2", "question_type": "short-answer", "question": "What colour is <image>?",
         "images": [pil("green")], "options": [], "answer": "Green", "data_source": "synthetic",
         "category": "colour"},
        {"id": "m3", "question_type": "multi-choice", "question": "Which is brighter?",
         "images": [pil("yellow"), pil("blue")], "options": ["A. yellow", "blue"], "answer": "A",
         "data_source": "synthetic", "category": "brightness"},
    ], feats).parent.parent


def write_muirbench(root: Path) -> Path:
    """data/test: one row with an image in an option, one whose images the question does not place."""
    from datasets import Image as HFImage
    from datasets import List, Value

    feats = {"idx": Value("string"), "task": Value("string"), "image_relation": Value("string"),
             "image_type": Value("string"), "question": Value("string"), "options": List(Value("string")),
             "answer": Value("string"), "image_list": List(HFImage()), "counterpart_idx": Value("string")}
    return _parquet(root / "data" / "test-00000-of-00001.parquet", [
        {"idx": "1", "task": "Visual Retrieval", "image_relation": "Similar", "image_type": "Photo",
         "question": "Which image matches <image>?", "options": ["<image>", "<image>", "None of the choices"],
         "answer": "A", "image_list": [pil("red"), pil("red"), pil("blue")], "counterpart_idx": "2"},
        {"idx": "2", "task": "Counting", "image_relation": "Complementary", "image_type": "Photo",
         "question": "How many red squares in total?", "options": ["1", "2", "3"], "answer": "B",
         "image_list": [pil("red"), pil("red")], "counterpart_idx": "1"},
    ], feats).parent.parent


def write_nlvr2(root: Path) -> Path:
    """dev.json (three statements over two image pairs) with the images in ``dev/``."""
    images = root / "dev"
    images.mkdir(parents=True, exist_ok=True)
    for stem, (left, right) in {"dev-1-0": ("red", "red"), "dev-1-1": ("red", "blue")}.items():
        pil(left).save(images / f"{stem}-img0.png")
        pil(right).save(images / f"{stem}-img1.png")
    rows = [{"identifier": "dev-1-0-0", "sentence": "Both images are red.", "label": "True", "synset": "colour"},
            {"identifier": "dev-1-1-0", "sentence": "Both images are red.", "label": "False", "synset": "colour"},
            {"identifier": "dev-1-1-1", "sentence": "The right image is blue.", "label": "True", "synset": "colour"}]
    path = root / "dev.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


POPE_ROWS = [("red", "Is there a red square in the image?", "yes"), ("red", "Is there a blue square in the image?",
             "no"), ("blue", "Is there a blue square in the image?", "yes"), ("blue", "Is there a green square in "
             "the image?", "no"), ("green", "Is there a green square in the image?", "yes"), ("green", "Is there a "
             "red square in the image?", "no")]


def write_pope(root: Path, name: str = "coco_pope_random.json") -> Path:
    """A POPE question file (RUCAIBox layout: one JSON object a line) and its val2014 image folder."""
    images = root / "val2014"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (colour, text, label) in enumerate(POPE_ROWS, 1):
        file = f"COCO_val2014_{list(COLOURS).index(colour):012d}.jpg"
        pil(colour).save(images / file)
        lines.append(json.dumps({"question_id": i, "image": file, "text": text, "label": label}))
    (root / name).write_text("\n".join(lines) + "\n")
    return root / name


# ---- the readers -------------------------------------------------------------------------------------------
def _marks(item) -> int:
    return item.question.count(IMAGE_TOKEN) + sum(o.count(IMAGE_TOKEN) for o in item.options or [])


def _decodes(bench) -> None:
    for item in bench.items:
        assert _marks(item) == len(item.images), item.id
        for image in item.images:
            assert load_image(image, origin=item.origin).mode == "RGB"


def test_mmmu_split_citations_and_skip(tmp_path):
    bench = read_benchmark("mmmu", write_mmmu(tmp_path / "MMMU"))
    assert bench.split == "validation" and bench.skipped == {NO_ANSWER: 1}
    assert [i.id for i in bench.items] == ["validation_Accounting_1", "validation_Accounting_2", "validation_Art_1"]
    first, open_q, art = bench.items
    assert first.kind == "multiple_choice" and first.answer == "A" and first.subset == "Accounting"
    assert first.question == f"{IMAGE_TOKEN} What colour is the square?"
    assert first.options == ["red", "blue", f"the colour of {IMAGE_TOKEN}"]
    assert [load_image(v).getpixel((8, 8)) for v in first.images] == [COLOURS["red"], COLOURS["green"]]
    assert open_q.kind == "open" and open_q.options is None and open_q.answer == "red"
    # images in citation order: <image 2> first
    assert [load_image(v).getpixel((8, 8)) for v in art.images] == [COLOURS["blue"], COLOURS["yellow"]]
    _decodes(bench)
    dev = read_benchmark("mmmu", tmp_path / "MMMU", split="dev")
    assert [i.id for i in dev.items] == ["validation_Art_9"]


def test_blink_subtasks_images_first(tmp_path):
    bench = read_benchmark("blink", write_blink(tmp_path / "BLINK"))
    assert [i.id for i in bench.items] == ["val_Counting_1", "val_Counting_2", "val_Jigsaw_1"]
    assert [i.subset for i in bench.items] == ["Counting", "Counting", "Jigsaw"]
    assert [i.answer for i in bench.items] == ["A", "B", "B"]
    jigsaw = bench.items[2]
    assert len(jigsaw.images) == 3 and jigsaw.question.startswith(IMAGE_TOKEN * 3 + "\n")
    assert jigsaw.meta["prompt"].endswith("Select from the following choices.")
    _decodes(bench)


def test_blink_test_split_with_hidden_answers_is_no_items(tmp_path):
    write_blink(tmp_path / "BLINK")
    with pytest.raises(DataError, match="no blink items to score"):
        read_benchmark("blink", tmp_path / "BLINK", split="test")


def test_mantis_eval_options_and_short_answer(tmp_path):
    bench = read_benchmark("mantis", write_mantis(tmp_path / "Mantis-Eval"))
    mc, short, prefixed = bench.items
    assert mc.options == ["the first", "the second"] and mc.answer == "B" and mc.subset == "colour"
    assert mc.question == f"{IMAGE_TOKEN} {IMAGE_TOKEN} Which image is red?"
    assert short.kind == "open" and short.options is None and short.answer == "Green"
    assert prefixed.options == ["yellow", "blue"]  # its own letter removed; an unprefixed option kept
    assert prefixed.question == f"{IMAGE_TOKEN * 2}\nWhich is brighter?"  # unplaced images first
    _decodes(bench)


def test_muirbench_images_in_options(tmp_path):
    bench = read_benchmark("muirbench", write_muirbench(tmp_path / "MUIRBENCH"))
    retrieval, counting = bench.items
    assert retrieval.subset == "Visual Retrieval" and retrieval.options[:2] == [IMAGE_TOKEN, IMAGE_TOKEN]
    assert retrieval.question == f"Which image matches {IMAGE_TOKEN}?" and len(retrieval.images) == 3
    assert counting.question.startswith(IMAGE_TOKEN * 2 + "\n") and counting.answer == "B"
    assert retrieval.meta["image_relation"] == "Similar"
    _decodes(bench)


def test_nlvr2_pairs_and_train_directory(tmp_path):
    bench = read_benchmark("nlvr2", write_nlvr2(tmp_path / "nlvr2"))
    assert [i.answer for i in bench.items] == ["true", "false", "true"]
    assert all(i.kind == "yes_no" and len(i.images) == 2 for i in bench.items)
    assert bench.items[1].images[1].endswith("dev-1-1-img1.png") and "Both images are red." in bench.items[1].question
    _decodes(bench)
    # the train layout: images/train/<directory>/...
    train_images = tmp_path / "images" / "train" / "7"
    train_images.mkdir(parents=True)
    pil("red").save(train_images / "train-5-0-img0.png")
    pil("blue").save(train_images / "train-5-0-img1.png")
    (tmp_path / "train.json").write_text(json.dumps(
        {"identifier": "train-5-0-1", "sentence": "One is red.", "label": "True", "directory": 7}) + "\n")
    train = read_benchmark("nlvr2", tmp_path / "train.json", images=tmp_path / "images" / "train")
    assert Path(train.items[0].images[0]) == train_images / "train-5-0-img0.png"


def test_pope_jsonl_folder_and_parquet(tmp_path):
    path = write_pope(tmp_path / "pope")
    bench = read_benchmark("pope", path, images=tmp_path / "pope" / "val2014")
    assert [i.answer for i in bench.items] == [label for _, _, label in POPE_ROWS]
    assert all(i.subset == "random" and i.question.startswith(IMAGE_TOKEN + "\n") for i in bench.items)
    assert [i.id for i in bench.items] == [str(n) for n in range(1, 7)]
    _decodes(bench)
    # a folder of the three split files: read file by file, ids prefixed by the split
    write_pope(tmp_path / "pope", "coco_pope_adversarial.json")
    both = read_benchmark("pope", tmp_path / "pope", images=tmp_path / "pope" / "val2014")
    assert [i.subset for i in both.items] == ["adversarial"] * 6 + ["random"] * 6
    assert both.items[0].id == "adversarial/1"
    # the lmms-lab parquet layout
    from datasets import Image as HFImage
    from datasets import Value

    feats = {"id": Value("string"), "question_id": Value("string"), "question": Value("string"),
             "answer": Value("string"), "image_source": Value("string"), "image": HFImage(),
             "category": Value("string")}
    pq = _parquet(tmp_path / "lmms" / "data" / "test-00000-of-00003.parquet", [
        {"id": "0", "question_id": "1", "question": "Is there a red square?", "answer": "yes", "image_source": "x",
         "image": pil("red"), "category": "popular"}], feats)
    lmms = read_benchmark("pope", pq)
    assert lmms.items[0].id == "popular/1" and lmms.items[0].subset == "popular" and lmms.items[0].answer == "yes"
    _decodes(lmms)


def test_max_items_and_format_names(tmp_path):
    assert len(read_benchmark("blink", write_blink(tmp_path / "BLINK"), max_items=2).items) == 2
    assert format_of("pope_adversarial") == "pope" and format_of("mantis-eval") == "mantis"
    assert format_of("MMMU") == "mmmu"
    with pytest.raises(ValueError, match="unknown format; the name must be"):
        format_of("vqav2")
    with pytest.raises(ValueError, match="unknown option"):
        read_benchmark("pope", tmp_path, split="val")


# ---- bad input: errors naming the file and the row ---------------------------------------------------------
def test_missing_column_names_the_file(tmp_path):
    from datasets import Value

    path = _parquet(tmp_path / "m" / "test-00000-of-00001.parquet", [{"idx": "1", "question": "q?"}],
                    {"idx": Value("string"), "question": Value("string")})
    with pytest.raises(DataError, match=r"test-00000-of-00001.parquet: missing column\(s\) task, options"):
        read_benchmark("muirbench", tmp_path / "m")
    assert path.is_file()


def test_no_files_of_the_split(tmp_path):
    write_blink(tmp_path / "BLINK")
    with pytest.raises(FileNotFoundError, match="no parquet files of split 'validation'.*splits found: test, val"):
        read_benchmark("blink", tmp_path / "BLINK", split="validation")


def _mmmu_bad(tmp_path: Path, **change) -> Path:
    from datasets import Image as HFImage
    from datasets import Value

    row = {"id": "validation_Math_1", "question": "What is <image 1>?", "options": "['a', 'b']", "answer": "A",
           "question_type": "multiple-choice", "image_1": pil("red"), "image_2": None}
    row.update(change)
    feats = {"id": Value("string"), "question": Value("string"), "options": Value("string"),
             "answer": Value("string"), "question_type": Value("string"), "image_1": HFImage(),
             "image_2": HFImage()}
    return _parquet(tmp_path / "Math" / "validation-00000-of-00001.parquet", [row], feats)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"options": "['a', 'b'"}, r"validation-00000-of-00001.parquet:0: 'options' is not a list literal"),
     ({"answer": "C"}, r"parquet:0: the answer 'C' is not an option letter \(A, B\)"),
     ({"question": "What is <image 2>?"}, r"parquet:0: the text cites <image 2> but 'image_2' is empty"),
     ({"question_type": "essay"}, r"parquet:0: question_type must be 'multiple-choice' or 'open'"),
     ({"options": "[]"}, r"parquet:0: 'options' must be a non-empty list of strings")],
)
def test_mmmu_bad_rows(tmp_path, change, message):
    _mmmu_bad(tmp_path, **change)
    with pytest.raises(DataError, match=message):
        read_benchmark("mmmu", tmp_path)


def test_more_marks_than_images(tmp_path):
    from datasets import Image as HFImage
    from datasets import List, Value

    _parquet(tmp_path / "data" / "test-00000-of-00001.parquet", [
        {"idx": "1", "task": "t", "question": "<image> vs <image>?", "options": ["a", "b"], "answer": "A",
         "image_list": [pil("red")]}],
        {"idx": Value("string"), "task": Value("string"), "question": Value("string"),
         "options": List(Value("string")), "answer": Value("string"), "image_list": List(HFImage())})
    with pytest.raises(DataError, match=r"parquet:0: the question and options hold 2 <image> mark\(s\) but the row "
                                        r"has 1 image"):
        read_benchmark("muirbench", tmp_path)


def test_nlvr2_bad_rows(tmp_path):
    path = write_nlvr2(tmp_path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + [json.dumps({"identifier": "dev-9-0-0", "sentence": "x", "label": "True"})]))
    with pytest.raises(DataError, match=r"dev.json:4: image dev-9-0-img0.png not found in"):
        read_benchmark("nlvr2", path)
    path.write_text("\n".join(lines + [json.dumps({"identifier": "dev-1-0-1", "sentence": "x", "label": "maybe"})]))
    with pytest.raises(DataError, match=r"dev.json:4: 'label' must be 'True' or 'False', got 'maybe'"):
        read_benchmark("nlvr2", path)
    path.write_text("\n".join(lines + ["{not json"]))
    with pytest.raises(DataError, match=r"dev.json:4: not valid JSON"):
        read_benchmark("nlvr2", path)
    path.write_text("\n".join(lines + [lines[0]]))
    with pytest.raises(DataError, match=r"dev.json:4: duplicate id 'dev-1-0-0' \(first at .*dev.json:1\)"):
        read_benchmark("nlvr2", path)


def test_pope_bad_rows_and_skips(tmp_path):
    path = write_pope(tmp_path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + [json.dumps({"question_id": 7, "image": "COCO_val2014_000000000000.jpg",
                                                   "text": "Is there a cat?", "label": "Yes!"})]))
    with pytest.raises(DataError, match=r"coco_pope_random.json:7: 'label' must be 'yes' or 'no', got 'Yes!'"):
        read_benchmark("pope", path, images=tmp_path / "val2014")
    path.write_text("\n".join(lines + [json.dumps({"question_id": 7, "image": "missing.jpg", "text": "Is it?",
                                                   "label": "no"})]))
    with pytest.raises(DataError, match=r"coco_pope_random.json:7: image: image file not found: .*missing.jpg"):
        read_benchmark("pope", path, images=tmp_path / "val2014")
    path.write_text("\n".join(lines + [json.dumps({"question_id": 7, "image": "missing.jpg", "text": "Is it?",
                                                   "label": None})]))
    bench = read_benchmark("pope", path, images=tmp_path / "val2014")
    assert len(bench.items) == 6 and bench.skipped == {NO_ANSWER: 1}
    with pytest.raises(FileNotFoundError, match="POPE images: .*nowhere: no such directory"):
        read_benchmark("pope", path, images=tmp_path / "nowhere")
