"""Read and write preference data: jsonl, parquet (a file or a directory of shards), HF datasets on disk.

Documented behaviour: a bad row (malformed, a missing column, an empty prompt, a tie, a bad
label) is SKIPPED AND COUNTED — the result lists each skipped row with its file, row and reason,
and a warning summarises the counts. ``strict=True`` raises :class:`DataError` at the first one.
A file that cannot be opened at all always raises. Ties are never treated as wins.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from mm_align.data.records import ColumnMap, DataError, PreferencePair, ReadResult, SkippedRow, UnpairedSample

logger = logging.getLogger(__name__)

__all__ = ["detect_format", "iter_rows", "read_preferences", "write_preferences", "is_empty"]

Format = Literal["jsonl", "parquet", "hf"]


def detect_format(path: str | Path) -> Format:
    """The format of ``path`` from its name or contents."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix in (".jsonl", ".json", ".ndjson"):
            return "jsonl"
        if p.suffix == ".parquet":
            return "parquet"
        raise DataError(f"{p}: unknown data format (expected .jsonl, .parquet or an HF dataset directory)")
    if (p / "dataset_info.json").exists() or (p / "state.json").exists():
        return "hf"
    if any(p.glob("*.parquet")):
        return "parquet"
    raise DataError(f"{p}: a directory with neither *.parquet shards nor an HF dataset (dataset_info.json)")


def iter_rows(path: str | Path, format: str = "auto") -> Iterator[tuple[str, int, dict | None, str | None]]:
    """Yield ``(source, row index, row dict or None, parse error or None)`` for every row."""
    p = Path(path)
    fmt = detect_format(p) if format == "auto" else format
    if fmt == "jsonl":
        try:
            f = p.open("r", encoding="utf-8")
        except OSError as exc:
            raise DataError(f"{p}: cannot open: {exc}") from exc
        with f:
            for i, line in enumerate(f):
                if not line.strip():
                    yield str(p), i, None, "empty line"
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield str(p), i, None, f"malformed json: {exc.msg} (line {i + 1})"
                    continue
                if not isinstance(row, dict):
                    yield str(p), i, None, f"malformed json: a row must be an object, got {type(row).__name__}"
                    continue
                yield str(p), i, row, None
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        shards = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
        row = 0
        for shard in shards:
            try:
                table = pq.read_table(shard)
            except Exception as exc:  # pyarrow raises several types for a corrupt file
                raise DataError(f"{shard}: cannot read parquet: {exc}") from exc
            for i, r in enumerate(table.to_pylist()):
                yield str(shard), i, r, None
            row += table.num_rows
    elif fmt == "hf":
        import datasets

        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as exc:
            raise DataError(f"{p}: cannot load the HF dataset: {exc}") from exc
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{p}: a DatasetDict without a 'train' split (splits: {', '.join(ds)})")
            ds = ds["train"]
        for i, r in enumerate(ds):
            yield str(p), i, dict(r), None
    else:
        raise DataError(f"{p}: unknown format '{fmt}'; valid: auto, jsonl, parquet, hf")


