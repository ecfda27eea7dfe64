"""Readers and writers of mm_align.data: round trips, skipped-and-counted rows, strict mode, shards."""

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mm_align.data import (
    ColumnMap,
    DataError,
    PreferencePair,
    ReadResult,
    SkippedRow,
    UnpairedSample,
    detect_format,
    iter_rows,
    read_preferences,
    write_preferences,
)

PAIRS = [  # one type per column: what columnar formats (parquet, hf) can hold
    PreferencePair("a red circle", "img/0_w.png", "img/0_l.png", id="0", meta={"seed": 1, "tags": ["a"]}),
    PreferencePair("a blue square", "yes", "no", id="1", meta={"seed": 2, "tags": []}),
    PreferencePair("toy", "3", "5", id=None, meta={"seed": 3, "tags": ["b", "c"]}),
]
MIXED = [  # jsonl holds anything JSON holds: chat prompts, numbers, dicts
    PreferencePair([{"role": "user", "content": "which?"}], 3, 5, id="m0", meta={"x": {"k": [1, 2]}}),
    PreferencePair("plain", {"text": "a"}, ["b"], id="m1", meta={"x": None}),
]
UNPAIRED = [
    UnpairedSample("p0", "good answer", True, id="u0", meta={"score": 0.9}),
    UnpairedSample("p1", "bad answer", False, id="u1", meta={"score": 0.1}),
]
BYTE_PAIRS = [
    PreferencePair("caption 0", b"\x89PNG-w0", b"\x89PNG-l0", id="b0", meta={"jpg_extra": b"\x00\x01", "label_0": 1.}),
    PreferencePair("caption 1", b"\xff\xd8-w1", b"\xff\xd8-l1", id="b1", meta={"jpg_extra": b"\x02", "label_0": 1.}),
]


def _write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize("name,fmt", [("d.jsonl", "jsonl"), ("d.parquet", "parquet"), ("d_hf", "hf")])
def test_paired_round_trip(tmp_path, name, fmt):
    path = write_preferences(PAIRS, tmp_path / name)
    assert path == tmp_path / name
    assert detect_format(path) == fmt
    result = read_preferences(path)
    assert isinstance(result, ReadResult) and result.skipped == []
    assert result.records == PAIRS


@pytest.mark.parametrize("name", ["u.jsonl", "u.parquet", "u_hf"])
def test_unpaired_round_trip(tmp_path, name):
    path = write_preferences(UNPAIRED, tmp_path / name)
    result = read_preferences(path, kind="unpaired")
    assert result.records == UNPAIRED
    assert [r.desirable for r in result.records] == [True, False]


@pytest.mark.parametrize("name", ["b.parquet", "b_hf"])
def test_bytes_survive_parquet_and_hf(tmp_path, name):
    path = write_preferences(BYTE_PAIRS, tmp_path / name)
    records = read_preferences(path).records
    assert records == BYTE_PAIRS
    assert isinstance(records[0].chosen, bytes) and records[0].meta["jpg_extra"] == b"\x00\x01"


def test_jsonl_round_trips_any_json_value(tmp_path):
    assert read_preferences(write_preferences(MIXED, tmp_path / "m.jsonl")).records == MIXED


def test_mixed_types_in_a_parquet_column_raise_data_error(tmp_path):
    with pytest.raises(DataError, match=r"m\.parquet"):
        write_preferences(MIXED, tmp_path / "m.parquet")
    assert list(tmp_path.iterdir()) == []


def test_bytes_in_jsonl_are_refused_and_nothing_is_written(tmp_path):
    target = tmp_path / "b.jsonl"
    with pytest.raises(DataError, match=r"record 0 \(id 'b0'\).*parquet"):
        write_preferences(BYTE_PAIRS, target)
    assert list(tmp_path.iterdir()) == []  # no target, no temp file left behind


def test_unserialisable_value_names_the_record(tmp_path):
    records = [PAIRS[0], PreferencePair("p", "a", "b", id="odd", meta={"when": object()})]
    with pytest.raises(DataError, match=r"record 1 \(id 'odd'\).*not JSON-serialisable"):
        write_preferences(records, tmp_path / "x.jsonl")


def test_write_is_atomic_and_replaces(tmp_path):
    path = write_preferences(PAIRS, tmp_path / "d.jsonl")
    write_preferences(PAIRS[:1], path)
    assert len(read_preferences(path).records) == 1
    hf = write_preferences(PAIRS, tmp_path / "hf")
    write_preferences(PAIRS[:2], hf)
    assert len(read_preferences(hf).records) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "hf"]  # no temp names left


