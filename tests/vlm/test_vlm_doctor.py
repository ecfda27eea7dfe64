"""``mm-align doctor --modality vlm`` (mm_align.vlm.vlm_checks.vlm_doctor): each problem reported with its row (and
file), on TRL jsonl and parquet, LLaMA-Factory directories and the normalised jsonl."""

from __future__ import annotations

import json

import pytest
from mm_align.vlm.vlm_checks import vlm_doctor

from .test_vlm_formats import (
    assistant,
    llamafactory_dir,
    png_bytes,
    trl_conversational_parquet,
    trl_string_jsonl,
    user,
    write_image,
    write_jsonl,
)


def _finding(report, check):
    found = [f for f in report.findings if f.check == check]
    assert found, f"no {check} finding in {[f.check for f in report.findings]}"
    return found[0]


def test_clean_data_is_ok(tmp_path):
    for path in (trl_string_jsonl(tmp_path / "a"), trl_conversational_parquet(tmp_path),
                 llamafactory_dir(tmp_path / "lf")):
        report = vlm_doctor(path)
        assert report.ok and report.findings == [] and report.rows == report.valid == 2, report.table()


def test_every_problem_is_named_with_its_row_and_file(tmp_path):
    write_image(tmp_path / "ok.png", "red")
    write_image(tmp_path / "other.png", "blue")
    (tmp_path / "broken.png").write_bytes(png_bytes("red")[:40])  # a truncated PNG
    (tmp_path / "text.png").write_text("not an image")
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"images": ["ok.png"], "prompt": "<image>Colour?", "chosen": "red", "rejected": "blue"},           # 1 fine
        {"images": ["ok.png"], "prompt": "<image><image>Which?", "chosen": "a", "rejected": "b"},          # 2
        {"images": ["gone.png"], "prompt": "<image>Colour?", "chosen": "red", "rejected": "blue"},        # 3
        {"images": ["broken.png"], "prompt": "<image>Colour?", "chosen": "red", "rejected": "blue"},      # 4
        {"images": ["ok.png", "text.png"], "prompt": "<image><image>Q", "chosen": "a", "rejected": "b"},  # 5
        {"images": ["ok.png"], "prompt": user("<image>", "Q"), "chosen": assistant(" "), "rejected": "b"},  # 6
        {"images": ["ok.png"], "prompt": "<image>Q", "chosen": "same", "rejected": "same"},                 # 7 tie
        {"images": ["ok.png"], "rejected_images": ["other.png"], "prompt": "<image>Colour?",
         "chosen": "red", "rejected": "red"},                                                                # 8 fine
    ])
    report = vlm_doctor(path)
    assert not report.ok and report.rows == 8 and report.valid == 2
    assert _finding(report, "image_count_mismatch").examples == [
        "d.jsonl:2: image count mismatch: the prompt has 2 image placeholder(s) but 'images' holds 1 image(s)"]
    assert _finding(report, "missing_image").examples == ["d.jsonl:3: missing image: images[0]: gone.png"]
    unreadable = _finding(report, "unreadable_image")
    assert unreadable.severity == "error" and unreadable.count == 2
    assert unreadable.examples[0].startswith(f"d.jsonl:4: images[0]: {tmp_path / 'broken.png'}: ")
    assert unreadable.examples[1].startswith(f"d.jsonl:5: images[1]: {tmp_path / 'text.png'}: "
                                             "UnidentifiedImageError")
    assert _finding(report, "empty_chosen").examples == ["d.jsonl:6: empty chosen"]
    tie = _finding(report, "tie")
    assert (tie.severity, tie.examples) == ("warning", ["d.jsonl:7: tie: chosen and rejected are identical"])
    # the image-side rejection (row 8) has identical answers on purpose: not a tie, no finding
    assert all("d.jsonl:8" not in e for f in report.findings for e in f.examples)
    assert "ERRORS FOUND" in report.table()


def test_duplicates_count_the_images(tmp_path):
    """The same question with the same answers about another image is not a duplicate; the same row twice is."""
    write_image(tmp_path / "a.png", "red")
    write_image(tmp_path / "b.png", "blue")
    row = {"prompt": "<image>Is there a shape?", "chosen": "yes", "rejected": "no"}
    path = write_jsonl(tmp_path / "d.jsonl", [{**row, "images": ["a.png"]}, {**row, "images": ["b.png"]},
                                              {**row, "images": ["a.png"]}])
    report = vlm_doctor(path)
    assert report.ok
    dup = _finding(report, "duplicate")
    assert (dup.severity, dup.count, dup.examples) == ("warning", 1, ["d.jsonl:3: same as d.jsonl:1"])


