"""Readers of image preference pairs: pair folders, and any image-pair source with every image decoded.

- :func:`read_pair_folders` reads the two pair-folder layouts (the adapter data format ``pair_folders``;
  see there for the exact rules) and :func:`iter_pair_folder_rows` yields their raw rows, the skipped
  ones included (what ``mm-align doctor`` walks);
- :func:`detect_image_format` tells ``pickapic``, ``pair_folders`` and ``jsonl`` sources apart;
- :func:`read_image_pairs` reads any of them with every image fully decoded (what
  :func:`~mm_align.image.converters.convert` and ``mm-align evaluate image`` read).

Bad rows are SKIPPED AND COUNTED (or raise :class:`~mm_align.data.DataError` with ``strict=True``).
"""

from __future__ import annotations

import filecmp
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mm_align.image.image_io import IMAGE_EXTENSIONS
from mm_align.image.pickapic import PICKAPIC_COLUMNS, check_image_bytes, read_pickapic

from mm_align.data import (
    ColumnMap,
    DataError,
    PreferencePair,
    RawRow,
    ReadResult,
    iter_source_rows,
    row_to_record,
)
from mm_align.data.io import read_rows

__all__ = [
    "FORMATS",
    "PROMPTS_FILE",
    "RECORD_KEYS",
    "check_format",
    "detect_image_format",
    "is_pair_folders",
    "iter_pair_folder_rows",
    "read_image_pairs",
    "read_pair_folders",
]

FORMATS: tuple[str, ...] = ("pickapic", "pair_folders", "jsonl")
"""The image pair formats (plus ``"auto"``) that :func:`read_image_pairs` reads and the converter writes."""

PROMPTS_FILE = "prompts.jsonl"
"""The prompts file of the split pair-folders layout."""
RECORD_KEYS = frozenset({"prompt", "chosen", "rejected", "id"})
"""The keys of a pair's own columns; every other key of a row or ``meta.json`` goes into ``record.meta``."""
_COLUMNS = ColumnMap()
_READ_OPTIONS = ("check_images",)


# ---- reading pair folders ------------------------------------------------------------------------


def _natural_key(name: str) -> tuple[list[Any], str]:
    """Sort ``"2"`` before ``"10"``: digits compare as numbers."""
    parts = re.split(r"(\d+)", name.lower())
    return [int(t) if k % 2 else t for k, t in enumerate(parts)], name


def _image_files(directory: Path) -> list[Path]:
    files = (q for q in directory.iterdir() if q.is_file() and not q.name.startswith("."))
    return sorted((q for q in files if q.suffix.lower() in IMAGE_EXTENSIONS), key=lambda q: _natural_key(q.name))


def _pick(candidates: list[Path], missing: str, where: str) -> Path | str:
    """The one candidate image, or the skip reason: ``missing`` when there is none, ambiguous when several."""
    if not candidates:
        return missing
    if len(candidates) > 1:
        return f"ambiguous image: {where} has {' and '.join(q.name for q in candidates)}"
    return candidates[0]


def _read_meta(path: Path, where: str) -> dict[str, Any] | str:
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"malformed json: {where}/{path.name}: {exc}"
    if not isinstance(meta, dict):
        return f"malformed json: {where}/{path.name} must hold an object, got {type(meta).__name__}"
    return {k: v for k, v in meta.items() if k not in RECORD_KEYS}


def _per_id_row(folder: Path) -> dict[str, Any] | str:
    files = [q for q in folder.iterdir() if q.is_file()]
    prompt_file = next((q for q in files if q.name.lower() == "prompt.txt"), None)
    if prompt_file is None:
        return f"missing prompt: no prompt.txt in {folder.name}"
    try:
        prompt = prompt_file.read_text(encoding="utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError:
        return f"unreadable prompt: {folder.name}/{prompt_file.name} is not UTF-8 text"
    except OSError as exc:
        return f"unreadable prompt: {folder.name}/{prompt_file.name}: {exc.strerror or exc}"
    images = [q for q in files if q.suffix.lower() in IMAGE_EXTENSIONS]
    sides = {}
    for side in ("chosen", "rejected"):
        candidates = sorted(q for q in images if q.stem.lower() == side)
        picked = _pick(candidates, f"missing {side}: no {side}.png/.jpg/... in {folder.name}", folder.name)
        if isinstance(picked, str):
            return picked
        sides[side] = str(picked)
    meta = _read_meta(folder / "meta.json", folder.name)
    if isinstance(meta, str):
        return meta
    return {**meta, "id": folder.name, "prompt": prompt, **sides}


def _per_id_rows(root: Path) -> Iterator[RawRow]:
    folders = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")),
                     key=lambda d: _natural_key(d.name))
    for i, folder in enumerate(folders):
        row = _per_id_row(folder)
        yield RawRow(str(folder), i, i, *((None, row) if isinstance(row, str) else (row, None)))


