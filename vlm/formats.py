"""Readers of VLM preference data in the layouts users bring: TRL's vision datasets, LLaMA-Factory, and jsonl.

Every reader has the signature ``reader(path, strict=False, kind="paired", **options) -> ReadResult`` (the VLM
adapter's ``dataset_formats`` points at them) and gives records of the shared shape of
:mod:`mm_align.vlm.vlm_records`: ``prompt`` (chat messages or a string with ``<image>`` marks), ``chosen`` /
``rejected`` (or ``completion`` + ``desirable`` for ``kind="unpaired"``), ``meta["images"]`` in placeholder order
and, for an image-side rejection, ``meta["rejected_images"]``. Image paths come out absolute (resolved as each
format resolves them, below); image bytes and ``{"bytes": ..., "path": ...}`` cells stay as they are.

``trl`` — :func:`read_trl_vision`, TRL's vision preference format (checked against TRL 1.16: its
``docs/source/dataset_formats.md`` "Vision datasets", ``trl.data_utils.prepare_multimodal_messages`` and
``DataCollatorForVisionPreference``, and the layout of ``HuggingFaceH4/rlaif-v_formatted`` /
``trl-lib/rlaif-v``, i.e. ``openbmb/RLAIF-V-Dataset`` reformatted):

- columns ``images`` (a list of images; TRL also takes one image in a column ``image``), ``prompt``, ``chosen``,
  ``rejected`` (unpaired: ``prompt``, ``completion``, ``label``), from a jsonl file, a parquet file or shard
  directory, or an HF dataset saved with ``save_to_disk``; images as paths, bytes or datasets ``Image`` cells;
- the *conversational* form: ``prompt`` is a list of ``{"role", "content"}`` messages whose content is a list of
  ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts (``text: null`` on image parts, as datasets
  stores them, is fine), ``chosen`` / ``rejected`` one assistant message each. As TRL does, when a user message's
  content is a plain string, the FIRST such message gets one ``{"type": "image"}`` part per image put before its
  text — unless the string itself marks its images with ``<image>`` (the record contract reads those marks as
  the placeholders; TRL would keep them as text and still prepend the images);
- the *implicit prompt* form (no ``prompt`` column; ``chosen`` and ``rejected`` whole conversations): the prompt
  is their longest common run of leading messages (``trl.extract_prompt``), and what follows must be one
  assistant message on each side;
- the *standard* form: ``prompt`` a string in which each ``<image>`` marks one image (what LLaVA's processor
  expects), ``chosen`` / ``rejected`` strings;
- relative image paths are relative to the data file's directory (the directory itself for a shard directory
  or a saved HF dataset), which is where the adapter's ``base_dir`` resolves them too.

``llamafactory`` — :func:`read_llamafactory`, LLaMA-Factory's datasets (checked against its ``data/README.md``,
``data/dataset_info.json`` and ``src/llamafactory/data/{parser,converter,loader}.py``): a dataset directory with
``dataset_info.json``, whose entry (``dataset=NAME`` picks one) names a local ``file_name`` (a ``.json`` array or
JSON-lines file, ``.jsonl``, ``.parquet``, or a folder of such files), ``"formatting"`` and ``"ranking": true``
(pairs) or a ``kto_tag`` column (unpaired):

- ``sharegpt`` (and ``openai``, the same with ``role``/``content`` tags): ``columns.messages`` (default
  ``conversations``) holds ``{role_tag: ..., content_tag: ...}`` turns (``tags`` default to LLaMA-Factory's
  ``from``/``value``/``human``/``gpt``/``system``); a first turn from ``system_tag`` (or ``columns.system``) is
  the system prompt; turns alternate human/gpt and a ranking conversation ends with a human turn; EVERY turn
  before the answer is the prompt (multi-turn prompts keep their earlier gpt turns); ``chosen`` / ``rejected``
  are single messages ``{"from": "gpt", "value": ...}``. Tool turns (observation / function_call) are not read;
- ``alpaca``: ``instruction`` + ``"\\n"`` + ``input`` is the user turn (after ``history`` pairs), ``chosen`` /
  ``rejected`` strings;
- ``columns.images``: each ``<image>`` in the turns marks one image; a path is looked up under ``media_dir``
  (default: the dataset directory, LLaMA-Factory's ``media_dir`` default ``dataset_dir``) and, when not there,
  taken as given (absolute, or relative to the working directory), as LLaMA-Factory's ``_find_medias`` does.
  A row key ``rejected_images`` (same rules) is an image-side rejection: an mm-align extension LLaMA-Factory
  ignores.

``jsonl`` — :func:`read_vlm_jsonl`, the normalised form as stored by :func:`~mm_align.data.write_preferences`:
``{prompt, chosen, rejected, id, images, rejected_images?, ...}`` rows (jsonl, or parquet / HF with the same
columns), images relative to the file's directory, with none of TRL's implicit rules. The core reader
:func:`~mm_align.data.read_preferences` reads these rows too (an image-side rejection included); this reader adds
the VLM checks: placeholder counts, every image looked up, and an image-side rejection whose rejected images are
the images themselves is a tie.

Bad rows are SKIPPED AND COUNTED (or raise :class:`~mm_align.data.DataError` naming the file and line or row with
``strict=True``), exactly like the core readers. Reasons (``"<category>: <detail>"``): ``missing column``, ``empty
prompt``, ``empty chosen`` / ``empty rejected`` / ``empty completion``, ``tie``, ``bad label``, ``bad prompt``,
``bad answer``, ``bad image``, ``missing image``, ``image count mismatch`` (the prompt's placeholders against the
row's images), ``bad message``, ``bad roles``, ``bad turn count``, ``unsupported role``, ``bad kto_tag``,
``malformed json``. Image files are looked up, not decoded (``mm-align doctor --modality vlm`` decodes them).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm_align.vlm.format_writers import write_llamafactory, write_trl_vision
from mm_align.vlm.vlm_records import (
    IMAGE_TOKEN,
    answer_text,
    count_image_placeholders,
    prompt_messages,
    vlm_example,
)

from mm_align.data import ColumnMap, DataError, PreferencePair, RawRow, ReadResult, UnpairedSample, is_empty
from mm_align.data import row_to_record as core_row_to_record
from mm_align.data.io import iter_source_rows, read_rows

__all__ = [
    "FORMATS",
    "DATASET_INFO",
    "LlamaFactoryEntry",
    "detect_vlm_format",
    "is_llamafactory_dir",
    "iter_llamafactory_rows",
    "llamafactory_row",
    "load_llamafactory_entry",
    "read_llamafactory",
    "read_trl_vision",
    "read_vlm",
    "read_vlm_jsonl",
    "trl_row",
    "write_llamafactory",
    "write_trl_vision",
]

FORMATS: tuple[str, ...] = ("trl", "llamafactory", "jsonl")
"""The VLM data formats :func:`read_vlm` reads (plus ``"auto"``) and ``mm-align convert vlm`` writes."""
DATASET_INFO = "dataset_info.json"
"""The file that makes a directory a LLaMA-Factory dataset directory."""

_CONTAINERS = ("auto", "jsonl", "parquet", "hf")
_LOCAL_KEYS = ("file_name",)
_HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
_LF_FORMATTINGS = ("alpaca", "sharegpt", "openai")
_LF_SUFFIXES = (".json", ".jsonl", ".parquet")
# LLaMA-Factory's DatasetAttr defaults (src/llamafactory/data/parser.py)
_LF_COLUMNS: dict[str, str | None] = {
    "prompt": "instruction", "query": "input", "response": "output", "history": None, "messages": "conversations",
    "system": None, "tools": None, "images": None, "videos": None, "audios": None, "chosen": None, "rejected": None,
    "kto_tag": None,
}
_LF_TAGS: dict[str, str] = {
    "role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
    "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system",
}
_REJECTED_IMAGES = "rejected_images"


# ---- images --------------------------------------------------------------------------------------------------------


def _resolve_path(value: str, where: str, roots: Sequence[Path]) -> tuple[str | None, str | None]:
    if not value.strip():
        return None, f"bad image: {where} is an empty path"
    if "://" in value:
        return None, f"bad image: {where} is a URL ({value[:80]}); images are read from local files only"
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [root / path for root in roots]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate.resolve()), None
    return None, f"missing image: {where}: {value}"


def _resolve_image(value: Any, where: str, roots: Sequence[Path]) -> tuple[Any, str | None]:
    """``(the image as the record keeps it, None)`` or ``(None, skip reason)``; paths come back absolute."""
    if value is None:
        return None, f"bad image: {where} is null"
    if isinstance(value, (bytes, bytearray)):
        return (bytes(value), None) if value else (None, f"bad image: {where} is 0 bytes")
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return (value, None) if value["bytes"] else (None, f"bad image: {where} is 0 bytes")
        if isinstance(value.get("path"), str):
            return _resolve_path(value["path"], where, roots)
        return None, f"bad image: {where} is a dict without 'bytes' or 'path' (keys {sorted(value)})"
    if isinstance(value, (str, Path)):
        return _resolve_path(str(value), where, roots)
    if hasattr(value, "convert"):  # a PIL image, from an in-memory source
        return value, None
    return None, f"bad image: {where} is a {type(value).__name__}, not a path, bytes or an image dict"


def _resolve_images(value: Any, column: str, roots: Sequence[Path]) -> tuple[list[Any] | None, str | None]:
    if value is None:
        return [], None
    if isinstance(value, (str, bytes, bytearray, dict)):  # one image given bare
        value = [value]
    if not isinstance(value, (list, tuple)):
        return None, f"bad image: '{column}' must be a list of images, got {type(value).__name__}"
    out = []
    for i, item in enumerate(value):
        resolved, reason = _resolve_image(item, f"{column}[{i}]", roots)
        if reason is not None:
            return None, reason
        out.append(resolved)
    return out, None


def _image_key(value: Any) -> Any:
    if isinstance(value, dict):
        return value.get("bytes") if value.get("bytes") is not None else value.get("path")
    return value if isinstance(value, (str, bytes)) else id(value)


# ---- the checks every format shares --------------------------------------------------------------------------------


def _prompt_problem(prompt: Any, images: list[Any], rejected_images: list[Any] | None) -> str | None:
    if is_empty(prompt):
        return "empty prompt"
    try:
        messages = prompt_messages(prompt)
    except DataError as exc:
        return f"bad prompt: {exc}"
    if not any(m["content"] for m in messages):
        return "empty prompt"
    n = count_image_placeholders(messages)
    if n != len(images):
        return (f"image count mismatch: the prompt has {n} image placeholder(s) but 'images' holds "
                f"{len(images)} image(s)")
    if rejected_images is not None and len(rejected_images) != n:
        return (f"image count mismatch: the prompt has {n} image placeholder(s) but 'rejected_images' holds "
                f"{len(rejected_images)} image(s)")
    return None


def _answer_problem(value: Any, side: str) -> tuple[str | None, str | None]:
    """``(text, None)`` or ``(None, reason)`` for one answer."""
    if is_empty(value):
        return None, f"empty {side}"
    try:
        text = answer_text(value, side)
    except DataError as exc:
        return None, f"bad answer: {exc}"
    if not text.strip():
        return None, f"empty {side}"
    return text, None


def _pair(prompt: Any, chosen: Any, rejected: Any, images: list[Any], rejected_images: list[Any] | None,
          rid: Any, meta: dict[str, Any]) -> PreferencePair | str:
    problem = _prompt_problem(prompt, images, rejected_images)
    if problem is not None:
        return problem
    texts = []
    for side, value in (("chosen", chosen), ("rejected", rejected)):
        text, reason = _answer_problem(value, side)
        if reason is not None:
            return reason
        texts.append(text)
    if texts[0] == texts[1]:
        if rejected_images is None:
            return "tie: chosen and rejected are identical"
        if [_image_key(v) for v in images] == [_image_key(v) for v in rejected_images]:
            return "tie: chosen and rejected are identical, and so are images and rejected_images"
    meta = {**meta, "images": images}
    if rejected_images is not None:
        meta[_REJECTED_IMAGES] = rejected_images
    record = PreferencePair(prompt, chosen, rejected, None if rid is None else str(rid), meta)
    try:
        vlm_example(record)
    except DataError as exc:  # a shape the checks above let through
        return f"bad prompt: {exc}"
    return record


def _unpaired(prompt: Any, completion: Any, desirable: bool, images: list[Any], rid: Any,
              meta: dict[str, Any]) -> UnpairedSample | str:
    problem = _prompt_problem(prompt, images, None)
    if problem is not None:
        return problem
    _, reason = _answer_problem(completion, "completion")
    if reason is not None:
        return reason
    rid = None if rid is None else str(rid)
    record = UnpairedSample(prompt, completion, desirable, rid, {**meta, "images": images})
    try:
        vlm_example(record)
    except DataError as exc:
        return f"bad prompt: {exc}"
    return record


def _check_kind(kind: str, path: str | Path) -> None:
    if kind not in ("paired", "unpaired"):
        raise DataError(f"{path}: kind must be 'paired' or 'unpaired', got {kind!r}")


def _check_options(options: dict[str, Any], valid: tuple[str, ...], format: str, path: str | Path) -> None:
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise DataError(f"{path}: unknown {format} option(s) {', '.join(unknown)}; valid: "
                        f"{', '.join(valid) or 'none'}")


def _base_dir(path: Path) -> Path:
    path = path.expanduser().resolve()
    return path if path.is_dir() else path.parent


# ---- TRL and the normalised jsonl ----------------------------------------------------------------------------------


def _insert_trl_placeholders(prompt: list[Any], n_images: int) -> list[Any]:
    """TRL's rule (``prepare_multimodal_messages``): the first user message with string content gets one image part
    per image before its text. Left alone when that string marks its images with ``<image>``."""
    out = []
    done = False
    for message in prompt:
        if (not done and isinstance(message, dict) and message.get("role") == "user"
                and isinstance(message.get("content"), str)):
            done = True
            if n_images and IMAGE_TOKEN not in message["content"]:
                parts = [{"type": "image"} for _ in range(n_images)]
                message = {**message, "content": [*parts, {"type": "text", "text": message["content"]}]}
        out.append(message)
    return out


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def _extract_prompt(chosen: list[Any], rejected: list[Any]) -> tuple[list[Any], list[Any], list[Any]]:
    """``trl.extract_prompt`` for conversations: the longest common run of leading messages is the prompt."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    return chosen[:k], chosen[k:], rejected[k:]


