"""The dataset doctor: every problem found and counted, never an exception on bad data."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from mm_align.data import PreferencePair, UnpairedSample, check_referenced_files, doctor, write_preferences


def _lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _every_problem(tmp_path):
    (tmp_path / "w.png").write_bytes(b"png")
    (tmp_path / "l.png").write_bytes(b"png")
    (tmp_path / "dir.png").mkdir()  # exists but cannot be opened for reading
    absolute = tmp_path / "abs.wav"
    absolute.write_bytes(b"RIFF")
    good = {"prompt": "a red circle", "chosen": "w.png", "rejected": "l.png"}
    return _lines(tmp_path / "data.jsonl", [
        good,                                                      # 0 fine
        {**good, "chosen": "missing.png"},                         # 1 missing file
        {**good, "chosen": "dir.png"},                             # 2 unreadable file
        {**good, "prompt": " "},                                   # 3 empty prompt
        {**good, "id": "dup"},                                     # 4 duplicate of row 0 (ids do not matter)
        {**good, "rejected": "w.png"},                             # 5 tie
        '{"prompt": "broken',                                      # 6 malformed
        {"prompt": "p", "chosen": "w.png"},                        # 7 missing column
        {**good, "prompt": "list", "chosen": ["w.png", "gone.jpg"]},  # 8 missing file one level deep
        {**good, "prompt": "abs", "chosen": str(absolute)},        # 9 absolute path, exists
    ])


def _by_check(report):
    return {f.check: (f.severity, f.count) for f in report.findings}


def test_every_problem_is_found_and_counted(tmp_path):
    report = doctor(_every_problem(tmp_path))
    assert _by_check(report) == {
        "missing_file": ("error", 2),
        "unreadable_file": ("error", 1),
        "empty_prompt": ("error", 1),
        "duplicate": ("warning", 1),
        "tie": ("warning", 1),
        "malformed_json": ("error", 1),
        "missing_column": ("error", 1),
    }
    assert report.rows == 10
    assert report.valid == 3  # rows 0, 4 (a duplicate is only a warning) and 9
    assert report.ok is False
    examples = {f.check: f.examples for f in report.findings}
    assert examples["missing_file"] == [
        "data.jsonl:2: missing file missing.png",
        "data.jsonl:9: missing file gone.jpg",
    ]
    assert examples["unreadable_file"][0].startswith("data.jsonl:3: unreadable file dir.png")
    assert examples["duplicate"] == ["data.jsonl:5: same as data.jsonl:1"]
    assert examples["malformed_json"][0].startswith("data.jsonl:7: malformed json")
    assert examples["missing_column"] == ["data.jsonl:8: missing column: rejected"]


def test_table_lists_every_check_in_fixed_width_columns(tmp_path):
    report = doctor(_every_problem(tmp_path))
    table = report.table()
    for finding in report.findings:
        assert finding.check in table
    assert "ERRORS FOUND" in table
    rows = [line for line in table.splitlines() if " | " in line]
    checks = [line for line in rows if not line.startswith(" ")]
    assert len(checks) == 1 + len(report.findings)  # header + one first line per finding (more examples below)
    separators = {tuple(i for i in range(len(line)) if line.startswith(" | ", i))[:3] for line in rows}
    assert len(separators) == 1  # the columns line up
    assert [c.strip() for c in rows[0].split(" | ")] == ["check", "severity", "count", "example"]
    assert rows[0].index(" | ") == len("unreadable_file")  # as wide as the widest check name


def test_clean_dataset_is_ok(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "img" / name).write_bytes(b"x")
    path = write_preferences([
        PreferencePair("p0", "img/a.png", "img/b.png", id="0"),
        PreferencePair("p1", "img/b.png", "img/a.png", id="1"),
        PreferencePair("p2", "some text ending with a dot.", "other text", id="2"),
    ], tmp_path / "clean.jsonl")
    report = doctor(path)
    assert report.ok is True and report.findings == []
    assert (report.rows, report.valid) == (3, 3)
    assert "no problems found" in report.table()


def test_warnings_alone_keep_ok_true(tmp_path):
    path = _lines(tmp_path / "d.jsonl", [
        {"prompt": "p", "chosen": "a", "rejected": "a"},
        {"prompt": "q", "chosen": [{"x": 1, "y": "w"}], "rejected": "b"},
        {"prompt": "q", "chosen": [{"y": "w", "x": 1}], "rejected": "b", "id": "7"},  # same content, key order aside
        {"prompt": "q", "chosen": [{"y": "w", "x": 2}], "rejected": "b"},
    ])
    report = doctor(path)
    assert _by_check(report) == {"tie": ("warning", 1), "duplicate": ("warning", 1)}
    assert report.findings[1].examples == ["d.jsonl:3: same as d.jsonl:2"]
    assert report.ok is True


def test_custom_check_is_run_and_reported_under_its_name(tmp_path):
    path = _lines(tmp_path / "d.jsonl", [{"prompt": "ok prompt", "chosen": "a", "rejected": "b"},
                                         {"prompt": "no", "chosen": "a", "rejected": "b"}])
    seen = []

    def prompt_too_short(record, base_dir: Path) -> list[str]:
        seen.append(base_dir)
        return [f"prompt has {len(record.prompt)} characters"] if len(record.prompt) < 3 else []

    def crashing_check(record, base_dir):
        raise RuntimeError("boom")

    report = doctor(path, checks=[prompt_too_short, crashing_check])
    assert seen == [tmp_path, tmp_path]
    found = {f.check: f for f in report.findings}
    assert found["prompt_too_short"].count == 1 and found["prompt_too_short"].severity == "error"
    assert found["prompt_too_short"].examples == ["d.jsonl:2: prompt has 2 characters"]
    assert found["crashing_check"].count == 2 and "boom" in found["crashing_check"].examples[0]
    assert report.ok is False and report.valid == 0
    assert "prompt_too_short" in report.table() and "crashing_check" in report.table()


def test_missing_dataset_is_one_unreadable_finding(tmp_path):
    report = doctor(tmp_path / "nope.jsonl")
    assert [(f.check, f.severity, f.count) for f in report.findings] == [("unreadable", "error", 1)]
    assert "nope.jsonl" in report.findings[0].examples[0]
    assert report.ok is False and report.rows == 0
    assert "unreadable" in report.table()


def test_parquet_shards_bytes_duplicates_and_shard_names(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    row = {"caption": "c", "chosen": b"\x89PNG-a", "rejected": b"\x89PNG-b"}
    pq.write_table(pa.Table.from_pylist([row, {**row, "chosen": b"\x89PNG-c"}]), shards / "a.parquet")
    pq.write_table(pa.Table.from_pylist([{**row, "caption": ""}, row]), shards / "b.parquet")
    from mm_align.data import ColumnMap

    report = doctor(shards, columns=ColumnMap(prompt="caption"))
    assert _by_check(report) == {"empty_prompt": ("error", 1), "duplicate": ("warning", 1)}
    examples = {f.check: f.examples for f in report.findings}
    assert examples["empty_prompt"] == ["b.parquet: row 0 (0-based; row 2 of the dataset): empty prompt"]
    assert examples["duplicate"] == [
        "b.parquet: row 1 (0-based; row 3 of the dataset): same as a.parquet: row 0 (0-based)"
    ]
    assert (report.rows, report.valid) == (4, 3)


def test_unpaired_bad_labels(tmp_path):
    path = write_preferences([UnpairedSample("p", "c", True), UnpairedSample("q", "d", False)], tmp_path / "u.jsonl")
    with path.open("a") as f:
        f.write(json.dumps({"prompt": "r", "completion": "e", "label": "maybe"}) + "\n")
    report = doctor(path, kind="unpaired")
    assert _by_check(report) == {"bad_label": ("error", 1)}
    assert report.findings[0].examples[0].startswith("u.jsonl:3: bad label: 'maybe'")


def test_check_referenced_files_directly(tmp_path):
    (tmp_path / "x.WAV").write_bytes(b"RIFF")
    record = PreferencePair("p", {"audio": "x.WAV", "text": "hello"}, "https://example.com/y.png")
    assert check_referenced_files(record, tmp_path) == []  # dict one level deep; URLs are not paths
    record = UnpairedSample("p", ["x.WAV", "missing.flac"], True)
    assert check_referenced_files(record, tmp_path) == ["missing file missing.flac"]