@pytest.mark.parametrize("name", ["e.jsonl", "e.parquet", "e_hf"])
def test_no_records_round_trip(tmp_path, name):
    result = read_preferences(write_preferences([], tmp_path / name))
    assert result.records == [] and result.skipped == []


@pytest.mark.parametrize("name", ["d.parquet", "d_hf"])
def test_columnar_meta_keys_missing_from_the_first_record_are_kept(tmp_path, name):
    records = [PreferencePair("p0", "a", "b"), PreferencePair("p1", "c", "d", meta={"late": 7})]
    back = read_preferences(write_preferences(records, tmp_path / name)).records
    assert back[1].meta == {"late": 7}
    assert back[0].meta == {"late": None}  # columnar: absent -> None (documented)


def test_column_map_and_meta(tmp_path):
    path = _write_lines(tmp_path / "pick.jsonl", [
        json.dumps({"caption": "a cat", "img_w": "w.png", "img_l": "l.png", "ranking_id": 12, "model_0": "m"}),
    ])
    cols = ColumnMap(prompt="caption", chosen="img_w", rejected="img_l", id="ranking_id")
    (record,) = read_preferences(path, columns=cols).records
    assert record == PreferencePair("a cat", "w.png", "l.png", id="12", meta={"model_0": "m"})


def _bad_jsonl(tmp_path):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    return _write_lines(tmp_path / "bad.jsonl", [
        json.dumps({**good, "id": "r0"}),
        "{not json",
        json.dumps({"prompt": "p", "chosen": "a", "id": "r2"}),
        json.dumps({**good, "prompt": "   ", "id": "r3"}),
        json.dumps({**good, "chosen": 4, "rejected": 4, "id": "r4"}),
        json.dumps({**good, "prompt": [], "id": "r5"}),
        json.dumps({**good, "id": "r6"}),
    ])