def is_empty(value: Any) -> bool:
    """None, an empty or whitespace-only string, or an empty list/dict."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, dict, bytes)):
        return len(value) == 0
    return False


_TRUE = {"true", "1", "desirable", "yes"}
_FALSE = {"false", "0", "undesirable", "no"}


def _label(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    return None


def row_to_record(row: dict, kind: str, cols: ColumnMap) -> PreferencePair | UnpairedSample | str:
    """A record, or the reason the row is skipped."""
    names = (cols.prompt, cols.chosen, cols.rejected) if kind == "paired" else (
        cols.prompt, cols.completion, cols.label)
    for name in names:
        if name not in row:
            return f"missing column: {name}"
    if is_empty(row[cols.prompt]):
        return "empty prompt"
    used = set(names) | {cols.id}
    meta = {k: v for k, v in row.items() if k not in used}
    rid = row.get(cols.id)
    rid = None if rid is None else str(rid)
    if kind == "paired":
        chosen, rejected = row[cols.chosen], row[cols.rejected]
        if is_empty(chosen):
            return "empty chosen"
        if is_empty(rejected):
            return "empty rejected"
        if chosen == rejected:
            return "tie: chosen and rejected are identical"
        return PreferencePair(row[cols.prompt], chosen, rejected, rid, meta)
    completion = row[cols.completion]
    if is_empty(completion):
        return "empty completion"
    label = _label(row[cols.label])
    if label is None:
        return f"bad label: {row[cols.label]!r} (expected true/false, 1/0, desirable/undesirable)"
    return UnpairedSample(row[cols.prompt], completion, label, rid, meta)


def read_preferences(
    path: str | Path,
    format: str = "auto",
    kind: Literal["paired", "unpaired"] = "paired",
    columns: ColumnMap | None = None,
    strict: bool = False,
) -> ReadResult:
    """Read paired (prompt, chosen, rejected) or unpaired (prompt, completion, label) records.

    Extra columns go into ``record.meta``. Bad rows are skipped and counted (or raise when
    ``strict``), see the module docstring.
    """
    if kind not in ("paired", "unpaired"):
        raise ValueError(f"kind must be 'paired' or 'unpaired', got {kind!r}")
    cols = columns or ColumnMap()
    records: list[Any] = []
    skipped: list[SkippedRow] = []
    for source, i, row, error in iter_rows(path, format):
        result = row_to_record(row, kind, cols) if row is not None else error
        if isinstance(result, str):
            if strict:
                raise DataError(f"{source}: row {i}: {result}")
            skipped.append(SkippedRow(source, i, result))
        else:
            records.append(result)
    out = ReadResult(records, skipped, str(path))
    if skipped:
        counts = ", ".join(f"{k}: {v}" for k, v in out.skipped_by_reason().items())
        logger.warning(f"{path}: kept {len(records)} rows, skipped {len(skipped)} ({counts})")
    return out


def _row(record: Any) -> dict[str, Any]:
    if isinstance(record, PreferencePair):
        base = {"prompt": record.prompt, "chosen": record.chosen, "rejected": record.rejected, "id": record.id}
    elif isinstance(record, UnpairedSample):
        base = {"prompt": record.prompt, "completion": record.completion, "label": record.desirable, "id": record.id}
    else:
        raise DataError(f"cannot write a {type(record).__name__}: expected PreferencePair or UnpairedSample")
    clash = set(base) & set(record.meta)
    if clash:
        raise DataError(f"record {record.id!r}: meta keys {sorted(clash)} clash with the record's own columns")
    return {**base, **record.meta}


def write_preferences(records: Sequence[Any], path: str | Path, format: str = "auto") -> Path:
    """Write records as jsonl, parquet or an HF dataset on disk, atomically (temp name, then rename)."""
    p = Path(path)
    fmt = format
    if fmt == "auto":
        fmt = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}.get(p.suffix, "hf")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    rows = [_row(r) for r in records]
    if fmt == "jsonl":
        with tmp.open("w", encoding="utf-8") as f:
            for r, rec in zip(rows, records):
                try:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
                except TypeError as exc:
                    tmp.unlink(missing_ok=True)
                    hint = " (bytes cannot go in jsonl: write parquet)" if "bytes" in str(exc) else ""
                    raise DataError(f"record {rec.id!r}: not JSON-serialisable: {exc}{hint}") from exc
        os.replace(tmp, p)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
        os.replace(tmp, p)
    elif fmt == "hf":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(tmp))
        if p.exists():
            shutil.rmtree(p)
        os.replace(tmp, p)
    else:
        raise DataError(f"{p}: unknown format '{fmt}'; valid: auto, jsonl, parquet, hf")
    return p
