"""Text-preference data (TPO, ALGORITHMS.md §3): captioned images become TDPO pairs or TKTO samples.

No image pairs are needed. Each (image x, caption c) row gives a mismatched caption c_l, a
perturbation of c along one of four axes (objects, attributes, spatial, context) by the offline
rule-based perturber or any local causal LM (:mod:`mm_align.image.caption_perturb`). Then:

- TDPO (paired losses, e.g. ``diffusion_dpo``): ``PreferencePair(prompt=c, chosen=x, rejected=x,
  meta={"rejected_prompt": c_l})``. The diffusion adapter runs the same image, latent sample, noise
  and timestep under both captions, so ``err(x, c) − err(x, c_l)`` is the Diffusion-DPO margin.
- TKTO (unpaired losses, e.g. ``diffusion_kto``): ``UnpairedSample(c, x, desirable=True)`` and
  ``UnpairedSample(c_l, x, desirable=False)``.

Perturbation is seeded per row (``seed``, row index), so the same data and seed give the same
captions on every process and every run. Captions no axis applies to are skipped and counted
(``unperturbable caption``). This module is the ``captions`` data format of the image adapter:
``data.format: captions`` with ``data.options: {perturber: rule, axes: [...], seed: 0}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mm_align.data import DataError, PreferencePair, ReadResult, SkippedRow, UnpairedSample
from mm_align.data.io import is_empty, iter_source_rows

__all__ = ["read_captions", "caption_row"]

CAPTION_COLUMNS = ("caption", "prompt", "text")
IMAGE_COLUMNS = ("image", "jpg", "png", "file_name", "path")


def _first(row: dict[str, Any], names: tuple[str, ...], wanted: str | None) -> tuple[str | None, Any]:
    for name in (wanted,) if wanted else names:
        if name in row and not is_empty(row[name]):
            return name, row[name]
    return None, None


def caption_row(row: dict[str, Any], caption_column: str | None = None,
                image_column: str | None = None) -> tuple[str, Any, str | None] | str:
    """``(caption, image, id)`` of one captioned-image row, or the reason it is skipped."""
    name, caption = _first(row, CAPTION_COLUMNS, caption_column)
    if name is None:
        return f"empty caption: none of {caption_column or '/'.join(CAPTION_COLUMNS)} holds text"
    if not isinstance(caption, str):
        return f"bad caption: {name} is a {type(caption).__name__}, not text"
    image_name, image = _first(row, IMAGE_COLUMNS, image_column)
    if image_name is None:
        return f"missing column: {image_column or '/'.join(IMAGE_COLUMNS)} (the image)"
    rid = row.get("id")
    return caption.strip(), image, None if rid is None else str(rid)


def read_captions(
    path: str | Path,
    strict: bool = False,
    kind: str = "paired",
    perturber: str | dict[str, Any] = "rule",
    axes: list[str] | None = None,
    seed: int = 0,
    caption_column: str | None = None,
    image_column: str | None = None,
    format: str = "auto",
) -> ReadResult:
    """Read captioned images (jsonl / parquet / HF on disk) and make TDPO pairs or TKTO samples.

    Args:
        path: The dataset; each row has a caption (``caption``/``prompt``/``text``) and an image
            (``image``/``jpg``/``png``/``file_name``/``path``: a path relative to the file, bytes, or
            an HF image cell).
        strict: Raise at the first bad or unperturbable row instead of skipping and counting it.
        kind: ``"paired"`` → TDPO pairs; ``"unpaired"`` → TKTO samples (two per row).
        perturber: ``"rule"``, a local causal-LM directory, or a spec dict (see ``make_perturber``);
            ``"none"``: no perturbation, every row is one desirable ``UnpairedSample`` (Self-NPO's data).
        axes: Perturbation axes to draw from (default: all four).
        seed: Seeds each row's perturbation together with the row index.

    Returns:
        :class:`ReadResult` with the records and every skipped row (reason and row number).
    """
    if kind not in ("paired", "unpaired"):
        raise DataError(f"{path}: kind must be paired or unpaired, got {kind!r}")
    rows: list[tuple[str, Any, str | None]] = []
    where: list[tuple[str, int]] = []
    skipped: list[SkippedRow] = []
    for raw in iter_source_rows(path, format):  # the core's raw rows: file, row number, parse error
        result = caption_row(raw.data, caption_column, image_column) if raw.data is not None else raw.error
        if isinstance(result, str):
            if strict:
                raise DataError(f"{raw.where()}: {result}")
            skipped.append(SkippedRow(raw.source, raw.row, result))
            continue
        rows.append(result)
        where.append((raw.source, raw.row))
    if perturber in ("none", None):  # plain captioned images (Self-NPO, supervised fine-tuning)
        plain = [UnpairedSample(c, x, True, rid if rid is not None else str(i), {}) for (c, x, rid), (_, i) in
                 zip(rows, where)]
        return ReadResult(plain, skipped, str(path))
    from mm_align.image.caption_perturb import make_perturber, perturb_dataset

    results, _ = perturb_dataset([c for c, _, _ in rows], make_perturber(perturber), seed=seed, axes=axes)
    records: list[Any] = []
    for (caption, image, rid), (src, row_index), result in zip(rows, where, results):
        if result is None:
            reason = f"unperturbable caption: no {'/'.join(axes) if axes else 'axis'} applies to {caption[:60]!r}"
            if strict:
                raise DataError(f"{src}:{row_index}: {reason}")
            skipped.append(SkippedRow(src, row_index, reason))
            continue
        rid = rid if rid is not None else str(row_index)
        meta = {"perturbation_axis": result.axis, "perturbation": result.operation}
        if kind == "paired":
            records.append(PreferencePair(caption, image, image, rid, {**meta, "rejected_prompt": result.perturbed}))
        else:
            records.append(UnpairedSample(caption, image, True, f"{rid}+", dict(meta)))
            records.append(UnpairedSample(result.perturbed, image, False, f"{rid}-", dict(meta)))
    skipped.sort(key=lambda s: s.row)
    return ReadResult(records, skipped, str(path))
