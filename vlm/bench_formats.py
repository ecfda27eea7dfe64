"""Readers of local copies of the VLM benchmarks, in the layouts they are published in, into one item type.

Every reader returns a :class:`BenchSet` of :class:`BenchItem` s: an id, the images (as stored: a datasets image
dict ``{"bytes", "path"}``, an absolute path, or a PIL image; decoded by
:func:`mm_align.vlm.vlm_records.load_image` when the model runs), the question with one ``<image>`` mark
(:data:`~mm_align.vlm.vlm_records.IMAGE_TOKEN`) per image in image order (question first, then the options), the
options or None, the gold answer, the kind (``"multiple_choice"``, ``"yes_no"`` or ``"open"``,
:mod:`mm_align.vlm.answer_extraction`) and the subset results are broken down by.

Images a question does not place are put at its start, before the text (the order in which the benchmarks'
reference scripts pass them: BLINK's and Mantis-Eval's images come before the prompt); a question with more marks
than images is an error.

The layouts, and the sources they were checked against:

- **MMMU** (``mmmu``; the Hugging Face parquet of ``MMMU/MMMU``: one folder per subject with
  ``{dev,validation,test}-*.parquet``, or the merged copy ``lmms-lab/MMMU``; checked against the dataset cards of
  ``HuggingFaceM4/MMMU`` / ``lmms-lab/MMMU`` and the reference scorer in ``EvolvingLMMs-Lab/lmms-eval``
  ``tasks/mmmu/utils.py``): columns ``id`` (``validation_Accounting_1``), ``question`` with ``<image k>`` marks,
  ``options`` as the string repr of a Python list (``"['1', '2']"``), ``answer`` (an option letter, or the answer
  text of an open question, possibly a list repr of alternatives), ``image_1`` .. ``image_7`` (image dicts, null
  when unused), ``question_type`` (``multiple-choice`` or ``open``). Each ``<image k>`` in the question and the
  options, in text order, becomes an ``<image>`` and brings ``image_k`` (so a twice-cited image is passed twice).
  Subset: the subject (from the id; else the folder). Default split ``validation``.
- **BLINK** (``blink``; ``BLINK-Benchmark/BLINK``: one folder per subtask with ``{val,test}-*.parquet``; checked
  against the dataset's file tree and its evaluation code ``zeyofu/BLINK_Benchmark`` ``eval/``): ``idx``,
  ``question``, ``choices`` (a list), ``answer`` as ``"(A)"``, ``image_1`` .. ``image_4`` (null when unused),
  ``sub_task``, ``prompt`` (the published full prompt; kept in ``meta``, the question is rendered with its choices
  like every other multiple-choice set). Subset: ``sub_task`` (else the folder). Default split ``val``.
- **Mantis-Eval** (``mantis``; ``TIGER-Lab/Mantis-Eval``: ``mantis_eval/test-*.parquet``; checked against the
  dataset's file tree and ``TIGER-AI-Lab/Mantis`` ``mantis/benchmark/eval.py``): ``id``, ``question_type``
  (``multi-choice`` or ``short-answer``), ``question`` with ``<image>`` marks, ``images`` (a list of image
  dicts), ``options`` (a list; an option already prefixed with its own letter, ``"(A) ..."``, ``"A. ..."``,
  ``"A: ..."``, ``"A) ..."``, has the prefix removed, as the reference script avoids doubling it), ``answer``
  (``"A"`` or ``"(A)"``; the text of a short answer), ``category``. Subset: ``category``. Default split ``test``.
- **MuirBench** (``muirbench``; ``MUIRBENCH/MUIRBENCH``: ``data/test-*.parquet``; checked against the dataset's
  file tree and ``lmms-eval`` ``tasks/muirbench/utils.py``): ``idx``, ``task``, ``question`` (``<image>`` marks
  where the question places images), ``options`` (a list; may hold ``<image>`` marks), ``answer`` (a letter),
  ``image_list`` (a list of image dicts), ``image_relation``, ``image_type``, ``counterpart_idx``. Subset:
  ``task``. Default split ``test``.
- **NLVR2** (``nlvr2``; the original JSON-lines files of ``lil-lab/nlvr`` ``nlvr2/data/{train,dev,test1}.json``;
  checked against ``nlvr2/README.md`` there): ``identifier`` (``split-set_id-pair_id-sentence_id``), ``sentence``,
  ``label`` (``"True"`` / ``"False"``), ``directory`` (train only). The left and right images are
  ``split-set_id-pair_id-img0.png`` / ``-img1.png`` (the README's naming), looked up in ``images=DIR`` (default:
  the file's folder and the split's folder beside it, ``dev.json`` -> ``dev/``) and, when a row has
  ``directory``, first in ``DIR/<directory>/`` (the train images' layout). The
  answer is ``true`` / ``false`` (a yes/no item: :func:`~mm_align.vlm.answer_extraction.extract_yes_no` reads
  true/false as yes/no).
- **POPE** (``pope``; the JSON-lines files of ``RUCAIBox/POPE`` ``output/coco/coco_pope_{random,popular,
  adversarial}.json``, one object a line, with the images of a COCO ``val2014`` folder; or the parquet of
  ``lmms-lab/POPE``; checked against published copies of those lines and ``lmms-eval`` ``tasks/pope/``): jsonl
  ``question_id``, ``image`` (a file name in ``images=DIR``, default the file's folder), ``text`` (the question),
  ``label`` (``yes`` / ``no``); parquet ``question_id``, ``question``, ``answer``, ``image``, ``category``. A
  folder of jsonl files is read file by file. Subset: ``random`` / ``popular`` / ``adversarial`` (the file name's
  last part, or ``category``).

A file or a folder is given; in a folder, the split's parquet files (``<split>-*.parquet``, any depth, sorted) are
read. Bad rows: a missing column, an unreadable options list, an answer that is no option letter, an image a
question cites but the row lacks, an image file that is not there, a duplicate id: a
:class:`~mm_align.data.records.DataError` naming the file and the row (``file:N``: the line of a jsonl file, the
0-based row of a parquet file). Rows **without a gold answer** (null or empty; a test split whose answers are
withheld) are skipped and counted in :attr:`BenchSet.skipped`, never scored.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm_align.vlm.answer_extraction import Kind, option_letters
from mm_align.vlm.vlm_records import IMAGE_TOKEN

from mm_align.data.records import DataError

__all__ = ["BenchItem", "BenchSet", "FORMATS", "DEFAULT_SPLITS", "read_benchmark", "read_mmmu", "read_blink",
           "read_mantis_eval", "read_muirbench", "read_nlvr2", "read_pope", "format_of", "NO_ANSWER"]

NO_ANSWER = "no gold answer (a split whose answers are withheld)"
_MMMU_IMAGE = re.compile(r"<image (\d+)>")
_LETTER_PREFIX = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])[.:)])\s*")


@dataclass
class BenchItem:
    """One benchmark question.

    Args:
        id: the item's id, unique in its set.
        images: the images, one per ``<image>`` mark of ``question`` + ``options``, in order (as stored).
        question: the question text with its ``<image>`` marks.
        options: the option texts of a multiple-choice question (letters ``A``, ``B``, ... in order), else None.
        answer: the gold answer: an option letter, ``yes`` / ``no`` / ``true`` / ``false``, or an open answer (a list
            of alternatives for an open question that has several).
        kind: ``"multiple_choice"``, ``"yes_no"`` or ``"open"``.
        subset: the subset results are broken down by (subject, subtask, POPE split), or None.
        instruction: the answer-format instruction that ends the prompt, or None for the kind's default.
        origin: where it was read (``"file.parquet:12"``), for messages.
        meta: other published fields kept for reference (BLINK's full prompt, ...).
    """

    id: str
    images: list[Any]
    question: str
    options: list[str] | None
    answer: str | list[str]
    kind: Kind
    subset: str | None = None
    instruction: str | None = None
    origin: str | None = field(default=None, compare=False)
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass
class BenchSet:
    """The items read from one benchmark copy.

    Args:
        format: the reader's name (``"mmmu"``, ``"pope"``, ...).
        source: the file or folder read.
        split: the split read from a folder of parquet files, or None.
        items: the items, in file order.
        skipped: reason -> rows skipped for it (rows without a gold answer).
    """

    format: str
    source: str
    split: str | None
    items: list[BenchItem]
    skipped: dict[str, int] = field(default_factory=dict)


# ---- low-level reading -------------------------------------------------------------------------------------
def _parquet_files(path: Path, split: str) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    files = sorted(p for p in path.rglob(f"{split}-*.parquet") if p.is_file())
    files += sorted(p for p in path.rglob(f"{split}.parquet") if p.is_file())
    if not files:
        found = sorted({p.name.split("-")[0].removesuffix(".parquet") for p in path.rglob("*.parquet")})
        raise FileNotFoundError(f"{path}: no parquet files of split {split!r} (<split>-*.parquet); splits found: "
                                f"{', '.join(found) or 'none'}")
    return files


def _parquet_rows(path: Path, required: tuple[str, ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(origin, row)`` of every row of a parquet file, after checking that it has the ``required`` columns."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for a file that is no parquet
        raise DataError(f"{path}: not a readable parquet file ({e})") from e
    names = set(pf.schema_arrow.names)
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (columns: {', '.join(sorted(names))})")
    index = 0
    for batch in pf.iter_batches(batch_size=64):
        for row in batch.to_pylist():
            yield f"{path}:{index}", row
            index += 1


def _json_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(origin, row)`` of a JSON-lines file (one object a line; blank lines skipped) or of a JSON array."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from e
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"{path}:{i}: an item must be a JSON object, got {type(row).__name__}")
            yield f"{path}:{i}", row
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise DataError(f"{path}:{n}: a line must be a JSON object, got {type(row).__name__}")
        yield f"{path}:{n}", row


def _need(row: dict[str, Any], key: str, origin: str) -> Any:
    if key not in row:
        raise DataError(f"{origin}: missing field {key!r} (fields: {', '.join(sorted(row))})")
    return row[key]


def _text(row: dict[str, Any], key: str, origin: str) -> str:
    value = _need(row, key, origin)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{origin}: {key!r} must be a non-empty string, got {value!r:.60}")
    return value


def _no_answer(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _option_list(value: Any, origin: str, what: str = "options") -> list[str]:
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError) as e:
            raise DataError(f"{origin}: {what!r} is not a list literal ({e}): {value!r:.80}") from None
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(o, str) for o in value):
        raise DataError(f"{origin}: {what!r} must be a non-empty list of strings, got {value!r:.80}")
    option_letters(len(value))  # 1..26 options
    return [str(o) for o in value]


def _letter(value: Any, options: list[str], origin: str) -> str:
    letter = str(value).strip().strip("()").strip().upper()
    letters = option_letters(len(options))
    if letter not in letters:
        raise DataError(f"{origin}: the answer {value!r} is not an option letter ({', '.join(letters)})")
    return letter


def _image_value(value: Any, base: Path, origin: str, what: str) -> Any:
    """A stored image as the reader keeps it: a datasets image dict with bytes, an absolute path, or a PIL image."""
    if hasattr(value, "convert"):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return {"bytes": value["bytes"], "path": value.get("path")}
        if value.get("path"):
            value = value["path"]
        else:
            raise DataError(f"{origin}: {what} is an image dict with neither bytes nor a path")
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value), "path": None}
    if isinstance(value, (str, Path)):
        p = Path(value)
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            raise DataError(f"{origin}: {what}: image file not found: {p}")
        return str(p)
    raise DataError(f"{origin}: {what} must be an image (dict, bytes or path), got {type(value).__name__}")


def _place_images(question: str, options: list[str] | None, n_images: int, origin: str) -> str:
    """``question`` with the images it does not place put at its start (module docstring)."""
    marks = question.count(IMAGE_TOKEN) + sum(o.count(IMAGE_TOKEN) for o in options or [])
    if marks > n_images:
        raise DataError(f"{origin}: the question and options hold {marks} {IMAGE_TOKEN} mark(s) but the row has "
                        f"{n_images} image(s)")
    return IMAGE_TOKEN * (n_images - marks) + ("\n" if marks < n_images else "") + question


def _subset_from_folder(path: Path, root: Path) -> str | None:
    return path.parent.name if path.parent != root and path.parent.name not in ("data", "") else None


# ---- the readers -------------------------------------------------------------------------------------------
def _cite_images(text: str, row: dict[str, Any], base: Path, origin: str, images: list[Any]) -> str:
    """MMMU: each ``<image k>`` of ``text`` becomes ``<image>``; ``image_k`` is appended to ``images``."""
    def cite(m: re.Match) -> str:
        key = f"image_{m.group(1)}"
        if row.get(key) is None:
            raise DataError(f"{origin}: the text cites <image {m.group(1)}> but {key!r} is empty")
        images.append(_image_value(row[key], base, origin, key))
        return IMAGE_TOKEN

    return _MMMU_IMAGE.sub(cite, text)


def _answered_parquet_rows(root: Path, split: str, required: tuple[str, ...], items: list[Any],
                           skipped: dict[str, int], max_items: int | None
                           ) -> Iterator[tuple[Path, str, dict[str, Any]]]:
    """``(file, origin, row)`` of the split's parquet rows that have a gold answer, until ``items`` (which the
    caller fills) holds ``max_items``; a row without an answer is counted under ``NO_ANSWER`` in ``skipped``."""
    for file in _parquet_files(root, split):
        for origin, row in _parquet_rows(file, required):
            if max_items is not None and len(items) >= max_items:
                return
            if _no_answer(row["answer"]):
                skipped[NO_ANSWER] = skipped.get(NO_ANSWER, 0) + 1
                continue
            yield file, origin, row


def _image_column(row: dict[str, Any], key: str, file: Path, origin: str) -> list[Any]:
    """A column holding the item's images as a non-empty list."""
    raw = row[key]
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{origin}: '{key}' must be a non-empty list of images")
    return [_image_value(v, file.parent, origin, f"{key}[{i}]") for i, v in enumerate(raw)]


