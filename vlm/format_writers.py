"""Writers of VLM preference data: TRL's vision format (jsonl + image files) and LLaMA-Factory (json + dataset_info).

Both take records of the shape of :mod:`mm_align.vlm.vlm_records` (from any reader of
:mod:`mm_align.vlm.formats`, or built in memory, e.g. by the MIA-DPO data builder, with PIL images) and write every
image as a file under ``images/`` next to the data, named by the sha256 of its bytes (so an image used by many
rows, like a distractor, is stored once, and writes of train and test into one directory never clash), with
paths relative to the data file. Image bytes are kept as they are (a JPEG stays the same JPEG); a PIL image is
encoded as PNG (lossless).

Writes are atomic (:mod:`mm_align.atomic`): the images first, then the data file, then (LLaMA-Factory)
``dataset_info.json``, each renamed into place complete, so a reader never finds a row whose image is not there.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

from mm_align.vlm.vlm_records import VLMExample, vlm_example

from mm_align.atomic import atomic_write_bytes, atomic_write_text
from mm_align.data import DataError, PreferencePair, UnpairedSample

__all__ = ["IMAGES_DIR", "ImageStore", "write_trl_vision", "write_llamafactory", "sharegpt_content"]

IMAGES_DIR = "images"
"""The folder, next to the data file, that the writers put the images in."""

_PIL_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
_OWN_KEYS = frozenset({"images", "rejected_images"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _describe(index: int, record: Any) -> str:
    rid = getattr(record, "id", None)
    return f"record {index}" + (f" (id {rid!r})" if rid is not None else "") + (
        f" from {record.origin}" if getattr(record, "origin", None) else "")


class ImageStore:
    """Writes images as content-named files under ``root/images/`` and gives their paths relative to ``root``.

    Args:
        root: The directory the data file is in.
        base_dir: Where relative image paths of the records resolve (None = the working directory).
        folder: The image folder's path relative to ``root``.
    """

    def __init__(self, root: Path, base_dir: Path | None = None, folder: str = IMAGES_DIR) -> None:
        self.root, self.base_dir, self.folder = Path(root), base_dir, folder
        self._done: dict[str, str] = {}

    def _data(self, value: Any, what: str) -> tuple[bytes, str | None]:
        """``(bytes, suffix or None)`` of a stored image (the suffix of a path, None to detect it)."""
        if hasattr(value, "convert") and hasattr(value, "save"):  # a PIL image
            buf = io.BytesIO()
            value.save(buf, format="PNG")
            return buf.getvalue(), ".png"
        if isinstance(value, dict):
            value = value["bytes"] if value.get("bytes") is not None else value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value), None
        if isinstance(value, (str, Path)):
            path = Path(value).expanduser()
            if not path.is_absolute() and self.base_dir is not None:
                path = self.base_dir / path
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise DataError(f"{what}: cannot read image {value}: {exc.strerror or exc}") from exc
            suffix = path.suffix.lower()
            return data, suffix if suffix in _PIL_SUFFIX.values() or suffix in (".jpeg", ".tiff") else None
        raise DataError(f"{what}: an image must be a path, bytes, an image dict or a PIL image, got "
                        f"{type(value).__name__}")

    def put(self, value: Any, what: str) -> str:
        """Store one image; its path relative to ``root`` (``images/<sha256>.<ext>``).

        Raises:
            DataError: naming ``what``, when the image cannot be read or its bytes are not an image.
        """
        data, suffix = self._data(value, what)
        digest = hashlib.sha256(data).hexdigest()[:32]
        if digest in self._done:
            return self._done[digest]
        if suffix is None:
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(io.BytesIO(data)) as im:
                    kind = im.format or ""
            except (UnidentifiedImageError, OSError) as exc:
                raise DataError(f"{what}: the image bytes are not an image: {exc}") from exc
            suffix = _PIL_SUFFIX.get(kind, f".{kind.lower() or 'img'}")
        rel = f"{self.folder}/{digest}{suffix}"
        target = self.root / rel
        if not target.is_file() or target.stat().st_size != len(data):
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, data)
        self._done[digest] = rel
        return rel

    def put_all(self, values: list[Any] | None, what: str) -> list[str] | None:
        """:meth:`put` for each image of a list (``None`` stays ``None``)."""
        if values is None:
            return None
        return [self.put(v, f"{what}[{i}]") for i, v in enumerate(values)]


def _example(record: Any, index: int) -> VLMExample:
    if not isinstance(record, (PreferencePair, UnpairedSample)):
        raise DataError(f"{_describe(index, record)} is a {type(record).__name__}; expected PreferencePair or "
                        "UnpairedSample")
    try:
        return vlm_example(record)
    except DataError as exc:
        raise DataError(f"cannot write {_describe(index, record)}: {exc}") from exc


def _extra(record: Any, row: dict[str, Any], index: int) -> dict[str, Any]:
    """The record's other meta keys, which the row carries as its own columns."""
    extra = {k: v for k, v in record.meta.items() if k not in _OWN_KEYS}
    clash = sorted(set(extra) & set(row))
    if clash:
        raise DataError(f"{_describe(index, record)}: meta keys {clash} clash with the row's own columns")
    return extra


