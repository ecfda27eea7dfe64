"""``mm-align doctor --modality image`` on 0-byte images: said once, as an empty file."""

from __future__ import annotations

import json

from mm_align.image.image_checks import image_doctor
from PIL import Image


def test_a_0_byte_image_is_one_empty_file_finding(tmp_path):
    Image.new("RGB", (96, 96), "red").save(tmp_path / "ok.png")
    (tmp_path / "empty.png").write_bytes(b"")
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "empty.png", "rejected": "ok.png"}) + "\n", encoding="utf-8")
    report = image_doctor(path)
    assert {f.check: f.examples for f in report.findings} == {
        "unreadable_file": ["data.jsonl:1: unreadable file empty.png: empty file (0 bytes)"],
    }
    assert report.ok is False and "empty file (0 bytes)" in report.table()