def read_mmmu(path: str | Path, split: str = "validation", max_items: int | None = None) -> BenchSet:
    """MMMU from its Hugging Face parquet files (module docstring)."""
    root = Path(path)
    items: list[BenchItem] = []
    skipped: dict[str, int] = {}
    columns = ("id", "question", "options", "answer", "question_type")
    rows = _answered_parquet_rows(root, split, columns, items, skipped, max_items)
    for file, origin, row in rows:
        qtype = _text(row, "question_type", origin)
        question = _text(row, "question", origin)
        images: list[Any] = []

        if qtype == "multiple-choice":
            options = _option_list(row["options"], origin)
            question = _cite_images(question, row, file.parent, origin, images)
            options = [_cite_images(o, row, file.parent, origin, images) for o in options]
            answer: str | list[str] = _letter(row["answer"], options, origin)
            kind: Kind = "multiple_choice"
        elif qtype == "open":
            options = None
            question = _cite_images(question, row, file.parent, origin, images)
            answer = str(row["answer"])
            if answer.lstrip().startswith("["):
                answer = _option_list(answer, origin, "answer")
            kind = "open"
        else:
            raise DataError(f"{origin}: question_type must be 'multiple-choice' or 'open', got {qtype!r}")
        if not images:  # no citation: every image the row has, first
            images = [_image_value(row[f"image_{k}"], file.parent, origin, f"image_{k}")
                      for k in range(1, 8) if row.get(f"image_{k}") is not None]
        item_id = str(_need(row, "id", origin))
        m = re.match(r"^[a-z]+_(.+)_\d+$", item_id)
        subset = m.group(1) if m else _subset_from_folder(file, root)
        items.append(BenchItem(item_id, images, _place_images(question, options, len(images), origin), options,
                               answer, kind, subset, origin=origin))
    return BenchSet("mmmu", str(root), split if root.is_dir() else None, items, skipped)


