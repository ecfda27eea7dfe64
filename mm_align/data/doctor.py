"""``mm-align doctor``: validate a preference dataset before spending GPU time on it.

The doctor reads every row through the same raw layer as the readers (:func:`iter_source_rows`),
so it sees the rows a reader would skip, and it reports every problem instead of stopping at the
first. Built-in checks (the check name, then its severity):

- ``unreadable`` (error): the dataset does not exist or cannot be opened or decoded;
- ``malformed_json``, ``missing_column``, ``bad_label``, ``empty_prompt``, ``empty_chosen``,
  ``empty_rejected``, ``empty_completion`` (errors): rows the readers skip;
- ``tie`` (warning): identical chosen and rejected, or label 0.5 — the readers drop them;
- ``duplicate`` (warning): the same prompt, chosen and rejected (or completion and label) as an earlier row;
- ``non_finite`` (error): a NaN or infinite number anywhere in a row (a reward in a meta column, a float
  in a prompt list, ...); the example names the field, e.g. ``"d.jsonl:3: field 'scores[1]' is nan"``;
- ``missing_file``, ``unreadable_file`` (errors): see :func:`check_referenced_files` (a 0-byte file is
  ``unreadable file x.png: empty file (0 bytes)``);
- ``no_rows`` (error): the dataset has no rows at all (``"empty file (0 bytes)"`` for a 0-byte file);
- plus one check per function in ``checks`` (error), named after the function, which modality
  packages use for corrupt or tiny images, wrong sample rates, etc.

Examples locate rows as users find them: ``"d.jsonl:4"`` is LINE 4 of a jsonl file (1-based, as editors
and ``grep -n`` count); ``"d.parquet: row 3 (0-based)"`` is ``pandas.read_parquet(...).iloc[3]``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mm_align.data.io import RawRow, iter_source_rows, row_to_record
from mm_align.data.records import ColumnMap, DataError, PreferencePair, UnpairedSample

__all__ = [
    "Finding", "DoctorReport", "RecordCheck", "doctor", "check_referenced_files", "non_finite_fields",
    "FILE_EXTENSIONS",
]

RecordCheck = Callable[[PreferencePair | UnpairedSample, Path], list[str]]
"""A per-record check: ``(record, base_dir) -> problems``, each a short string; an empty list = fine."""

FILE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".wav", ".flac", ".mp3", ".ogg", ".mp4",
                   ".avi", ".mov", ".webm", ".npy", ".pt", ".safetensors")
_WARNINGS = frozenset({"tie", "duplicate"})
_MAX_EXAMPLES = 5
_TABLE_EXAMPLES = 3  # examples shown per check in the table (the report keeps up to _MAX_EXAMPLES)
_MAX_EXAMPLE_CHARS = 160


@dataclass
class Finding:
    """One check's result: how many rows it flagged and up to 5 examples (``"file:row: detail"``)."""

    check: str
    severity: Literal["error", "warning"]
    count: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class DoctorReport:
    """Everything the doctor found in one dataset.

    Args:
        source: The dataset path.
        rows: Rows seen (blank jsonl lines are not rows).
        valid: Rows a reader keeps and that no error-severity check flagged.
        findings: One :class:`Finding` per check that flagged something, in order of first occurrence.
    """

    source: str
    rows: int = 0
    valid: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No error-severity findings (warnings are allowed)."""
        return not any(f.severity == "error" for f in self.findings)

    def add(self, check: str, example: str, severity: Literal["error", "warning"] | None = None) -> None:
        """Count one problem under ``check`` (severity: warning for ties and duplicates, else error)."""
        finding = next((f for f in self.findings if f.check == check), None)
        if finding is None:
            finding = Finding(check, severity or ("warning" if check in _WARNINGS else "error"))
            self.findings.append(finding)
        finding.count += 1
        if len(finding.examples) < _MAX_EXAMPLES:
            finding.examples.append(example)

    def table(self) -> str:
        """A fixed-width summary table: ``check | severity | count | example``.

        Each check shows up to 3 examples, one per line (the check's later lines leave the first three
        columns blank), and ``... and N more`` when it flagged more rows than that.

        Returns:
            `str`: the header, a rule, the findings' lines (or a "no problems found" line), and a
            closing line with the row counts and the verdict (printed once, here).
        """
        header = ("check", "severity", "count", "example")
        body: list[tuple[str, str, str, str]] = []
        for f in self.findings:
            shown = f.examples[:_TABLE_EXAMPLES] or [""]
            body.append((f.check, f.severity, str(f.count), _clip(shown[0])))
            body += [("", "", "", _clip(example)) for example in shown[1:]]
            if f.count > len(shown):
                body.append(("", "", "", f"... and {f.count - len(shown)} more"))
        widths = [max(len(r[k]) for r in [header, *body]) for k in range(3)]

        def line(r: tuple[str, str, str, str]) -> str:
            return f"{r[0]:<{widths[0]}} | {r[1]:<{widths[1]}} | {r[2]:>{widths[2]}} | {r[3]}".rstrip()

        lines = [line(header), "-+-".join("-" * w for w in widths) + "-+-" + "-" * 7]
        lines += [line(r) for r in body] if body else ["(no problems found)"]
        verdict = "OK" if self.ok else "ERRORS FOUND"
        lines.append(f"{self.source}: {self.rows} rows, {self.valid} valid — {verdict}")
        return "\n".join(lines)


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_EXAMPLE_CHARS else text[: _MAX_EXAMPLE_CHARS - 3] + "..."


def _non_finite(value: Any, name: str) -> Iterator[str]:
    """``"field 'NAME' is nan"`` for every NaN/inf float in a row value, at any depth (``a.b``, ``a[2]``)."""
    if isinstance(value, float):  # bools and ints are finite; numpy floats subclass float
        if not math.isfinite(value):
            yield f"field '{name}' is {value}"
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _non_finite(v, f"{name}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _non_finite(v, f"{name}[{i}]")


def non_finite_fields(row: dict[str, Any]) -> list[str]:
    """The NaN / infinite numbers of a raw row, each named by its field path.

    Args:
        row: A raw row (column name -> value), as :func:`~mm_align.data.io.iter_source_rows` gives it.

    Returns:
        `list[str]`: e.g. ``["field 'reward' is nan", "field 'prompt[1]' is inf"]``.
    """
    return [problem for column, value in row.items() for problem in _non_finite(value, str(column))]


def _candidate_paths(value: Any) -> list[str]:
    items = list(value.values()) if isinstance(value, dict) else list(value) if isinstance(value, list) else [value]
    return [
        v for v in items
        if isinstance(v, str) and v.strip().lower().endswith(FILE_EXTENSIONS) and "://" not in v and "\n" not in v
    ]


def check_referenced_files(record: PreferencePair | UnpairedSample, base_dir: Path) -> list[str]:
    """The built-in file check: every file a record names must exist and be readable.

    A string value of ``chosen``/``rejected`` (or ``completion``), or a string inside a list or dict
    one level deep, that ends with a media/tensor extension (:data:`FILE_EXTENSIONS`) is a path;
    relative paths are resolved against ``base_dir``. URLs (``scheme://``) are not checked.

    Args:
        record: A record from a reader.
        base_dir: The directory relative paths are relative to (the dataset file's directory).

    Returns:
        `list[str]`: ``"missing file <name>"`` / ``"unreadable file <name>: <why>"`` problems (a 0-byte
        file is ``"unreadable file <name>: empty file (0 bytes)"``).
    """
    values = (record.chosen, record.rejected) if isinstance(record, PreferencePair) else (record.completion,)
    problems: list[str] = []
    for value in values:
        for name in _candidate_paths(value):
            path = Path(name.strip()).expanduser()
            if not path.is_absolute():
                path = base_dir / path
            if not path.exists():
                problems.append(f"missing file {name}")
                continue
            try:
                with path.open("rb") as f:
                    first = f.read(1)
            except OSError as exc:
                problems.append(f"unreadable file {name}: {exc.strerror or exc}")
                continue
            if not first:
                problems.append(f"unreadable file {name}: empty file (0 bytes)")
    return problems


def _canonical(value: Any) -> Any:
    """A JSON-serialisable stand-in for a value, with bytes replaced by their sha256."""
    if isinstance(value, (bytes, bytearray)):
        return {"__bytes_sha256__": hashlib.sha256(value).hexdigest()}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return {"__repr__": repr(value)}


def _content_hash(*values: Any) -> str:
    blob = json.dumps([_canonical(v) for v in values], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _check_name(check: Callable[..., Any]) -> str:
    while isinstance(check, functools.partial):
        check = check.func
    return getattr(check, "__name__", None) or type(check).__name__


def doctor(
    path: str | Path,
    format: str = "auto",
    kind: Literal["paired", "unpaired"] = "paired",
    columns: ColumnMap | None = None,
    checks: Sequence[RecordCheck] = (),
    rows: Callable[[Path], Iterable[RawRow]] | None = None,
    parse: Callable[[dict[str, Any]], PreferencePair | UnpairedSample | str] | None = None,
) -> DoctorReport:
    """Validate a preference dataset and report every problem found (see the module docstring).

    Never raises on bad rows or a missing dataset: a dataset that does not exist or cannot be opened
    gives one ``unreadable`` error finding; a custom check that raises is reported under its name.

    Args:
        path: The dataset (jsonl, parquet file or shard directory, HF dataset on disk).
        format: ``"auto"``, ``"jsonl"``, ``"parquet"`` or ``"hf"``.
        kind: ``"paired"`` or ``"unpaired"``.
        columns: The source column names.
        checks: Extra per-record checks (``(record, base_dir) -> problems``), each reported under the
            function's name.
        rows: The rows of a source a modality reads itself (e.g. pair folders) instead of the core formats'.
        parse: ``row -> record | skip reason`` for a modality's row schema (e.g. Pick-a-Pic) instead of the
            core column mapping.

    Returns:
        :class:`DoctorReport`: ``report.ok`` is ``False`` when any error-severity check fired.

    Raises:
        ValueError: ``kind`` is not ``"paired"`` or ``"unpaired"``.
    """
    if kind not in ("paired", "unpaired"):
        raise ValueError(f"kind must be 'paired' or 'unpaired', got {kind!r}")
    cols = columns or ColumnMap()
    report = DoctorReport(str(path))
    p = Path(path)
    base_dir = p if p.is_dir() else p.parent
    seen: dict[str, str] = {}
    try:
        for raw in rows(p) if rows is not None else iter_source_rows(p, format):
            report.rows += 1
            where = raw.where(Path(raw.source).name)  # "d.jsonl:LINE" / "d.parquet: row N (0-based)"
            if raw.data is None:
                record = raw.error
            else:
                record = parse(raw.data) if parse is not None else row_to_record(raw.data, kind, cols)
            if isinstance(record, str):
                category = record.split(":", 1)[0].strip()
                report.add(category.replace(" ", "_"), f"{where}: {record}")
                continue
            if isinstance(record, PreferencePair):
                key = _content_hash(record.prompt, record.chosen, record.rejected)
            else:
                key = _content_hash(record.prompt, record.completion, record.desirable)
            if key in seen:
                report.add("duplicate", f"{where}: same as {seen[key]}")
            else:
                seen[key] = where
            ok = True
            for problem in non_finite_fields(raw.data or {}):
                report.add("non_finite", f"{where}: {problem}")
                ok = False
            for problem in check_referenced_files(record, base_dir):
                check = "missing_file" if problem.startswith("missing") else "unreadable_file"
                report.add(check, f"{where}: {problem}")
                ok = False
            for custom in checks:
                name = _check_name(custom)
                try:
                    problems = list(custom(record, base_dir))
                except Exception as exc:  # a buggy or crashing check is a finding, not a crash
                    problems = [f"check raised {type(exc).__name__}: {exc}"]
                for problem in problems:
                    report.add(name, f"{where}: {problem}")
                    ok = False
            report.valid += ok
    except DataError as exc:
        report.add("unreadable", str(exc), "error")
    if report.rows == 0 and not report.findings:
        empty = p.is_file() and p.stat().st_size == 0
        report.add("no_rows", f"{p.name}: {'empty file (0 bytes)' if empty else 'no rows'}", "error")
    return report
