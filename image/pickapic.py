"""Pick-a-Pic preference data (v1/v2 parquet shards, mirrors, HF datasets on disk, any dataset with its columns).

Columns: ``caption``, ``jpg_0``, ``jpg_1`` (JPEG bytes), ``label_0``, ``label_1`` (1 / 0 / 0.5),
optional ``model_0``, ``model_1``, ``ranking_id``. ``label_0 == 1`` → ``jpg_0`` wins. Documented
behaviour: ties (0.5), corrupt or undecodable images, empty captions, missing columns and
inconsistent labels are SKIPPED AND COUNTED (``ReadResult.skipped`` names file, row and reason);
``strict=True`` stops at the first one with a :class:`~mm_align.data.DataError`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from PIL import Image

from mm_align.data import DataError, PreferencePair, ReadResult
from mm_align.data.io import is_empty, read_rows

__all__ = ["PICKAPIC_COLUMNS", "read_pickapic", "check_image_bytes", "pickapic_row"]

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")


def check_image_bytes(value: Any) -> str | None:
    """None when ``value`` holds a decodable image, else why not."""
    if isinstance(value, dict) and "bytes" in value:  # HF Image feature, undecoded
        value = value["bytes"]
    if not isinstance(value, (bytes, bytearray)) or not value:
        return f"not image bytes ({type(value).__name__})"
    try:
        with Image.open(io.BytesIO(value)) as im:
            im.load()  # decodes every pixel: truncated files fail here, not at training time
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for corrupt data
        return f"{type(exc).__name__}: {exc}"
    return None


def pickapic_row(row: dict[str, Any]) -> PreferencePair | str:
    """A pair from one Pick-a-Pic row, or the reason the row is skipped."""
    for col in PICKAPIC_COLUMNS:
        if col not in row:
            return f"missing column: {col}"
    if is_empty(row["caption"]):
        return "empty prompt"
    l0, l1 = row["label_0"], row["label_1"]
    if l0 == 0.5 or l1 == 0.5:
        return "tie: label 0.5"
    if {l0, l1} != {0, 1}:
        return f"bad label: label_0={l0!r}, label_1={l1!r}"
    for col in ("jpg_0", "jpg_1"):
        problem = check_image_bytes(row[col])
        if problem:
            return f"corrupt image: {col}: {problem}"
    win, lose = ("0", "1") if l0 == 1 else ("1", "0")
    meta = {k: row[k] for k in ("model_0", "model_1") if k in row}
    meta["winner"] = int(win)
    rid = None if row.get("ranking_id") is None else str(row["ranking_id"])
    return PreferencePair(row["caption"], row[f"jpg_{win}"], row[f"jpg_{lose}"], rid, meta)


def read_pickapic(path: str | Path, format: str = "auto", strict: bool = False, kind: str = "paired") -> ReadResult:
    """Read Pick-a-Pic-schema data (parquet file or shard directory, HF dataset on disk, jsonl).

    Raises:
        DataError: ``kind`` is not ``"paired"`` (Pick-a-Pic holds pairs; unpaired losses need other data).
    """
    if kind != "paired":
        raise DataError(f"{path}: Pick-a-Pic data holds pairs; a {kind} loss needs unpaired data")
    return read_rows(path, pickapic_row, format, strict)
