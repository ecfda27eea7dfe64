"""The one form every VLM preference record takes inside mm-align, whatever file it came from.

A VLM pair is a core :class:`~mm_align.data.records.PreferencePair` (or an
:class:`~mm_align.data.records.UnpairedSample` for KTO) whose fields hold:

- ``prompt``: the conversation before the answer, as chat messages in the transformers / TRL form
  ``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]``,
  or a plain string in which each ``<image>`` marks one image (LLaVA / LLaMA-Factory style);
- ``chosen`` / ``rejected`` (``completion``): the answer, a string or a list with one assistant message;
- ``meta["images"]``: the prompt's images in placeholder order (paths relative to the data file, absolute
  paths, raw bytes, ``{"bytes": ..., "path": ...}`` as datasets stores them, or PIL images);
- ``meta["rejected_images"]`` (optional): an **image-side rejection** (mDPO's conditional preference):
  the rejected answer is scored under these images instead of ``images``; with the same answer on both
  sides, only the input differs. It needs as many images as the prompt has placeholders.

:func:`vlm_example` turns such a record into a :class:`VLMExample`, the normalised view that adapters,
the length audit, the doctor and the data builders read. Readers of TRL, LLaMA-Factory and jsonl files
produce records of this shape (``mm_align.vlm.formats``).
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm_align.data.records import DataError, PreferencePair, UnpairedSample

__all__ = ["IMAGE_TOKEN", "VLMExample", "vlm_example", "prompt_messages", "answer_text", "count_image_placeholders",
           "load_image"]

# the placeholder of string prompts (LLaVA, LLaMA-Factory); chat messages use {"type": "image"}
IMAGE_TOKEN = "<image>"


@dataclass
class VLMExample:
    """A normalised VLM record.

    Args:
        messages: the prompt as chat messages; every image is a ``{"type": "image"}`` content part, and every
            message's ``content`` is a list of parts (``{"type": "text", "text": ...}`` or ``{"type": "image"}``).
        images: the prompt's images, one per placeholder, in order (as stored: path, bytes, dict or PIL image).
        chosen: the chosen answer's text (paired), or the completion's text (unpaired).
        rejected: the rejected answer's text; None for an unpaired sample.
        rejected_images: the images the rejected answer is scored under, or None (= ``images``).
        desirable: for an unpaired sample, whether the completion is desirable; None when paired.
        id: the record's id.
        origin: where the record was read (``"train.jsonl:12"``), for messages.
    """

    messages: list[dict[str, Any]]
    images: list[Any]
    chosen: str
    rejected: str | None = None
    rejected_images: list[Any] | None = None
    desirable: bool | None = None
    id: str | None = None
    origin: str | None = field(default=None, compare=False)

    @property
    def image_side(self) -> bool:
        """True when the rejected answer is scored under other images (an image-side rejection)."""
        return self.rejected_images is not None


def _where(origin: str | None) -> str:
    return f"{origin}: " if origin else ""


def _parts_from_string(text: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    pieces = text.split(IMAGE_TOKEN)
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def _normalise_message(message: Any, origin: str | None) -> dict[str, Any]:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise DataError(f"{_where(origin)}a chat message must be a dict with 'role' and 'content', "
                        f"got {message!r:.80}")
    content = message["content"]
    if isinstance(content, str):
        parts = _parts_from_string(content)
    elif isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
                raise DataError(f"{_where(origin)}a content part must be {{'type': 'text'|'image', ...}}, "
                                f"got {part!r:.80}")
            if part["type"] == "image":
                parts.append({"type": "image"})
            else:
                parts.extend(_parts_from_string(str(part.get("text", ""))) or [{"type": "text", "text": ""}])
    else:
        raise DataError(f"{_where(origin)}a message's 'content' must be a string or a list of parts, "
                        f"got {type(content).__name__}")
    return {"role": str(message["role"]), "content": parts}


def prompt_messages(prompt: Any, origin: str | None = None) -> list[dict[str, Any]]:
    """The prompt as normalised chat messages: a string becomes one user message, ``<image>`` marks become
    image parts; string contents of messages are split the same way."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": _parts_from_string(prompt)}]
    if isinstance(prompt, list) and prompt:
        return [_normalise_message(m, origin) for m in copy.deepcopy(prompt)]
    raise DataError(f"{_where(origin)}'prompt' must be a string or a non-empty list of chat messages, "
                    f"got {type(prompt).__name__}")


