"""Writers of image preference pairs: Pick-a-Pic parquet, pair folders, and jsonl with image files.

- :func:`write_pickapic`: one Pick-a-Pic-schema parquet file, which
  :func:`~mm_align.image.pickapic.read_pickapic` reads back to the same pairs;
- :func:`write_pair_folders`: per-id folders ``OUT/<id>/{prompt.txt, chosen.<ext>, rejected.<ext>, meta.json}``,
  which :func:`~mm_align.image.pair_readers.read_pair_folders` reads;
- :func:`write_image_jsonl`: the core jsonl schema with the images as files next to it.

Image bytes are never re-encoded when they are JPEG or PNG; other formats (WebP, GIF, BMP, TIFF) are
copied as files as they are, and re-encoded losslessly to PNG when written into a Pick-a-Pic parquet.
Every write is atomic: the data goes to a temporary name next to the target and is renamed over it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm_align.image.image_io import IMAGE_EXTENSIONS, png_bytes
from mm_align.image.pair_readers import RECORD_KEYS, is_pair_folders
from PIL import Image

from mm_align.data import DataError, PreferencePair, write_preferences

logger = logging.getLogger(__name__)

__all__ = ["WRITERS", "write_image_jsonl", "write_pair_folders", "write_pickapic"]

_PIL_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tiff",
               "MPO": ".jpg"}
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})
_PARQUET_BATCH = 256


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
            return _Image(png_bytes(value), None, ".png")
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
            return png_bytes(im if im.mode in _PNG_MODES else im.convert("RGBA" if "A" in im.getbands() else "RGB"))
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
        if k in RECORD_KEYS:
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
    if out.is_dir() and any(out.iterdir()) and not is_pair_folders(out):
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
    """Write pairs as one Pick-a-Pic-schema parquet file, which ``read_pickapic`` reads back to the same pairs.

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


WRITERS: dict[str, Callable[..., Path]] = {
    "pickapic": write_pickapic,
    "pair_folders": write_pair_folders,
    "jsonl": write_image_jsonl,
}
"""Format name -> ``writer(records, out, base_dir=None) -> out``."""