def test_non_strict_read_skips_and_counts_exactly(tmp_path, caplog):
    path = _bad_jsonl(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mm_align.data.io"):
        result = read_preferences(path)
    assert [r.id for r in result.records] == ["r0", "r6"]
    assert result.skipped == [
        SkippedRow(str(path), 1, "malformed json: Expecting property name enclosed in double quotes (column 2)"),
        SkippedRow(str(path), 2, "missing column: rejected"),
        SkippedRow(str(path), 3, "empty prompt"),
        SkippedRow(str(path), 4, "tie: chosen and rejected are identical"),
        SkippedRow(str(path), 5, "empty prompt"),
    ]
    assert result.skipped_by_reason() == {"malformed json": 1, "missing column": 1, "empty prompt": 2, "tie": 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one summary at the end, not one line per row
    assert "skipped 5" in warnings[0] and "empty prompt: 2" in warnings[0] and "tie: 1" in warnings[0]


def test_blank_lines_are_not_rows_but_keep_line_numbers(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl", ["", json.dumps({"prompt": "p", "chosen": "a"}), "   "])
    result = read_preferences(path)
    assert result.records == [] and result.skipped == [SkippedRow(str(path), 1, "missing column: rejected")]


def test_strict_raises_at_the_first_bad_row_naming_file_and_row(tmp_path):
    path = _bad_jsonl(tmp_path)
    with pytest.raises(DataError) as info:
        read_preferences(path, strict=True)
    message = str(info.value)
    assert "bad.jsonl:2: malformed json" in message  # line 2 of the file, 1-based as editors count
    assert "row" not in message and "line 1" not in message


def test_strict_names_a_missing_column_row(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl", [json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})] * 3
                        + [json.dumps({"prompt": "p", "rejected": "b"})])
    with pytest.raises(DataError, match=r"d\.jsonl:4: missing column: chosen"):
        read_preferences(path, strict=True)


@pytest.mark.parametrize("name", ["nope.jsonl", "nope.parquet", "nope_dir"])
def test_nonexistent_path_raises_naming_it(tmp_path, name):
    with pytest.raises(DataError, match=name):
        read_preferences(tmp_path / name)
    with pytest.raises(DataError, match=name):
        read_preferences(tmp_path / name, format="jsonl")


def test_unknown_format_and_unknown_suffix(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match=r"data\.csv"):
        detect_format(path)
    with pytest.raises(DataError, match="valid: auto, jsonl, parquet, hf"):
        read_preferences(path, format="csv")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(DataError, match="empty"):
        read_preferences(empty_dir)


def test_corrupt_parquet_raises_naming_it(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet"):
        read_preferences(path)


def test_parquet_shards_row_index_continues_and_the_shard_is_named(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.Table.from_pylist([{"prompt": f"p{i}", "chosen": f"w{i}", "rejected": f"l{i}"}
                                         for i in range(3)]), shards / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist([
        {"prompt": "p3", "chosen": "w3", "rejected": "l3"},
        {"prompt": "", "chosen": "w4", "rejected": "l4"},
        {"prompt": "p5", "chosen": "w5", "rejected": "l5"},
    ]), shards / "part-00001.parquet")
    assert detect_format(shards) == "parquet"
    result = read_preferences(shards)
    assert [r.prompt for r in result.records] == ["p0", "p1", "p2", "p3", "p5"]
    assert result.skipped == [SkippedRow(str(shards / "part-00001.parquet"), 4, "empty prompt")]
    assert [i for i, _, _ in iter_rows(shards)] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(DataError, match=r"part-00001\.parquet: row 1 \(0-based; row 4 of the dataset\): empty prompt"):
        read_preferences(shards, strict=True)


def test_pick_a_pic_style_parquet_with_bytes_meta(tmp_path):
    path = tmp_path / "pick.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"caption": "c", "jpg_0": b"\xff\xd8a", "jpg_1": b"\xff\xd8b", "label_0": 1.0, "model_0": "sdxl"},
    ]), path)
    (record,) = read_preferences(path, columns=ColumnMap(prompt="caption", chosen="jpg_0", rejected="jpg_1")).records
    assert record.chosen == b"\xff\xd8a" and record.meta == {"label_0": 1.0, "model_0": "sdxl"}


def test_unpaired_labels(tmp_path):
    labels = [True, False, 1, 0, "true", "False", "desirable", "UNDESIRABLE", 0.5, "maybe", None]
    path = _write_lines(tmp_path / "u.jsonl", [
        json.dumps({"prompt": "p", "completion": f"c{i}", "label": label}) for i, label in enumerate(labels)
    ])
    result = read_preferences(path, kind="unpaired")
    assert [r.desirable for r in result.records] == [True, False, True, False, True, False, True, False]
    assert [(s.row, s.reason.split(" (")[0]) for s in result.skipped] == [
        (8, "tie: label 0.5"), (9, "bad label: 'maybe'"), (10, "bad label: None")
    ]
    assert result.skipped_by_reason() == {"tie": 1, "bad label": 2}
    with pytest.raises(DataError, match=r"u\.jsonl:9: tie"):
        read_preferences(path, kind="unpaired", strict=True)


def test_unpaired_missing_label_column(tmp_path):
    path = _write_lines(tmp_path / "u.jsonl", [json.dumps({"prompt": "p", "completion": "c"})])
    assert read_preferences(path, kind="unpaired").skipped[0].reason == "missing column: label"


def test_hf_dataset_dict_uses_train(tmp_path):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_list([{"prompt": "t", "chosen": "a", "rejected": "b"}]),
        "test": datasets.Dataset.from_list([{"prompt": "x", "chosen": "a", "rejected": "b"}]),
    })
    dd.save_to_disk(str(tmp_path / "dd"))
    assert detect_format(tmp_path / "dd") == "hf"
    assert [r.prompt for r in read_preferences(tmp_path / "dd").records] == ["t"]


def test_mixed_record_kinds_are_refused(tmp_path):
    with pytest.raises(DataError, match="mix"):
        write_preferences([PAIRS[0], UNPAIRED[0]], tmp_path / "m.jsonl")


def test_bad_kind_is_a_value_error(tmp_path):
    path = write_preferences(PAIRS, tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match="kind"):
        read_preferences(path, kind="ranked")


def test_an_input_side_pair_with_the_same_answer_is_not_a_tie(tmp_path):
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "<image> colour?", "chosen": "red", "rejected": "red", "images": ["a.png"],
         "rejected_images": ["b.png"]},
        {"prompt": "<image> colour?", "chosen": "red", "rejected": "red", "images": ["a.png"]},
        {"prompt": "<image> colour?", "chosen": "red", "rejected": "red", "rejected_images": []},
    ]) + "\n")
    res = read_preferences(p)
    assert [r.meta["rejected_images"] for r in res.records] == [["b.png"]]
    assert [s.reason for s in res.skipped] == ["tie: chosen and rejected are identical"] * 2
