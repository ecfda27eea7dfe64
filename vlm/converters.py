"""``mm-align convert vlm``: VLM preference data between TRL's vision format, LLaMA-Factory and the normalised jsonl.

``mm-align convert vlm SRC DST [--from trl|llamafactory|jsonl] [--to trl|llamafactory|jsonl] [--kind paired|unpaired]
[--dataset NAME] [--media-dir DIR] [--name NAME] [--strict]``

Sources are read by :mod:`mm_align.vlm.formats` (``auto``: a LLaMA-Factory dataset directory is ``llamafactory``,
anything else ``trl``, which reads the normalised jsonl too); rows they skip are counted by reason in the summary,
or stop the conversion with ``--strict``. Destinations:

``trl``
    ``DST/<name>.jsonl`` (``--name``, default ``train``; a ``DST`` ending in ``.jsonl`` names the file itself) in
    TRL's conversational vision form, images under ``images/`` next to it
    (:func:`~mm_align.vlm.format_writers.write_trl_vision`).
``llamafactory``
    ``DST/<name>.json`` + ``DST/dataset_info.json`` (entry ``<name>``, default ``train``) + ``DST/images/``
    (:func:`~mm_align.vlm.format_writers.write_llamafactory`).
``jsonl``
    The records as they are read (prompt and answers in their source form) through
    :func:`~mm_align.data.write_preferences`, ``DST`` a ``.jsonl`` file, images copied into ``<DST stem>_images/``
    next to it and named relative to it.

``--to`` may be left out when ``DST`` ends in ``.jsonl`` (jsonl) or is a directory holding a LLaMA-Factory
``dataset_info.json`` (llamafactory). Round trips keep every field the formats hold: the prompt's turns and image
places, the answers, the images' bytes, an image-side rejection's images, the id and the other columns (an extra
key in LLaMA-Factory rows, which LLaMA-Factory ignores). What a format cannot hold: sharegpt turns are strings, so
two adjacent text parts of a message come back as one.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mm_align.vlm.format_writers import ImageStore, write_llamafactory, write_trl_vision
from mm_align.vlm.formats import FORMATS, detect_vlm_format, is_llamafactory_dir, read_vlm

from mm_align.data import DataError, PreferencePair, write_preferences
from mm_align.data.conversion import ConversionSummary
from mm_align.data.io import JSONL_SUFFIXES
from mm_align.help_format import HelpFormatter

__all__ = ["FORMATS", "VLMConvertSummary", "convert", "convert_main", "write_vlm_jsonl"]


@dataclass
class VLMConvertSummary(ConversionSummary):
    """What :func:`convert` did: records read (and kept), skipped source rows with file, line or row and reason,
    records written (to the data file)."""


def write_vlm_jsonl(records: Any, path: str | Path) -> Path:
    """Write records as the normalised jsonl, images copied into ``<stem>_images/`` next to ``path``.

    Args:
        records: VLM records (image paths absolute, or bytes / image dicts / PIL images).
        path: A ``.jsonl`` file.

    Returns:
        `Path`: ``path``.

    Raises:
        DataError: ``path`` is not a ``.jsonl`` file name, an image cannot be read, or a record cannot be written.
    """
    p = Path(path)
    if p.suffix.lower() not in JSONL_SUFFIXES:
        raise DataError(f"{p}: the jsonl format is written to a .jsonl file")
    p.parent.mkdir(parents=True, exist_ok=True)
    store = ImageStore(p.parent, folder=f"{p.stem}_images")
    out = []
    for i, record in enumerate(records):
        what = f"record {i}" + (f" (id {record.id!r})" if record.id is not None else "")
        meta = dict(record.meta)
        meta["images"] = store.put_all(list(meta.get("images") or []), f"{what}: images")
        if isinstance(record, PreferencePair) and meta.get("rejected_images") is not None:
            meta["rejected_images"] = store.put_all(list(meta["rejected_images"]), f"{what}: rejected_images")
        out.append(replace(record, meta=meta))
    return write_preferences(out, p, "jsonl")


def _dst_format(dst: Path) -> str:
    if dst.suffix.lower() in JSONL_SUFFIXES:
        return "jsonl"
    if is_llamafactory_dir(dst):
        return "llamafactory"
    raise DataError(f"{dst}: cannot tell the output format; pass --to trl|llamafactory|jsonl (a .jsonl destination "
                    "is jsonl, a LLaMA-Factory dataset directory llamafactory)")


def _check_format(format: str, path: Path) -> str:
    if format not in FORMATS:
        raise DataError(f"{path}: unknown VLM data format {format!r}; valid: auto, {', '.join(FORMATS)}")
    return format


def convert(src: str | Path, dst: str | Path, src_format: str = "auto", dst_format: str = "auto",
            strict: bool = False, kind: str = "paired", dataset: str | None = None,
            media_dir: str | Path | None = None, name: str | None = None) -> VLMConvertSummary:
    """Convert VLM preference data between ``trl``, ``llamafactory`` and ``jsonl`` (see the module docstring).

    Args:
        src: The source dataset.
        dst: The destination (a directory for ``trl`` / ``llamafactory``, a ``.jsonl`` file for ``jsonl``; ``trl``
            also takes a ``.jsonl`` file name).
        src_format: ``"auto"`` (:func:`~mm_align.vlm.formats.detect_vlm_format`), ``"trl"``, ``"llamafactory"`` or
            ``"jsonl"``.
        dst_format: ``"auto"`` (see the module docstring), ``"trl"``, ``"llamafactory"`` or ``"jsonl"``.
        strict: Raise at the first bad source row.
        kind: ``"paired"`` or ``"unpaired"``.
        dataset: The LLaMA-Factory entry to read (when several fit).
        media_dir: Where a LLaMA-Factory source's image paths are looked up first.
        name: The written file's stem and the LLaMA-Factory entry's name (default ``train``).

    Returns:
        :class:`VLMConvertSummary`.

    Raises:
        DataError: The source cannot be read or a format told or is unknown, ``src`` and ``dst`` are the same, a
            record cannot be written, or (``strict``) a bad row.
    """
    src_p, dst_p = Path(src), Path(dst)
    if src_p.expanduser().resolve() == dst_p.expanduser().resolve():
        raise DataError(f"{src}: source and destination are the same")
    fmt = detect_vlm_format(src_p) if src_format == "auto" else _check_format(src_format, src_p)
    to = _dst_format(dst_p) if dst_format == "auto" else _check_format(dst_format, dst_p)
    options: dict[str, Any] = {}
    if fmt == "llamafactory":
        options = {k: v for k, v in (("dataset", dataset), ("media_dir", media_dir)) if v is not None}
    elif dataset is not None or media_dir is not None:
        raise DataError(f"{src}: --dataset and --media-dir are read for a llamafactory source only")
    result = read_vlm(src_p, fmt, strict, kind, **options)
    records = list(result.records)
    if name is not None and dst_p.suffix.lower() in JSONL_SUFFIXES:
        raise DataError(f"{dst}: --name is not read for a .jsonl destination (the file name is DST)")
    if to == "trl":
        if dst_p.suffix.lower() in JSONL_SUFFIXES:
            written = write_trl_vision(records, dst_p.parent, dst_p.stem)
        else:
            written = write_trl_vision(records, dst_p, name or "train")
    elif to == "llamafactory":
        written = write_llamafactory(records, dst_p, name or "train") / f"{name or 'train'}.json"
    else:
        written = write_vlm_jsonl(records, dst_p)
    unit = "pairs" if kind == "paired" else "samples"
    return VLMConvertSummary(str(src), str(written), fmt, to, len(records), len(records), list(result.skipped),
                             unit=unit)


def convert_main(argv: list[str]) -> int:
    """``mm-align convert vlm SRC DST [options]``: print the summary; 2 on a data error."""
    choices = ("auto", *FORMATS)
    parser = argparse.ArgumentParser(
        prog="mm-align convert vlm",
        description="Convert VLM preference data between TRL's vision format, LLaMA-Factory datasets and jsonl.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("src", help="source: a TRL jsonl / parquet / HF dataset dir, a LLaMA-Factory dataset dir "
                                    "(with dataset_info.json), or a jsonl of the normalised form")
    parser.add_argument("dst", help="destination: a directory (trl, llamafactory) or a .jsonl file (jsonl; trl too)")
    parser.add_argument("--from", dest="src_format", choices=choices, default="auto",
                        help="source format (default: auto: a LLaMA-Factory dataset dir is llamafactory, else trl)")
    parser.add_argument("--to", dest="dst_format", choices=choices, default="auto",
                        help="destination format (default: auto: .jsonl is jsonl, a LLaMA-Factory dir llamafactory)")
    parser.add_argument("--kind", choices=("paired", "unpaired"), default="paired",
                        help="paired: prompt, chosen, rejected; unpaired: prompt, completion, label (KTO)")
    parser.add_argument("--dataset", default=None, help="the dataset_info.json entry to read (llamafactory source)")
    parser.add_argument("--media-dir", default=None,
                        help="where a llamafactory source's image paths are looked up first (default: its dir)")
    parser.add_argument("--name", default=None,
                        help="the written file's stem and LLaMA-Factory entry name (default: train)")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad row instead of skipping it")
    args = parser.parse_args(argv)
    try:
        summary = convert(args.src, args.dst, args.src_format, args.dst_format, strict=args.strict, kind=args.kind,
                          dataset=args.dataset, media_dir=args.media_dir, name=args.name)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.text())
    return 0