def _dumps(row: dict[str, Any], record: Any, index: int, out: Path, **kwargs: Any) -> str:
    try:
        return json.dumps(row, ensure_ascii=False, **kwargs)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{out}: {_describe(index, record)}: not JSON-serialisable (bytes or objects in a meta "
                        f"column?): {exc}") from exc


def _assistant(text: str) -> list[dict[str, Any]]:
    return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]


def _check_kinds(records: list[Any], out: Path) -> None:
    if len({type(r) for r in records}) > 1:
        raise DataError(f"{out}: cannot write a mix of PreferencePair and UnpairedSample records to one dataset")


def write_trl_vision(records: Any, out_dir: str | Path, name: str = "train", base_dir: str | Path | None = None
                     ) -> Path:
    """Write records in TRL's conversational vision preference format: ``out_dir/<name>.jsonl`` + ``out_dir/images/``.

    Each row is ``{"id"?, "images": [relative paths], "prompt": [messages with {"type": "image"} and
    {"type": "text", "text": ...} parts], "chosen": [one assistant message], "rejected": [...]}`` (unpaired:
    ``"completion"`` and ``"label"``), plus ``"rejected_images"`` for an image-side rejection and every other meta
    key as its own column. This is the form TRL recommends for vision data (each model's processor puts its own
    image tokens in through its chat template), what ``DPOTrainer`` reads after
    ``load_dataset("json", ...)`` with the ``images`` column cast to ``Sequence(Image())``, and what
    :func:`~mm_align.vlm.formats.read_trl_vision` reads back.

    Args:
        records: :class:`PreferencePair` or :class:`UnpairedSample` records of the VLM shape (not a mix).
        out_dir: The directory to write into (created).
        name: The jsonl file's stem.
        base_dir: Where the records' relative image paths resolve (None = the working directory).

    Returns:
        `Path`: the jsonl file.

    Raises:
        DataError: A record is not of the VLM shape (placeholder count, answers), an image cannot be read or is not
            an image, or a meta value is not JSON-serialisable; the message names the record.
    """
    out = Path(out_dir)
    if not _NAME.match(name):
        raise DataError(f"{out}: file name stem {name!r} must be letters, digits, '.', '_' or '-'")
    records = list(records)
    target = out / f"{name}.jsonl"
    _check_kinds(records, target)
    out.mkdir(parents=True, exist_ok=True)
    store = ImageStore(out, Path(base_dir) if base_dir is not None else None)
    lines = []
    for i, record in enumerate(records):
        ex = _example(record, i)
        what = _describe(i, record)
        row: dict[str, Any] = {} if record.id is None else {"id": record.id}
        row["images"] = store.put_all(ex.images, f"{what}: images")
        row["prompt"] = ex.messages
        if isinstance(record, PreferencePair):
            row["chosen"], row["rejected"] = _assistant(ex.chosen), _assistant(ex.rejected or "")
            if ex.rejected_images is not None:
                row["rejected_images"] = store.put_all(ex.rejected_images, f"{what}: rejected_images")
        else:
            row["completion"], row["label"] = _assistant(ex.chosen), bool(ex.desirable)
        row.update(_extra(record, row, i))
        lines.append(_dumps(row, record, i, target) + "\n")
    atomic_write_text(target, "".join(lines))
    return target


def sharegpt_content(parts: list[dict[str, Any]]) -> str:
    """Normalised content parts as one sharegpt string: ``<image>`` per image part, the texts as they are.

    Adjacent text parts are joined without a separator (a string cannot keep them apart).
    """
    return "".join("<image>" if p["type"] == "image" else p["text"] for p in parts)


def _sharegpt_turns(ex: VLMExample, what: str) -> tuple[str | None, list[dict[str, str]]]:
    messages = ex.messages
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = sharegpt_content(messages[0]["content"]), messages[1:]
        if "<image>" in system:
            raise DataError(f"{what}: an image in the system message cannot be written in the sharegpt format")
    turns = []
    for k, m in enumerate(messages):
        expected = "user" if k % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise DataError(f"{what}: LLaMA-Factory's sharegpt turns alternate user/assistant from a user turn; "
                            f"turn {k + 1} is {m['role']!r}")
        turns.append({"from": "human" if expected == "user" else "gpt", "value": sharegpt_content(m["content"])})
    if len(turns) % 2 == 0:
        raise DataError(f"{what}: the prompt must end with a user turn to be written in the sharegpt format")
    return system, turns


