"""Image checks for ``mm-align doctor DATA --modality image``: corrupt, tiny and extreme-aspect images.

Each check is a doctor :data:`~mm_align.data.RecordCheck` (``(record, base_dir) -> problems``) and is
reported under its function name:

- ``corrupt_image``: the image cannot be fully decoded (every pixel is decoded with PIL ``.load()``,
  so a truncated JPEG is caught here rather than at training time); empty image bytes are
  ``"empty file (0 bytes)"`` (a 0-byte image FILE is the core's ``unreadable_file: empty file (0 bytes)``);
- ``tiny_image``: the shorter side is below ``min_side`` pixels (default :data:`MIN_SIDE` = 64);
- ``odd_size_image``: the aspect ratio (long side / short side) is above ``max_aspect``
  (default :data:`MAX_ASPECT` = 4).

A 512×40 image is both tiny and of an odd size, and is reported under both names. Sides that are not a
multiple of 8 are NOT a problem (the adapters resize and centre-crop), nor is an unusual mode (palette,
greyscale, CMYK, 16-bit: images are converted to RGB when loaded).

The values checked are ``chosen`` and ``rejected`` of a :class:`~mm_align.data.PreferencePair` (``completion``
of an :class:`~mm_align.data.UnpairedSample`), and the items of a list one level deep, when they are:

- a path ending in an image extension (:data:`IMAGE_EXTENSIONS`), relative to ``base_dir`` or absolute;
  URLs are skipped. A missing or unopenable file is NOT reported here: the doctor's built-in
  ``missing_file`` / ``unreadable_file`` checks already report it;
- raw bytes (e.g. a Pick-a-Pic ``jpg_0`` cell);
- an HF ``datasets`` Image value left undecoded, ``{"bytes": ..., "path": ...}`` (the path is used when
  the bytes are ``None``).

Every other value (text, numbers, chat messages) is ignored. Use :func:`image_checks` for other thresholds.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm_align.image.image_io import IMAGE_EXTENSIONS
from mm_align.image.pair_readers import detect_image_format, iter_pair_folder_rows
from mm_align.image.pickapic import check_image_bytes, pickapic_row
from PIL import Image

from mm_align.data import DataError, PreferencePair, RecordCheck, UnpairedSample, doctor

__all__ = [
    "image_doctor",
    "IMAGE_CHECKS",
    "IMAGE_EXTENSIONS",
    "MAX_ASPECT",
    "MIN_SIDE",
    "corrupt_image",
    "image_checks",
    "image_values",
    "odd_size_image",
    "tiny_image",
]

MIN_SIDE = 64
"""Default ``tiny_image`` threshold: the shorter side must be at least this many pixels."""
MAX_ASPECT = 4.0
"""Default ``odd_size_image`` threshold: long side / short side must be at most this."""

Record = PreferencePair | UnpairedSample


@dataclass(frozen=True)
class _Probe:
    """What decoding one image gave: its size, or why it cannot be decoded."""

    size: tuple[int, int] | None
    error: str | None


def _is_image_path(value: Any) -> bool:
    return (
        isinstance(value, str)
        and value.strip().lower().endswith(IMAGE_EXTENSIONS)
        and "://" not in value
        and "\n" not in value
    )


def _is_image_value(value: Any) -> bool:
    if isinstance(value, (bytes, bytearray)) or _is_image_path(value):
        return True
    if isinstance(value, dict) and "bytes" in value:
        return value["bytes"] is not None or _is_image_path(value.get("path"))
    return False


def image_values(record: Record) -> list[tuple[str, Any]]:
    """The image values of a record, each with the field it is in (``"chosen"``, ``"rejected[1]"``, ...).

    Args:
        record: A paired or unpaired record.

    Returns:
        `list[tuple[str, Any]]`: paths, bytes and HF image dicts found in ``chosen``/``rejected`` (or
        ``completion``) and one level deep in lists; text and other values are left out.
    """
    if isinstance(record, PreferencePair):
        fields = (("chosen", record.chosen), ("rejected", record.rejected))
    else:
        fields = (("completion", record.completion),)
    found: list[tuple[str, Any]] = []
    for name, value in fields:
        if isinstance(value, (list, tuple)):
            found += [(f"{name}[{i}]", v) for i, v in enumerate(value) if _is_image_value(v)]
        elif _is_image_value(value):
            found.append((name, value))
    return found


@functools.lru_cache(maxsize=8)
def _probe_bytes(data: bytes) -> _Probe:
    """Decode once; the three checks ask about the same image one after the other."""
    if not data:
        return _Probe(None, "empty file (0 bytes)")
    problem = check_image_bytes(data)
    if problem is not None:
        return _Probe(None, problem)
    with Image.open(io.BytesIO(data)) as im:
        return _Probe(im.size, None)


@functools.lru_cache(maxsize=64)
def _probe_file(path: str, mtime_ns: int, size: int) -> _Probe | None:
    del mtime_ns, size  # part of the cache key only: a rewritten file is decoded again
    try:
        data = Path(path).read_bytes()
    except OSError:  # the doctor's unreadable_file check reports it
        return None
    return _probe_bytes(data)


def _probe(value: Any, base_dir: Path) -> tuple[str, _Probe] | None:
    """``(label, probe)`` for an image value, or ``None`` when there is nothing to check here."""
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} image bytes", _probe_bytes(bytes(value))
    if not isinstance(value, str):
        return None
    path = Path(value.strip()).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    try:
        stat = path.stat()
    except OSError:  # missing: reported by the doctor's missing_file check
        return None
    if not path.is_file() or stat.st_size == 0:
        return None  # a directory with an image name, or a 0-byte file: the core's unreadable_file reports it
    probe = _probe_file(str(path), stat.st_mtime_ns, stat.st_size)
    return (value.strip(), probe) if probe is not None else None


def _probes(record: Record, base_dir: Path) -> list[tuple[str, str, _Probe]]:
    out = []
    for field, value in image_values(record):
        probed = _probe(value, Path(base_dir))
        if probed is not None:
            out.append((field, *probed))
    return out


def corrupt_image(record: Record, base_dir: Path) -> list[str]:
    """Images that cannot be fully decoded (truncated, not an image at all, corrupt data).

    Returns:
        `list[str]`: e.g. ``"chosen: a.jpg: OSError: image file is truncated (3 bytes not processed)"``.
    """
    return [f"{field}: {label}: {p.error}" for field, label, p in _probes(record, base_dir) if p.error is not None]


def tiny_image(record: Record, base_dir: Path, min_side: int = MIN_SIDE) -> list[str]:
    """Images whose shorter side is below ``min_side`` pixels.

    Returns:
        `list[str]`: e.g. ``"rejected: b.png is 16x16 px (shorter side 16 < 64)"``.
    """
    problems = []
    for field, label, p in _probes(record, base_dir):
        if p.size is not None and min(p.size) < min_side:
            w, h = p.size
            problems.append(f"{field}: {label} is {w}x{h} px (shorter side {min(w, h)} < {min_side})")
    return problems


def odd_size_image(record: Record, base_dir: Path, max_aspect: float = MAX_ASPECT) -> list[str]:
    """Images with an extreme aspect ratio: long side / short side above ``max_aspect``.

    Sides that are not a multiple of 8 are not flagged: the adapters resize and centre-crop.

    Returns:
        `list[str]`: e.g. ``"chosen: c.png is 512x40 px (aspect 12.8 > 4)"``.
    """
    problems = []
    for field, label, p in _probes(record, base_dir):
        if p.size is None:
            continue
        w, h = p.size
        aspect = max(w, h) / max(1, min(w, h))
        if aspect > max_aspect:
            problems.append(f"{field}: {label} is {w}x{h} px (aspect {aspect:.3g} > {max_aspect:g})")
    return problems


def image_checks(min_side: int = MIN_SIDE, max_aspect: float = MAX_ASPECT) -> list[RecordCheck]:
    """The image checks with other thresholds, for ``doctor(path, checks=image_checks(...))``.

    Args:
        min_side: ``tiny_image`` flags a shorter side below this many pixels.
        max_aspect: ``odd_size_image`` flags long side / short side above this.

    Returns:
        `list[RecordCheck]`: ``[corrupt_image, tiny_image, odd_size_image]``; the doctor reports each
        under its function name (partials keep the name).

    Raises:
        ValueError: ``min_side`` < 1 or ``max_aspect`` < 1.
    """
    if min_side < 1:
        raise ValueError(f"min_side must be at least 1, got {min_side}")
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be at least 1, got {max_aspect}")
    return [
        corrupt_image,
        functools.partial(tiny_image, min_side=min_side),
        functools.partial(odd_size_image, max_aspect=max_aspect),
    ]


IMAGE_CHECKS: list[RecordCheck] = image_checks()
"""The default image checks (min side 64 px, aspect at most 4), loaded by ``mm-align doctor --modality image``."""


def image_doctor(path: str | Path, format: str = "auto", kind: str = "paired") -> Any:
    """``mm-align doctor --modality image``: the core doctor with the image checks, on any image source.

    Pick-a-Pic data (a ``jpg_0`` column) is parsed by the Pick-a-Pic row parser, pair folders by the
    pair-folder walker; other data goes through the core formats. ``format`` may also name
    ``pickapic`` or ``pair_folders`` directly.
    """
    fmt = format
    if format == "auto":
        try:
            fmt = detect_image_format(path)
        except DataError:
            fmt = "auto"  # let the core doctor report what it cannot read
    if fmt == "pickapic":
        return doctor(path, "auto", kind, checks=IMAGE_CHECKS, parse=pickapic_row)
    if fmt == "pair_folders":
        return doctor(path, "auto", kind, checks=IMAGE_CHECKS, rows=iter_pair_folder_rows)
    return doctor(path, "auto" if fmt == "jsonl" else fmt, kind, checks=IMAGE_CHECKS)