def read_blink(path: str | Path, split: str = "val", max_items: int | None = None) -> BenchSet:
    """BLINK from its Hugging Face parquet files, one folder per subtask (module docstring)."""
    root = Path(path)
    items: list[BenchItem] = []
    skipped: dict[str, int] = {}
    columns = ("idx", "question", "choices", "answer", "image_1")
    rows = _answered_parquet_rows(root, split, columns, items, skipped, max_items)
    for file, origin, row in rows:
        options = _option_list(row["choices"], origin, "choices")
        images = [_image_value(row[f"image_{k}"], file.parent, origin, f"image_{k}")
                  for k in range(1, 5) if row.get(f"image_{k}") is not None]
        if not images:
            raise DataError(f"{origin}: the row has no image (image_1 is empty)")
        question = _text(row, "question", origin)
        subset = row.get("sub_task") or _subset_from_folder(file, root)
        items.append(BenchItem(str(row["idx"]), images, _place_images(question, options, len(images), origin),
                               options, _letter(row["answer"], options, origin), "multiple_choice", subset,
                               origin=origin, meta={"prompt": row.get("prompt")}))
    return BenchSet("blink", str(root), split if root.is_dir() else None, items, skipped)


def _strip_own_letter(options: list[str]) -> list[str]:
    """Options with a leading ``(A)`` / ``A.`` / ``A:`` / ``A)`` removed where the letter is the option's own."""
    out = []
    for letter, option in zip(option_letters(len(options)), options):
        m = _LETTER_PREFIX.match(option)
        out.append(option[m.end():] if m and (m.group(1) or m.group(2)) == letter else option)
    return out


