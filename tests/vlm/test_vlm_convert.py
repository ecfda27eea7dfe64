"""``mm-align convert vlm`` (mm_align.vlm.converters) and the writers (mm_align.vlm.format_writers): round trips
between TRL, LLaMA-Factory and jsonl keep every field the formats hold, image bytes included; skipped rows are
counted by reason; what is written loads in TRL's own data path and reads back."""

from __future__ import annotations

import hashlib
import json

import pytest
from mm_align.vlm.converters import convert, convert_main
from mm_align.vlm.format_writers import write_llamafactory, write_trl_vision
from mm_align.vlm.formats import read_llamafactory, read_trl_vision, read_vlm, read_vlm_jsonl
from mm_align.vlm.vlm_records import load_image, vlm_example
from PIL import Image

from mm_align.data import DataError, PreferencePair, UnpairedSample

from .test_vlm_formats import (
    COLOURS,
    assistant,
    llamafactory_dir,
    png_bytes,
    trl_conversational_parquet,
    trl_string_jsonl,
    user,
    write_image,
    write_jsonl,
)


def _image_bytes(value) -> bytes:
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") is not None else value["path"]
    if isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def view(record) -> tuple:
    """What every format holds of a record: the normalised prompt, the answers, the images' bytes, the id, the rest."""
    ex = vlm_example(record)
    rejected = None if ex.rejected_images is None else [hashlib.sha256(_image_bytes(v)).hexdigest()
                                                        for v in ex.rejected_images]
    extra = {k: v for k, v in record.meta.items() if k not in ("images", "rejected_images")}
    return (ex.messages, ex.chosen, ex.rejected, ex.desirable,
            [hashlib.sha256(_image_bytes(v)).hexdigest() for v in ex.images], rejected, record.id, extra)


def test_round_trips_keep_every_field(tmp_path):
    """TRL parquet (image bytes) -> LLaMA-Factory -> TRL jsonl -> jsonl -> TRL: the same records, byte-equal images."""
    src = trl_conversational_parquet(tmp_path)
    original = [view(r) for r in read_trl_vision(src).records]
    s1 = convert(src, tmp_path / "lf", dst_format="llamafactory", name="pairs")
    assert (s1.src_format, s1.dst_format, s1.read, s1.written) == ("trl", "llamafactory", 2, 2)
    assert json.loads((tmp_path / "lf" / "dataset_info.json").read_text())["pairs"]["ranking"] is True
    assert [view(r) for r in read_llamafactory(tmp_path / "lf").records] == original
    convert(tmp_path / "lf", tmp_path / "trl", dst_format="trl")
    assert [view(r) for r in read_trl_vision(tmp_path / "trl" / "train.jsonl").records] == original
    convert(tmp_path / "trl" / "train.jsonl", tmp_path / "flat" / "pairs.jsonl", dst_format="jsonl")
    assert [view(r) for r in read_vlm_jsonl(tmp_path / "flat" / "pairs.jsonl").records] == original
    convert(tmp_path / "flat" / "pairs.jsonl", tmp_path / "back.jsonl", src_format="jsonl", dst_format="trl")
    assert [view(r) for r in read_vlm(tmp_path / "back.jsonl").records] == original
    # the images are files next to the data, named by content, referenced by relative paths
    rows = [json.loads(line) for line in (tmp_path / "trl" / "train.jsonl").read_text().splitlines()]
    assert rows[1]["images"][0].startswith("images/") and (tmp_path / "trl" / rows[1]["images"][0]).is_file()
    assert load_image(rows[1]["images"][0], tmp_path / "trl").getpixel((0, 0)) == COLOURS["green"]
    flat = json.loads((tmp_path / "flat" / "pairs.jsonl").read_text().splitlines()[0])
    assert flat["images"][0].startswith("pairs_images/")


def test_multi_turn_system_ids_meta_and_image_side_rejections_survive(tmp_path):
    write_image(tmp_path / "src" / "a.png", "red")
    write_image(tmp_path / "src" / "b.png", "blue")
    prompt = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
              *user("<image>", "What is this?"), *assistant("A shape."), *user("Its colour?")]
    path = write_jsonl(tmp_path / "src" / "t.jsonl", [
        {"id": "side", "images": ["a.png"], "rejected_images": ["b.png"], "prompt": prompt,
         "chosen": assistant("red"), "rejected": assistant("red"), "score": 0.25, "tags": ["mdpo"]},
        {"id": "text", "images": ["a.png"], "prompt": prompt, "chosen": "red", "rejected": "blue", "score": 1.0,
         "tags": []},
    ])
    original = [view(r) for r in read_trl_vision(path).records]
    assert original[0][5] is not None  # the image-side rejection is there to be kept
    for to, dst, read in (("llamafactory", tmp_path / "lf", read_llamafactory),
                          ("trl", tmp_path / "trl", lambda p: read_trl_vision(p / "train.jsonl")),
                          ("jsonl", tmp_path / "j.jsonl", read_vlm_jsonl)):
        convert(path, dst, dst_format=to)
        assert [view(r) for r in read(dst).records] == original, to