def _split_rows(root: Path) -> Iterator[RawRow]:
    prompts = root / PROMPTS_FILE
    for part in ("chosen", "rejected"):
        if not (root / part).is_dir():
            raise DataError(f"{root}: a split pair-folders dataset needs chosen/, rejected/ and {PROMPTS_FILE}; "
                            f"{part}/ is missing")
    if not prompts.is_file():
        raise DataError(f"{root}: a split pair-folders dataset needs chosen/, rejected/ and {PROMPTS_FILE}; "
                        f"{PROMPTS_FILE} is missing")
    by_id: dict[str, dict[str, list[Path]]] = {"chosen": {}, "rejected": {}}
    listing: dict[str, list[Path]] = {}
    for side in by_id:
        listing[side] = _image_files(root / side)
        for q in listing[side]:
            by_id[side].setdefault(q.stem, []).append(q)
    first_row: dict[str, int] = {}
    for raw in iter_source_rows(prompts, "jsonl"):
        if raw.data is None:
            yield raw
            continue
        row = dict(raw.data)
        rid, file = row.pop("id", None), row.pop("file", None)
        if rid is None and file is not None:
            rid = Path(str(file)).stem
        if rid is None or not str(rid).strip():
            yield raw._replace(data=None, error="missing id: a row needs an 'id' (or a 'file' whose stem is the id)")
            continue
        rid = str(rid)
        if rid in first_row:
            yield raw._replace(data=None, error=f"duplicate id: {rid} (first in row {first_row[rid]})")
            continue
        first_row[rid] = raw.row
        sides: dict[str, str] = {}
        reason = None
        for side in ("chosen", "rejected"):
            picked = _pick(by_id[side].get(rid, []), f"missing {side}: no {side}/{rid}.png/.jpg/... for id {rid}",
                           f"{side}/")
            if isinstance(picked, str):
                reason = picked
                break
            sides[side] = str(picked)
        if reason is not None:
            yield raw._replace(data=None, error=reason)
            continue
        meta = {k: v for k, v in row.items() if k not in RECORD_KEYS - {"prompt"}}
        yield raw._replace(data={**meta, "id": rid, **sides})
    for side in ("chosen", "rejected"):
        for k, q in enumerate(listing[side]):
            if q.stem not in first_row:
                yield RawRow(str(root / side), k, k, None,
                             f"no prompt: {side}/{q.name} has no row in {PROMPTS_FILE} (id {q.stem})")


def _is_split_layout(root: Path) -> bool:
    return (root / "chosen").is_dir() or (root / PROMPTS_FILE).is_file()


def _has_per_id_folders(root: Path) -> bool:
    return any(d.is_dir() and (d / "prompt.txt").is_file() for d in root.iterdir())


def is_pair_folders(path: str | Path) -> bool:
    """True when ``path`` is a directory in one of the pair-folders layouts (split, or per-id folders)."""
    root = Path(path)
    return root.is_dir() and (_is_split_layout(root) or _has_per_id_folders(root))


def iter_pair_folder_rows(path: str | Path) -> Iterator[RawRow]:
    """Every entry of a pair-folders dataset as a raw row, including the ones a reader skips.

    Each row's ``data`` is ``{"id", "prompt", "chosen", "rejected", **meta}`` with absolute image paths
    (what :func:`~mm_align.data.row_to_record` turns into a pair), or ``data`` is ``None`` and ``error``
    says why the entry is unusable. See :func:`read_pair_folders` for the layouts and reasons.

    Raises:
        DataError: ``path`` is not a directory, or a split layout lacks ``chosen/``, ``rejected/`` or
            ``prompts.jsonl``.
    """
    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise DataError(f"{path}: no such file or directory")
    if not root.is_dir():
        raise DataError(f"{path}: pair folders are a directory (DIR/<id>/prompt.txt + chosen/rejected images, or "
                        f"DIR/chosen/, DIR/rejected/ and DIR/{PROMPTS_FILE})")
    yield from (_split_rows(root) if _is_split_layout(root) else _per_id_rows(root))


def _same_file_contents(a: str, b: str) -> bool:
    try:
        return filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def _image_problem(chosen: Any, rejected: Any) -> str | None:
    """Why a pair of (path or bytes) images is unusable: a corrupt image. ``None`` when both decode."""
    for side, value in (("chosen", chosen), ("rejected", rejected)):
        try:
            data = Path(value).read_bytes() if isinstance(value, str) else value
        except OSError as exc:
            return f"unreadable file: {side}: {value}: {exc.strerror or exc}"
        problem = check_image_bytes(data)
        if problem is not None:
            return f"corrupt image: {side}: {problem}"
    return None