def read_mantis_eval(path: str | Path, split: str = "test", max_items: int | None = None) -> BenchSet:
    """Mantis-Eval from its Hugging Face parquet file (module docstring)."""
    root = Path(path)
    items: list[BenchItem] = []
    skipped: dict[str, int] = {}
    columns = ("id", "question_type", "question", "images", "options", "answer")
    rows = _answered_parquet_rows(root, split, columns, items, skipped, max_items)
    for file, origin, row in rows:
        qtype = _text(row, "question_type", origin)
        images = _image_column(row, "images", file, origin)
        question = _text(row, "question", origin)
        if qtype == "multi-choice":
            options: list[str] | None = _strip_own_letter(_option_list(row["options"], origin))
            answer = _letter(row["answer"], options, origin)
            kind: Kind = "multiple_choice"
        elif qtype == "short-answer":
            options, answer, kind = None, str(row["answer"]), "open"
        else:
            raise DataError(f"{origin}: question_type must be 'multi-choice' or 'short-answer', got {qtype!r}")
        items.append(BenchItem(str(row["id"]), images, _place_images(question, options, len(images), origin),
                               options, answer, kind, row.get("category"), origin=origin))
    return BenchSet("mantis", str(root), split if root.is_dir() else None, items, skipped)


def read_muirbench(path: str | Path, split: str = "test", max_items: int | None = None) -> BenchSet:
    """MuirBench from its Hugging Face parquet files (module docstring)."""
    root = Path(path)
    items: list[BenchItem] = []
    skipped: dict[str, int] = {}
    columns = ("idx", "task", "question", "options", "answer", "image_list")
    rows = _answered_parquet_rows(root, split, columns, items, skipped, max_items)
    for file, origin, row in rows:
        images = _image_column(row, "image_list", file, origin)
        options = _option_list(row["options"], origin)
        question = _text(row, "question", origin)
        meta = {k: row.get(k) for k in ("image_relation", "image_type", "counterpart_idx") if k in row}
        items.append(BenchItem(str(row["idx"]), images, _place_images(question, options, len(images), origin),
                               options, _letter(row["answer"], options, origin), "multiple_choice",
                               row.get("task"), origin=origin, meta=meta))
    return BenchSet("muirbench", str(root), split if root.is_dir() else None, items, skipped)


