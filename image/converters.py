"""Image preference data converters: Pick-a-Pic parquet ⇄ image pair folders ⇄ jsonl with image files.

Formats (``mm-align convert image SRC DST [--from F] [--to F] [--strict]``):

``pickapic``
    The Pick-a-Pic schema (columns ``caption``, ``jpg_0``, ``jpg_1``, ``label_0``, ``label_1``, optional
    ``model_0``, ``model_1``, ``ranking_id``), read by :func:`~mm_align.image.pickapic.read_pickapic` from a
    parquet file, a directory of parquet shards, an HF dataset on disk or jsonl. Written by
    :func:`write_pickapic` as one parquet file.

``pair_folders``
    A directory in one of two layouts, read by :func:`read_pair_folders` (see there for the exact rules):

    - per-id folders: ``DIR/<id>/prompt.txt``, ``DIR/<id>/chosen.<ext>``, ``DIR/<id>/rejected.<ext>``
      (optional ``DIR/<id>/meta.json``); this is the layout :func:`write_pair_folders` writes;
    - split folders: ``DIR/chosen/<id>.<ext>``, ``DIR/rejected/<id>.<ext>`` and ``DIR/prompts.jsonl``
      with one ``{"id": ..., "prompt": ...}`` (or ``{"file": ..., "prompt": ...}``) object per line.

``jsonl``
    The core preference schema, one ``{"prompt", "chosen", "rejected", "id", **meta}`` object per line,
    ``chosen``/``rejected`` being image paths relative to the jsonl file's directory (or absolute).
    :func:`write_image_jsonl` copies the images into ``<dst stem>_images/`` next to the file and writes
    the rows with :func:`~mm_align.data.write_preferences`. As a source, anything
    :func:`~mm_align.data.read_preferences` reads with those columns works (parquet or HF with image
    bytes or ``{"bytes": ...}`` cells too).

Image bytes are never re-encoded when they are JPEG or PNG: a JPEG read from Pick-a-Pic lands in a folder
as the same bytes (``.jpg``, the extension detected by PIL) and goes back into a parquet unchanged. Other
formats (WebP, GIF, BMP, TIFF) are copied as files as they are, and re-encoded losslessly to PNG when
written into a Pick-a-Pic parquet. Every write is atomic: the data goes to a temporary name next to the
target and is renamed over it (:func:`write_image_jsonl` renames its image folder first, then the file).

Bad rows are SKIPPED AND COUNTED (or raise :class:`~mm_align.data.DataError` with ``strict=True``): a
conversion also fully decodes every image and skips pairs with a corrupt one, so nothing is lost silently.
"""

from __future__ import annotations

import argparse
import filecmp
import io
import json
import logging
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm_align.image.image_checks import IMAGE_EXTENSIONS
from mm_align.image.pickapic import PICKAPIC_COLUMNS, check_image_bytes, read_pickapic
from PIL import Image

from mm_align.data import (
    ColumnMap,
    DataError,
    PreferencePair,
    RawRow,
    ReadResult,
    SkippedRow,
    iter_source_rows,
    row_to_record,
    write_preferences,
)
from mm_align.data.io import JSONL_SUFFIXES, read_rows

logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "ConvertSummary",
    "convert",
    "convert_main",
    "detect_image_format",
    "iter_pair_folder_rows",
    "read_image_pairs",
    "read_pair_folders",
    "write_image_jsonl",
    "write_pair_folders",
    "write_pickapic",
]

FORMATS: tuple[str, ...] = ("pickapic", "pair_folders", "jsonl")
"""The formats :func:`convert` reads and writes (plus ``"auto"``)."""

PROMPTS_FILE = "prompts.jsonl"
_COLUMNS = ColumnMap()
_RECORD_KEYS = frozenset({"prompt", "chosen", "rejected", "id"})
_PIL_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tiff",
               "MPO": ".jpg"}
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})
_PARQUET_BATCH = 256
_MAX_LISTED_SKIPS = 10
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
    return {k: v for k, v in meta.items() if k not in _RECORD_KEYS}


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
        meta = {k: v for k, v in row.items() if k not in _RECORD_KEYS - {"prompt"}}
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
            a corrupt one (slower; :func:`convert` always does).

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
    """Read image pairs from any format :func:`convert` knows, every image fully decoded.

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
    fmt = detect_image_format(path) if format == "auto" else _check_format(format, path)
    if fmt == "pickapic":
        return read_pickapic(path, strict=strict)
    if fmt == "pair_folders":
        return read_pair_folders(path, strict=strict, check_images=True)
    base_dir = _base_dir(Path(path))
    return read_rows(path, lambda row: _image_pair_row(row, base_dir), strict=strict)


def _check_format(format: str, path: str | Path) -> str:
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
    if p.is_dir() and (_is_split_layout(p) or _has_per_id_folders(p)):
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


# ---- images for the writers ----------------------------------------------------------------------


@dataclass
class _Image:
    """An image to write: bytes in memory or a file to copy, and its file suffix."""

    data: bytes | None
    path: Path | None
    suffix: str

    def read(self) -> bytes:
        return self.data if self.data is not None else self.path.read_bytes()


def _sniff(source: bytes | Path) -> str:
    """PIL's format name (``"JPEG"``, ``"PNG"``, ...) from the header."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
        return im.format or ""


