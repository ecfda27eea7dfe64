"""VLM checks for ``mm-align doctor DATA --modality vlm``: the core doctor on TRL, LLaMA-Factory and jsonl VLM data.

:func:`vlm_doctor` reads every row through the format's own row parser (:mod:`mm_align.vlm.formats`), so what a
reader would skip is reported under the skip reason's category (the check name, then its severity):

- ``image_count_mismatch`` (error): the prompt's image placeholders (``{"type": "image"}`` parts or ``<image>``
  marks) against the row's ``images`` (or ``rejected_images``), e.g. ``"t.jsonl:3: image count mismatch: the
  prompt has 2 image placeholder(s) but 'images' holds 1 image(s)"``;
- ``missing_image`` (error): an image path that names no file (``"missing image: images[0]: cat.png"``);
  ``bad_image`` (error): a null, empty, URL or otherwise unusable image value;
- ``empty_prompt``, ``empty_chosen``, ``empty_rejected``, ``empty_completion`` (errors): no text (an assistant
  message whose text is empty counts as empty); ``bad_prompt``, ``bad_answer``, ``bad_message``, ``bad_roles``,
  ``bad_turn_count``, ``unsupported_role``, ``missing_column``, ``malformed_json``, ``bad_label``,
  ``bad_kto_tag`` (errors);
- ``tie`` (warning): identical chosen and rejected answers — except for an image-side rejection
  (``rejected_images`` other than ``images``), where identical answers are the point; only when the rejected
  images are the images too is it a tie;
- ``unreadable_image`` (error, :func:`unreadable_image`): an image file or bytes that cannot be fully decoded,
  naming the row, the field and the file;
- ``large_image`` (warning, :func:`large_image`): more than ``large_pixels`` pixels (default
  :data:`LARGE_IMAGE_PIXELS`); the processors downscale such images anyway, after paying for decoding them;
- ``duplicate`` (warning): the same prompt, answers AND images as an earlier row (the core doctor's duplicate
  check leaves the images out, which flags every reuse of a question across images; this one replaces it);
- the core's ``non_finite``, ``no_rows`` and ``unreadable`` (errors).

Formats: ``auto`` (a LLaMA-Factory dataset directory, or a data file its ``dataset_info.json`` names, is
``llamafactory``; anything else ``trl``), ``trl``, ``llamafactory``, ``jsonl`` (the normalised form, without
TRL's implicit rules), and ``parquet`` / ``hf`` (TRL's format in that container).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mm_align.vlm.formats import (
    detect_vlm_format,
    iter_llamafactory_rows,
    llamafactory_row,
    load_llamafactory_entry,
    trl_row,
)
from PIL import Image, UnidentifiedImageError

from mm_align.data import DataError, DoctorReport, PreferencePair, RawRow, RecordCheck, UnpairedSample, doctor
from mm_align.data.io import iter_source_rows

__all__ = [
    "LARGE_IMAGE_PIXELS",
    "VLM_CHECKS",
    "VLM_DOCTOR_FORMATS",
    "image_fields",
    "large_image",
    "unreadable_image",
    "vlm_doctor",
]

LARGE_IMAGE_PIXELS = 4096 * 4096
"""Default ``large_image`` threshold (pixels, width × height)."""
VLM_DOCTOR_FORMATS = ("auto", "trl", "llamafactory", "jsonl", "parquet", "hf")

Record = PreferencePair | UnpairedSample


def image_fields(record: Record) -> list[tuple[str, Any]]:
    """The record's images with their fields: ``("images[0]", value)``, ..., ``("rejected_images[0]", value)``."""
    out = [(f"images[{i}]", v) for i, v in enumerate(record.meta.get("images") or [])]
    rejected = record.meta.get("rejected_images")
    return out + [(f"rejected_images[{i}]", v) for i, v in enumerate(rejected or [])]


def _label(value: Any) -> str:
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} image bytes"
    return str(value)