def read_nlvr2(path: str | Path, images: str | Path | None = None, max_items: int | None = None) -> BenchSet:
    """NLVR2 from its original JSON-lines file and image folder (module docstring)."""
    file = Path(path)
    if images is not None:
        image_dirs = [Path(images)]
        if not image_dirs[0].is_dir():
            raise FileNotFoundError(f"NLVR2 images: {images}: no such directory")
    else:  # the file's folder, and the split's folder beside it (dev.json -> dev/)
        image_dirs = [d for d in (file.parent, file.parent / file.stem) if d.is_dir()]
    items: list[BenchItem] = []
    skipped: dict[str, int] = {}
    for origin, row in _json_rows(file):
        if max_items is not None and len(items) >= max_items:
            break
        if _no_answer(row.get("label")):
            skipped[NO_ANSWER] = skipped.get(NO_ANSWER, 0) + 1
            continue
        identifier = _text(row, "identifier", origin)
        sentence = _text(row, "sentence", origin)
        label = str(row["label"]).strip().lower()
        if label not in ("true", "false"):
            raise DataError(f"{origin}: 'label' must be 'True' or 'False', got {row['label']!r}")
        stem = identifier.rsplit("-", 1)[0]
        if stem == identifier:
            raise DataError(f"{origin}: 'identifier' {identifier!r} is not split-set_id-pair_id-sentence_id")
        folders = [d / str(row["directory"]) for d in image_dirs if row.get("directory") is not None] + image_dirs
        pair = []
        for side in ("img0", "img1"):
            name = f"{stem}-{side}.png"
            found = next((f / name for f in folders if (f / name).is_file()), None)
            if found is None:
                where = " or ".join(str(f) for f in folders) or "no image folder (give images=DIR)"
                raise DataError(f"{origin}: image {name} not found in {where}")
            pair.append(str(found))
        question = (f"Left image: {IMAGE_TOKEN}\nRight image: {IMAGE_TOKEN}\nIs this statement about the two "
                    f"images true or false? {sentence.strip()}")
        items.append(BenchItem(identifier, pair, question, None, label, "yes_no", None,
                               instruction="Answer true or false.", origin=origin))
    return BenchSet("nlvr2", str(file), None, items, skipped)


