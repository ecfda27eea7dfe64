"""Readers note where each record was found; messages name it; the record's value and fingerprint ignore it."""

from __future__ import annotations

from mm_align.data import PreferencePair, read_preferences
from mm_align.reference_cache import records_fingerprint


def test_jsonl_records_know_their_line_and_parquet_rows_their_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "a"}\n'  # a tie: skipped, but counts as a line
                    '{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    (record,) = read_preferences(path).records
    assert record.origin == f"{path}:2"
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"prompt": ["x", "y"], "chosen": ["a", "c"], "rejected": ["b", "d"]})
    pq.write_table(table, tmp_path / "d.parquet")
    assert [r.origin for r in read_preferences(tmp_path / "d.parquet").records] == [
        f"{tmp_path / 'd.parquet'}: row 0 (0-based)", f"{tmp_path / 'd.parquet'}: row 1 (0-based)"]


def test_origin_is_not_part_of_the_value_or_the_cache_key():
    a = PreferencePair("p", "a", "b", id="1", origin="x.jsonl:3")
    b = PreferencePair("p", "a", "b", id="1", origin="moved/x.jsonl:9")
    assert a == b
    plain = PreferencePair("p", "a", "b", "1")
    assert records_fingerprint([a]) == records_fingerprint([b]) == records_fingerprint([plain])
    assert records_fingerprint([a]) != records_fingerprint([PreferencePair("p", "a", "c", "1")])
