"""MIA-DPO's augmentations (mm_align.vlm.mia_augment): sequence, grid collage and pic-in-pic.

Every source item is a solid image of its own colour, so the item shown in an image, a tile or the pasted centre is
read back from a pixel: the target is checked to be where the prompt says, and the distractors never to be it.
"""

from __future__ import annotations

import io

import pytest
from mm_align.vlm.mia_augment import (
    FORMATS,
    GRID_LAYOUTS,
    IMAGE_COUNTS,
    SourceItem,
    augment,
    augment_item,
    grid_collage,
    rewrite_question,
)
from mm_align.vlm.vlm_records import count_image_placeholders, prompt_messages, vlm_example
from PIL import Image


def _colour(i: int) -> tuple[int, int, int]:
    return (20 + 23 * i % 230, 200 - 17 * i % 190, 60 + 41 * i % 190)


def _pool(n: int = 12, tmp_path=None) -> list[SourceItem]:
    items = []
    for i in range(n):
        im = Image.new("RGB", (40 + 3 * i, 30 + 2 * i), _colour(i))  # sizes differ: letterboxing is exercised
        image = im
        if tmp_path is not None:
            image = tmp_path / f"{i}.png"
            im.save(image)
        items.append(SourceItem(image, "<image>\nWhat colour is the shape?", f"answer {i}", f"item{i}"))
    return items


def _who(pixel: tuple[int, int, int], n: int = 12) -> int:
    """The item whose colour ``pixel`` is."""
    return next(i for i in range(n) if max(abs(a - b) for a, b in zip(pixel, _colour(i))) <= 2)


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_rewrite_question():
    assert rewrite_question("<image>\nWhat colour is the shape?") == "what colour is the shape?"
    assert rewrite_question("  Is   there a  circle? ") == "is there a circle?"
    assert rewrite_question("I see a shape; which one?") == "I see a shape; which one?"
    assert rewrite_question("RGB value of the shape?") == "RGB value of the shape?"
    assert rewrite_question("Are the shapes red?<image>") == "are the shapes red?"
    with pytest.raises(ValueError, match="empty"):
        rewrite_question("<image>\n ")


