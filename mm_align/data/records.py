"""Preference records and the outcome of reading a dataset (kept rows, skipped-and-counted rows)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DataError", "PreferencePair", "UnpairedSample", "SkippedRow", "ReadResult", "ColumnMap", "locate"]


class DataError(ValueError):
    """A dataset cannot be used; the message names the file, the row (when there is one) and what is wrong."""


@dataclass
class PreferencePair:
    """One paired preference: ``chosen`` is preferred over ``rejected`` for ``prompt``.

    Args:
        prompt: A string or any JSON-like value (e.g. a list of chat messages).
        chosen: The preferred sample: text, a path, a number, a list, a dict or raw bytes.
        rejected: The dispreferred sample, of the same kind as ``chosen``.
        id: An optional identifier carried through to reports.
        meta: Every other column of the source row (e.g. ``images``, ``model_0``, scores).
        origin: Where the reader found it (``"train.jsonl:12"``, ``"shard.parquet: row 3 (0-based)"``), for
            messages; not part of the record's value (ignored by ``==`` and by the data fingerprint).
    """

    prompt: Any
    chosen: Any
    rejected: Any
    id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    origin: str | None = field(default=None, compare=False, repr=False)


@dataclass
class UnpairedSample:
    """One unpaired judgement (KTO-style): ``completion`` for ``prompt`` is desirable or not.

    Args:
        prompt: A string or any JSON-like value.
        completion: The judged sample.
        desirable: ``True`` for a desirable completion, ``False`` for an undesirable one.
        id: An optional identifier.
        meta: Every other column of the source row.
        origin: Where the reader found it, for messages (as :class:`PreferencePair`'s).
    """

    prompt: Any
    completion: Any
    desirable: bool
    id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    origin: str | None = field(default=None, compare=False, repr=False)


def locate(source: str, row: int, file_row: int | None = None, line: int | None = None) -> str:
    """Where a row is, as a user finds it in the file.

    Args:
        source: The file (or directory) the row is in.
        row: The dataset-wide 0-based row index.
        file_row: The 0-based index inside ``source`` (differs from ``row`` for later parquet shards).
        line: The 1-based line number of a jsonl row; ``None`` for columnar formats.

    Returns:
        `str`: ``"data.jsonl:7"`` for a jsonl line; ``"data.parquet: row 6 (0-based)"`` otherwise, with
        ``"; row 1030 of the dataset"`` added for a row of a later shard.
    """
    if line is not None:
        return f"{source}:{line}"
    local = row if file_row is None else file_row
    dataset = f"; row {row} of the dataset" if local != row else ""
    return f"{source}: row {local} (0-based{dataset})"


@dataclass
class SkippedRow:
    """A row a reader skipped, and why.

    Args:
        source: The file the row is in (for parquet shards: the shard).
        row: 0-based row index. For jsonl the line index; for a directory of parquet shards the index
            continues across the shards (sorted by name).
        reason: ``"<category>: <detail>"`` or just ``"<category>"``, e.g. ``"missing column: rejected"``.
        line: For jsonl, the 1-based line number (``row + 1``) that messages quote; ``None`` otherwise.
        file_row: The 0-based index inside ``source`` (``None`` = ``row``; differs for later shards).
    """

    source: str
    row: int
    reason: str
    line: int | None = field(default=None, compare=False)  # derived from row; == ignores it
    file_row: int | None = field(default=None, compare=False)

    def where(self) -> str:
        """``"<source>:LINE"`` for jsonl, ``"<source>: row N (0-based)"`` otherwise (as in every message)."""
        return locate(self.source, self.row, self.file_row, self.line)


@dataclass
class ReadResult:
    """The records a reader kept, the rows it skipped, and the dataset it read."""

    records: list[PreferencePair] | list[UnpairedSample]
    skipped: list[SkippedRow]
    source: str

    def skipped_by_reason(self) -> dict[str, int]:
        """Skipped rows counted by reason category (the text before the first ``':'``), in order of first occurrence.

        Returns:
            `dict[str, int]`: e.g. ``{"malformed json": 1, "tie": 2}``.
        """
        return dict(Counter(s.reason.split(":", 1)[0].strip() for s in self.skipped))


@dataclass
class ColumnMap:
    """Column names in the source data, e.g. ``ColumnMap(prompt="caption")``."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    completion: str = "completion"
    label: str = "label"
    id: str = "id"
    # Columns that give the rejected sample an input of its own (an input-side rejection: another image, prompt,
    # clip or recording). A pair holding one differs in its input, so identical chosen and rejected outputs are
    # the point of it, not a tie.
    rejected_inputs: tuple[str, ...] = ("rejected_images", "rejected_prompt", "rejected_video", "rejected_audio")
