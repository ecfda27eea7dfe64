"""The normalised VLM record: string and chat prompts, answers, image counts, image-side rejections, images."""

from __future__ import annotations

import io

import pytest
from mm_align.vlm.vlm_records import count_image_placeholders, load_image, vlm_example
from PIL import Image

from mm_align.data.records import DataError, PreferencePair, UnpairedSample


def test_string_prompt_with_image_marks_becomes_chat_parts():
    rec = PreferencePair("Image1: <image>\nImage2: <image>\nIn Image2, what shape?", "a circle", "a square",
                         meta={"images": ["a.png", "b.png"]})
    ex = vlm_example(rec)
    assert ex.messages == [{"role": "user", "content": [
        {"type": "text", "text": "Image1:"}, {"type": "image"}, {"type": "text", "text": "Image2:"},
        {"type": "image"}, {"type": "text", "text": "In Image2, what shape?"}]}]
    assert (ex.chosen, ex.rejected, ex.images, ex.image_side) == ("a circle", "a square", ["a.png", "b.png"], False)


def test_trl_conversational_record():
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    rec = PreferencePair(prompt, [{"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
                         [{"role": "assistant", "content": "blue"}], meta={"images": ["x.png"]})
    ex = vlm_example(rec)
    assert count_image_placeholders(ex.messages) == 1
    assert (ex.chosen, ex.rejected) == ("red", "blue")


def test_placeholder_mismatch_names_the_row():
    rec = PreferencePair("<image> <image> which?", "a", "b", meta={"images": ["x.png"]}, origin="train.jsonl:7")
    with pytest.raises(DataError, match=r"train.jsonl:7: the prompt has 2 image placeholder\(s\) but the record has 1"
                       ):
        vlm_example(rec)


def test_image_side_rejection_needs_as_many_images():
    ok = PreferencePair("<image> what?", "red", "red", meta={"images": ["a.png"], "rejected_images": ["b.png"]})
    assert vlm_example(ok).image_side and vlm_example(ok).rejected_images == ["b.png"]
    bad = PreferencePair("<image> what?", "red", "red", meta={"images": ["a.png"], "rejected_images": []},
                         origin="p.jsonl:3")
    with pytest.raises(DataError, match="p.jsonl:3: .*'rejected_images' holds 0"):
        vlm_example(bad)


def test_unpaired_and_bad_answers():
    ex = vlm_example(UnpairedSample("<image> colour?", "red", True, meta={"images": ["a.png"]}))
    assert (ex.chosen, ex.rejected, ex.desirable) == ("red", None, True)
    with pytest.raises(DataError, match="assistant message"):
        vlm_example(PreferencePair("<image>?", [{"role": "user", "content": "x"}], "b", meta={"images": ["a"]}))
    with pytest.raises(DataError, match="'prompt' must be"):
        vlm_example(PreferencePair(3, "a", "b"))


def test_load_image_from_path_bytes_and_dict(tmp_path):
    Image.new("RGB", (4, 3), (255, 0, 0)).save(tmp_path / "r.png")
    buf = io.BytesIO()
    Image.new("L", (2, 2), 7).save(buf, format="PNG")
    assert load_image("r.png", tmp_path).size == (4, 3)
    assert load_image(buf.getvalue()).mode == "RGB"
    assert load_image({"bytes": None, "path": str(tmp_path / "r.png")}).getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(DataError, match="row 2: image file not found"):
        load_image("missing.png", tmp_path, origin="row 2")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="unreadable image"):
        load_image("bad.png", tmp_path)