def trl_row(row: dict[str, Any], kind: str = "paired", base_dir: Path | None = None,
            trl_rules: bool = True) -> PreferencePair | UnpairedSample | str:
    """One TRL (``trl_rules=True``) or normalised-jsonl row as a record, or the reason it is skipped.

    Args:
        row: A raw row (column -> value).
        kind: ``"paired"`` or ``"unpaired"``.
        base_dir: Where relative image paths resolve (the data file's directory); None = the working directory.
        trl_rules: Apply TRL's own rules: the ``image`` column, implicit prompts, and image parts put before the
            first string user message.

    Returns:
        A :class:`PreferencePair` / :class:`UnpairedSample` of the shape of :mod:`mm_align.vlm.vlm_records`, or
        the skip reason (see the module docstring).
    """
    roots = [base_dir if base_dir is not None else Path.cwd()]
    row = dict(row)
    images_value = row.pop("images", None)
    if trl_rules and "image" in row:
        if images_value is not None:
            return "bad image: the row has both an 'image' and an 'images' column"
        images_value = row.pop("image")
        if images_value is not None:
            images_value = [images_value]
    images, reason = _resolve_images(images_value, "images", roots)
    if reason is not None:
        return reason
    rejected_value = row.pop(_REJECTED_IMAGES, None)
    rejected_images = None
    if rejected_value is not None:
        rejected_images, reason = _resolve_images(rejected_value, _REJECTED_IMAGES, roots)
        if reason is not None:
            return reason
    if kind == "unpaired":
        record = core_row_to_record(row, "unpaired", ColumnMap())
        if isinstance(record, str):
            return record
        if rejected_images is not None:
            return "bad image: 'rejected_images' is for pairs (an image-side rejection), not unpaired samples"
        prompt = record.prompt
        if trl_rules and isinstance(prompt, list):
            prompt = _insert_trl_placeholders(prompt, len(images))
        return _unpaired(prompt, record.completion, record.desirable, images, record.id, record.meta)
    if trl_rules and "prompt" not in row and _is_messages(row.get("chosen")) and _is_messages(row.get("rejected")):
        row["prompt"], row["chosen"], row["rejected"] = _extract_prompt(row["chosen"], row["rejected"])
        if not row["prompt"]:
            return "missing column: prompt (chosen and rejected share no leading messages to take it from)"
    for name in ("prompt", "chosen", "rejected"):
        if name not in row:
            return f"missing column: {name}"
    prompt, chosen, rejected = row.pop("prompt"), row.pop("chosen"), row.pop("rejected")
    rid = row.pop("id", None)
    if trl_rules and isinstance(prompt, list):
        prompt = _insert_trl_placeholders(prompt, len(images))
    return _pair(prompt, chosen, rejected, images, rejected_images, rid, row)