_POPE_SPLITS = ("random", "popular", "adversarial")


def read_pope(path: str | Path, images: str | Path | None = None, max_items: int | None = None) -> BenchSet:
    """POPE from the RUCAIBox JSON-lines files and a COCO image folder, or the lmms-lab parquet (module docstring)."""
    root = Path(path)
    items: list[BenchItem] = []
    skipped: dict[str, int] = {}
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file())
        if not files:
            raise FileNotFoundError(f"{root}: no POPE .json / .jsonl files")
    elif root.suffix == ".parquet":
        return _read_pope_parquet(root, max_items)
    else:
        files = [root]
    for file in files:
        if max_items is not None and len(items) >= max_items:
            break
        image_dir = Path(images) if images is not None else file.parent
        if not image_dir.is_dir():
            raise FileNotFoundError(f"POPE images: {image_dir}: no such directory")
        last = file.stem.rsplit("_", 1)[-1]
        subset = last if last in _POPE_SPLITS else file.stem
        for origin, row in _json_rows(file):
            if max_items is not None and len(items) >= max_items:
                break
            if _no_answer(row.get("label")):
                skipped[NO_ANSWER] = skipped.get(NO_ANSWER, 0) + 1
                continue
            label = str(row["label"]).strip().lower()
            if label not in ("yes", "no"):
                raise DataError(f"{origin}: 'label' must be 'yes' or 'no', got {row['label']!r}")
            qid = _need(row, "question_id", origin)
            image = _image_value(_text(row, "image", origin), image_dir, origin, "image")
            item_id = f"{subset}/{qid}" if len(files) > 1 else str(qid)
            items.append(BenchItem(item_id, [image], f"{IMAGE_TOKEN}\n{_text(row, 'text', origin).strip()}", None,
                                   label, "yes_no", subset, origin=origin))
    return BenchSet("pope", str(root), None, items, skipped)