def read_pair_folders(path: str | Path, strict: bool = False, kind: str = "paired", **options: Any) -> ReadResult:
    """Read image pair folders (the adapter data format ``pair_folders``).

    Layouts (``DIR`` = ``path``; image extensions: .png .jpg .jpeg .webp .bmp .gif, any case):

    - **per-id folders** (used unless ``DIR/chosen/`` or ``DIR/prompts.jsonl`` exists): every
      subdirectory ``DIR/<id>/`` (hidden ones excepted) is one pair: ``prompt.txt`` (UTF-8; trailing
      newlines removed), exactly one ``chosen.<ext>`` and one ``rejected.<ext>``, and optionally
      ``meta.json`` (an object; its keys go into ``record.meta``). Rows are the subdirectories in natural
      order (``2`` before ``10``); a skipped row names the folder (``source``) and its index (``row``).
      Files at the top level are ignored.
    - **split folders**: ``DIR/chosen/<id>.<ext>``, ``DIR/rejected/<id>.<ext>`` and ``DIR/prompts.jsonl``,
      one object per line: ``{"id": "0001", "prompt": "..."}`` or ``{"file": "0001.png", "prompt": "..."}``
      (the file's stem is the id; ``id`` wins when both are given). Images are matched to rows by file
      stem. Other keys go into ``record.meta``. Rows are the lines of ``prompts.jsonl`` (``source`` is
      that file, ``row`` its 0-based line); then every image whose id has no row is skipped as
      ``"no prompt"`` with ``source`` = its ``chosen/`` or ``rejected/`` folder and ``row`` = its index in
      that folder's listing in natural order.

    Records are ``PreferencePair(prompt, chosen=<absolute path>, rejected=<absolute path>, id)``.

    Skip reasons: ``missing prompt`` (no prompt.txt), ``unreadable prompt``, ``empty prompt``,
    ``missing chosen``, ``missing rejected``, ``ambiguous image`` (e.g. chosen.png and chosen.jpg),
    ``malformed json`` (prompts.jsonl line or meta.json), ``missing id``, ``duplicate id``, ``no prompt``
    (an image no row names), ``tie`` (chosen and rejected files are byte-identical), and with
    ``check_images=True`` ``corrupt image``.

    Args:
        path: The dataset directory.
        strict: Raise :class:`DataError` at the first bad entry (naming the folder or file and row).
        kind: Must be ``"paired"``.
        **options: ``check_images`` (bool, default False): fully decode every image and skip pairs with
            a corrupt one (slower; :func:`~mm_align.image.converters.convert` always does).

    Returns:
        :class:`ReadResult`: the pairs, the skipped entries, and the source.

    Raises:
        DataError: ``kind`` is not ``"paired"``, an unknown option, a path that is not a directory, an
            incomplete split layout, or (``strict``) a bad entry.
    """
    if kind != "paired":
        raise DataError(f"{path}: pair folders hold pairs; a {kind} loss needs unpaired data")
    unknown = sorted(set(options) - set(_READ_OPTIONS))
    if unknown:
        raise DataError(f"{path}: unknown pair_folders option(s) {', '.join(unknown)}; valid: "
                        f"{', '.join(_READ_OPTIONS)}")
    check_images = bool(options.get("check_images", False))

    def parse(row: dict[str, Any]) -> PreferencePair | str:
        record = row_to_record(row, "paired", _COLUMNS)
        if isinstance(record, str):
            return record
        if _same_file_contents(record.chosen, record.rejected):
            return "tie: chosen and rejected files are identical"
        if check_images:
            return _image_problem(record.chosen, record.rejected) or record
        return record

    return read_rows(path, parse, strict=strict, rows=iter_pair_folder_rows(path))


# ---- reading any image-pair source ---------------------------------------------------------------


def _base_dir(path: Path) -> Path:
    path = path.expanduser().resolve()
    return path if path.is_dir() else path.parent