@pytest.mark.parametrize("n", IMAGE_COUNTS["sequence"])
def test_sequence(n):
    pool = _pool()
    target = pool[3]
    s = augment(target, pool, "sequence", n, seed=7)
    aug = s.augmentation
    k = aug["target"]
    marks = "\n".join(f"Image{i}: <image>" for i in range(1, n + 1))
    assert s.prompt == f"{marks}\nIn Image{k}, what colour is the shape?"
    assert len(s.images) == n == aug["n_images"] and 1 <= k <= n
    shown = [_who(im.getpixel((im.width // 2, im.height // 2))) for im in s.images]
    assert shown[k - 1] == 3  # the target is where the prompt says
    assert shown.count(3) == 1 and len(set(shown)) == n  # distractors distinct, never the target
    assert [f"item{i}" for i in shown if i != 3] == aug["distractor_ids"]
    assert s.images[k - 1].size == (49, 36)  # sequence images keep their own size
    assert s.answer == "answer 3" and aug["format"] == "sequence" and aug["source_id"] == "item3"
    pair = s.to_pair("answer 5")
    ex = vlm_example(pair)  # the record contract: as many <image> marks as images
    assert len(ex.images) == count_image_placeholders(ex.messages) == n
    assert ex.chosen == "answer 3" and ex.rejected == "answer 5" and pair.meta["augmentation"] == aug


@pytest.mark.parametrize("n", IMAGE_COUNTS["grid"])
def test_grid_collage(n):
    pool = _pool()
    tile = 64
    s = augment(pool[5], pool, "grid", n, seed=1, tile_size=tile)
    aug = s.augmentation
    rows, cols = GRID_LAYOUTS[n]
    margin = round(40 * tile / 448)
    assert aug["grid"] == [rows, cols] and aug["margin"] == margin == 6
    assert s.prompt == f"<image>\nIn Image{aug['target']}, what colour is the shape?"
    assert len(s.images) == 1 and count_image_placeholders(prompt_messages(s.prompt)) == 1
    canvas = s.images[0]
    assert canvas.size == (cols * tile + (cols + 1) * margin, rows * tile + (rows + 1) * margin)
    assert aug["canvas_size"] == list(canvas.size) and len(aug["tile_boxes"]) == n
    shown = []
    for t, (x0, y0, x1, y1) in enumerate(aug["tile_boxes"]):
        assert (x1 - x0, y1 - y0) == (tile, tile)
        assert (x0, y0) == (margin + (t % cols) * (tile + margin), margin + (t // cols) * (tile + margin))
        shown.append(_who(canvas.getpixel(((x0 + x1) // 2, (y0 + y1) // 2))))
        # letterboxed: the top-left pixel of a wider-than-tall source is the white background
        assert canvas.getpixel((x0, y0)) == (255, 255, 255)
        # the label ImageK is drawn in the margin band above the tile: dark pixels there
        band = canvas.crop((x0, y0 - margin, x1, y0))
        assert min(lo for lo, _ in band.getextrema()) < 100, f"no label above tile {t + 1}"
    assert shown[aug["target"] - 1] == 5 and shown.count(5) == 1 and len(set(shown)) == n
    assert aug["target_box"] == aug["tile_boxes"][aug["target"] - 1]
    x0, y0, x1, y1 = aug["region_box"]
    assert (x1 - x0, y1 - y0) == (tile + margin, tile + margin)  # the tile grown by half a margin on each side


def test_grid_labels_read_back_and_margins_scale():
    """The labels differ per tile (the drawn text differs), margins follow the tile size, square pads centred."""
    pool = _pool()
    s = grid_collage(pool[0], pool[1:4], 2, "x", tile_size=448)
    aug = s.augmentation
    assert aug["margin"] == 40
    bands = [s.images[0].crop((x0, y0 - 40, x0 + 120, y0)).tobytes() for x0, y0, _, _ in aug["tile_boxes"]]
    assert len(set(bands)) == 4  # Image1..Image4 are different drawings
    sq = grid_collage(pool[0], pool[1:3], 2, "x", tile_size=64, square=True)  # 1×3: 216 × 76 -> 216 × 216
    w, h = sq.images[0].size
    assert w == h == 3 * 64 + 4 * 6
    x0, y0, x1, y1 = sq.augmentation["tile_boxes"][1]
    assert _who(sq.images[0].getpixel(((x0 + x1) // 2, (y0 + y1) // 2))) == 0 and y0 == (216 - 76) // 2 + 6
    with pytest.raises(ValueError, match="tiles"):
        grid_collage(pool[0], pool[1:5], 1, "x")  # 5 tiles: no layout


def test_pic_in_pic():
    pool = _pool()
    s = augment(pool[2], pool, "pic_in_pic", seed=3, tile_size=100)
    aug = s.augmentation
    assert s.prompt == "<image>\nFor the image in the center, what colour is the shape?"
    assert aug["n_images"] == 2 and aug["target"] == "center" and len(s.images) == 1
    canvas = s.images[0]
    assert canvas.size == (100, 100)
    x0, y0, x1, y1 = aug["target_box"]
    assert max(x1 - x0, y1 - y0) == 70  # 0.7 of the canvas, aspect kept (46 × 34 source)
    assert abs((x0 + x1) / 2 - 50) <= 1 and abs((y0 + y1) / 2 - 50) <= 1  # centred
    assert _who(canvas.getpixel((50, 50))) == 2  # the target at the centre
    background = _who(canvas.getpixel((2, 2)))
    assert background != 2 and aug["distractor_ids"] == [f"item{background}"]
    assert aug["region_box"] == [float(v) for v in aug["target_box"]]


@pytest.mark.parametrize("fmt", FORMATS)
def test_seeded_and_deterministic(fmt, tmp_path):
    pool = _pool(tmp_path=tmp_path)  # from files, as a user's data
    a = augment(pool[0], pool, fmt, seed=11, tile_size=48, j=2)
    b = augment(pool[0], list(reversed(pool))[::-1], fmt, seed=11, tile_size=48, j=2)
    assert a.id == b.id and a.prompt == b.prompt and a.meta == b.meta
    assert [_png(x) for x in a.images] == [_png(x) for x in b.images]
    draws = {(augment(pool[0], pool, fmt, seed=s, tile_size=48).prompt,
              tuple(augment(pool[0], pool, fmt, seed=s, tile_size=48).augmentation["distractor_ids"]))
             for s in range(8)}
    assert len(draws) > 1  # the seed matters
    # several augmentations of one item differ by j, not by the order items are processed in
    assert augment(pool[4], pool, fmt, seed=11, tile_size=48, j=0).meta == \
        augment_item(pool[4], pool, [fmt], 3, seed=11, tile_size=48)[0].meta


def test_distractors_are_never_the_target(tmp_path):
    pool = _pool(6, tmp_path)
    twin = SourceItem(pool[0].image, "What is it?", "x", "twin")  # another item with the target's very image
    for seed in range(30):
        s = augment(pool[0], [*pool, twin], "sequence", 5, seed=seed)
        assert "item0" not in s.augmentation["distractor_ids"] and "twin" not in s.augmentation["distractor_ids"]
    with pytest.raises(ValueError, match="5 distractor"):
        augment(pool[0], [*pool[:5], twin], "grid", 6)
    with pytest.raises(ValueError, match="unknown MIA-DPO format"):
        augment(pool[0], pool, "collage")
    with pytest.raises(ValueError, match="takes 2, 3, 4, 6, 9"):
        augment(pool[0], pool, "grid", 5)


def test_augment_item_formats():
    pool = _pool()
    samples = augment_item(pool[1], pool, FORMATS, 6, seed=0, tile_size=32)
    assert [s.augmentation["format"] for s in samples] == list(FORMATS) * 2
    assert len({s.id for s in samples}) == 6
    assert all(s.augmentation["n_images"] in IMAGE_COUNTS[s.augmentation["format"]] for s in samples)
    mixed = augment_item(pool[1], pool, FORMATS, 4, seed=0, tile_size=32)  # 4 is no multiple of 3: drawn
    assert all(s.augmentation["format"] in FORMATS for s in mixed)
    with pytest.raises(ValueError, match="non-empty subset"):
        augment_item(pool[1], pool, ["sequence", "mosaic"])
