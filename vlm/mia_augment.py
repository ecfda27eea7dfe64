"""MIA-DPO's multi-image augmentation of single-image (image, question, answer) data (Liu et al. 2024, "MIA-DPO:
Multi-Image Augmented Direct Preference Optimization For Large Vision-Language Models", arXiv 2410.17637, §3.2 and
Fig. 4; ALGORITHMS.md §5).

A single-image item becomes a multi-image prompt by adding **unrelated distractor images**, drawn (seeded) from the
other items of the same source set (never the target item, nor an item with the same image), and a language cue that
names the target. The answer stays the item's ground truth. Three formats:

- ``sequence`` (2–5 images): the images one after the other, the target at position ``k``; prompt
  ``Image1: <image>\\nImage2: <image>\\n…ImageN: <image>\\nIn Image{k}, <question>``.
- ``grid`` (a collage of 2/3/4/6/9 tiles, laid out 1×2, 1×3, 2×2, 2×3, 3×3): every image fitted (aspect kept,
  letterboxed on white) into a ``tile_size`` square tile (the paper's 448 px; choose it for the model's input size),
  tiles separated by margins of ``40 · tile_size / 448`` px (the paper's 40 px at 448), each tile labelled ``ImageK``
  (row-major, from 1) in the margin band above it; the target is tile ``k``. ``square=True`` pads the collage to a
  square (centred, white), what a processor that centre-crops (LLaVA-1.5's CLIP processor) needs to see every tile
  (LLaVA-1.5's own code pads to square the same way). Prompt ``<image>\\nIn Image{k}, <question>``.
- ``pic_in_pic`` (one image built from two): a distractor resized to ``tile_size × tile_size`` as the background, the
  target fitted into ``0.7 · tile_size`` (aspect kept) and pasted at its centre. Prompt
  ``<image>\\nFor the image in the center, <question>``.

**Question rewriting**: the question's own ``<image>`` marks are removed (LLaVA-style data starts with
``<image>\\n``) and whitespace is collapsed; after the cue ("In Image2, ", "For the image in the center, ") its first
letter is lowercased, unless the first word is ``I`` or an acronym (two or more capitals, e.g. "RGB", "OCR").

**Seeds**: every draw (the number of images when it is not given, the format when several are allowed, the target's
position, the distractors) comes from ``random.Random(crc32(f"{seed}:{item.id}:{fmt}:{n}:{j}"))``: an augmentation
depends on the seed, the item and its index ``j`` only, never on the order items are processed in.

Each :class:`AugmentedSample` carries ``meta["augmentation"]``: ``format``, ``n_images`` (the number of SOURCE images
shown: the sequence length, the tile count, 2 for pic-in-pic), ``target`` (the target's 1-based position; ``"center"``
for pic-in-pic), ``source_id``, ``distractor_ids`` (in display order), and for the one-image formats the geometry the
attention rule reads: ``canvas_size`` ``[W, H]``, ``target_box`` ``[x0, y0, x1, y1]`` (px; the target tile or the
pasted target) and ``region_box`` (the region whose attention share counts as the target's: the target tile grown by
half a margin on every side, so the regions of a collage's tiles partition it up to the outer border; for pic-in-pic,
the pasted target).
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm_align.vlm.vlm_records import IMAGE_TOKEN, load_image

from mm_align.data import PreferencePair

__all__ = ["FORMATS", "IMAGE_COUNTS", "GRID_LAYOUTS", "PAPER_TILE_SIZE", "PAPER_MARGIN", "PIC_IN_PIC_SCALE",
           "SourceItem", "AugmentedSample", "rewrite_question", "augment", "augment_item", "sequence", "grid_collage",
           "pic_in_pic", "augmentation_seed"]

FORMATS: tuple[str, ...] = ("sequence", "grid", "pic_in_pic")
"""The three MIA-DPO formats."""
IMAGE_COUNTS: dict[str, tuple[int, ...]] = {"sequence": (2, 3, 4, 5), "grid": (2, 3, 4, 6, 9), "pic_in_pic": (2,)}
"""The numbers of source images each format takes (the paper's; pic-in-pic: the target and one background)."""
GRID_LAYOUTS: dict[int, tuple[int, int]] = {2: (1, 2), 3: (1, 3), 4: (2, 2), 6: (2, 3), 9: (3, 3)}
"""Tiles -> (rows, cols) of the collage."""
PAPER_TILE_SIZE = 448
"""The paper's tile size (px)."""
PAPER_MARGIN = 40
"""The paper's margin between tiles at :data:`PAPER_TILE_SIZE` (px); scaled with the tile."""
PIC_IN_PIC_SCALE = 0.7
"""The pasted target's size relative to the background (the paper's 0.7)."""

_WHITE = (255, 255, 255)
_ACRONYM = re.compile(r"^[A-Z][A-Z0-9]+\b")


@dataclass
class SourceItem:
    """One single-image item: an image, a question about it and its ground-truth answer.

    Args:
        image: the image (a path, bytes, a datasets image dict or a PIL image; see
            :func:`~mm_align.vlm.vlm_records.load_image`).
        question: the question (``<image>`` marks in it are dropped).
        answer: the ground-truth answer.
        id: a unique id within the source set (seeds and the distractor exclusion use it).
        base_dir: where a relative image path resolves.
    """

    image: Any
    question: str
    answer: str
    id: str
    base_dir: Path | None = field(default=None, compare=False)

    def load(self) -> Any:
        """The image as an RGB PIL image (:func:`~mm_align.vlm.vlm_records.load_image`)."""
        return load_image(self.image, self.base_dir, f"item {self.id!r}")


@dataclass
class AugmentedSample:
    """A multi-image prompt built from one item, in the record form of :mod:`mm_align.vlm.vlm_records`.

    Args:
        id: ``"<item id>:<format>:<n>:<j>"``.
        prompt: the prompt string with one ``<image>`` mark per image.
        images: the prompt's images (PIL, RGB), in mark order.
        answer: the ground truth (MIA-DPO's chosen answer).
        meta: ``{"augmentation": {...}}`` (module docstring).
    """

    id: str
    prompt: str
    images: list[Any]
    answer: str
    meta: dict[str, Any]

    @property
    def augmentation(self) -> dict[str, Any]:
        """``meta["augmentation"]``."""
        return self.meta["augmentation"]

    def to_pair(self, rejected: str, **meta: Any) -> PreferencePair:
        """The preference pair ``chosen = ground truth`` vs ``rejected``: prompt string with ``<image>`` marks,
        ``meta["images"]`` the PIL images, ``meta["augmentation"]`` and any extra ``meta`` keys."""
        return PreferencePair(prompt=self.prompt, chosen=self.answer, rejected=rejected, id=self.id,
                              meta={"images": list(self.images), **self.meta, **meta})


def augmentation_seed(seed: int, item_id: str, fmt: str, n: int | None, j: int) -> int:
    """The seed of one augmentation (module docstring): ``crc32(f"{seed}:{item_id}:{fmt}:{n}:{j}")``."""
    return zlib.crc32(f"{seed}:{item_id}:{fmt}:{n}:{j}".encode())


def rewrite_question(question: str) -> str:
    """The question as it follows a cue such as ``"In Image2, "``: ``<image>`` marks removed, whitespace collapsed,
    the first letter lowercased unless the first word is ``I`` or an acronym (module docstring).

    Raises:
        ValueError: the question is empty once its image marks are removed.
    """
    text = " ".join(question.replace(IMAGE_TOKEN, " ").split())
    if not text:
        raise ValueError(f"the question {question!r} is empty once its {IMAGE_TOKEN} marks are removed")
    first = text.split(" ", 1)[0]
    if first == "I" or first.startswith("I'") or _ACRONYM.match(text):
        return text
    return text[0].lower() + text[1:]


# ---- drawing -------------------------------------------------------------------------------------------------------
def _distractors(item: SourceItem, pool: Sequence[SourceItem], k: int, rng: random.Random) -> list[SourceItem]:
    """``k`` distinct pool items, none the target (same id, or the very same image value)."""
    def same_image(a: Any, b: Any) -> bool:
        if a is b:
            return True
        if isinstance(a, (str, Path)) and isinstance(b, (str, Path)):
            return Path(a) == Path(b)
        return isinstance(a, (bytes, bytearray)) and isinstance(b, (bytes, bytearray)) and a == b

    candidates = [p for p in pool if p.id != item.id and not same_image(p.image, item.image)]
    if len(candidates) < k:
        raise ValueError(f"item {item.id!r}: {k} distractor(s) needed but the pool holds only {len(candidates)} other "
                         "item(s) with a different image")
    return rng.sample(candidates, k)


def _fit(image: Any, box: tuple[int, int], background: tuple[int, int, int] = _WHITE) -> Any:
    """``image`` scaled to fit ``box`` (aspect kept), centred on a ``background`` canvas of size ``box``."""
    from PIL import Image

    w, h = image.size
    scale = min(box[0] / w, box[1] / h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    canvas = Image.new("RGB", box, background)
    canvas.paste(image.resize(size, Image.Resampling.BICUBIC), ((box[0] - size[0]) // 2, (box[1] - size[1]) // 2))
    return canvas


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=max(1, size))
    except (OSError, TypeError, ValueError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _check(fmt: str, n: int, tile_size: int) -> None:
    if fmt not in IMAGE_COUNTS:
        raise ValueError(f"unknown MIA-DPO format {fmt!r}; valid: {', '.join(FORMATS)}")
    if n not in IMAGE_COUNTS[fmt]:
        raise ValueError(f"format {fmt!r} takes {', '.join(map(str, IMAGE_COUNTS[fmt]))} images, got {n}")
    if tile_size < 8:
        raise ValueError(f"tile_size must be at least 8 px, got {tile_size}")


def _meta(fmt: str, n: int, target: int | str, item: SourceItem, distractors: list[SourceItem],
          **geometry: Any) -> dict[str, Any]:
    return {"augmentation": {"format": fmt, "n_images": n, "target": target, "source_id": item.id,
                             "distractor_ids": [d.id for d in distractors], **geometry}}


# ---- the three formats ---------------------------------------------------------------------------------------------
def sequence(item: SourceItem, distractors: Sequence[SourceItem], k: int, sample_id: str) -> AugmentedSample:
    """The sequence format: ``len(distractors) + 1`` images, the target at 1-based position ``k`` (module docstring).

    Raises:
        ValueError: ``k`` out of range.
    """
    n = len(distractors) + 1
    if not 1 <= k <= n:
        raise ValueError(f"target position {k} is out of range for {n} images")
    order = list(distractors[:k - 1]) + [item] + list(distractors[k - 1:])
    marks = "\n".join(f"Image{i}: {IMAGE_TOKEN}" for i in range(1, n + 1))
    prompt = f"{marks}\nIn Image{k}, {rewrite_question(item.question)}"
    return AugmentedSample(sample_id, prompt, [x.load() for x in order], item.answer,
                           _meta("sequence", n, k, item, [x for x in order if x is not item]))


def grid_collage(item: SourceItem, distractors: Sequence[SourceItem], k: int, sample_id: str,
                 tile_size: int = PAPER_TILE_SIZE, square: bool = False) -> AugmentedSample:
    """The grid-collage format: ``len(distractors) + 1`` labelled tiles, the target in tile ``k`` (module docstring).

    Args:
        item: the target item.
        distractors: the other tiles' items, in the order they fill the remaining tiles.
        k: the target tile (1-based, row-major).
        sample_id: the sample's id.
        tile_size: the side of a tile (px); margins are ``round(40 · tile_size / 448)`` px (at least 1).
        square: pad the collage to a square (for processors that centre-crop).

    Raises:
        ValueError: a tile count without a layout, or ``k`` out of range.
    """
    from PIL import Image, ImageDraw

    n = len(distractors) + 1
    if n not in GRID_LAYOUTS:
        raise ValueError(f"a grid collage takes {', '.join(map(str, GRID_LAYOUTS))} tiles, got {n}")
    if not 1 <= k <= n:
        raise ValueError(f"target tile {k} is out of range for {n} tiles")
    rows, cols = GRID_LAYOUTS[n]
    margin = max(1, round(PAPER_MARGIN * tile_size / PAPER_TILE_SIZE))
    width, height = cols * tile_size + (cols + 1) * margin, rows * tile_size + (rows + 1) * margin
    side = max(width, height) if square else 0
    canvas_w, canvas_h = (side, side) if square else (width, height)
    ox, oy = (canvas_w - width) // 2, (canvas_h - height) // 2
    canvas = Image.new("RGB", (canvas_w, canvas_h), _WHITE)
    draw = ImageDraw.Draw(canvas)
    draw.fontmode = "1"  # crisp black labels, readable even at small tile sizes
    font = _font(round(0.7 * margin))
    order = list(distractors[:k - 1]) + [item] + list(distractors[k - 1:])
    boxes: list[list[int]] = []
    for t, source in enumerate(order):
        r, c = divmod(t, cols)
        x0, y0 = ox + margin + c * (tile_size + margin), oy + margin + r * (tile_size + margin)
        canvas.paste(_fit(source.load(), (tile_size, tile_size)), (x0, y0))
        boxes.append([x0, y0, x0 + tile_size, y0 + tile_size])
        # the label in the margin band above the tile, its top-left corner at the tile's left edge
        draw.text((x0, y0 - margin), f"Image{t + 1}", fill=(0, 0, 0), font=font)
    half = margin / 2
    tx0, ty0, tx1, ty1 = boxes[k - 1]
    region = [max(0.0, tx0 - half), max(0.0, ty0 - half), min(float(canvas_w), tx1 + half),
              min(float(canvas_h), ty1 + half)]
    prompt = f"{IMAGE_TOKEN}\nIn Image{k}, {rewrite_question(item.question)}"
    meta = _meta("grid", n, k, item, [x for x in order if x is not item], grid=[rows, cols], tile_size=tile_size,
                 margin=margin, canvas_size=[canvas_w, canvas_h], tile_boxes=boxes, target_box=boxes[k - 1],
                 region_box=region)
    return AugmentedSample(sample_id, prompt, [canvas], item.answer, meta)


def pic_in_pic(item: SourceItem, background: SourceItem, sample_id: str, tile_size: int = PAPER_TILE_SIZE,
               scale: float = PIC_IN_PIC_SCALE) -> AugmentedSample:
    """The pic-in-pic format: ``background`` resized to ``tile_size²``, the target fitted into ``scale · tile_size``
    and pasted at its centre (module docstring)."""
    if not 0 < scale < 1:
        raise ValueError(f"the pasted target's scale must be in (0, 1), got {scale}")
    canvas = background.load().resize((tile_size, tile_size))
    inner = max(1, round(scale * tile_size))
    target = item.load()
    w, h = target.size
    fit = min(inner / w, inner / h)
    size = (max(1, round(w * fit)), max(1, round(h * fit)))
    x0, y0 = (tile_size - size[0]) // 2, (tile_size - size[1]) // 2
    from PIL import Image

    canvas.paste(target.resize(size, Image.Resampling.BICUBIC), (x0, y0))
    box = [x0, y0, x0 + size[0], y0 + size[1]]
    prompt = f"{IMAGE_TOKEN}\nFor the image in the center, {rewrite_question(item.question)}"
    meta = _meta("pic_in_pic", 2, "center", item, [background], canvas_size=[tile_size, tile_size], target_box=box,
                 region_box=[float(v) for v in box], scale=scale)
    return AugmentedSample(sample_id, prompt, [canvas], item.answer, meta)


# ---- the public entry points ---------------------------------------------------------------------------------------
def augment(item: SourceItem, pool: Sequence[SourceItem], fmt: str, n: int | None = None, seed: int = 0,
            tile_size: int = PAPER_TILE_SIZE, j: int = 0, square: bool = False) -> AugmentedSample:
    """One MIA-DPO augmentation of ``item`` with distractors from ``pool`` (module docstring).

    Args:
        item: the target item.
        pool: the source set the distractors are drawn from (it may contain ``item``; it is never drawn).
        fmt: ``"sequence"``, ``"grid"`` or ``"pic_in_pic"``.
        n: the number of source images (:data:`IMAGE_COUNTS`); None draws one (seeded).
        seed: the base seed (:func:`augmentation_seed`).
        tile_size: the grid tile / pic-in-pic canvas side (px), the paper's 448 by default.
        j: the augmentation's index for this item (several augmentations of one item differ by it).
        square: pad grid collages to a square (for centre-cropping processors).

    Returns:
        An :class:`AugmentedSample` with id ``"<item id>:<fmt>:<n>:<j>"``.

    Raises:
        ValueError: an unknown format, an image count the format does not take, a tile size under 8 px, too few
            distractors in the pool, or an empty question.
    """
    if fmt not in IMAGE_COUNTS:
        raise ValueError(f"unknown MIA-DPO format {fmt!r}; valid: {', '.join(FORMATS)}")
    if n is None:
        n = random.Random(augmentation_seed(seed, item.id, fmt, None, j)).choice(IMAGE_COUNTS[fmt])
    _check(fmt, n, tile_size)
    rng = random.Random(augmentation_seed(seed, item.id, fmt, n, j))
    sample_id = f"{item.id}:{fmt}:{n}:{j}"
    if fmt == "pic_in_pic":
        return pic_in_pic(item, _distractors(item, pool, 1, rng)[0], sample_id, tile_size)
    k = rng.randint(1, n)
    distractors = _distractors(item, pool, n - 1, rng)
    if fmt == "sequence":
        return sequence(item, distractors, k, sample_id)
    return grid_collage(item, distractors, k, sample_id, tile_size, square)


def augment_item(item: SourceItem, pool: Sequence[SourceItem], formats: Sequence[str] = FORMATS, n_per_item: int = 1,
                 seed: int = 0, tile_size: int = PAPER_TILE_SIZE, square: bool = False) -> list[AugmentedSample]:
    """``n_per_item`` augmentations of ``item``: augmentation ``j`` takes format ``formats[j % len(formats)]`` when
    ``n_per_item`` is a multiple of ``len(formats)``, else one drawn (seeded) from ``formats``; its image count is
    drawn (seeded) from the format's :data:`IMAGE_COUNTS`.

    Raises:
        ValueError: no or unknown formats, ``n_per_item < 1``, or what :func:`augment` raises.
    """
    formats = list(formats)
    if not formats or any(f not in IMAGE_COUNTS for f in formats):
        raise ValueError(f"formats must be a non-empty subset of {', '.join(FORMATS)}, got {formats}")
    if n_per_item < 1:
        raise ValueError(f"n_per_item must be >= 1, got {n_per_item}")
    out = []
    for j in range(n_per_item):
        if n_per_item % len(formats) == 0:
            fmt = formats[j % len(formats)]
        else:
            fmt = random.Random(augmentation_seed(seed, item.id, "format", None, j)).choice(formats)
        out.append(augment(item, pool, fmt, None, seed, tile_size, j, square))
    return out
