"""``mm-align doctor``: validate a preference dataset before any training.

Reports every problem it finds — it never stops at the first: unreadable data, malformed rows,
missing columns, bad labels, empty prompts (errors); missing or unreadable referenced files
(errors); ties and exact duplicates (warnings: they would be dropped or double-counted);
plus the checks a modality adds (corrupt images, tiny images, ...).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mm_align.data.io import iter_rows, row_to_record
from mm_align.data.records import ColumnMap, DataError, PreferencePair

__all__ = ["Finding", "DoctorReport", "RecordCheck", "doctor", "check_referenced_files", "FILE_EXTENSIONS"]

RecordCheck = Callable[[Any, Path], list[str]]
FILE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".wav", ".flac", ".mp3", ".ogg", ".mp4",
                   ".avi", ".mov", ".webm", ".npy", ".pt", ".safetensors")
_SEVERITY = {"tie": "warning", "duplicate": "warning"}


@dataclass
class Finding:
    check: str
    severity: Literal["error", "warning"]
    count: int = 0
    examples: list[str] = field(default_factory=list)


@dataclass
class DoctorReport:
    source: str
    rows: int = 0
    valid: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def add(self, check: str, example: str, severity: Literal["error", "warning"] | None = None) -> None:
        sev = severity or _SEVERITY.get(check, "error")
        for f in self.findings:
            if f.check == check:
                break
        else:
            f = Finding(check, sev)
            self.findings.append(f)
        f.count += 1
        if len(f.examples) < 5:
            f.examples.append(example)

    def table(self) -> str:
        if not self.findings:
            return f"{self.source}: no problems found in {self.rows} rows"
        width = max(len(f.check) for f in self.findings + [Finding("check", "error")])
        lines = [f"{'check':<{width}}  severity  {'count':>6}  example", "-" * (width + 40)]
        for f in self.findings:
            lines.append(f"{f.check:<{width}}  {f.severity:<8}  {f.count:>6}  {f.examples[0] if f.examples else ''}")
        return "\n".join(lines)


def _paths_in(value: Any) -> list[str]:
    items = [value] if not isinstance(value, (list, dict)) else (
        list(value.values()) if isinstance(value, dict) else list(value))
    return [v for v in items if isinstance(v, str) and v.lower().endswith(FILE_EXTENSIONS)]


def check_referenced_files(record: Any, base_dir: Path) -> list[str]:
    """Each file a record names (by a media/tensor extension) must exist and be readable."""
    fields = (record.chosen, record.rejected) if isinstance(record, PreferencePair) else (record.completion,)
    problems = []
    for value in fields:
        for name in _paths_in(value):
            path = Path(name) if Path(name).is_absolute() else base_dir / name
            if not path.exists():
                problems.append(f"missing file {name}")
                continue
            try:
                with path.open("rb") as f:
                    f.read(1)
            except OSError as exc:
                problems.append(f"unreadable file {name}: {exc.strerror or exc}")
    return problems


def _content_hash(row: dict) -> str:
    def default(v: Any) -> str:
        return hashlib.sha256(v).hexdigest() if isinstance(v, bytes) else repr(v)

    return hashlib.sha256(json.dumps(row, sort_keys=True, default=default).encode()).hexdigest()


def doctor(
    path: str | Path,
    format: str = "auto",
    kind: Literal["paired", "unpaired"] = "paired",
    columns: ColumnMap | None = None,
    checks: Sequence[RecordCheck] = (),
) -> DoctorReport:
    """Validate a dataset and return every finding (never raises on bad rows)."""
    cols = columns or ColumnMap()
    report = DoctorReport(str(path))
    p = Path(path)
    base_dir = p.parent if p.is_file() else p
    seen: dict[str, str] = {}
    try:
        rows = iter_rows(p, format)
        for source, i, row, error in rows:
            report.rows += 1
            where = f"{Path(source).name}:{i}"
            if row is None:
                report.add("malformed", f"{where}: {error}")
                continue
            result = row_to_record(row, kind, cols)
            if isinstance(result, str):
                category = result.split(":")[0]
                report.add(category.replace(" ", "_"), f"{where}: {result}")
                continue
            ok = True
            key_cols = (cols.prompt, cols.chosen, cols.rejected) if kind == "paired" else (
                cols.prompt, cols.completion, cols.label)
            h = _content_hash({k: row[k] for k in key_cols})
            if h in seen:
                report.add("duplicate", f"{where}: same as {seen[h]}")
            else:
                seen[h] = where
            for problem in check_referenced_files(result, base_dir):
                check_name = "missing_file" if problem.startswith("missing") else "unreadable_file"
                report.add(check_name, f"{where}: {problem}")
                ok = False
            for check in checks:
                for problem in check(result, base_dir):
                    report.add(getattr(check, "__name__", "check"), f"{where}: {problem}")
                    ok = False
            report.valid += ok
    except DataError as exc:
        report.add("unreadable", str(exc))
    return report


