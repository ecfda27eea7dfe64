"""The doctor's and the readers' messages: non-finite numbers, row locations a user can find, the table."""

from __future__ import annotations

import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mm_align.data import DataError, doctor, read_preferences


def _lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = {"prompt": "a red circle", "chosen": "a", "rejected": "b"}


def _by_check(report):
    return {f.check: f for f in report.findings}


# ---- NaN / inf ---------------------------------------------------------------------------------------


def test_nan_and_inf_anywhere_in_a_row_are_errors_naming_file_line_and_field(tmp_path):
    # json.loads accepts NaN / Infinity: these rows read back with non-finite floats
    path = _lines(tmp_path / "d.jsonl", [
        {**GOOD, "reward": 0.5},
        '{"prompt": "p", "chosen": "a", "rejected": "b", "reward": NaN}',
        '{"prompt": ["x", 1.0, Infinity], "chosen": "c", "rejected": "d"}',
        '{"prompt": "q", "chosen": "e", "rejected": "f", "scores": {"clip": [0.1, -Infinity]}}',
    ])
    report = doctor(path)
    assert report.ok is False
    found = _by_check(report)["non_finite"]
    assert found.severity == "error" and found.count == 3
    assert found.examples == [
        "d.jsonl:2: field 'reward' is nan",
        "d.jsonl:3: field 'prompt[2]' is inf",
        "d.jsonl:4: field 'scores.clip[1]' is -inf",
    ]
    assert report.valid == 1
    assert "non_finite" in report.table()


def test_nan_in_a_parquet_column_is_found(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{**GOOD, "reward": 1.0}, {**GOOD, "chosen": "z", "reward": math.nan}]), path)
    report = doctor(path)
    assert _by_check(report)["non_finite"].examples == ["d.parquet: row 1 (0-based): field 'reward' is nan"]
    assert report.ok is False


# ---- row locations -------------------------------------------------------------------------------------


def test_jsonl_messages_quote_one_line_number_the_1_based_one(tmp_path):
    path = _lines(tmp_path / "bad.jsonl", [GOOD, {**GOOD, "chosen": "x"}, "", '{"prompt": oops}'])
    (example,) = _by_check(doctor(path))["malformed_json"].examples
    assert example.startswith("bad.jsonl:4: malformed json")  # line 4 of the file (line 3 is blank)
    assert "line 3" not in example and ":3:" not in example
    with pytest.raises(DataError) as info:
        read_preferences(path, strict=True)
    assert str(info.value).startswith(f"{path}:4: malformed json")
    (skipped,) = read_preferences(path).skipped
    assert (skipped.row, skipped.line, skipped.where()) == (3, 4, f"{path}:4")


def test_duplicates_name_the_earlier_line(tmp_path):
    path = _lines(tmp_path / "d.jsonl", [GOOD, GOOD])
    assert _by_check(doctor(path))["duplicate"].examples == ["d.jsonl:2: same as d.jsonl:1"]


def test_parquet_rows_say_they_are_0_based(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {**GOOD, "prompt": ""}]), path)
    assert _by_check(doctor(path))["empty_prompt"].examples == ["d.parquet: row 1 (0-based): empty prompt"]
    with pytest.raises(DataError, match=r"d\.parquet: row 1 \(0-based\): empty prompt"):
        read_preferences(path, strict=True)


# ---- the table -----------------------------------------------------------------------------------------


def test_table_shows_several_examples_per_check_and_says_empty_file(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "dir1.png").mkdir()
    (tmp_path / "dir2.png").mkdir()
    (tmp_path / "dir3.png").mkdir()
    path = _lines(tmp_path / "d.jsonl", [
        {"prompt": "p1", "chosen": "dir1.png", "rejected": "ok.png"},
        {"prompt": "p2", "chosen": "empty.png", "rejected": "ok.png"},
        {"prompt": "p3", "chosen": "dir2.png", "rejected": "ok.png"},
        {"prompt": "p4", "chosen": "dir3.png", "rejected": "ok.png"},
    ])
    report = doctor(path)
    finding = _by_check(report)["unreadable_file"]
    assert finding.count == 4
    assert finding.examples[1] == "d.jsonl:2: unreadable file empty.png: empty file (0 bytes)"
    table = report.table()
    assert "d.jsonl:1: unreadable file dir1.png" in table
    assert "d.jsonl:2: unreadable file empty.png: empty file (0 bytes)" in table  # not hidden behind "count 4"
    assert "d.jsonl:3: unreadable file dir2.png" in table
    assert "d.jsonl:4" not in table and "... and 1 more" in table  # at most 3 examples a check


def test_verdict_line_appears_once_in_the_table(tmp_path):
    table = doctor(_lines(tmp_path / "d.jsonl", [GOOD])).table()
    assert table.count("1 rows, 1 valid") == 1 and table.splitlines()[-1].endswith("1 rows, 1 valid — OK")


def test_a_0_byte_dataset_is_an_empty_file_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"")
    report = doctor(path)
    assert report.ok is False
    assert [(f.check, f.examples) for f in report.findings] == [("no_rows", ["d.jsonl: empty file (0 bytes)"])]
    assert "empty file" in report.table()
