"""VLM data readers (mm_align.vlm.formats) on fixture files written here in the published layouts.

- TRL's vision preference format (checked against TRL 1.16's dataset_formats doc "Vision datasets",
  ``prepare_multimodal_messages`` and ``DataCollatorForVisionPreference``): the standard string form with ``<image>``
  marks in jsonl; the conversational form with ``{"type": "image"}`` parts in parquet with image bytes (the layout of
  HuggingFaceH4/rlaif-v_formatted: ``images: Sequence(Image())``, content parts ``{text, type}``) and as a saved HF
  dataset; string contents that get their image parts as TRL gives them; the ``image`` column; implicit prompts.
- LLaMA-Factory (its data/README.md and src/llamafactory/data/{parser,converter}.py): a dataset directory with
  ``dataset_info.json``, sharegpt ranking rows (``conversations`` + single ``chosen``/``rejected`` messages) in a
  JSON array, ``<image>`` marks, image paths relative to the dataset dir (media_dir), openai tags, alpaca, KTO.
- the normalised jsonl through the core reader.

Every bad case is checked with its message and location.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from mm_align.vlm.formats import (
    detect_vlm_format,
    load_llamafactory_entry,
    read_llamafactory,
    read_trl_vision,
    read_vlm,
    read_vlm_jsonl,
)
from mm_align.vlm.vlm_records import load_image, vlm_example
from PIL import Image

from mm_align.data import DataError, PreferencePair, read_preferences, write_preferences

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


# ---- fixture builders (imported by test_vlm_convert / test_vlm_doctor) ---------------------------------------------


def png_bytes(colour: str, size: tuple[int, int] = (8, 8)) -> bytes:
    """A small solid-colour PNG."""
    buf = io.BytesIO()
    Image.new("RGB", size, COLOURS[colour]).save(buf, format="PNG")
    return buf.getvalue()


def write_image(path: Path, colour: str, size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(colour, size))
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    """One line per row; a str row is written as it is (for malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def user(*parts: str) -> list[dict]:
    """A conversational prompt: "<image>" -> an image part, anything else a text part."""
    content = [{"type": "image"} if p == "<image>" else {"type": "text", "text": p} for p in parts]
    return [{"role": "user", "content": content}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def trl_string_jsonl(root: Path) -> Path:
    """TRL's standard form: string prompt with <image> marks, string answers, image paths relative to the file."""
    write_image(root / "imgs" / "red.png", "red")
    write_image(root / "imgs" / "blue.png", "blue")
    return write_jsonl(root / "train.jsonl", [
        {"images": ["imgs/red.png"], "prompt": "<image>What colour is the shape?", "chosen": "red",
         "rejected": "blue", "id": "a"},
        {"images": ["imgs/red.png", "imgs/blue.png"], "prompt": "<image><image>Which image is blue?",
         "chosen": "the second", "rejected": "the first", "id": "b"},
    ])


def trl_conversational_parquet(root: Path) -> Path:
    """TRL's conversational form in parquet with image bytes, written by datasets (rlaif-v_formatted's layout)."""
    import datasets
    from datasets import Features, List, Value
    from datasets import Image as ImageFeature

    message = List({"role": Value("string"), "content": List({"text": Value("string"), "type": Value("string")})})
    features = Features({"images": List(ImageFeature()), "prompt": message, "chosen": message, "rejected": message})

    def parts(*items: str) -> list[dict]:
        return [{"type": "image", "text": None} if p == "<image>" else {"type": "text", "text": p} for p in items]

    data = {
        "images": [[{"bytes": png_bytes("red"), "path": None}],
                   [{"bytes": png_bytes("green"), "path": None}, {"bytes": png_bytes("blue"), "path": None}]],
        "prompt": [[{"role": "user", "content": parts("<image>", "What colour?")}],
                   [{"role": "user", "content": parts("<image>", "<image>", "Which is green?")}]],
        "chosen": [[{"role": "assistant", "content": parts("red")}], [{"role": "assistant", "content": parts("1")}]],
        "rejected": [[{"role": "assistant", "content": parts("blue")}],
                     [{"role": "assistant", "content": parts("2")}]],
    }
    path = root / "rlaif.parquet"
    datasets.Dataset.from_dict(data, features=features).to_parquet(str(path))
    return path


def llamafactory_dir(root: Path, rows: list | None = None, entry: dict | None = None, name: str = "vlm_dpo") -> Path:
    """A LLaMA-Factory dataset dir: dataset_info.json + a sharegpt ranking JSON array + images under mllm_data/."""
    root.mkdir(parents=True, exist_ok=True)
    write_image(root / "mllm_data" / "1.png", "red")
    write_image(root / "mllm_data" / "2.png", "blue")
    if rows is None:
        rows = [
            {"conversations": [{"from": "human", "value": "<image>What colour is it?"}],
             "chosen": {"from": "gpt", "value": "red"}, "rejected": {"from": "gpt", "value": "green"},
             "images": ["mllm_data/1.png"]},
            {"conversations": [{"from": "system", "value": "Answer briefly."},
                               {"from": "human", "value": "<image>Look at this."},
                               {"from": "gpt", "value": "I see a red square."},
                               {"from": "human", "value": "And this one? <image>"}],
             "chosen": {"from": "gpt", "value": "blue"}, "rejected": {"from": "gpt", "value": "red"},
             "images": ["mllm_data/1.png", "mllm_data/2.png"]},
        ]
    (root / f"{name}.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    entry = entry or {"file_name": f"{name}.json", "formatting": "sharegpt", "ranking": True,
                      "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                                  "images": "images"}}
    info = root / "dataset_info.json"
    existing = json.loads(info.read_text()) if info.exists() else {}
    info.write_text(json.dumps({**existing, name: entry}, indent=2), encoding="utf-8")
    return root


def pixel(value, base_dir: Path | None = None) -> tuple[int, int, int]:
    return load_image(value, base_dir).getpixel((0, 0))


def line_of(path: Path, text: str) -> int:
    """The 1-based line of ``path`` holding ``text``."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


# ---- TRL -----------------------------------------------------------------------------------------------------------


def test_trl_string_form_jsonl_loads_with_absolute_image_paths(tmp_path):
    path = trl_string_jsonl(tmp_path)
    result = read_trl_vision(path)
    assert result.skipped == [] and [r.id for r in result.records] == ["a", "b"]
    first, second = result.records
    assert first.prompt == "<image>What colour is the shape?" and (first.chosen, first.rejected) == ("red", "blue")
    assert first.meta["images"] == [str((tmp_path / "imgs" / "red.png").resolve())]
    assert first.origin == f"{path}:1"
    ex = vlm_example(second)
    assert [p["type"] for p in ex.messages[0]["content"]] == ["image", "image", "text"]
    assert [pixel(v) for v in ex.images] == [COLOURS["red"], COLOURS["blue"]]


def test_trl_bad_rows_are_skipped_and_counted_with_their_lines(tmp_path):
    write_image(tmp_path / "a.png", "red")
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"images": ["a.png"], "prompt": "<image><image>Two?", "chosen": "x", "rejected": "y"},   # 1: 2 marks, 1 image
        {"images": ["gone.png"], "prompt": "<image>Colour?", "chosen": "x", "rejected": "y"},    # 2: missing file
        '{"images": ["a.png"], "prompt": ',                                                      # 3: malformed
        {"images": ["a.png"], "prompt": user("<image>", "Q"), "chosen": assistant(""), "rejected": "y"},  # 4
        {"images": ["a.png"], "prompt": "<image>Q", "chosen": "same", "rejected": assistant("same")},     # 5: tie
        {"images": ["a.png"], "prompt": "<image>Q", "chosen": "ok", "rejected": "fine"},          # 6: kept
        {"images": [None], "prompt": "<image>Q", "chosen": "x", "rejected": "y"},                  # 7: null image
        {"images": ["a.png"], "prompt": "<image>Q", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"},
    ])
    result = read_trl_vision(path)
    assert [r.origin for r in result.records] == [f"{path}:6"]
    reasons = {s.where(): s.reason for s in result.skipped}
    assert reasons[f"{path}:1"] == ("image count mismatch: the prompt has 2 image placeholder(s) but 'images' holds "
                                    "1 image(s)")
    assert reasons[f"{path}:2"] == "missing image: images[0]: gone.png"
    assert reasons[f"{path}:3"].startswith("malformed json: ")
    assert reasons[f"{path}:4"] == "empty chosen"
    assert reasons[f"{path}:5"] == "tie: chosen and rejected are identical"
    assert reasons[f"{path}:7"] == "bad image: images[0] is null"
    assert reasons[f"{path}:8"] == "bad answer: 'chosen' must be an assistant message, got role 'user'"
    assert result.skipped_by_reason() == {"image count mismatch": 1, "missing image": 1, "malformed json": 1,
                                          "empty chosen": 1, "tie": 1, "bad image": 1, "bad answer": 1}
    with pytest.raises(DataError, match=rf"^{path}:1: image count mismatch: the prompt has 2 image placeholder"):
        read_trl_vision(path, strict=True)


def test_trl_conversational_parquet_with_image_bytes(tmp_path):
    path = trl_conversational_parquet(tmp_path)
    result = read_trl_vision(path)
    assert result.skipped == [] and len(result.records) == 2
    rec = result.records[1]
    assert rec.origin == f"{path}: row 1 (0-based)"
    ex = vlm_example(rec)
    assert ex.messages == user("<image>", "<image>", "Which is green?")
    assert (ex.chosen, ex.rejected) == ("1", "2")
    assert [pixel(v) for v in ex.images] == [COLOURS["green"], COLOURS["blue"]]
    assert all(isinstance(v, dict) and isinstance(v["bytes"], bytes) for v in ex.images)


def test_trl_saved_hf_dataset(tmp_path):
    import datasets

    parquet = trl_conversational_parquet(tmp_path)
    saved = tmp_path / "saved"
    datasets.Dataset.from_parquet(str(parquet)).save_to_disk(str(saved))
    assert detect_vlm_format(saved) == "trl"  # an HF save_to_disk dir has a dataset_info.json too
    result = read_vlm(saved)
    assert [vlm_example(r).chosen for r in result.records] == ["red", "1"]
    assert pixel(result.records[0].meta["images"][0]) == COLOURS["red"]


def test_string_contents_get_their_image_parts_as_trl_gives_them(tmp_path):
    """TRL's conversational form with string contents: the first user message gets one image part per image before
    its text (trl.data_utils.prepare_multimodal_messages, which this test runs on the same row to compare)."""
    trl_data_utils = pytest.importorskip("trl.data_utils")
    write_image(tmp_path / "a.png", "red")
    write_image(tmp_path / "b.png", "blue")
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compare them."}]
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"images": ["a.png", "b.png"], "prompt": prompt, "chosen": [{"role": "assistant", "content": "a is red"}],
         "rejected": [{"role": "assistant", "content": "both blue"}]},
    ])
    rec = read_trl_vision(path).records[0]
    ours = vlm_example(rec).messages
    theirs = trl_data_utils.prepare_multimodal_messages(prompt, images=["A", "B"])
    assert [[p["type"] for p in m["content"]] for m in ours] == [[p["type"] for p in m["content"]] for m in theirs]
    assert ours[1]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare them."}]
    assert vlm_example(rec).rejected == "both blue"


def test_single_image_column_and_implicit_prompt(tmp_path):
    write_image(tmp_path / "a.png", "green")
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"image": "a.png", "prompt": "<image>Colour?", "chosen": "green", "rejected": "red"},
        {"images": ["a.png"], "chosen": conv + assistant("green"), "rejected": conv + assistant("red")},
        {"images": ["a.png"], "chosen": assistant("green"), "rejected": assistant("red")},
    ])
    result = read_trl_vision(path)
    assert [r.origin for r in result.records] == [f"{path}:1", f"{path}:2"]
    assert pixel(result.records[0].meta["images"][0]) == COLOURS["green"]
    implicit = vlm_example(result.records[1])
    assert implicit.messages == user("<image>", "Colour?") and (implicit.chosen, implicit.rejected) == ("green", "red")
    assert result.skipped[0].reason.startswith("missing column: prompt")


def test_trl_unpaired_rows(tmp_path):
    write_image(tmp_path / "a.png", "red")
    path = write_jsonl(tmp_path / "kto.jsonl", [
        {"images": ["a.png"], "prompt": "<image>Colour?", "completion": "red", "label": True},
        {"images": ["a.png"], "prompt": "<image>Colour?", "completion": assistant("blue"), "label": False},
        {"images": ["a.png"], "prompt": "<image>Colour?", "completion": "blue", "label": "maybe"},
        {"images": [], "prompt": "<image>Colour?", "completion": "blue", "label": False},
    ])
    result = read_trl_vision(path, kind="unpaired")
    assert [(vlm_example(r).chosen, r.desirable) for r in result.records] == [("red", True), ("blue", False)]
    assert [s.reason.split(":")[0] for s in result.skipped] == ["bad label", "image count mismatch"]


def test_unknown_options_and_kinds_are_errors(tmp_path):
    path = trl_string_jsonl(tmp_path)
    with pytest.raises(DataError, match="unknown trl option\\(s\\) dataset; valid: container"):
        read_trl_vision(path, dataset="x")
    with pytest.raises(DataError, match="kind must be 'paired' or 'unpaired'"):
        read_trl_vision(path, kind="ranked")


# ---- the normalised jsonl ------------------------------------------------------------------------------------------


def test_normalised_jsonl_goes_through_the_core_reader(tmp_path):
    """write_preferences -> read_preferences keeps a VLM record usable: vlm_example accepts it and its relative image
    path loads against the file's directory (the adapter's base_dir)."""
    write_image(tmp_path / "img" / "a.png", "red")
    write_image(tmp_path / "img" / "b.png", "blue")
    text_side = PreferencePair("<image>Colour?", "red", "blue", id="t", meta={"images": ["img/a.png"]})
    chat = PreferencePair(user("<image>", "<image>", "Same?"), assistant("no"), assistant("yes"), id="c",
                          meta={"images": ["img/a.png", "img/b.png"], "source": "unit"})
    path = write_preferences([text_side, chat], tmp_path / "pairs.jsonl")
    core = read_preferences(path)
    assert core.skipped == [] and [r.id for r in core.records] == ["t", "c"]
    ex = vlm_example(core.records[1])
    assert ex.messages == user("<image>", "<image>", "Same?") and (ex.chosen, ex.rejected) == ("no", "yes")
    assert [pixel(v, tmp_path) for v in ex.images] == [COLOURS["red"], COLOURS["blue"]]
    ours = read_vlm_jsonl(path)
    assert [vlm_example(r).messages for r in ours.records] == [vlm_example(r).messages for r in core.records]
    assert ours.records[1].meta["source"] == "unit"


def test_image_side_rejections_are_kept_and_real_ties_dropped(tmp_path):
    """An image-side rejection has the same answer on both sides: the core reader keeps it (a rejected_images column),
    and so do read_vlm_jsonl / read_trl_vision, which also drop the one whose rejected images ARE the images."""
    write_image(tmp_path / "a.png", "red")
    write_image(tmp_path / "b.png", "blue")
    side = PreferencePair("<image>Colour?", "red", "red", id="s",
                          meta={"images": ["a.png"], "rejected_images": ["b.png"]})
    same = PreferencePair("<image>Colour?", "red", "red", id="t",
                          meta={"images": ["a.png"], "rejected_images": ["a.png"]})
    path = write_preferences([side, same], tmp_path / "side.jsonl")
    assert [r.id for r in read_preferences(path).records] == ["s", "t"]
    for reader in (read_vlm_jsonl, read_trl_vision):
        result = reader(path)
        assert [r.id for r in result.records] == ["s"]
        assert vlm_example(result.records[0]).image_side
        assert pixel(result.records[0].meta["rejected_images"][0]) == COLOURS["blue"]
        assert result.skipped[0].reason == ("tie: chosen and rejected are identical, and so are images and "
                                            "rejected_images")
    bad = write_preferences([PreferencePair("<image>Q", "a", "a", meta={"images": ["a.png"], "rejected_images": []})],
                            tmp_path / "bad.jsonl")
    assert read_vlm_jsonl(bad).skipped[0].reason == ("image count mismatch: the prompt has 1 image placeholder(s) "
                                                     "but 'rejected_images' holds 0 image(s)")


def test_jsonl_reader_has_none_of_trls_implicit_rules(tmp_path):
    write_image(tmp_path / "a.png", "red")
    path = write_jsonl(tmp_path / "n.jsonl", [
        {"images": ["a.png"], "prompt": [{"role": "user", "content": "Colour?"}], "chosen": "r", "rejected": "b"},
    ])
    assert read_trl_vision(path).records  # TRL puts the image before the text
    assert read_vlm_jsonl(path).skipped[0].reason.startswith("image count mismatch: the prompt has 0 image")


# ---- LLaMA-Factory -------------------------------------------------------------------------------------------------


def test_llamafactory_sharegpt_ranking_dataset(tmp_path):
    root = llamafactory_dir(tmp_path / "data")
    assert detect_vlm_format(root) == "llamafactory"
    result = read_llamafactory(root)
    assert result.skipped == [] and len(result.records) == 2
    first, multi = result.records
    assert first.origin == f"{root / 'vlm_dpo.json'}:2"  # the line its object starts on
    assert (first.chosen, first.rejected) == ("red", "green")
    assert first.meta["images"] == [str((root / "mllm_data" / "1.png").resolve())]
    ex = vlm_example(multi)
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant", "user"]  # every turn before the answer
    assert ex.messages[2]["content"] == [{"type": "text", "text": "I see a red square."}]
    assert ex.messages[3]["content"] == [{"type": "text", "text": "And this one?"}, {"type": "image"}]
    assert [pixel(v) for v in ex.images] == [COLOURS["red"], COLOURS["blue"]]
    assert (ex.chosen, ex.rejected) == ("blue", "red")
    # pointing at the data file selects its entry
    assert len(read_vlm(root / "vlm_dpo.json").records) == 2


def test_llamafactory_bad_rows_name_file_and_line(tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "<image><image>Which?"}],
         "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"},
         "images": ["mllm_data/1.png"]},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "human", "value": "<image>Colour?"}],
         "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"},
         "images": ["mllm_data/1.png"]},
        {"conversations": [{"from": "human", "value": "<image>Colour?"}, {"from": "gpt", "value": "red"}],
         "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"},
         "images": ["mllm_data/1.png"]},
        {"conversations": [{"from": "human", "value": "<image>Colour?"}],
         "chosen": "red", "rejected": {"from": "gpt", "value": "b"}, "images": ["mllm_data/1.png"]},
        {"conversations": [{"from": "human", "value": "<image>Colour?"}],
         "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"},
         "images": ["mllm_data/nope.png"]},
        {"conversations": [{"from": "human", "value": "<image>Colour?"}],
         "chosen": {"from": "gpt", "value": "red"}, "rejected": {"from": "gpt", "value": "blue"},
         "images": ["mllm_data/2.png"]},
    ]
    root = llamafactory_dir(tmp_path / "data", rows)
    data = root / "vlm_dpo.json"
    result = read_llamafactory(root)
    assert [r.chosen for r in result.records] == ["red"]
    starts = [i for i, line in enumerate(data.read_text().splitlines(), 1) if line == "  {"]
    reasons = {s.where(): s.reason for s in result.skipped}
    assert reasons == {
        f"{data}:{starts[0]}": "image count mismatch: the prompt has 2 image placeholder(s) but 'images' holds 1 "
                               "image(s)",
        f"{data}:{starts[1]}": "bad roles: turn 2 is from 'human', expected 'gpt' or 'function_call'",
        f"{data}:{starts[2]}": "bad turn count: a ranking conversation ends with a 'human' turn (the answers are in "
                               "chosen and rejected); got 2 turn(s)",
        f"{data}:{starts[3]}": "bad answer: 'chosen' must be one message {'from': 'gpt', 'value': ...}, got str",
        f"{data}:{starts[4]}": "missing image: images[0]: mllm_data/nope.png",
    }
    with pytest.raises(DataError, match=rf"^{data}:{starts[0]}: image count mismatch"):
        read_llamafactory(root, strict=True)


def test_llamafactory_entry_selection_and_errors(tmp_path):
    root = llamafactory_dir(tmp_path / "data")
    llamafactory_dir(root, name="other")
    with pytest.raises(DataError, match=r"2 preference datasets in it \(vlm_dpo, other\); name one"):
        read_llamafactory(root)
    assert len(read_llamafactory(root, dataset="other").records) == 2
    with pytest.raises(DataError, match="no dataset 'nope'; its datasets: vlm_dpo, other"):
        read_llamafactory(root, dataset="nope")
    info = json.loads((root / "dataset_info.json").read_text())
    info["hub"] = {"hf_hub_url": "someone/rlhf-v", "ranking": True}
    info["sft"] = {"file_name": "vlm_dpo.json", "formatting": "sharegpt"}
    (root / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="dataset 'hub' is read from hf_hub_url .*only local file_name entries"):
        read_llamafactory(root, dataset="hub")
    with pytest.raises(DataError, match="dataset 'sft' is not a preference dataset"):
        read_llamafactory(root, dataset="sft")
    (root / "dataset_info.json").write_text(json.dumps({"hub": info["hub"], "sft": info["sft"]}))
    with pytest.raises(DataError, match=r"none of its datasets \(hub, sft\) is a local preference"):
        read_llamafactory(root)
    with pytest.raises(DataError, match="not a LLaMA-Factory dataset directory"):
        load_llamafactory_entry(tmp_path)
    with pytest.raises(DataError, match="unknown llamafactory option\\(s\\) split"):
        read_llamafactory(root, dataset="other", split="train")


def test_llamafactory_image_paths_resolve_like_llamafactory(tmp_path, monkeypatch):
    """media_dir first (default: the dataset dir), then the path as given (absolute, or from the working dir)."""
    media = tmp_path / "media"
    write_image(media / "x.png", "green")
    write_image(tmp_path / "cwd" / "y.png", "white")
    rows = [{"conversations": [{"from": "human", "value": "<image><image>Which?"}],
             "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"},
             "images": ["x.png", "y.png"]}]
    root = llamafactory_dir(tmp_path / "data", rows)
    monkeypatch.chdir(tmp_path / "cwd")
    assert read_llamafactory(root).skipped[0].reason == "missing image: images[0]: x.png"
    rec = read_llamafactory(root, media_dir=media).records[0]
    assert [pixel(v) for v in rec.meta["images"]] == [COLOURS["green"], COLOURS["white"]]


def test_llamafactory_openai_tags_alpaca_and_kto(tmp_path):
    write_image(tmp_path / "a.png", "red")
    openai_rows = [{"messages": [{"role": "system", "content": "Brief."}, {"role": "user", "content": "<image>Hue?"}],
                    "better": {"role": "assistant", "content": "red"},
                    "worse": {"role": "assistant", "content": "blue"},
                    "pics": ["a.png"], "id": 7, "score": 0.5}]
    root = llamafactory_dir(tmp_path, openai_rows, name="oai", entry={
        "file_name": "oai.json", "formatting": "sharegpt", "ranking": True,
        "columns": {"messages": "messages", "chosen": "better", "rejected": "worse", "images": "pics"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}})
    rec = read_llamafactory(root, dataset="oai").records[0]
    assert rec.id == "7" and rec.meta["score"] == 0.5 and rec.chosen == "red"
    assert [m["role"] for m in vlm_example(rec).messages] == ["system", "user"]
    alpaca = [{"instruction": "<image>Name the colour.", "input": "One word.", "chosen": "red", "rejected": "blue",
               "images": ["a.png"]}]
    llamafactory_dir(root, alpaca, name="alp", entry={
        "file_name": "alp.json", "ranking": True,
        "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected",
                    "images": "images"}})
    rec = read_llamafactory(root, dataset="alp").records[0]
    assert vlm_example(rec).messages == user("<image>", "Name the colour.\nOne word.")
    kto = [{"conversations": [{"from": "human", "value": "<image>Hue?"}, {"from": "gpt", "value": "red"}],
            "kto_tag": True, "images": ["a.png"]},
           {"conversations": [{"from": "human", "value": "<image>Hue?"}, {"from": "gpt", "value": "blue"}],
            "kto_tag": "no", "images": ["a.png"]}]
    llamafactory_dir(root, kto, name="kto", entry={
        "file_name": "kto.json", "formatting": "sharegpt",
        "columns": {"messages": "conversations", "kto_tag": "kto_tag", "images": "images"}})
    result = read_llamafactory(root, kind="unpaired")  # the only entry with a kto_tag column
    assert [(r.completion, r.desirable) for r in result.records] == [("red", True)]
    assert result.skipped[0].reason == "bad kto_tag: 'kto_tag' must be true or false, got 'no'"


def test_llamafactory_jsonl_and_parquet_files_and_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = llamafactory_dir(tmp_path / "data")
    rows = json.loads((root / "vlm_dpo.json").read_text())
    info = json.loads((root / "dataset_info.json").read_text())["vlm_dpo"]
    pq.write_table(pa.Table.from_pylist(rows), root / "pairs.parquet")
    folder = root / "parts"
    write_jsonl(folder / "a.jsonl", rows[:1])
    write_jsonl(folder / "b.jsonl", rows[1:] + ["{broken"])
    (root / "dataset_info.json").write_text(json.dumps({"pq": {**info, "file_name": "pairs.parquet"},
                                                        "parts": {**info, "file_name": "parts"}}))
    from_parquet = read_llamafactory(root, dataset="pq")
    assert [r.origin for r in from_parquet.records] == [f"{root / 'pairs.parquet'}: row {i} (0-based)" for i in (0, 1)]
    assert [vlm_example(r).messages for r in from_parquet.records] == [
        vlm_example(r).messages for r in read_llamafactory(llamafactory_dir(tmp_path / "again")).records]
    result = read_llamafactory(root, dataset="parts")
    assert [r.origin for r in result.records] == [f"{folder / 'a.jsonl'}:1", f"{folder / 'b.jsonl'}:1"]
    assert result.skipped[0].where() == f"{folder / 'b.jsonl'}:2" and result.skipped[0].row == 2  # across files
    pq.write_table(pa.Table.from_pylist(rows), folder / "c.parquet")
    with pytest.raises(DataError, match="the files of 'parts' must all be of one type"):
        read_llamafactory(root, dataset="parts")


# ---- through the VLM adapter ---------------------------------------------------------------------------------------


def test_the_same_pair_in_every_format_scores_the_same_through_the_adapter(tmp_path):
    """One pair written as TRL's string form (jsonl, image file), TRL's conversational form (parquet, image bytes) and
    a LLaMA-Factory ranking dataset, read by the adapter's own data formats (data.format trl_vision / llamafactory
    through orchestration.read_data): the tiny LLaVA gives all three the same log-probs."""
    import datasets
    import torch
    from datasets import Features, List, Value
    from datasets import Image as ImageFeature

    from mm_align import recipes
    from mm_align.orchestration import read_data
    from mm_align.run_config import DataConfig

    from .tiny_vlms import draw_shape, make_tiny_llava

    draw_shape(tmp_path / "lf" / "img" / "shape.png", "red")
    image = tmp_path / "lf" / "img" / "shape.png"
    question, good, bad = "What colour is the shape?", "red", "blue circle"
    write_jsonl(tmp_path / "trl" / "t.jsonl", [{"images": [str(image)], "prompt": f"<image>{question}",
                                                "chosen": good, "rejected": bad}])
    message = List({"role": Value("string"), "content": List({"text": Value("string"), "type": Value("string")})})
    features = Features({"images": List(ImageFeature()), "prompt": message, "chosen": message, "rejected": message})
    datasets.Dataset.from_dict({
        "images": [[{"bytes": image.read_bytes(), "path": None}]],
        "prompt": [[{"role": "user", "content": [{"type": "image", "text": None},
                                                 {"type": "text", "text": question}]}]],
        "chosen": [assistant(good)], "rejected": [assistant(bad)]}, features=features).to_parquet(
        str(tmp_path / "c.parquet"))
    llamafactory_dir(tmp_path / "lf", [{"conversations": [{"from": "human", "value": f"<image>{question}"}],
                                        "chosen": {"from": "gpt", "value": good},
                                        "rejected": {"from": "gpt", "value": bad}, "images": ["img/shape.png"]}])
    adapter = recipes.build_adapter("vlm", {"pretrained": str(make_tiny_llava(tmp_path / "llava")),
                                            "max_length": 256})
    records = []
    for path, fmt in ((tmp_path / "trl" / "t.jsonl", "trl_vision"), (tmp_path / "c.parquet", "trl_vision"),
                      (tmp_path / "lf", "llamafactory")):
        result = read_data(adapter, str(path), DataConfig(train=str(path), format=fmt), "paired")
        assert result.skipped == []
        records += result.records
    with torch.no_grad():
        s = adapter.scores(adapter.collate(records, [0, 0, 0]), adapter.model)
    assert torch.allclose(s.chosen, s.chosen[0].expand(3), atol=1e-5)
    assert torch.allclose(s.rejected, s.rejected[0].expand(3), atol=1e-5)
    assert s.chosen[0].item() != pytest.approx(s.rejected[0].item(), abs=1e-4)