def _read_table(path: str | Path, strict: bool, kind: str, options: dict[str, Any], trl_rules: bool,
                format: str) -> ReadResult:
    _check_kind(kind, path)
    _check_options(options, ("container",), format, path)
    container = options.get("container", "auto")
    if container not in _CONTAINERS:
        raise DataError(f"{path}: unknown container {container!r}; valid: {', '.join(_CONTAINERS)}")
    base_dir = _base_dir(Path(path))
    return read_rows(path, lambda row: trl_row(row, kind, base_dir, trl_rules), container, strict)


def read_trl_vision(path: str | Path, strict: bool = False, kind: str = "paired", **options: Any) -> ReadResult:
    """Read TRL's vision preference format (the adapter data format ``trl_vision``; see the module docstring).

    Args:
        path: A jsonl file, a parquet file or shard directory, or an HF dataset saved with ``save_to_disk``.
        strict: Raise :class:`DataError` at the first bad row (naming the file and line / row) instead of skipping
            and counting it.
        kind: ``"paired"`` (prompt, chosen, rejected) or ``"unpaired"`` (prompt, completion, label).
        **options: ``container``: ``"auto"`` (from the path), ``"jsonl"``, ``"parquet"`` or ``"hf"``.

    Returns:
        :class:`ReadResult`: the records (image paths absolute), the skipped rows with their reasons, the source.

    Raises:
        DataError: The dataset cannot be opened, an unknown option or kind, or (``strict``) a bad row.
    """
    return _read_table(path, strict, kind, options, True, "trl")