def test_unpaired_round_trip(tmp_path):
    write_image(tmp_path / "a.png", "white")
    path = write_jsonl(tmp_path / "kto.jsonl", [
        {"images": ["a.png"], "prompt": "<image>Colour?", "completion": "white", "label": True},
        {"images": ["a.png"], "prompt": "<image>Colour?", "completion": "black", "label": False},
    ])
    original = [view(r) for r in read_trl_vision(path, kind="unpaired").records]
    summary = convert(path, tmp_path / "lf", dst_format="llamafactory", kind="unpaired")
    assert summary.text().startswith("read 2 samples")
    assert [view(r) for r in read_llamafactory(tmp_path / "lf", kind="unpaired").records] == original
    convert(tmp_path / "lf", tmp_path / "trl", dst_format="trl", kind="unpaired")
    assert [view(r) for r in read_trl_vision(tmp_path / "trl" / "train.jsonl", kind="unpaired").records] == original


def test_skipped_rows_are_counted_by_reason_in_the_summary(tmp_path, capsys):
    write_image(tmp_path / "a.png", "red")
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"images": ["a.png"], "prompt": "<image>Q", "chosen": "a", "rejected": "b"},
        {"images": ["a.png"], "prompt": "<image><image>Q", "chosen": "a", "rejected": "b"},
        {"images": ["x.png"], "prompt": "<image>Q", "chosen": "a", "rejected": "b"},
        {"images": ["a.png"], "prompt": "<image>Q", "chosen": "a", "rejected": "a"},
    ])
    assert convert_main([str(path), str(tmp_path / "out"), "--to", "llamafactory"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"read 1 pairs from {path} (trl); skipped 3 rows (image count mismatch: 1, missing image: 1, "
                      "tie: 1)")
    assert out[1] == (f"  {path}:2: image count mismatch: the prompt has 2 image placeholder(s) but 'images' holds "
                      "1 image(s)")
    assert out[2] == f"  {path}:3: missing image: images[0]: x.png"
    assert out[-1] == f"wrote 1 pairs to {tmp_path / 'out' / 'train.json'} (llamafactory)"
    assert convert_main([str(path), str(tmp_path / "strict"), "--to", "trl", "--strict"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}:2: image count mismatch")
    assert not (tmp_path / "strict" / "train.jsonl").exists()


def test_convert_errors(tmp_path, capsys):
    src = trl_string_jsonl(tmp_path)
    with pytest.raises(DataError, match="cannot tell the output format; pass --to"):
        convert(src, tmp_path / "somewhere")
    with pytest.raises(DataError, match="source and destination are the same"):
        convert(src, src, dst_format="jsonl")
    with pytest.raises(DataError, match="--dataset and --media-dir are read for a llamafactory source only"):
        convert(src, tmp_path / "o", dst_format="trl", dataset="x")
    with pytest.raises(DataError, match="--name is not read for a .jsonl destination"):
        convert(src, tmp_path / "o.jsonl", dst_format="trl", name="n")
    with pytest.raises(DataError, match="file name stem '../up' must be letters"):
        write_trl_vision([], tmp_path / "o", name="../up")
    with pytest.raises(DataError, match="unknown VLM data format 'sharegpt'"):
        convert(src, tmp_path / "o", dst_format="sharegpt")
    assert convert_main([str(src), str(tmp_path / "x.parquet")]) == 2
    assert "pass --to trl|llamafactory|jsonl" in capsys.readouterr().err
    lf = llamafactory_dir(tmp_path / "lf")
    llamafactory_dir(lf, name="second")
    assert convert_main([str(lf), str(tmp_path / "t"), "--to", "trl"]) == 2
    assert "name one" in capsys.readouterr().err
    assert convert_main([str(lf), str(tmp_path / "t"), "--to", "trl", "--dataset", "second"]) == 0


def test_writers_take_in_memory_records_with_pil_images(tmp_path):
    """What the MIA-DPO builder hands write_trl_vision: PIL images, a distractor used twice (stored once)."""
    target, distractor = Image.new("RGB", (6, 4), COLOURS["red"]), Image.new("RGB", (6, 4), COLOURS["blue"])
    records = [PreferencePair("Image1: <image>\nImage2: <image>\nIn Image1, what colour?", "red", "blue",
                              id=str(i), meta={"images": [target, distractor] if i == 0 else [distractor, target]})
               for i in range(2)]
    out = write_trl_vision(records, tmp_path / "mia", name="mia")
    assert out == tmp_path / "mia" / "mia.jsonl"
    assert len(list((tmp_path / "mia" / "images").iterdir())) == 2
    back = read_trl_vision(out).records
    assert [load_image(v).getpixel((0, 0)) for v in back[1].meta["images"]] == [COLOURS["blue"], COLOURS["red"]]
    texts = [(ex.messages, ex.chosen, ex.rejected) for ex in map(vlm_example, back)]
    assert texts == [(ex.messages, ex.chosen, ex.rejected) for ex in map(vlm_example, records)]
    with pytest.raises(DataError, match=r"cannot write record 0 \(id 'x'\): the prompt has 1 image placeholder"):
        write_trl_vision([PreferencePair("<image>Q", "a", "b", id="x", meta={"images": []})], tmp_path / "bad")
    with pytest.raises(DataError, match="record 0: images\\[0\\]: the image bytes are not an image"):
        write_llamafactory([PreferencePair("<image>Q", "a", "b", meta={"images": [b"not a png"]})],
                           tmp_path / "b", "d")
    with pytest.raises(DataError, match="turns alternate user/assistant from a user turn; turn 1 is 'assistant'"):
        write_llamafactory([PreferencePair([{"role": "assistant", "content": "hi"}, *user("Q")], "a", "b")],
                           tmp_path / "c", "d")
    with pytest.raises(DataError, match="a mix of PreferencePair and UnpairedSample"):
        write_trl_vision([records[0], UnpairedSample("<image>Q", "a", True, meta={"images": [target]})],
                         tmp_path / "m")


def test_write_llamafactory_keeps_other_entries(tmp_path):
    root = llamafactory_dir(tmp_path / "lf")
    records = read_llamafactory(root).records
    write_llamafactory(records[:1], root, "subset")
    info = json.loads((root / "dataset_info.json").read_text())
    assert set(info) == {"vlm_dpo", "subset"}
    assert [view(r) for r in read_llamafactory(root, dataset="subset").records] == [view(records[0])]
    data = json.loads((root / "subset.json").read_text())
    assert data[0]["conversations"] == [{"from": "human", "value": "<image>What colour is it?"}]
    assert data[0]["chosen"] == {"from": "gpt", "value": "red"}


def test_written_trl_data_loads_in_trls_own_data_path(tmp_path):
    """datasets' json loader (how TRL users load a jsonl), then TRL's prepare_multimodal_messages: the images fill
    the placeholders exactly, and TRL sees the rows as conversational."""
    trl_data_utils = pytest.importorskip("trl.data_utils")
    import datasets

    src = trl_conversational_parquet(tmp_path)
    out = convert(src, tmp_path / "trl", dst_format="trl").dst
    ds = datasets.load_dataset("json", data_files=out, split="train")
    assert len(ds) == 2
    for row in ds:
        images = [Image.open(tmp_path / "trl" / p) for p in row["images"]]  # paths relative to the file
        messages = trl_data_utils.prepare_multimodal_messages(row["prompt"], images=images)
        filled = [p["image"] for m in messages for p in m["content"] if p["type"] == "image"]
        assert filled == images
        assert trl_data_utils.is_conversational(row)


def test_cli_convert_vlm(tmp_path, capsys):
    from mm_align.cli import main

    src = trl_string_jsonl(tmp_path)
    assert main(["convert", "vlm", str(src), str(tmp_path / "lf"), "--to", "llamafactory"]) == 0
    assert capsys.readouterr().out.startswith(f"read 2 pairs from {src} (trl)")
    assert len(read_llamafactory(tmp_path / "lf").records) == 2


def test_image_bytes_are_kept_as_they_are(tmp_path):
    """A JPEG stays the same JPEG (no re-encoding) through every writer."""
    import io

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), COLOURS["green"]).save(buf, format="JPEG", quality=75)
    jpeg = buf.getvalue()
    images = [{"bytes": jpeg, "path": None}, png_bytes("red")]
    rec = PreferencePair("<image><image>Q", "a", "b", meta={"images": images})
    trl = write_trl_vision([rec], tmp_path / "t")
    row = json.loads(trl.read_text())
    assert row["images"][0].endswith(".jpg") and row["images"][1].endswith(".png")
    assert (tmp_path / "t" / row["images"][0]).read_bytes() == jpeg
    lf = write_llamafactory([rec], tmp_path / "lf", "d")
    stored = json.loads((lf / "d.json").read_text())[0]["images"]
    assert [(lf / p).read_bytes() for p in stored] == [jpeg, png_bytes("red")]
