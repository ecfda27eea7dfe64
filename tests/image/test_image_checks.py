"""Image doctor checks: a truncated JPEG, a tiny PNG and an extreme aspect ratio are flagged under their
check names with their rows; good, text, missing and odd-mode images are not (double) reported."""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import numpy as np
import pytest
from mm_align.image.image_checks import (
    IMAGE_CHECKS,
    MAX_ASPECT,
    MIN_SIDE,
    corrupt_image,
    image_checks,
    image_values,
    odd_size_image,
    tiny_image,
)
from PIL import Image

from mm_align.cli import main
from mm_align.data import PreferencePair, UnpairedSample, doctor


def _image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).convert(mode)


def _bytes(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _save(path: Path, im: Image.Image, fmt: str = "PNG") -> str:
    path.write_bytes(_bytes(im, fmt))
    return path.name


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def bad_dataset(tmp_path: Path) -> Path:
    good_a = _save(tmp_path / "good_a.png", _image(96, 96, 1))
    good_b = _save(tmp_path / "good_b.jpg", _image(96, 96, 2), "JPEG")
    truncated = _bytes(_image(96, 96, 3), "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    tiny = _save(tmp_path / "tiny.png", _image(16, 16, 4))
    wide = _save(tmp_path / "wide.png", _image(512, 40, 5))
    return _jsonl(tmp_path / "data.jsonl", [
        {"prompt": "good", "chosen": good_a, "rejected": good_b},            # 0 fine
        {"prompt": "truncated", "chosen": "truncated.jpg", "rejected": good_a},  # 1 corrupt
        {"prompt": "tiny", "chosen": good_a, "rejected": tiny},              # 2 tiny
        {"prompt": "wide", "chosen": wide, "rejected": good_b},              # 3 odd size (and tiny: 40 < 64)
        {"prompt": "text", "chosen": "a red cat", "rejected": "a blue dog"},  # 4 text: not images, ignored
        {"prompt": "gone", "chosen": "missing.png", "rejected": good_a},     # 5 missing: core check only
    ])


def _examples(report) -> dict[str, list[str]]:
    return {f.check: f.examples for f in report.findings}


def test_doctor_flags_exactly_the_bad_images_by_check_and_row(bad_dataset):
    report = doctor(bad_dataset, checks=IMAGE_CHECKS)
    found = _examples(report)
    assert set(found) == {"corrupt_image", "tiny_image", "odd_size_image", "missing_file"}
    assert len(found["corrupt_image"]) == 1
    assert found["corrupt_image"][0].startswith("data.jsonl:2: chosen: truncated.jpg: ")
    assert "truncated" in found["corrupt_image"][0]
    assert found["tiny_image"] == [
        "data.jsonl:3: rejected: tiny.png is 16x16 px (shorter side 16 < 64)",
        "data.jsonl:4: chosen: wide.png is 512x40 px (shorter side 40 < 64)",
    ]
    assert found["odd_size_image"] == ["data.jsonl:4: chosen: wide.png is 512x40 px (aspect 12.8 > 4)"]
    assert found["missing_file"] == ["data.jsonl:6: missing file missing.png"]  # reported once, by the core
    assert {f.check: f.severity for f in report.findings} == dict.fromkeys(found, "error")
    assert report.rows == 6 and report.valid == 2  # the good row and the text row
    assert not report.ok


def test_thresholds_are_configurable(bad_dataset):
    report = doctor(bad_dataset, checks=image_checks(min_side=8, max_aspect=20))
    assert {f.check for f in report.findings} == {"corrupt_image", "missing_file"}
    assert [getattr(c, "func", c).__name__ for c in IMAGE_CHECKS] == ["corrupt_image", "tiny_image",
                                                                        "odd_size_image"]
    assert (MIN_SIDE, MAX_ASPECT) == (64, 4.0)
    with pytest.raises(ValueError, match="min_side"):
        image_checks(min_side=0)
    with pytest.raises(ValueError, match="max_aspect"):
        image_checks(max_aspect=0.5)


def test_cli_doctor_exit_codes(tmp_path, bad_dataset, capsys):
    assert main(["doctor", str(bad_dataset), "--modality", "image"]) == 1
    out = capsys.readouterr().out
    assert "corrupt_image" in out and "tiny_image" in out and "odd_size_image" in out
    good = tmp_path / "good"
    good.mkdir()
    _save(good / "w.png", _image(96, 96, 7))
    _save(good / "l.png", _image(128, 96, 8, mode="P"))  # palette mode and sides not multiples of 8 are fine
    _save(good / "g.png", _image(100, 90, 9, mode="L"))
    _jsonl(good / "data.jsonl", [{"prompt": "p", "chosen": "w.png", "rejected": "l.png"},
                                 {"prompt": "q", "chosen": "g.png", "rejected": "w.png"}])
    assert main(["doctor", str(good / "data.jsonl"), "--modality", "image"]) == 0
    assert "(no problems found)" in capsys.readouterr().out


def test_bytes_hf_dicts_lists_and_unpaired(tmp_path):
    good, tiny = _bytes(_image(80, 80, 1), "JPEG"), _bytes(_image(10, 70, 2))
    cut = good[:200]
    pair = PreferencePair("p", {"bytes": cut, "path": None}, [good, tiny, "not an image"])
    assert [f for f, _ in image_values(pair)] == ["chosen", "rejected[0]", "rejected[1]"]
    assert corrupt_image(pair, tmp_path)[0].startswith("chosen: 200 image bytes: ")
    assert tiny_image(pair, tmp_path) == [f"rejected[1]: {len(tiny)} image bytes is 10x70 px (shorter side 10 < 64)"]
    assert odd_size_image(pair, tmp_path) == [f"rejected[1]: {len(tiny)} image bytes is 10x70 px (aspect 7 > 4)"]
    # an HF dict with no bytes points at a file; unpaired records check the completion
    _save(tmp_path / "c.webp", _image(300, 60, 3), "WEBP")
    sample = UnpairedSample("p", {"bytes": None, "path": "c.webp"}, True)
    assert odd_size_image(sample, tmp_path) == ["completion: c.webp is 300x60 px (aspect 5 > 4)"]
    assert functools.partial(tiny_image, min_side=50)(sample, tmp_path) == []
    # a directory named like an image, a URL and numbers are left to the core checks / ignored
    (tmp_path / "dir.png").mkdir()
    other = PreferencePair("p", "dir.png", "https://example.com/x.png")
    assert image_values(other) == [("chosen", "dir.png")]
    assert all(check(other, tmp_path) == [] for check in IMAGE_CHECKS)
    assert image_values(PreferencePair("p", 1.0, None)) == []


def test_a_rewritten_file_is_decoded_again(tmp_path):
    _save(tmp_path / "x.png", _image(16, 16))
    pair = PreferencePair("p", "x.png", "x.png")
    assert len(tiny_image(pair, tmp_path)) == 2
    _save(tmp_path / "x.png", _image(96, 64))
    assert tiny_image(pair, tmp_path) == []


def test_image_doctor_reads_pickapic_and_pair_folders(tmp_path, capsys):
    """`mm-align doctor --modality image` on a Pick-a-Pic parquet and on pair folders, not only jsonl."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mm_align.cli import main

    good, tiny = _bytes(_image(96, 96, 1)), _bytes(_image(16, 16, 2))
    truncated = _bytes(_image(96, 96, 3), "JPEG")
    table = pa.table({"caption": ["a cat", "a dog", "a fox"], "jpg_0": [good, tiny, truncated[:200]],
                      "jpg_1": [_bytes(_image(96, 96, 4))] * 3, "label_0": [1.0, 0.0, 1.0],
                      "label_1": [0.0, 1.0, 0.0]})
    pq.write_table(table, tmp_path / "pap.parquet")
    assert main(["doctor", str(tmp_path / "pap.parquet"), "--modality", "image"]) == 1
    out = capsys.readouterr().out
    assert "tiny_image" in out and "corrupt" in out and "3 rows, 1 valid" in out
    folders = tmp_path / "pairs"
    for i, (c, r) in enumerate([(good, _bytes(_image(96, 96, 5))), (tiny, good)]):
        (folders / str(i)).mkdir(parents=True)
        (folders / str(i) / "prompt.txt").write_text(f"prompt {i}\n")
        (folders / str(i) / "chosen.png").write_bytes(c)
        (folders / str(i) / "rejected.png").write_bytes(r)
    assert main(["doctor", str(folders), "--modality", "image"]) == 1
    out = capsys.readouterr().out
    assert "tiny_image" in out and "2 rows, 1 valid" in out