def read_vlm_jsonl(path: str | Path, strict: bool = False, kind: str = "paired", **options: Any) -> ReadResult:
    """Read the normalised VLM form (``{prompt, chosen, rejected, images, rejected_images?}`` rows; see the module
    docstring): the rows the core reader reads, with image-side rejections kept and every image looked up.

    Args:
        path: A jsonl file (or parquet / an HF dataset with the same columns).
        strict: Raise at the first bad row instead of skipping and counting it.
        kind: ``"paired"`` or ``"unpaired"``.
        **options: ``container`` as for :func:`read_trl_vision`.

    Returns:
        :class:`ReadResult`.

    Raises:
        DataError: The dataset cannot be opened, an unknown option or kind, or (``strict``) a bad row.
    """
    return _read_table(path, strict, kind, options, False, "jsonl")


# ---- LLaMA-Factory -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaFactoryEntry:
    """One ``dataset_info.json`` entry, resolved.

    Args:
        name: The entry's name (``dataset: NAME`` in LLaMA-Factory).
        dataset_dir: The directory holding ``dataset_info.json``.
        files: The data files (``file_name``, or the files of the folder it names, sorted by name).
        formatting: ``alpaca``, ``sharegpt`` or ``openai``.
        ranking: Whether it is a preference dataset.
        columns: Every column role -> its name (LLaMA-Factory's defaults filled in).
        tags: The sharegpt tags (LLaMA-Factory's defaults filled in).
        media_dir: Where relative image paths are looked up first.
    """

    name: str
    dataset_dir: Path
    files: list[Path]
    formatting: str
    ranking: bool
    columns: dict[str, str | None] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    media_dir: Path | None = None