def answer_text(answer: Any, what: str, origin: str | None = None) -> str:
    """An answer's text: a string, or a list holding one assistant message (TRL's conversational form)."""
    if isinstance(answer, str):
        return answer
    if isinstance(answer, list) and len(answer) == 1 and isinstance(answer[0], dict):
        message = _normalise_message(answer[0], origin)
        if message["role"] != "assistant":
            raise DataError(f"{_where(origin)}'{what}' must be an assistant message, got role {message['role']!r}")
        if any(p["type"] == "image" for p in message["content"]):
            raise DataError(f"{_where(origin)}'{what}' holds an image placeholder; images belong to the prompt")
        return "".join(p["text"] for p in message["content"])
    raise DataError(f"{_where(origin)}'{what}' must be a string or a list with one assistant message, "
                    f"got {type(answer).__name__}")


def count_image_placeholders(messages: list[dict[str, Any]]) -> int:
    """How many ``{"type": "image"}`` parts the normalised messages hold."""
    return sum(1 for m in messages for p in m["content"] if p["type"] == "image")


def _image_list(value: Any, what: str, origin: str | None) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, Path, bytes, dict)) or hasattr(value, "convert"):  # one image given bare
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise DataError(f"{_where(origin)}'{what}' must be a list of images, got {type(value).__name__}")


def vlm_example(record: PreferencePair | UnpairedSample) -> VLMExample:
    """The normalised view of a VLM record (see the module docstring).

    Raises:
        DataError: naming the record's origin, when the prompt or an answer has the wrong shape, or when the
            number of image placeholders differs from the number of images (or of rejected images).
    """
    origin = record.origin
    messages = prompt_messages(record.prompt, origin)
    images = _image_list(record.meta.get("images"), "images", origin)
    n = count_image_placeholders(messages)
    if n != len(images):
        raise DataError(f"{_where(origin)}the prompt has {n} image placeholder(s) but the record has "
                        f"{len(images)} image(s)")
    if isinstance(record, UnpairedSample):
        return VLMExample(messages, images, answer_text(record.completion, "completion", origin),
                          desirable=bool(record.desirable), id=record.id, origin=origin)
    rejected_images = record.meta.get("rejected_images")
    if rejected_images is not None:
        rejected_images = _image_list(rejected_images, "rejected_images", origin)
        if len(rejected_images) != n:
            raise DataError(f"{_where(origin)}the prompt has {n} image placeholder(s) but 'rejected_images' "
                            f"holds {len(rejected_images)}")
    return VLMExample(messages, images, answer_text(record.chosen, "chosen", origin),
                      answer_text(record.rejected, "rejected", origin), rejected_images, id=record.id, origin=origin)


def load_image(value: Any, base_dir: Path | None = None, origin: str | None = None) -> Any:
    """One stored image as an RGB ``PIL.Image``: a path (relative ones against ``base_dir``), raw bytes,
    ``{"bytes": ..., "path": ...}`` (the datasets Image feature) or a PIL image.

    Raises:
        DataError: naming the origin and the file, when it is missing or not a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    if hasattr(value, "convert"):
        return value.convert("RGB")
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif value.get("path"):
            value = value["path"]
        else:
            raise DataError(f"{_where(origin)}an image dict needs 'bytes' or 'path', got keys {sorted(value)}")
    try:
        if isinstance(value, (bytes, bytearray)):
            with Image.open(io.BytesIO(value)) as im:
                return im.convert("RGB")
        if isinstance(value, (str, Path)):
            p = Path(value)
            if not p.is_absolute() and base_dir is not None:
                p = base_dir / p
            if not p.is_file():
                raise DataError(f"{_where(origin)}image file not found: {p}")
            with Image.open(p) as im:
                return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        what = "(bytes)" if isinstance(value, (bytes, bytearray)) else str(value)[:120]
        raise DataError(f"{_where(origin)}unreadable image {what}: {e}") from e
    raise DataError(f"{_where(origin)}an image must be a path, bytes, a datasets image dict or a PIL image, "
                    f"got {type(value).__name__}")
