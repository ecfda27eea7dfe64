"""Read and write preference data: jsonl, parquet (a file or a directory of shards), HF datasets on disk.

Documented behaviour of the readers:

- A bad row is SKIPPED AND COUNTED: the :class:`ReadResult` lists each skipped row with its file,
  its 0-based row index (and, for jsonl, its 1-based line number) and a reason, and one logger warning
  at the end of the read summarises the counts per reason. Reasons are ``"<category>: <detail>"``:
  ``"malformed json: Expecting value"``, ``"missing column: rejected"``, ``"empty prompt"``, ``"empty
  chosen"``, ``"tie: chosen and rejected are identical"``, ``"tie: label 0.5"``, ``"bad label: 'maybe' (...)"``.
- Messages locate a row the way a user finds it in the file: ``"data.jsonl:7"`` (the 1-based LINE of a
  jsonl file, as editors and ``grep -n`` count) and ``"data.parquet: row 6 (0-based)"`` for parquet and
  HF datasets (the index ``pandas``/``datasets`` give it; see :func:`locate`).
- ``strict=True`` raises :class:`DataError` at the first bad row, naming the file, the row and the reason.
- A dataset that does not exist or cannot be opened at all always raises :class:`DataError` naming it.
- Ties are never treated as wins.
- Blank lines in a jsonl file carry no row and are ignored (they still count for line numbers).

Paired rows are ``(prompt, chosen, rejected)``; unpaired rows are ``(prompt, completion, label)`` where
the label is a bool, 0/1, or one of the strings ``"true"``, ``"false"``, ``"desirable"``,
``"undesirable"`` (``"1"``/``"0"`` too; case-insensitive). Every other column goes into ``meta``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, NamedTuple

from mm_align.data.records import (
    ColumnMap,
    DataError,
    PreferencePair,
    ReadResult,
    SkippedRow,
    UnpairedSample,
    locate,
)

logger = logging.getLogger(__name__)

__all__ = [
    "RawRow",
    "detect_format",
    "is_empty",
    "iter_rows",
    "locate",
    "iter_source_rows",
    "read_preferences",
    "row_to_record",
    "write_preferences",
]

Format = Literal["jsonl", "parquet", "hf"]
FORMATS: tuple[str, ...] = ("jsonl", "parquet", "hf")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_BATCH = 1024  # rows decoded at a time from parquet / arrow
READ_SUMMARY = "mm_align_read_summary"
"""The attribute set on the one log record that summarises a read's skipped rows (a CLI that prints
the same summary itself filters this record out, so the counts are not shown twice)."""


class RawRow(NamedTuple):
    """One row as the raw layer sees it, before it becomes a record.

    ``row`` is the dataset-wide 0-based index (for a directory of parquet shards it continues across
    shards); ``file_row`` is the index inside ``source`` (equal to ``row`` except for later shards);
    ``line`` is the 1-based line number of a jsonl row (``None`` for columnar formats).
    Exactly one of ``data`` and ``error`` is ``None``.
    """

    source: str
    row: int
    file_row: int
    data: dict[str, Any] | None
    error: str | None
    line: int | None = None

    def where(self, source: str | None = None) -> str:
        """``"<source>:LINE"`` for jsonl, ``"<source>: row N (0-based)"`` otherwise (see :func:`locate`).

        Args:
            source: Name the file this way instead (e.g. just its base name).
        """
        return locate(self.source if source is None else source, self.row, self.file_row, self.line)


def detect_format(path: str | Path) -> Format:
    """The format of a dataset from its name or contents.

    Args:
        path: A ``.jsonl``/``.json``/``.ndjson`` lines file, a ``.parquet`` file, a directory of
            ``*.parquet`` shards, or a directory written by ``datasets.save_to_disk`` (it holds
            ``dataset_info.json``, ``state.json`` or ``dataset_dict.json``).

    Returns:
        `str`: ``"jsonl"``, ``"parquet"`` or ``"hf"``.

    Raises:
        DataError: The path does not exist or is none of the above; the message names it.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_dir():
        if any((p / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return "hf"
        if _shards(p):
            return "parquet"
        raise DataError(f"{p}: a directory with neither *.parquet shards nor an HF dataset (dataset_info.json)")
    suffix = p.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    raise DataError(
        f"{p}: unknown data format '{suffix or p.name}'; expected a .jsonl/.json file, a .parquet file or "
        "directory of shards, or an HF dataset directory (datasets.save_to_disk)"
    )


def _shards(directory: Path) -> list[Path]:
    return sorted(q for q in directory.glob("*.parquet") if q.is_file() and not q.name.startswith("."))


def _resolve_format(p: Path, format: str) -> str:
    if format == "auto":
        return detect_format(p)
    if format not in FORMATS:
        raise DataError(f"{p}: unknown format '{format}'; valid: auto, {', '.join(FORMATS)}")
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    return format


def iter_source_rows(path: str | Path, format: str = "auto") -> Iterator[RawRow]:
    """Every row of a dataset, including the ones a reader would skip, with the file it is in.

    This is the raw layer the readers and the doctor share.

    Args:
        path: The dataset (see :func:`detect_format`).
        format: ``"auto"``, ``"jsonl"``, ``"parquet"`` or ``"hf"``.

    Yields:
        :class:`RawRow`: ``(source, row, file_row, data, error)``; ``data`` is ``None`` exactly when the
        row could not be parsed, and ``error`` then says why (``"malformed json: ..."``).

    Raises:
        DataError: The dataset does not exist or cannot be opened or decoded at all.
    """
    p = Path(path)
    fmt = _resolve_format(p, format)
    if fmt == "jsonl":
        yield from _jsonl_rows(p)
    elif fmt == "parquet":
        yield from _parquet_rows(p)
    else:
        yield from _hf_rows(p)


def iter_rows(path: str | Path, format: str = "auto") -> Iterator[tuple[int, dict | None, str | None]]:
    """Every row of a dataset as ``(row index, row dict or None, parse error or None)``.

    The same rows as :func:`iter_source_rows`, without the file names (use that one to know which
    parquet shard a row is in).

    Args:
        path: The dataset (see :func:`detect_format`).
        format: ``"auto"``, ``"jsonl"``, ``"parquet"`` or ``"hf"``.

    Raises:
        DataError: The dataset does not exist or cannot be opened at all.
    """
    for raw in iter_source_rows(path, format):
        yield raw.row, raw.data, raw.error


def _jsonl_rows(p: Path) -> Iterator[RawRow]:
    try:
        f = p.open("rb")
    except OSError as exc:
        raise DataError(f"{p}: cannot open: {exc.strerror or exc}") from exc
    source = str(p)
    with f:
        for i, raw in enumerate(f):  # i: the 0-based line index; the message says line i + 1 (see locate)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield RawRow(source, i, i, None, f"malformed json: not UTF-8 text ({exc.reason})", i + 1)
                continue
            if i == 0:
                line = line.lstrip("\ufeff")  # a byte-order mark some editors write
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                yield RawRow(source, i, i, None, f"malformed json: {exc.msg} (column {exc.colno})", i + 1)
                continue
            if not isinstance(row, dict):
                yield RawRow(source, i, i, None,
                             f"malformed json: a row must be an object, got {type(row).__name__}", i + 1)
                continue
            yield RawRow(source, i, i, row, None, i + 1)


def _parquet_rows(p: Path) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if p.is_dir():
        shards = _shards(p)
        if not shards:
            raise DataError(f"{p}: no *.parquet shards in this directory")
    else:
        shards = [p]
    offset = 0
    for shard in shards:
        local = 0
        try:
            batches = pq.ParquetFile(shard).iter_batches(batch_size=_BATCH)
            for batch in batches:
                for row in batch.to_pylist():
                    yield RawRow(str(shard), offset + local, local, row, None)
                    local += 1
        except (OSError, pa.ArrowException) as exc:  # corrupt, truncated or not parquet at all
            raise DataError(f"{shard}: cannot read parquet (after {local} rows): {exc}") from exc
        offset += local


def _hf_rows(p: Path) -> Iterator[RawRow]:
    import datasets

    if _saved_without_rows(p):
        return
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError, arrow errors, ...
        raise DataError(f"{p}: cannot load the HF dataset: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise DataError(f"{p}: a DatasetDict without a 'train' split (splits: {', '.join(ds)})")
    table = ds.with_format("arrow")  # raw values: bytes stay bytes, nothing decoded to PIL/arrays
    for start in range(0, len(ds), _BATCH):
        for k, row in enumerate(table[start : start + _BATCH].to_pylist()):
            yield RawRow(str(p), start + k, start + k, row, None)


def _saved_without_rows(p: Path) -> bool:
    """A 0-row ``Dataset.save_to_disk`` writes no data files, and ``load_from_disk`` then fails on it."""
    try:
        state = json.loads((p / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("_data_files") == []


def is_empty(value: Any) -> bool:
    """Whether a prompt/sample value is empty: ``None``, a blank string, or an empty list, dict or bytes."""
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, (list, tuple, dict, bytes, bytearray)):
        return len(value) == 0
    return False


def _identical(a: Any, b: Any) -> bool:
    try:
        return (a == b) is True
    except Exception:  # values whose == is not a plain bool (arrays)
        return False


_TRUE = frozenset({"true", "1", "desirable"})
_FALSE = frozenset({"false", "0", "undesirable"})


def _parse_label(value: Any) -> bool | str:
    """A bool, or the reason the label is unusable."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        if value == 1:
            return True
        if value == 0:
            return False
        if value == 0.5:
            return "tie: label 0.5"
    elif isinstance(value, str):
        s = value.strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        if s == "0.5":
            return "tie: label 0.5"
    return f"bad label: {value!r} (expected true/false, 1/0, desirable/undesirable)"


def row_to_record(
    row: dict[str, Any], kind: Literal["paired", "unpaired"], columns: ColumnMap
) -> PreferencePair | UnpairedSample | str:
    """Turn one raw row into a record, or say why it is skipped.

    Args:
        row: A row dict from :func:`iter_source_rows`.
        kind: ``"paired"`` (prompt, chosen, rejected) or ``"unpaired"`` (prompt, completion, label).
        columns: The source column names.

    Returns:
        A :class:`PreferencePair` / :class:`UnpairedSample` (every other column in ``meta``), or the
        skip reason as a string (``"missing column: rejected"``, ``"empty prompt"``, ``"tie: ..."``, ...).
    """
    if kind == "paired":
        names = (columns.prompt, columns.chosen, columns.rejected)
    else:
        names = (columns.prompt, columns.completion, columns.label)
    for name in names:
        if name not in row:
            return f"missing column: {name}"
    prompt = row[columns.prompt]
    if is_empty(prompt):
        return "empty prompt"
    used = set(names) | {columns.id}
    meta = {k: v for k, v in row.items() if k not in used}
    rid = row.get(columns.id)
    rid = None if rid is None else str(rid)
    if kind == "paired":
        chosen, rejected = row[columns.chosen], row[columns.rejected]
        if is_empty(chosen):
            return "empty chosen"
        if is_empty(rejected):
            return "empty rejected"
        input_side = any(not is_empty(row.get(c)) for c in columns.rejected_inputs if row.get(c) is not None)
        if _identical(chosen, rejected) and not input_side:
            return "tie: chosen and rejected are identical"
        return PreferencePair(prompt, chosen, rejected, rid, meta)
    completion = row[columns.completion]
    if is_empty(completion):
        return "empty completion"
    label = _parse_label(row[columns.label])
    if isinstance(label, str):
        return label
    return UnpairedSample(prompt, completion, label, rid, meta)


def read_preferences(
    path: str | Path,
    format: str = "auto",
    kind: Literal["paired", "unpaired"] = "paired",
    columns: ColumnMap | None = None,
    strict: bool = False,
) -> ReadResult:
    """Read paired (prompt, chosen, rejected) or unpaired (prompt, completion, label) records.

    Args:
        path: A jsonl file, a parquet file or directory of shards, or an HF dataset saved on disk.
        format: ``"auto"`` (from the path, see :func:`detect_format`), ``"jsonl"``, ``"parquet"`` or ``"hf"``.
        kind: ``"paired"`` or ``"unpaired"``.
        columns: The source column names (default: ``prompt``, ``chosen``, ``rejected``, ``completion``,
            ``label``, ``id``). Other columns go into ``record.meta``.
        strict: Raise at the first bad row instead of skipping and counting it.

    Returns:
        :class:`ReadResult`: the kept records in file order, the skipped rows, and the source.

    Raises:
        DataError: The dataset cannot be opened; or, when ``strict``, a row is bad (the message names
            the file, the row and the reason).
        ValueError: ``kind`` is not ``"paired"`` or ``"unpaired"``.
    """
    if kind not in ("paired", "unpaired"):
        raise ValueError(f"kind must be 'paired' or 'unpaired', got {kind!r}")
    cols = columns or ColumnMap()
    return read_rows(path, lambda row: row_to_record(row, kind, cols), format, strict)


def read_rows(
    path: str | Path,
    parse: Callable[[dict[str, Any]], Any],
    format: str = "auto",
    strict: bool = False,
    rows: Iterable[RawRow] | None = None,
) -> ReadResult:
    """Read any row schema with ``parse(row) -> record | skip reason``, skipping and counting bad rows.

    The one skip-and-count loop behind :func:`read_preferences` and the modality readers (Pick-a-Pic,
    pair folders); ``strict`` raises :class:`DataError` naming the file, row and reason at the first bad
    row. ``rows`` replaces the core formats' rows (:func:`iter_source_rows`) for a source a modality
    lists itself (e.g. a directory of pair folders).
    """
    records: list[Any] = []
    skipped: list[SkippedRow] = []
    for raw in rows if rows is not None else iter_source_rows(path, format):
        result = parse(raw.data) if raw.data is not None else raw.error
        if isinstance(result, str):
            if strict:
                raise DataError(f"{raw.where()}: {result}")
            skipped.append(SkippedRow(raw.source, raw.row, result, raw.line, raw.file_row))
        else:
            if getattr(result, "origin", "") is None:  # a record that can say where it came from
                result.origin = raw.where()
            records.append(result)
    out = ReadResult(records, skipped, str(path))
    if skipped:
        counts = ", ".join(f"{reason}: {n}" for reason, n in out.skipped_by_reason().items())
        logger.warning("%s: kept %d rows, skipped %d bad rows (%s)", path, len(records), len(skipped), counts,
                       extra={READ_SUMMARY: True})
    return out


def _describe(index: int, record: Any) -> str:
    rid = getattr(record, "id", None)
    return f"record {index}" + (f" (id {rid!r})" if rid is not None else "")


def _rows(records: list[Any], p: Path) -> list[dict[str, Any]]:
    kinds = {type(r) for r in records}
    if len(kinds) > 1:
        raise DataError(f"{p}: cannot write a mix of PreferencePair and UnpairedSample records to one dataset")
    rows = []
    for i, record in enumerate(records):
        if isinstance(record, PreferencePair):
            base = {"prompt": record.prompt, "chosen": record.chosen, "rejected": record.rejected, "id": record.id}
        elif isinstance(record, UnpairedSample):
            base = {"prompt": record.prompt, "completion": record.completion, "label": record.desirable,
                    "id": record.id}
        else:
            raise DataError(f"{p}: {_describe(i, record)} is a {type(record).__name__}; "
                            "expected PreferencePair or UnpairedSample")
        clash = set(base) & set(record.meta)
        if clash:
            raise DataError(f"{p}: {_describe(i, record)}: meta keys {sorted(clash)} clash with the record's columns")
        rows.append({**base, **record.meta})
    return rows


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Column lists where every row has every column (``None`` where absent).

    Arrow and ``datasets`` infer the columns from the FIRST row only, so later meta keys would be lost.
    No records gives the paired columns, empty (a dataset without columns cannot be loaded back).
    """
    names = list(dict.fromkeys(k for r in rows for k in r)) or ["prompt", "chosen", "rejected", "id"]
    return {k: [r.get(k) for r in rows] for k in names}


def _has_bytes(value: Any) -> bool:
    if isinstance(value, (bytes, bytearray)):
        return True
    if isinstance(value, dict):
        return any(_has_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_bytes(v) for v in value)
    return False


def _write_format(p: Path, format: str) -> str:
    if format != "auto":
        if format not in FORMATS:
            raise DataError(f"{p}: unknown format '{format}'; valid: auto, {', '.join(FORMATS)}")
        return format
    suffix = p.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    if not suffix or p.is_dir():
        return "hf"
    raise DataError(f"{p}: cannot tell the format from '{suffix}'; use .jsonl, .parquet, a directory name "
                    "(HF dataset) or pass format='jsonl' | 'parquet' | 'hf'")


def write_preferences(
    records: Iterable[PreferencePair] | Iterable[UnpairedSample], path: str | Path, format: str = "auto"
) -> Path:
    """Write records as jsonl, parquet or an HF dataset on disk, atomically.

    Rows are ``{prompt, chosen, rejected, id, **meta}`` or ``{prompt, completion, label, id, **meta}``.
    The data goes to a temporary name in the same directory first and is then renamed over ``path``,
    so a reader never sees a half-written dataset. Columnar formats (parquet, hf) give every row every
    column: a meta key some records lack reads back as ``None`` for them.

    Args:
        records: :class:`PreferencePair` or :class:`UnpairedSample` records (not a mix).
        path: The target file (``.jsonl``/``.json``, ``.parquet``) or directory (HF dataset).
        format: ``"auto"`` (from the suffix; no suffix = ``"hf"``), ``"jsonl"``, ``"parquet"`` or ``"hf"``.

    Returns:
        `Path`: ``path``.

    Raises:
        DataError: A record cannot be written (not JSON-serialisable for jsonl, bytes in jsonl, a column
            that mixes types for parquet/hf, meta keys that clash with the record's own columns).
    """
    p = Path(path)
    fmt = _write_format(p, format)
    rows = _rows(list(records), p)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        if fmt == "jsonl":
            _write_jsonl(rows, p, tmp)
        elif fmt == "parquet":
            _write_parquet(rows, p, tmp)
        else:
            _write_hf(rows, p, tmp)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return p


def _write_jsonl(rows: list[dict[str, Any]], p: Path, tmp: Path) -> None:
    with tmp.open("w", encoding="utf-8", newline="\n") as f:
        for i, row in enumerate(rows):
            try:
                line = json.dumps(row, ensure_ascii=False)
            except (TypeError, ValueError) as exc:
                what = f"{p}: record {i}" + (f" (id {row['id']!r})" if row.get("id") is not None else "")
                if _has_bytes(row):
                    raise DataError(f"{what}: bytes values cannot be written to jsonl; write parquet or an HF "
                                    "dataset instead (or store file paths)") from exc
                raise DataError(f"{what}: not JSON-serialisable: {exc}") from exc
            f.write(line + "\n")
    os.replace(tmp, p)


def _write_parquet(rows: list[dict[str, Any]], p: Path, tmp: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pydict(_columns(rows))
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise DataError(f"{p}: cannot build a parquet table from the records (a column mixing types?): {exc}") from exc
    pq.write_table(table, tmp)
    os.replace(tmp, p)


def _write_hf(rows: list[dict[str, Any]], p: Path, tmp: Path) -> None:
    import datasets
    import pyarrow as pa

    if p.exists() and not p.is_dir():
        raise DataError(f"{p}: exists and is not a directory; an HF dataset is written as a directory")
    try:
        ds = datasets.Dataset.from_dict(_columns(rows))
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise DataError(f"{p}: cannot build an HF dataset from the records (a column mixing types?): {exc}") from exc
    ds.save_to_disk(str(tmp))
    if p.exists():
        old = p.with_name(f".{p.name}.old-{os.getpid()}")
        os.replace(p, old)
        os.replace(tmp, p)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, p)