def _read_info(info: Path) -> dict[str, Any]:
    try:
        data = json.loads(info.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{info}: cannot read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{info}:{exc.lineno}: malformed json (column {exc.colno}): {exc.msg}") from exc
    if not isinstance(data, dict):
        raise DataError(f"{info}: must hold an object of dataset entries, got {type(data).__name__}")
    return data


def is_llamafactory_dir(path: str | Path) -> bool:
    """True for a directory whose ``dataset_info.json`` lists LLaMA-Factory entries (not an HF ``save_to_disk``
    directory, which has a ``dataset_info.json`` too, beside ``state.json``)."""
    p = Path(path)
    info = p / DATASET_INFO
    if not p.is_dir() or not info.is_file() or (p / "state.json").exists():
        return False
    try:
        data = _read_info(info)
    except DataError:
        return False
    entries = [v for v in data.values() if isinstance(v, dict)]
    return bool(entries) and all(any(k in v for k in _LOCAL_KEYS + _HUB_KEYS) for v in entries)


def _entry_for_file(data: dict[str, Any], dataset_dir: Path, file: Path) -> str | None:
    target = file.resolve()
    for name, entry in data.items():
        if isinstance(entry, dict) and isinstance(entry.get("file_name"), str):
            if (dataset_dir / entry["file_name"]).resolve() == target:
                return name
    return None


def _pick_entry(data: dict[str, Any], info: Path, kind: str) -> str:
    if len(data) == 1:
        return next(iter(data))
    local = [n for n, e in data.items() if isinstance(e, dict) and "file_name" in e]
    if kind == "paired":
        fitting, what = [n for n in local if data[n].get("ranking") is True], 'preference ("ranking": true)'
    else:
        fitting, what = [n for n in local if (data[n].get("columns") or {}).get("kto_tag")], "KTO (a kto_tag column)"
    if len(fitting) == 1:
        return fitting[0]
    if not fitting:
        raise DataError(f"{info}: none of its datasets ({', '.join(data) or 'none'}) is a local {what} dataset")
    raise DataError(f"{info}: {len(fitting)} {what.split(' (')[0]} datasets in it ({', '.join(fitting)}); name one "
                    "(data.options.dataset=NAME, or --dataset NAME)")


def _entry_files(dataset_dir: Path, file_name: str, info: Path, name: str) -> list[Path]:
    target = dataset_dir / file_name
    if target.is_dir():
        files = sorted(q for q in target.iterdir() if q.is_file() and not q.name.startswith("."))
    elif target.is_file():
        files = [target]
    else:
        raise DataError(f"{info}: dataset '{name}': file_name {file_name!r} not found in {dataset_dir}")
    if not files:
        raise DataError(f"{info}: dataset '{name}': the folder {file_name!r} holds no data files")
    bad = [q.name for q in files if q.suffix.lower() not in _LF_SUFFIXES]
    if bad:
        raise DataError(f"{info}: dataset '{name}': cannot read {', '.join(bad)}; readable data files: "
                        f"{', '.join(_LF_SUFFIXES)}")
    if len({q.suffix.lower() for q in files}) > 1:
        raise DataError(f"{info}: dataset '{name}': the files of {file_name!r} must all be of one type")
    return files


def load_llamafactory_entry(path: str | Path, dataset: str | None = None, media_dir: str | Path | None = None,
                            kind: str = "paired") -> LlamaFactoryEntry:
    """The ``dataset_info.json`` entry that ``path`` and ``dataset`` name, checked and resolved.

    Args:
        path: The dataset directory (it holds ``dataset_info.json``), that file itself, or a data file an entry
            names (then that entry is the one read).
        dataset: The entry's name; None = the only entry, or the only one of ``kind`` (``"ranking": true`` for
            pairs, a ``kto_tag`` column for unpaired data).
        media_dir: Where image paths are looked up first (LLaMA-Factory's ``media_dir``); None = the dataset dir.
        kind: ``"paired"`` or ``"unpaired"``.

    Raises:
        DataError: No ``dataset_info.json``, an unknown or ambiguous entry, a hub entry (only local ``file_name``
            entries are read), an entry of the wrong kind or formatting, or data files that are missing or not
            ``.json`` / ``.jsonl`` / ``.parquet``.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    file = None
    if p.is_file():
        file = None if p.name == DATASET_INFO else p
        p = p.parent
    info = p / DATASET_INFO
    if not info.is_file():
        raise DataError(f"{p}: not a LLaMA-Factory dataset directory (no {DATASET_INFO})")
    data = _read_info(info)
    if dataset is None and file is not None:
        dataset = _entry_for_file(data, p, file)
        if dataset is None:
            raise DataError(f"{file}: no entry of {info} has this file as its file_name")
    name = dataset if dataset is not None else _pick_entry(data, info, kind)
    if name not in data:
        raise DataError(f"{info}: no dataset '{name}'; its datasets: {', '.join(data) or 'none'}")
    entry = data[name]
    if not isinstance(entry, dict):
        raise DataError(f"{info}: dataset '{name}' must be an object, got {type(entry).__name__}")
    if "file_name" not in entry:
        hub = [k for k in _HUB_KEYS if k in entry]
        if hub:
            raise DataError(f"{info}: dataset '{name}' is read from {hub[0]} ({entry[hub[0]]}); only local "
                            "file_name entries are read (there is no network)")
        raise DataError(f"{info}: dataset '{name}' has no file_name")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in _LF_FORMATTINGS:
        raise DataError(f"{info}: dataset '{name}': unknown formatting {formatting!r}; valid: "
                        f"{', '.join(_LF_FORMATTINGS)}")
    columns = {**_LF_COLUMNS, **(entry.get("columns") or {})}
    tags = {**_LF_TAGS, **(entry.get("tags") or {})}
    ranking = entry.get("ranking", False) is True
    if kind == "paired":
        if not ranking:
            raise DataError(f"{info}: dataset '{name}' is not a preference dataset (its entry needs "
                            '"ranking": true)')
        missing = [c for c in ("chosen", "rejected") if not columns.get(c)]
        if missing:
            raise DataError(f"{info}: dataset '{name}': a ranking entry needs columns.{' and columns.'.join(missing)}")
    elif not columns.get("kto_tag"):
        raise DataError(f"{info}: dataset '{name}' has no kto_tag column, which unpaired (KTO) data needs")
    files = _entry_files(p, str(entry["file_name"]), info, name)
    media = Path(media_dir).expanduser() if media_dir is not None else p
    return LlamaFactoryEntry(name, p.resolve(), files, formatting, ranking, columns, tags, media.resolve())


def _json_array_rows(p: Path, text: str) -> Iterator[RawRow]:
    """The elements of a JSON array file, each with the 1-based line it starts on."""
    decoder = json.JSONDecoder()
    n = len(text)

    def skip(i: int) -> int:
        while i < n and text[i] in " \t\r\n":
            i += 1
        return i

    i = skip(text.index("[") + 1)
    line, counted = 1, 0
    k = 0
    if i < n and text[i] == "]":
        return
    while True:
        line += text.count("\n", counted, i)
        counted = i
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise DataError(f"{p}:{exc.lineno}: malformed json (column {exc.colno}): {exc.msg}; the JSON array "
                            "cannot be read past it") from exc
        if isinstance(obj, dict):
            yield RawRow(str(p), k, k, obj, None, line)
        else:
            yield RawRow(str(p), k, k, None, f"malformed json: an element must be an object, got {type(obj).__name__}",
                         line)
        k += 1
        i = skip(end)
        if i < n and text[i] == ",":
            i = skip(i + 1)
            continue
        if i < n and text[i] == "]":
            if skip(i + 1) < n:
                raise DataError(f"{p}: text after the closing ']' of the JSON array")
            return
        where = text.count("\n", 0, min(i, n)) + 1
        raise DataError(f"{p}:{where}: malformed json: expected ',' or ']' after element {k - 1} of the JSON array")


def _file_rows(p: Path) -> Iterator[RawRow]:
    if p.suffix.lower() == ".parquet":
        yield from iter_source_rows(p, "parquet")
        return
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{p}: not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise DataError(f"{p}: cannot open: {exc.strerror or exc}") from exc
    if text.lstrip().startswith("["):
        yield from _json_array_rows(p, text)
    else:  # JSON lines (datasets' json loader reads both from a .json file)
        yield from iter_source_rows(p, "jsonl")


def iter_llamafactory_rows(entry: LlamaFactoryEntry) -> Iterator[RawRow]:
    """Every row of an entry's data files, the bad ones included; ``row`` continues across the files of a folder.

    Raises:
        DataError: A data file cannot be opened or is not valid JSON / parquet as a whole.
    """
    offset = 0
    for file in entry.files:
        last = -1
        for raw in _file_rows(file):
            last = raw.row
            yield raw._replace(row=offset + raw.row, file_row=raw.row)
        offset += last + 1


def _lf_turns(row: dict[str, Any], entry: LlamaFactoryEntry, kind: str) -> tuple[list[dict[str, Any]], Any] | str:
    """sharegpt / openai: ``(prompt turns incl. system, answer-or-answers)`` or a skip reason."""
    t, c = entry.tags, entry.columns
    role_tag, content_tag = t["role_tag"], t["content_tag"]
    user, assistant = t["user_tag"], t["assistant_tag"]
    tools = (t["observation_tag"], t["function_tag"])
    column = c["messages"]
    if column not in row:
        return f"missing column: {column}"
    messages = row[column]
    if not isinstance(messages, list):
        return f"bad message: '{column}' must be a list of turns, got {type(messages).__name__}"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or role_tag not in m or content_tag not in m:
            return f"bad message: turn {i + 1} of '{column}' needs '{role_tag}' and '{content_tag}'"
        if not isinstance(m[content_tag], str):
            return f"bad message: turn {i + 1}'s '{content_tag}' must be a string, got {type(m[content_tag]).__name__}"
    system = None
    if messages and t["system_tag"] and messages[0][role_tag] == t["system_tag"]:
        system, messages = messages[0][content_tag], messages[1:]
    elif c["system"]:
        system = row.get(c["system"])
    turns: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for i, m in enumerate(messages):
        expected = (user, t["observation_tag"]) if i % 2 == 0 else (assistant, t["function_tag"])
        role = m[role_tag]
        if role not in expected:
            return f"bad roles: turn {i + 1} is from {role!r}, expected {' or '.join(map(repr, expected))}"
        if role in tools:
            return f"unsupported role: turn {i + 1} is from {role!r} (tool turns are not read)"
        turns.append({"role": "user" if role == user else "assistant", "content": m[content_tag]})
    if kind == "unpaired":
        if len(messages) % 2 != 0 or not messages:
            return (f"bad turn count: a KTO conversation ends with the judged {assistant!r} turn; got "
                    f"{len(messages)} turn(s)")
        return turns[:-1], turns[-1]["content"]
    if len(messages) % 2 == 0:
        return (f"bad turn count: a ranking conversation ends with a {user!r} turn (the answers are in chosen and "
                f"rejected); got {len(messages)} turn(s)")
    answers = []
    for side in ("chosen", "rejected"):
        col = c[side]
        if col not in row:
            return f"missing column: {col}"
        answer = row[col]
        if answer is None:
            return f"empty {side}"
        if not isinstance(answer, dict) or role_tag not in answer or content_tag not in answer:
            return (f"bad answer: '{col}' must be one message {{'{role_tag}': '{assistant}', '{content_tag}': ...}}, "
                    f"got {type(answer).__name__}")
        if answer[role_tag] != assistant:
            if answer[role_tag] == t["function_tag"]:
                return f"unsupported role: '{col}' is from {answer[role_tag]!r} (tool calls are not read)"
            return f"bad roles: '{col}' is from {answer[role_tag]!r}, expected {assistant!r}"
        if not isinstance(answer[content_tag], str):
            return f"bad answer: '{col}'s '{content_tag}' must be a string"
        answers.append(answer[content_tag])
    return turns, answers


def _lf_alpaca(row: dict[str, Any], entry: LlamaFactoryEntry, kind: str) -> tuple[list[dict[str, Any]], Any] | str:
    c = entry.columns
    turns: list[dict[str, Any]] = []
    if c["system"] and row.get(c["system"]):
        turns.append({"role": "system", "content": row[c["system"]]})
    history = row.get(c["history"]) if c["history"] else None
    if isinstance(history, list):
        for i, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
                return f"bad message: history[{i}] must be [instruction, response]"
            turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    query = [str(row[k]) for k in (c["prompt"], c["query"]) if k and row.get(k)]
    turns.append({"role": "user", "content": "\n".join(query)})
    if kind == "unpaired":
        col = c["response"]
        if col not in row:
            return f"missing column: {col}"
        return turns, row[col]
    answers = []
    for side in ("chosen", "rejected"):
        col = c[side]
        if col not in row:
            return f"missing column: {col}"
        if row[col] is not None and not isinstance(row[col], str):
            return f"bad answer: '{col}' must be a string in the alpaca formatting, got {type(row[col]).__name__}"
        answers.append(row[col])
    return turns, answers


def llamafactory_row(row: dict[str, Any], entry: LlamaFactoryEntry, kind: str = "paired"
                     ) -> PreferencePair | UnpairedSample | str:
    """One row of a LLaMA-Factory dataset as a record, or the reason it is skipped (see the module docstring).

    The prompt is chat messages (``{"role": "system" | "user" | "assistant", "content": str}``, ``<image>`` marks
    kept in the strings), the answers their strings; unmapped columns go into ``meta`` (``id`` becomes the id).
    """
    parsed = (_lf_alpaca if entry.formatting == "alpaca" else _lf_turns)(row, entry, kind)
    if isinstance(parsed, str):
        return parsed
    prompt, answers = parsed
    roots = [entry.media_dir or entry.dataset_dir, Path.cwd()]
    c = entry.columns
    images_value = row.get(c["images"]) if c["images"] else None
    if isinstance(images_value, list) and not images_value:
        images_value = None
    images, reason = _resolve_images(images_value, c["images"] or "images", roots)
    if reason is not None:
        return reason
    mapped = {v for v in c.values() if v} | {"id", _REJECTED_IMAGES}
    meta = {k: v for k, v in row.items() if k not in mapped}
    rid = row.get("id")
    if kind == "unpaired":
        if row.get(_REJECTED_IMAGES) is not None:
            return "bad image: 'rejected_images' is for pairs (an image-side rejection), not unpaired samples"
        tag = row.get(c["kto_tag"])
        if not isinstance(tag, bool):
            return f"bad kto_tag: '{c['kto_tag']}' must be true or false, got {tag!r}"
        return _unpaired(prompt, answers, tag, images, rid, meta)
    rejected_images = None
    if row.get(_REJECTED_IMAGES) is not None:
        rejected_images, reason = _resolve_images(row[_REJECTED_IMAGES], _REJECTED_IMAGES, roots)
        if reason is not None:
            return reason
    return _pair(prompt, answers[0], answers[1], images, rejected_images, rid, meta)


def read_llamafactory(path: str | Path, strict: bool = False, kind: str = "paired", **options: Any) -> ReadResult:
    """Read a LLaMA-Factory dataset (the adapter data format ``llamafactory``; see the module docstring).

    Args:
        path: The dataset directory holding ``dataset_info.json`` (or one of the data files an entry names).
        strict: Raise :class:`DataError` at the first bad row (naming the file and line / row) instead of skipping
            and counting it.
        kind: ``"paired"`` (a ``"ranking": true`` entry) or ``"unpaired"`` (an entry with a ``kto_tag`` column).
        **options: ``dataset`` (the entry's name; needed when several entries fit), ``media_dir`` (where image
            paths are looked up first; default the dataset directory).

    Returns:
        :class:`ReadResult`: the records (image paths absolute), the skipped rows with their reasons, the source.

    Raises:
        DataError: See :func:`load_llamafactory_entry`; an unknown option; a data file that cannot be read as a
            whole; or (``strict``) a bad row.
    """
    _check_kind(kind, path)
    _check_options(options, ("dataset", "media_dir"), "llamafactory", path)
    entry = load_llamafactory_entry(path, options.get("dataset"), options.get("media_dir"), kind)
    return read_rows(path, lambda row: llamafactory_row(row, entry, kind), strict=strict,
                     rows=iter_llamafactory_rows(entry))


# ---- any of them ---------------------------------------------------------------------------------------------------


def detect_vlm_format(path: str | Path) -> str:
    """``"llamafactory"`` for a LLaMA-Factory dataset directory (or a data file an entry of the ``dataset_info.json``
    beside it names), else ``"trl"`` (which reads the normalised jsonl too).

    Raises:
        DataError: The path does not exist.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if is_llamafactory_dir(p):
        return "llamafactory"
    if p.is_file() and is_llamafactory_dir(p.parent):
        if p.name == DATASET_INFO or _entry_for_file(_read_info(p.parent / DATASET_INFO), p.parent, p):
            return "llamafactory"
    return "trl"


_READERS: dict[str, Callable[..., ReadResult]] = {
    "trl": read_trl_vision, "llamafactory": read_llamafactory, "jsonl": read_vlm_jsonl,
}


def read_vlm(path: str | Path, format: str = "auto", strict: bool = False, kind: str = "paired",
             **options: Any) -> ReadResult:
    """Read VLM preference data in any of :data:`FORMATS` (``"auto"``: :func:`detect_vlm_format`).

    Raises:
        DataError: An unknown format, or what the format's reader raises.
    """
    fmt = detect_vlm_format(path) if format == "auto" else format
    if fmt not in _READERS:
        raise DataError(f"{path}: unknown VLM data format {format!r}; valid: auto, {', '.join(FORMATS)}")
    return _READERS[fmt](path, strict=strict, kind=kind, **options)