def _jsonl_image(value: Any, side: str, base_dir: Path) -> tuple[Any, str | None]:
    """``(absolute path string or bytes, None)`` for a jsonl/parquet cell, or ``(None, why it is not an image)``."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None
    if isinstance(value, dict) and value.get("bytes") is not None:
        return bytes(value["bytes"]), None
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        value = value["path"]
    if not isinstance(value, str):
        return None, f"not an image: {side} is a {type(value).__name__}"
    if not value.strip().lower().endswith(IMAGE_EXTENSIONS):
        return None, f"not an image: {side} is {value[:60]!r} (not a path ending in {'/'.join(IMAGE_EXTENSIONS)})"
    path = Path(value.strip()).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        return None, f"missing file: {side}: {value}"
    return str(path), None


def _image_pair_row(row: dict[str, Any], base_dir: Path) -> PreferencePair | str:
    record = row_to_record(row, "paired", _COLUMNS)
    if isinstance(record, str):
        return record
    values = []
    for side in ("chosen", "rejected"):
        value, reason = _jsonl_image(getattr(record, side), side, base_dir)
        if reason is not None:
            return reason
        values.append(value)
    record.chosen, record.rejected = values
    if isinstance(record.chosen, str) and isinstance(record.rejected, str):
        if _same_file_contents(record.chosen, record.rejected):
            return "tie: chosen and rejected files are identical"
    elif record.chosen == record.rejected:
        return "tie: chosen and rejected are identical"
    return _image_problem(record.chosen, record.rejected) or record


def read_image_pairs(path: str | Path, format: str = "auto", strict: bool = False) -> ReadResult:
    """Read image pairs from any format of :data:`FORMATS`, every image fully decoded.

    Args:
        path: The dataset.
        format: ``"auto"`` (:func:`detect_image_format`), ``"pickapic"``, ``"pair_folders"`` or ``"jsonl"``.
        strict: Raise at the first bad row instead of skipping and counting it.

    Returns:
        :class:`ReadResult`: pairs whose ``chosen``/``rejected`` are image bytes (Pick-a-Pic, parquet cells)
        or absolute paths; pairs with a missing, undecodable or non-image value are skipped and counted.

    Raises:
        DataError: The dataset cannot be opened or its format told; (``strict``) a bad row.
    """
    fmt = detect_image_format(path) if format == "auto" else check_format(format, path)
    if fmt == "pickapic":
        return read_pickapic(path, strict=strict)
    if fmt == "pair_folders":
        return read_pair_folders(path, strict=strict, check_images=True)
    base_dir = _base_dir(Path(path))
    return read_rows(path, lambda row: _image_pair_row(row, base_dir), strict=strict)


def check_format(format: str, path: str | Path) -> str:
    """``format`` when it is one of :data:`FORMATS`.

    Raises:
        DataError: It is not; the message names ``path`` and the valid formats.
    """
    if format not in FORMATS:
        raise DataError(f"{path}: unknown image data format '{format}'; valid: auto, {', '.join(FORMATS)}")
    return format


def _columns_of(path: Path) -> list[str]:
    """Column names of a parquet file / shard directory (from the schema) or the first row of anything else."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = [path] if path.suffix.lower() == ".parquet" and path.is_file() else []
    if path.is_dir() and not any((path / n).exists() for n in ("dataset_info.json", "state.json",
                                                                  "dataset_dict.json")):
        parquet = sorted(q for q in path.glob("*.parquet") if q.is_file() and not q.name.startswith("."))
    if parquet:
        try:
            return list(pq.read_schema(parquet[0]).names)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{parquet[0]}: cannot read parquet: {exc}") from exc
    for raw in iter_source_rows(path):
        if raw.data is not None:
            return list(raw.data)
    raise DataError(f"{path}: no readable rows to tell the format from; pass --from pickapic|jsonl")


def detect_image_format(path: str | Path) -> str:
    """The image data format of a source.

    A directory with ``chosen/`` or ``prompts.jsonl``, or with a subdirectory holding ``prompt.txt``, is
    ``pair_folders``; data (parquet file or shards, HF dataset on disk, jsonl) with a ``jpg_0`` column is
    ``pickapic``; data with ``prompt``, ``chosen`` and ``rejected`` columns is ``jsonl``.

    Raises:
        DataError: The path does not exist or is none of these; the message names it.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if is_pair_folders(p):
        return "pair_folders"
    if p.is_dir() and not any(p.glob("*.parquet")) and not any(
        (p / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json")
    ):
        raise DataError(f"{p}: neither pair folders (DIR/<id>/prompt.txt, or DIR/chosen/ + DIR/{PROMPTS_FILE}) nor "
                        "a parquet / HF dataset directory")
    columns = _columns_of(p)
    if "jpg_0" in columns:
        return "pickapic"
    if {"prompt", "chosen", "rejected"} <= set(columns):
        return "jsonl"
    raise DataError(f"{p}: cannot tell the image data format from its columns ({', '.join(columns)}); expected "
                    f"Pick-a-Pic ({', '.join(PICKAPIC_COLUMNS)}) or prompt/chosen/rejected")