def _read_pope_parquet(file: Path, max_items: int | None) -> BenchSet:
    items: list[BenchItem] = []
    skipped: dict[str, int] = {}
    for origin, row in _parquet_rows(file, ("question_id", "question", "answer", "image")):
        if max_items is not None and len(items) >= max_items:
            break
        if _no_answer(row["answer"]):
            skipped[NO_ANSWER] = skipped.get(NO_ANSWER, 0) + 1
            continue
        label = str(row["answer"]).strip().lower()
        if label not in ("yes", "no"):
            raise DataError(f"{origin}: 'answer' must be 'yes' or 'no', got {row['answer']!r}")
        if row["image"] is None:
            raise DataError(f"{origin}: 'image' is empty")
        image = _image_value(row["image"], file.parent, origin, "image")
        subset = row.get("category")
        item_id = f"{subset}/{row['question_id']}" if subset else str(row["question_id"])
        items.append(BenchItem(item_id, [image], f"{IMAGE_TOKEN}\n{_text(row, 'question', origin).strip()}", None,
                               label, "yes_no", subset, origin=origin))
    return BenchSet("pope", str(file), None, items, skipped)


# ---- dispatch ----------------------------------------------------------------------------------------------
FORMATS: dict[str, Callable[..., BenchSet]] = {
    "mmmu": read_mmmu, "blink": read_blink, "mantis": read_mantis_eval, "muirbench": read_muirbench,
    "nlvr2": read_nlvr2, "pope": read_pope,
}
DEFAULT_SPLITS = {"mmmu": "validation", "blink": "val", "mantis": "test", "muirbench": "test"}
_OPTIONS = {"mmmu": ("split",), "blink": ("split",), "mantis": ("split",), "muirbench": ("split",),
            "nlvr2": ("images",), "pope": ("images",)}


def format_of(name: str) -> str:
    """The format a benchmark name stands for: the name itself or the longest format it starts with, followed by
    ``_``, ``-`` or ``.`` (``pope_adversarial`` -> ``pope``, ``mantis-eval`` -> ``mantis``).

    Raises:
        ValueError: naming the valid formats.
    """
    key = name.lower()
    for fmt in sorted(FORMATS, key=len, reverse=True):
        if key == fmt or (key.startswith(fmt) and key[len(fmt)] in "_-."):
            return fmt
    raise ValueError(f"benchmark {name!r}: unknown format; the name must be (or start with) one of "
                     f"{', '.join(FORMATS)}")


def read_benchmark(fmt: str, path: str | Path, max_items: int | None = None, **options: Any) -> BenchSet:
    """Read a benchmark copy with the reader of ``fmt`` and check that its ids are unique.

    Args:
        fmt: a key of :data:`FORMATS`.
        path: the file or folder.
        max_items: read only the first N items (default: all).
        **options: ``split`` (parquet formats) or ``images`` (NLVR2, POPE).

    Raises:
        ValueError: an unknown format or option (naming the valid ones).
        DataError: a bad row (naming the file and the row), a duplicate id, or no items.
        FileNotFoundError: the path (or the image folder) is missing.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown benchmark format {fmt!r}; valid: {', '.join(FORMATS)}")
    unknown = sorted(set(options) - set(_OPTIONS[fmt]))
    if unknown:
        raise ValueError(f"{fmt}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(_OPTIONS[fmt])}")
    if max_items is not None and max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    bench = FORMATS[fmt](path, max_items=max_items, **options)
    seen: dict[str, str] = {}
    for item in bench.items:
        if item.id in seen:
            raise DataError(f"{item.origin}: duplicate id {item.id!r} (first at {seen[item.id]})")
        seen[item.id] = item.origin or ""
    if not bench.items:
        raise DataError(f"{path}: no {fmt} items to score (skipped: {bench.skipped or 'none'})")
    return bench