@functools.lru_cache(maxsize=256)
def _probe_bytes(digest: str, data: bytes) -> tuple[tuple[int, int] | None, str | None]:
    del digest  # the cache key's readable part
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.size, None
    except UnidentifiedImageError:  # its message names the in-memory buffer, not the file
        return None, "UnidentifiedImageError: not an image format PIL can read"
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        return None, f"{type(exc).__name__}: {exc}"


@functools.lru_cache(maxsize=4096)
def _probe_file(path: str, mtime_ns: int, size: int) -> tuple[tuple[int, int] | None, str | None]:
    del mtime_ns, size  # part of the cache key only: a rewritten file is decoded again
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return None, f"cannot open: {exc.strerror or exc}"
    if not data:
        return None, "empty file (0 bytes)"
    return _probe_bytes(hashlib.sha256(data).hexdigest(), data)


def _probe(value: Any, base_dir: Path) -> tuple[tuple[int, int] | None, str | None] | None:
    """``(size, error)`` of one image value, fully decoded; None for a value that is not stored (a PIL image)."""
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (bytes, bytearray)):
        data = bytes(value)
        return _probe_bytes(hashlib.sha256(data).hexdigest(), data)
    if isinstance(value, str):
        path = Path(value).expanduser()
        path = path if path.is_absolute() else Path(base_dir) / path
        try:
            stat = path.stat()
        except OSError as exc:
            return None, f"cannot open: {exc.strerror or exc}"
        return _probe_file(str(path), stat.st_mtime_ns, stat.st_size)
    return None


def unreadable_image(record: Record, base_dir: Path) -> list[str]:
    """Images that cannot be fully decoded (every pixel is decoded, so a truncated file is caught here).

    Returns:
        `list[str]`: e.g. ``"images[1]: /data/b.png: OSError: image file is truncated (3 bytes not processed)"``.
    """
    problems = []
    for name, value in image_fields(record):
        probed = _probe(value, base_dir)
        if probed is not None and probed[1] is not None:
            problems.append(f"{name}: {_label(value)}: {probed[1]}")
    return problems


def _size(value: Any, base_dir: Path) -> tuple[int, int] | None:
    """An image's size from its header (nothing decoded); None when it cannot be opened (unreadable_image says why)."""
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") is not None else value.get("path")
    if hasattr(value, "size") and hasattr(value, "convert"):
        return tuple(value.size)
    try:
        if isinstance(value, (bytes, bytearray)):
            with Image.open(io.BytesIO(value)) as im:
                return im.size
        if isinstance(value, str):
            path = Path(value).expanduser()
            with Image.open(path if path.is_absolute() else Path(base_dir) / path) as im:
                return im.size
    except Exception:  # unreadable: reported by unreadable_image
        return None
    return None


def large_image(record: Record, base_dir: Path, max_pixels: int = LARGE_IMAGE_PIXELS) -> list[str]:
    """Images of more than ``max_pixels`` pixels (:func:`vlm_doctor` reports them as WARNINGS); the size is read
    from the file's header.

    Returns:
        `list[str]`: e.g. ``"images[0]: /data/a.png is 8000x6000 px (48000000 pixels > 16777216)"``.
    """
    problems = []
    for name, value in image_fields(record):
        size = _size(value, base_dir)
        if size is not None and size[0] * size[1] > max_pixels:
            w, h = size
            problems.append(f"{name}: {_label(value)} is {w}x{h} px ({w * h} pixels > {max_pixels})")
    return problems


VLM_CHECKS: list[RecordCheck] = [unreadable_image]
"""The error-severity record checks ``mm-align doctor --modality vlm`` adds to the core doctor's."""


def _image_identity(value: Any) -> Any:
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return {"sha256": hashlib.sha256(value).hexdigest()}
    return str(value)