def test_large_images_are_a_warning(tmp_path):
    write_image(tmp_path / "big.png", "white", (64, 32))
    write_image(tmp_path / "small.png", "white", (8, 8))
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"images": ["big.png", "small.png"], "prompt": "<image><image>Q", "chosen": "a", "rejected": "b"}])
    report = vlm_doctor(path, large_pixels=1000)
    assert report.ok
    large = _finding(report, "large_image")
    assert large.severity == "warning"
    assert large.examples == [f"d.jsonl:1: images[0]: {tmp_path / 'big.png'} is 64x32 px (2048 pixels > 1000)"]
    assert vlm_doctor(path).findings == []  # the default threshold (4096 x 4096 pixels)


def test_parquet_with_corrupt_image_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"images": [{"bytes": png_bytes("red"), "path": None}], "prompt": user("<image>", "Q"),
             "chosen": assistant("a"), "rejected": assistant("b")},
            {"images": [{"bytes": b"\x89PNG garbage", "path": None}], "prompt": user("<image>", "Q"),
             "chosen": assistant("a"), "rejected": assistant("c")}]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    report = vlm_doctor(path)
    assert [f.check for f in report.findings] == ["unreadable_image"]
    assert report.findings[0].examples[0].startswith("d.parquet: row 1 (0-based): images[0]: 12 image bytes: ")


def test_llamafactory_directory_is_detected_and_rows_named_by_line(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": "<image>Colour?"}],
             "chosen": {"from": "gpt", "value": "red"}, "rejected": {"from": "gpt", "value": "blue"},
             "images": ["mllm_data/1.png", "mllm_data/2.png"]},
            {"conversations": [{"from": "human", "value": "<image>Colour?"}],
             "chosen": {"from": "gpt", "value": ""}, "rejected": {"from": "gpt", "value": "blue"},
             "images": ["mllm_data/1.png"]}]
    root = llamafactory_dir(tmp_path / "lf", rows)
    report = vlm_doctor(root)
    starts = [i for i, line in enumerate((root / "vlm_dpo.json").read_text().splitlines(), 1) if line == "  {"]
    assert _finding(report, "image_count_mismatch").examples == [
        f"vlm_dpo.json:{starts[0]}: image count mismatch: the prompt has 1 image placeholder(s) but 'images' holds "
        "2 image(s)"]
    assert _finding(report, "empty_chosen").examples == [f"vlm_dpo.json:{starts[1]}: empty chosen"]
    assert vlm_doctor(root / "vlm_dpo.json").rows == 2  # the data file: its entry is found


def test_unreadable_sources_and_bad_arguments(tmp_path):
    report = vlm_doctor(tmp_path / "nothing.jsonl")
    assert not report.ok and report.findings[0].check == "unreadable"
    root = llamafactory_dir(tmp_path / "lf")
    info = json.loads((root / "dataset_info.json").read_text())
    (root / "dataset_info.json").write_text(json.dumps({"x": {**info["vlm_dpo"], "ranking": False}}))
    report = vlm_doctor(root)
    assert report.findings[0].check == "unreadable"
    assert "dataset 'x' is not a preference dataset" in report.findings[0].examples[0]
    (root / "vlm_dpo.json").write_text('[{"conversations": [}')
    (root / "dataset_info.json").write_text(json.dumps(info))
    report = vlm_doctor(root)
    assert report.findings[0].check == "unreadable" and "vlm_dpo.json:1: malformed json" in report.table()
    with pytest.raises(ValueError, match="unknown VLM data format 'pickapic'"):
        vlm_doctor(root, format="pickapic")


def test_jsonl_format_reads_without_trls_implicit_rules(tmp_path):
    write_image(tmp_path / "a.png", "red")
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"images": ["a.png"], "prompt": [{"role": "user", "content": "Colour?"}], "chosen": "r", "rejected": "b"}])
    assert vlm_doctor(path).ok  # TRL gives the image its part
    assert _finding(vlm_doctor(path, format="jsonl"), "image_count_mismatch").count == 1


def test_unpaired_data(tmp_path):
    write_image(tmp_path / "a.png", "red")
    path = write_jsonl(tmp_path / "kto.jsonl", [
        {"images": ["a.png"], "prompt": "<image>Colour?", "completion": "red", "label": True},
        {"images": ["a.png"], "prompt": "<image>Colour?", "completion": "", "label": False},
    ])
    report = vlm_doctor(path, kind="unpaired")
    assert _finding(report, "empty_completion").examples == ["kto.jsonl:2: empty completion"]
    assert report.valid == 1


def test_cli_doctor_modality_vlm(tmp_path, capsys):
    from mm_align.cli import main

    write_image(tmp_path / "a.png", "red")
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"images": ["a.png"], "prompt": "<image><image>Q", "chosen": "a", "rejected": "b"}])
    assert main(["doctor", str(path), "--modality", "vlm"]) == 1
    out = capsys.readouterr().out
    assert "image_count_mismatch" in out and "d.jsonl:1: image count mismatch" in out