def write_llamafactory(records: Any, out_dir: str | Path, dataset_name: str, base_dir: str | Path | None = None
                       ) -> Path:
    """Write records as a LLaMA-Factory sharegpt dataset: ``out_dir/<dataset_name>.json``, ``out_dir/images/`` and
    the entry ``dataset_name`` in ``out_dir/dataset_info.json`` (other entries there are kept).

    Pairs are written as ranking rows ``{"conversations": [{"from": "system"?}, {"from": "human", "value": ...},
    ...], "chosen": {"from": "gpt", "value": ...}, "rejected": {...}, "images": [...]}``; unpaired samples as KTO
    rows (the judged answer is the last ``gpt`` turn, ``"kto_tag": true|false``). Each image is an ``<image>`` mark
    in the turns and a path relative to ``out_dir`` (LLaMA-Factory's ``media_dir`` default). ``id``,
    ``rejected_images`` and the other meta keys are extra keys of the rows, which LLaMA-Factory ignores and
    :func:`~mm_align.vlm.formats.read_llamafactory` reads back. Train with ``dataset_dir: OUT_DIR`` and
    ``dataset: DATASET_NAME``.

    Args:
        records: :class:`PreferencePair` or :class:`UnpairedSample` records of the VLM shape (not a mix).
        out_dir: The dataset directory (created).
        dataset_name: The entry's name and the data file's stem (letters, digits, ``._-``).
        base_dir: Where the records' relative image paths resolve (None = the working directory).

    Returns:
        `Path`: ``out_dir`` (what :func:`~mm_align.vlm.formats.read_llamafactory` reads).

    Raises:
        DataError: A bad dataset name, a record whose turns do not alternate user/assistant (ending with a user
            turn), an unreadable image, a non-serialisable meta value, or a ``dataset_info.json`` that is not a
            JSON object.
    """
    out = Path(out_dir)
    if not _NAME.match(dataset_name):
        raise DataError(f"{out}: dataset name {dataset_name!r} must be letters, digits, '.', '_' or '-'")
    records = list(records)
    data_file = out / f"{dataset_name}.json"
    _check_kinds(records, data_file)
    out.mkdir(parents=True, exist_ok=True)
    info_path = out / "dataset_info.json"
    info: dict[str, Any] = {}
    if info_path.exists():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{info_path}: cannot add the entry to it: {exc}") from exc
        if not isinstance(info, dict):
            raise DataError(f"{info_path}: cannot add the entry to it: not a JSON object")
    store = ImageStore(out, Path(base_dir) if base_dir is not None else None)
    paired = not records or isinstance(records[0], PreferencePair)
    rows = []
    for i, record in enumerate(records):
        ex = _example(record, i)
        what = _describe(i, record)
        if paired:
            system, turns = _sharegpt_turns(ex, what)
            row: dict[str, Any] = {"conversations": turns, "chosen": {"from": "gpt", "value": ex.chosen},
                                   "rejected": {"from": "gpt", "value": ex.rejected}}
        else:
            system, turns = _sharegpt_turns(ex, what)
            row = {"conversations": [*turns, {"from": "gpt", "value": ex.chosen}], "kto_tag": bool(ex.desirable)}
        if system is not None:
            row["conversations"].insert(0, {"from": "system", "value": system})
        row["images"] = store.put_all(ex.images, f"{what}: images")
        if record.id is not None:
            row["id"] = record.id
        if ex.rejected_images is not None:
            row["rejected_images"] = store.put_all(ex.rejected_images, f"{what}: rejected_images")
        row.update(_extra(record, row, i))
        rows.append(row)
    text = "[\n" + ",\n".join(_dumps(r, records[i], i, data_file, indent=2) for i, r in enumerate(rows)) + "\n]\n"
    columns = {"messages": "conversations", "images": "images"}
    columns.update({"chosen": "chosen", "rejected": "rejected"} if paired else {"kto_tag": "kto_tag"})
    entry: dict[str, Any] = {"file_name": data_file.name, "formatting": "sharegpt", "columns": columns}
    if paired:
        entry["ranking"] = True
    atomic_write_text(data_file, text)
    atomic_write_text(info_path, json.dumps({**info, dataset_name: entry}, indent=2, ensure_ascii=False) + "\n")
    return out