def _record_key(record: Record) -> str:
    images = [_image_identity(v) for _, v in image_fields(record)]
    if isinstance(record, PreferencePair):
        fields = [record.prompt, record.chosen, record.rejected]
    else:
        fields = [record.prompt, record.completion, record.desirable]
    blob = json.dumps([fields, images], sort_keys=True, ensure_ascii=False, default=repr)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _second_pass(report: DoctorReport, rows: Iterable[RawRow], parse: Callable[[dict[str, Any]], Any],
                 base_dir: Path, large_pixels: int | None) -> None:
    """The image-aware duplicate check (replacing the core's) and the ``large_image`` warnings."""
    report.findings = [f for f in report.findings if f.check != "duplicate"]
    seen: dict[str, str] = {}
    for raw in rows:
        if raw.data is None:
            continue
        record = parse(raw.data)
        if isinstance(record, str):
            continue
        where = raw.where(Path(raw.source).name)
        key = _record_key(record)
        if key in seen:
            report.add("duplicate", f"{where}: same as {seen[key]}", "warning")
        else:
            seen[key] = where
        if large_pixels is not None:
            for problem in large_image(record, base_dir, large_pixels):
                report.add("large_image", f"{where}: {problem}", "warning")


def vlm_doctor(path: str | Path, format: str = "auto", kind: str = "paired",
               large_pixels: int | None = LARGE_IMAGE_PIXELS, dataset: str | None = None) -> DoctorReport:
    """``mm-align doctor --modality vlm``: the core doctor with the VLM checks, on TRL, LLaMA-Factory and jsonl data.

    Args:
        path: A TRL dataset (jsonl, parquet, HF dataset dir), a LLaMA-Factory dataset directory (or a data file its
            ``dataset_info.json`` names), or a jsonl of the normalised form.
        format: One of :data:`VLM_DOCTOR_FORMATS` (see the module docstring).
        kind: ``"paired"`` or ``"unpaired"``.
        large_pixels: The ``large_image`` warning's threshold; None turns it off.
        dataset: The LLaMA-Factory entry (when several fit and ``path`` is the directory).

    Returns:
        :class:`~mm_align.data.DoctorReport`: ``report.ok`` is ``False`` when an error-severity check fired.

    Raises:
        ValueError: ``format`` or ``kind`` is not one of the valid values.
    """
    if format not in VLM_DOCTOR_FORMATS:
        raise ValueError(f"unknown VLM data format {format!r}; valid: {', '.join(VLM_DOCTOR_FORMATS)}")
    if kind not in ("paired", "unpaired"):
        raise ValueError(f"kind must be 'paired' or 'unpaired', got {kind!r}")
    p = Path(path)
    fmt = format
    if format == "auto":
        try:
            fmt = detect_vlm_format(p)
        except DataError:
            fmt = "trl"  # let the core doctor report what it cannot read
    base_dir = p.expanduser().resolve()
    base_dir = base_dir if base_dir.is_dir() else base_dir.parent
    if fmt == "llamafactory":
        try:
            entry = load_llamafactory_entry(p, dataset, kind=kind)
        except DataError as exc:
            report = DoctorReport(str(path))
            report.add("unreadable", str(exc), "error")
            return report

        def parse(row: dict[str, Any]) -> Any:
            return llamafactory_row(row, entry, kind)

        def rows(_: Path) -> Iterable[RawRow]:
            return iter_llamafactory_rows(entry)

        container = "auto"
    else:
        trl_rules = fmt != "jsonl"
        container = fmt if fmt in ("jsonl", "parquet", "hf") else "auto"

        def parse(row: dict[str, Any]) -> Any:
            return trl_row(row, kind, base_dir, trl_rules)

        rows = None
    report = doctor(p, container, kind, checks=VLM_CHECKS, rows=rows, parse=parse)  # type: ignore[arg-type]
    if any(f.check == "unreadable" for f in report.findings):
        return report
    try:
        _second_pass(report, rows(p) if rows is not None else iter_source_rows(p, container), parse, base_dir,
                     large_pixels)
    except DataError:  # the first pass already reported it
        pass
    return report