def _suffix(source: bytes | Path) -> str:
    fmt = _sniff(source)
    return _PIL_SUFFIX.get(fmt, f".{fmt.lower()}" if fmt else ".png")


def _describe(index: int, record: Any) -> str:
    rid = getattr(record, "id", None)
    return f"record {index}" + (f" (id {rid!r})" if rid is not None else "")


def _image(value: Any, what: str, base_dir: Path) -> _Image:
    """The image a record value holds (a path, bytes, an HF ``{"bytes", "path"}`` dict or a PIL image)."""
    try:
        if isinstance(value, Image.Image):
            buf = io.BytesIO()
            value.save(buf, format="PNG")
            return _Image(buf.getvalue(), None, ".png")
        if isinstance(value, dict):
            value = value["bytes"] if value.get("bytes") is not None else value.get("path")
        if isinstance(value, (bytes, bytearray)):
            data = bytes(value)
            return _Image(data, None, _suffix(data))
        if isinstance(value, (str, Path)):
            path = Path(value).expanduser()
            path = path if path.is_absolute() else base_dir / path
            if not path.is_file():
                raise DataError(f"{what}: no such image file {value}")
            suffix = path.suffix.lower()
            return _Image(None, path, suffix if suffix in IMAGE_EXTENSIONS else _suffix(path))
    except DataError:
        raise
    except Exception as exc:  # PIL raises UnidentifiedImageError (OSError), ValueError, ...
        raise DataError(f"{what}: not a readable image: {type(exc).__name__}: {exc}") from exc
    raise DataError(f"{what}: not an image ({type(value).__name__}); expected a path, bytes or a PIL image")


def _save(image: _Image, directory: Path, stem: str) -> str:
    name = stem + image.suffix
    if image.path is not None:
        shutil.copyfile(image.path, directory / name)
    else:
        (directory / name).write_bytes(image.data)
    return name


def _pickapic_bytes(image: _Image, what: str) -> bytes:
    """JPEG and PNG bytes as they are; anything else re-encoded to PNG (lossless)."""
    data = image.read()
    try:
        if _sniff(data) in ("JPEG", "PNG"):
            return data
        with Image.open(io.BytesIO(data)) as im:
            im = im if im.mode in _PNG_MODES else im.convert("RGBA" if "A" in im.getbands() else "RGB")
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            return buf.getvalue()
    except Exception as exc:
        raise DataError(f"{what}: not a readable image: {type(exc).__name__}: {exc}") from exc


def _text_prompt(record: Any, index: int, where: Path) -> str:
    if not isinstance(record, PreferencePair):
        raise DataError(f"{where}: {_describe(index, record)} is a {type(record).__name__}; image pair formats "
                        "hold PreferencePair records")
    if not isinstance(record.prompt, str):
        raise DataError(f"{where}: {_describe(index, record)}: the prompt is a {type(record.prompt).__name__}; "
                        "image pair formats hold text prompts")
    return record.prompt


def _json_meta(meta: dict[str, Any], dropped: Counter) -> dict[str, Any]:
    """The JSON-serialisable meta entries (not clashing with the record's own columns); the rest counted."""
    out = {}
    for k, v in meta.items():
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            dropped[k] += 1
            continue
        if k in _RECORD_KEYS:
            dropped[k] += 1
            continue
        out[k] = v
    return out


def _warn_dropped(dropped: Counter, where: Path) -> None:
    if dropped:
        logger.warning("%s: meta keys not written (not JSON-serialisable or clashing): %s", where,
                       ", ".join(f"{k} ({n})" for k, n in dropped.items()))


def _folder_names(records: list[Any]) -> list[str]:
    """One safe, unique (case-insensitively) file name per record, from its id (else its index)."""
    used: set[str] = set()
    names = []
    for i, record in enumerate(records):
        rid = getattr(record, "id", None)
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", str(rid)).strip("._")[:100] if rid is not None else ""
        base = base or f"{i:06d}"
        name, k = base, 2
        while name.lower() in used:
            name, k = f"{base}-{k}", k + 1
        used.add(name.lower())
        names.append(name)
    return names


