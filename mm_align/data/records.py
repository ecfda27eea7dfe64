"""Preference records and the outcome of reading a dataset (kept rows, skipped-and-counted rows)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DataError", "PreferencePair", "UnpairedSample", "SkippedRow", "ReadResult", "ColumnMap"]


class DataError(ValueError):
    """A dataset cannot be used; the message names the file, the row and what is wrong."""


@dataclass
class PreferencePair:
    """One paired preference: ``chosen`` preferred over ``rejected`` for ``prompt``."""

    prompt: Any
    chosen: Any
    rejected: Any
    id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class UnpairedSample:
    """One unpaired judgement (KTO): ``completion`` for ``prompt`` is desirable or not."""

    prompt: Any
    completion: Any
    desirable: bool
    id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class SkippedRow:
    source: str
    row: int  # 0-based row index (jsonl: line index)
    reason: str


@dataclass
class ReadResult:
    records: list[Any]
    skipped: list[SkippedRow]
    source: str

    def skipped_by_reason(self) -> dict[str, int]:
        """Skipped rows counted by reason category (the text before ':')."""
        return dict(Counter(s.reason.split(":")[0] for s in self.skipped))


@dataclass
class ColumnMap:
    """Column names in the source data (e.g. ``prompt: caption``)."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    completion: str = "completion"
    label: str = "label"
    id: str = "id"
