"""``mm-align convert image``: image preference pairs between Pick-a-Pic parquet ⇄ pair folders ⇄ jsonl.

The readers are in :mod:`mm_align.image.pair_readers`, the writers in :mod:`mm_align.image.pair_writers`
(both importable from here too); this module is :func:`convert` and its command line.

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
import sys
from dataclasses import dataclass
from pathlib import Path

from mm_align.image.pair_readers import (
    FORMATS,
    check_format,
    detect_image_format,
    iter_pair_folder_rows,
    read_image_pairs,
    read_pair_folders,
)
from mm_align.image.pair_writers import WRITERS, write_image_jsonl, write_pair_folders, write_pickapic

from mm_align.data import DataError
from mm_align.data.conversion import ConversionSummary
from mm_align.data.io import JSONL_SUFFIXES
from mm_align.help_format import HelpFormatter

__all__ = [
    "FORMATS",
    "ConvertSummary",
    "convert",
    "convert_main",
    # the readers and writers, importable from here as before the split:
    "detect_image_format",
    "iter_pair_folder_rows",
    "read_image_pairs",
    "read_pair_folders",
    "write_image_jsonl",
    "write_pair_folders",
    "write_pickapic",
]



# ---- convert -------------------------------------------------------------------------------------


@dataclass
class ConvertSummary(ConversionSummary):
    """What :func:`convert` did (pairs read, skipped source rows with file, row and reason, pairs written)."""


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
    fmt = detect_image_format(src_p) if src_format == "auto" else check_format(src_format, src_p)
    to = _dst_format(dst_p) if dst_format == "auto" else check_format(dst_format, dst_p)
    result = read_image_pairs(src_p, fmt, strict)
    WRITERS[to](result.records, dst_p)
    return ConvertSummary(str(src), str(dst), fmt, to, len(result.records), len(result.records), list(result.skipped))


def convert_main(argv: list[str]) -> int:
    """``mm-align convert image SRC DST [--from F] [--to F] [--strict]``: print the summary; 2 on a data error."""
    choices = ("auto", *FORMATS)
    parser = argparse.ArgumentParser(
        prog="mm-align convert image",
        description="Convert image preference pairs between Pick-a-Pic parquet, pair folders and jsonl.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("src", help="source: parquet / shard dir / HF dir (pickapic), a directory (pair_folders), "
                                    "or .jsonl")
    parser.add_argument("dst", help="destination: .parquet (pickapic), .jsonl (jsonl) or a directory (pair_folders)")
    parser.add_argument("--from", dest="src_format", choices=choices, default="auto",
                        help="source format (default: auto, from the path and its columns)")
    parser.add_argument("--to", dest="dst_format", choices=choices, default="auto",
                        help="destination format (default: auto, from the destination's suffix)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
    args = parser.parse_args(argv)
    try:
        summary = convert(args.src, args.dst, args.src_format, args.dst_format, strict=args.strict)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.text())
    return 0
