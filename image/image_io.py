"""Image IO shared by the adapters, evaluators, converters, generation and benchmarks.

- :data:`IMAGE_EXTENSIONS`: the suffixes that make a string an image path;
- :func:`load_image`: an RGB PIL image from a path, bytes, an HF ``{"bytes": ...}`` cell or a PIL image;
- :func:`image_to_tensor`: the resize / centre-crop / [−1, 1] scaling the diffusion adapters train on;
- :func:`png_bytes`: a PIL image encoded as PNG (lossless), for parquet cells and inline HTML.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "load_image", "image_to_tensor", "png_bytes"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
"""Suffixes (case-insensitive) that make a string an image path; all are in the doctor's ``FILE_EXTENSIONS``."""


def load_image(value: Any, base_dir: Path | None = None) -> Image.Image:
    """An RGB PIL image from a path, raw bytes (e.g. a Pick-a-Pic ``jpg_0`` cell) or a PIL image.

    Args:
        value: A path (relative paths are relative to ``base_dir``), bytes, an undecoded HF datasets
            Image value ``{"bytes": ...}`` or a PIL image.
        base_dir: What relative paths are relative to; ``None`` = the current directory.

    Raises:
        ValueError: ``value`` is none of these.
        OSError: the file is missing or not an image (PIL's ``UnidentifiedImageError``).
    """
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value)).convert("RGB")
    if isinstance(value, dict) and "bytes" in value:  # HF datasets Image feature, undecoded
        return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
    if isinstance(value, str):
        path = Path(value)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return Image.open(path).convert("RGB")
    raise ValueError(f"cannot read an image from a {type(value).__name__}")


def image_to_tensor(image: Image.Image, resolution: int) -> tuple[torch.Tensor, tuple[int, int, int, int, int, int]]:
    """Resize the shorter side to ``resolution``, centre-crop, scale to [−1, 1]: ``(3, R, R)``.

    Also returns SDXL's micro-conditioning ``(orig_h, orig_w, crop_top, crop_left, R, R)``.
    """
    orig_w, orig_h = image.size
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (R, R, 3)
    return torch.from_numpy(array).permute(2, 0, 1), (orig_h, orig_w, top, left, resolution, resolution)


def png_bytes(image: Image.Image) -> bytes:
    """``image`` encoded as PNG (lossless; the mode is kept)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