def _temp_name(target: Path, tag: str = "tmp") -> Path:
    return target.with_name(f".{target.name}.{tag}-{os.getpid()}")


def _swap_dir(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` directory over ``target`` (the old one is removed after the rename)."""
    if target.exists():
        old = _temp_name(target, "old")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


# ---- writers -------------------------------------------------------------------------------------


def write_pair_folders(records: Iterable[PreferencePair], out_dir: str | Path, base_dir: str | Path | None = None
                       ) -> Path:
    """Write pairs as per-id folders: ``OUT/<id>/{prompt.txt, chosen.<ext>, rejected.<ext>, meta.json}``.

    ``<id>`` is the record's id made file-name safe (characters other than letters, digits, ``.``, ``_``,
    ``-`` become ``_``; a clash gets ``-2``, ``-3``, ...), or the record's 0-based index (``000042``) when it
    has none. Image bytes are written as they are with the extension PIL detects; image files are copied
    as they are. ``meta.json`` holds the record's JSON-serialisable meta (e.g. Pick-a-Pic ``model_0``,
    ``model_1``, ``winner``), written only when there is some. The folder is written under a temporary
    name and renamed over ``out_dir``.

    Args:
        records: Pairs with text prompts and images as paths, bytes, HF ``{"bytes": ...}`` dicts or PIL images.
        out_dir: The dataset directory; an existing one is replaced only if it is empty or pair folders.
        base_dir: What relative image paths are relative to (default: the current directory).

    Returns:
        `Path`: ``out_dir``.

    Raises:
        DataError: A record is not a pair with a text prompt, an image cannot be read, or ``out_dir``
            exists and is not a pair-folders dataset.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (_is_split_layout(out) or _has_per_id_folders(out)):
        raise DataError(f"{out}: exists and is not a pair-folders dataset; refusing to replace it")
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    records = list(records)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(out)
    dropped: Counter = Counter()
    try:
        _remove(tmp)
        tmp.mkdir()
        for i, (record, name) in enumerate(zip(records, _folder_names(records))):
            prompt = _text_prompt(record, i, out)
            d = tmp / name
            d.mkdir()
            (d / "prompt.txt").write_text(prompt + "\n", encoding="utf-8", newline="\n")
            for side in ("chosen", "rejected"):
                _save(_image(getattr(record, side), f"{out}: {_describe(i, record)}: {side}", base), d, side)
            meta = _json_meta(record.meta, dropped)
            if meta:
                (d / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        _swap_dir(tmp, out)
    finally:
        _remove(tmp)
    _warn_dropped(dropped, out)
    return out


def write_image_jsonl(records: Iterable[PreferencePair], out_path: str | Path, base_dir: str | Path | None = None
                      ) -> Path:
    """Write pairs as jsonl with the images as files in ``<stem>_images/`` next to it.

    Rows are ``{"prompt", "chosen", "rejected", "id", **meta}`` (written by
    :func:`~mm_align.data.write_preferences`), ``chosen``/``rejected`` being ``"<stem>_images/<id>_chosen.<ext>"``
    relative to the jsonl's directory (``<id>`` made file-name safe as in :func:`write_pair_folders`).
    Image bytes are written as they are with the extension PIL detects; image files are copied. Meta that
    is not JSON-serialisable (bytes) is left out with a warning. The images folder is renamed into place
    first, then the jsonl file: both are complete when they appear.

    Args:
        records: Pairs with text prompts and images as paths, bytes, HF ``{"bytes": ...}`` dicts or PIL images.
        out_path: The jsonl file.
        base_dir: What relative image paths are relative to (default: the current directory).

    Returns:
        `Path`: ``out_path``.

    Raises:
        DataError: A record is not a pair with a text prompt, or an image cannot be read.
    """
    p = Path(out_path)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    records = list(records)
    p.parent.mkdir(parents=True, exist_ok=True)
    images = p.parent / f"{p.stem}_images"
    tmp_images, tmp_jsonl = _temp_name(images), p.with_name(f".{p.stem}.tmp-{os.getpid()}.jsonl")
    dropped: Counter = Counter()
    rows = []
    try:
        _remove(tmp_images)
        tmp_images.mkdir()
        for i, (record, name) in enumerate(zip(records, _folder_names(records))):
            prompt = _text_prompt(record, i, p)
            files = [_save(_image(getattr(record, side), f"{p}: {_describe(i, record)}: {side}", base), tmp_images,
                           f"{name}_{side}") for side in ("chosen", "rejected")]
            rows.append(PreferencePair(prompt, f"{images.name}/{files[0]}", f"{images.name}/{files[1]}", record.id,
                                       _json_meta(record.meta, dropped)))
        write_preferences(rows, tmp_jsonl, format="jsonl")
        _swap_dir(tmp_images, images)
        os.replace(tmp_jsonl, p)
    finally:
        _remove(tmp_images)
        _remove(tmp_jsonl)
    _warn_dropped(dropped, p)
    return p


def _ranking_ids(records: list[Any]) -> tuple[list[Any], Any]:
    """``ranking_id`` values: the ids as int64 when every id is an integer, else as strings (index if none)."""
    import pyarrow as pa

    ids = [getattr(r, "id", None) for r in records]
    if all(i is None for i in ids):
        return list(range(len(records))), pa.int64()
    try:
        return [int(str(i)) for i in ids], pa.int64()
    except (TypeError, ValueError):
        return [str(i) if i is not None else str(k) for k, i in enumerate(ids)], pa.string()


def write_pickapic(records: Iterable[PreferencePair], out_path: str | Path, base_dir: str | Path | None = None
                   ) -> Path:
    """Write pairs as one Pick-a-Pic-schema parquet file, which :func:`read_pickapic` reads back to the same pairs.

    Columns: ``caption`` (the prompt), ``jpg_0``, ``jpg_1`` (image bytes: JPEG and PNG as they are, other
    formats re-encoded to PNG), ``label_0`` = 1.0 and ``label_1`` = 0.0 (``jpg_0`` is the chosen image) —
    except for a record that came from Pick-a-Pic with ``meta["winner"] == 1``, which keeps its original
    sides (``jpg_1`` chosen, labels 0/1) so that its ``model_0``/``model_1`` stay right —, ``ranking_id``
    (the record ids: int64 when all are integers, else strings; the row index when there are none), and
    ``model_0``/``model_1`` when any record's meta has them. Written under a temporary name and renamed.

    Args:
        records: Pairs with text prompts and images as paths, bytes, HF ``{"bytes": ...}`` dicts or PIL images.
        out_path: The parquet file.
        base_dir: What relative image paths are relative to (default: the current directory).

    Returns:
        `Path`: ``out_path``.

    Raises:
        DataError: A record is not a pair with a text prompt, an image cannot be read, or ``out_path`` is
            a directory.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = Path(out_path)
    if p.is_dir():
        raise DataError(f"{p}: is a directory; write_pickapic writes one parquet file (e.g. {p / 'train.parquet'})")
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    records = list(records)
    ranking, id_type = _ranking_ids(records)
    with_models = any(k in getattr(r, "meta", {}) for r in records for k in ("model_0", "model_1"))
    fields = [("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64()),
              ("label_1", pa.float64())]
    fields += [("model_0", pa.string()), ("model_1", pa.string())] if with_models else []
    schema = pa.schema([*fields, ("ranking_id", id_type)])
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(p)
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for start in range(0, len(records), _PARQUET_BATCH):
                cols: dict[str, list[Any]] = {name: [] for name in schema.names}
                for i in range(start, min(start + _PARQUET_BATCH, len(records))):
                    record = records[i]
                    cols["caption"].append(_text_prompt(record, i, p))
                    what = f"{p}: {_describe(i, record)}"
                    chosen = _pickapic_bytes(_image(record.chosen, f"{what}: chosen", base), f"{what}: chosen")
                    rejected = _pickapic_bytes(_image(record.rejected, f"{what}: rejected", base), f"{what}: rejected")
                    swap = record.meta.get("winner") in (1, "1")
                    cols["jpg_0"].append(rejected if swap else chosen)
                    cols["jpg_1"].append(chosen if swap else rejected)
                    cols["label_0"].append(0.0 if swap else 1.0)
                    cols["label_1"].append(1.0 if swap else 0.0)
                    if with_models:
                        for k in ("model_0", "model_1"):
                            value = record.meta.get(k)
                            cols[k].append(None if value is None else str(value))
                    cols["ranking_id"].append(ranking[i])
                writer.write_table(pa.table(cols, schema=schema))
        os.replace(tmp, p)
    finally:
        _remove(tmp)
    return p


_WRITERS = {"pickapic": write_pickapic, "pair_folders": write_pair_folders, "jsonl": write_image_jsonl}


# ---- convert -------------------------------------------------------------------------------------


@dataclass
class ConvertSummary:
    """What :func:`convert` did.

    Args:
        src: The source dataset.
        dst: The written dataset.
        src_format: The source format (detected when ``"auto"`` was asked).
        dst_format: The destination format.
        read: Pairs read (and kept).
        written: Pairs written.
        skipped: The source rows skipped, each with its file, row and reason.
    """

    src: str
    dst: str
    src_format: str
    dst_format: str
    read: int
    written: int
    skipped: list[SkippedRow] = field(default_factory=list)

    def skipped_by_reason(self) -> dict[str, int]:
        """Skipped rows counted by reason category (the text before the first ``':'``)."""
        return dict(Counter(s.reason.split(":", 1)[0].strip() for s in self.skipped))

    def text(self) -> str:
        """A few lines: pairs read (and skipped, by reason, with the first skipped rows), pairs written."""
        lines = [f"read {self.read} pairs from {self.src} ({self.src_format})"]
        if self.skipped:
            counts = ", ".join(f"{k}: {n}" for k, n in self.skipped_by_reason().items())
            lines[0] += f"; skipped {len(self.skipped)} rows ({counts})"
            lines += [f"  {s.source}: row {s.row}: {s.reason}" for s in self.skipped[:_MAX_LISTED_SKIPS]]
            if len(self.skipped) > _MAX_LISTED_SKIPS:
                lines.append(f"  ... and {len(self.skipped) - _MAX_LISTED_SKIPS} more")
        lines.append(f"wrote {self.written} pairs to {self.dst} ({self.dst_format})")
        return "\n".join(lines)


def _dst_format(dst: Path) -> str:
    suffix = dst.suffix.lower()
    if suffix == ".parquet":
        return "pickapic"
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if not suffix or dst.is_dir():
        return "pair_folders"
    raise DataError(f"{dst}: cannot tell the output format from '{suffix}'; use .parquet (pickapic), .jsonl "
                    "(jsonl), a directory (pair_folders) or pass --to")


def convert(src: str | Path, dst: str | Path, src_format: str = "auto", dst_format: str = "auto",
            strict: bool = False) -> ConvertSummary:
    """Convert image preference pairs between ``pickapic``, ``pair_folders`` and ``jsonl`` (see the module doc).

    Every image is fully decoded on the way: pairs with a missing or corrupt image, ties, empty prompts
    and the other bad rows of each format are skipped and counted in the summary (or raise with ``strict``).

    Args:
        src: The source dataset.
        dst: The destination: a ``.parquet`` file (pickapic), a ``.jsonl`` file (jsonl) or a directory
            (pair_folders) when ``dst_format`` is ``"auto"``.
        src_format: ``"auto"`` (:func:`detect_image_format`), ``"pickapic"``, ``"pair_folders"`` or ``"jsonl"``.
        dst_format: ``"auto"`` (from ``dst``'s suffix), ``"pickapic"``, ``"pair_folders"`` or ``"jsonl"``.
        strict: Raise at the first bad source row.

    Returns:
        :class:`ConvertSummary`: counts read / written / skipped by reason.

    Raises:
        DataError: The source cannot be read or its format told, ``src`` and ``dst`` are the same, a
            format is unknown, the destination cannot be written, or (``strict``) a bad row.
    """
    src_p, dst_p = Path(src), Path(dst)
    if src_p.expanduser().resolve() == dst_p.expanduser().resolve():
        raise DataError(f"{src}: source and destination are the same")
    fmt = detect_image_format(src_p) if src_format == "auto" else _check_format(src_format, src_p)
    to = _dst_format(dst_p) if dst_format == "auto" else _check_format(dst_format, dst_p)
    result = read_image_pairs(src_p, fmt, strict)
    _WRITERS[to](result.records, dst_p)
    return ConvertSummary(str(src), str(dst), fmt, to, len(result.records), len(result.records), list(result.skipped))


def convert_main(argv: list[str]) -> int:
    """``mm-align convert image SRC DST [--from F] [--to F] [--strict]``: print the summary; 2 on a data error."""
    choices = ("auto", *FORMATS)
    parser = argparse.ArgumentParser(
        prog="mm-align convert image",
        description="Convert image preference pairs between Pick-a-Pic parquet, pair folders and jsonl.",
    )
    parser.add_argument("src", help="source: parquet / shard dir / HF dir (pickapic), a directory (pair_folders), "
                                    "or .jsonl")
    parser.add_argument("dst", help="destination: .parquet (pickapic), .jsonl (jsonl) or a directory (pair_folders)")
    parser.add_argument("--from", dest="src_format", choices=choices, default="auto", help="source format")
    parser.add_argument("--to", dest="dst_format", choices=choices, default="auto", help="destination format")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
    args = parser.parse_args(argv)
    try:
        summary = convert(args.src, args.dst, args.src_format, args.dst_format, strict=args.strict)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.text())
    return 0
