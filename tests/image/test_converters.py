"""Image data converters: both pair-folder layouts read, bad entries skipped and counted (or strict), and
pair_folders → pickapic → jsonl → pair_folders keeps prompts, pixels and JPEG bytes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mm_align.image.converters import convert, convert_main
from mm_align.image.pair_readers import detect_image_format, read_image_pairs, read_pair_folders
from mm_align.image.pair_writers import write_image_jsonl, write_pair_folders, write_pickapic
from mm_align.image.pickapic import read_pickapic
from PIL import Image

from mm_align.cli import main
from mm_align.data import DataError, PreferencePair, read_preferences


def _image(seed: int, size: tuple[int, int] = (20, 16)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _bytes(seed: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    _image(seed).save(buf, format=fmt)
    return buf.getvalue()


def _pixels(value) -> np.ndarray:
    data = value if isinstance(value, bytes) else Path(value).read_bytes()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _pair_dir(root: Path, pid: str, prompt: str | None, chosen: bytes | None, rejected: bytes | None,
              ext: str = "png") -> None:
    d = root / pid
    d.mkdir(parents=True)
    if prompt is not None:
        (d / "prompt.txt").write_text(prompt + "\n", encoding="utf-8")
    if chosen is not None:
        (d / f"chosen.{ext}").write_bytes(chosen)
    if rejected is not None:
        (d / f"rejected.{ext}").write_bytes(rejected)


@pytest.fixture()
def folders(tmp_path: Path) -> Path:
    """Per-id layout: 3 good pairs (one JPEG) and 5 bad folders."""
    root = tmp_path / "pairs"
    _pair_dir(root, "2", "a red circle", _bytes(1), _bytes(2))
    _pair_dir(root, "10", "a blue square", _bytes(3, "JPEG"), _bytes(4, "JPEG"), ext="jpg")
    _pair_dir(root, "3", "ünïcode prompt", _bytes(5), _bytes(6))
    _pair_dir(root, "4", None, _bytes(7), _bytes(8))              # missing prompt.txt
    _pair_dir(root, "5", "no rejected", _bytes(9), None)          # missing rejected
    _pair_dir(root, "6", "  ", _bytes(10), _bytes(11))            # empty prompt
    _pair_dir(root, "7", "same", _bytes(12), _bytes(12))          # tie
    _pair_dir(root, "8", "two chosen", _bytes(13), _bytes(14))    # ambiguous
    (root / "8" / "chosen.jpg").write_bytes(_bytes(15, "JPEG"))
    (root / "README.md").write_text("top-level files are ignored")
    return root


def test_per_id_folders_read_skip_and_count(folders):
    result = read_pair_folders(folders)
    assert [(r.id, r.prompt) for r in result.records] == [
        ("2", "a red circle"), ("3", "ünïcode prompt"), ("10", "a blue square")]  # natural order
    first = result.records[0]
    assert Path(first.chosen).is_absolute() and first.chosen == str((folders / "2" / "chosen.png").resolve())
    assert result.records[2].rejected.endswith("10/rejected.jpg")
    assert result.skipped_by_reason() == {"missing prompt": 1, "missing rejected": 1, "empty prompt": 1, "tie": 1,
                                          "ambiguous image": 1}
    by_source = {Path(s.source).name: (s.row, s.reason) for s in result.skipped}
    assert by_source["4"] == (2, "missing prompt: no prompt.txt in 4")
    assert by_source["5"][1] == "missing rejected: no rejected.png/.jpg/... in 5"
    assert by_source["8"][1] == "ambiguous image: 8 has chosen.jpg and chosen.png"
    with pytest.raises(DataError, match=r"pairs/4: row 2 \(0-based\): missing prompt: no prompt.txt in 4"):
        read_pair_folders(folders, strict=True)


def test_split_layout(tmp_path):
    root = tmp_path / "split"
    (root / "chosen").mkdir(parents=True)
    (root / "rejected").mkdir()
    for i in range(5):
        (root / "chosen" / f"{i:04d}.png").write_bytes(_bytes(i))
        if i != 2:
            (root / "rejected" / f"{i:04d}.png").write_bytes(_bytes(100 + i))
    (root / "rejected" / "0009.jpg").write_bytes(_bytes(9, "JPEG"))  # an id with no row
    lines = [
        json.dumps({"id": "0000", "prompt": "zero", "model": "m"}),
        json.dumps({"file": "0001.png", "prompt": "one"}),
        json.dumps({"id": "0002", "prompt": "two: no rejected"}),
        '{"id": "0003", "prompt": ',                       # malformed
        json.dumps({"prompt": "no id"}),
        "",
        json.dumps({"id": "0000", "prompt": "again"}),    # duplicate id
        json.dumps({"id": "0004", "prompt": ""}),         # empty prompt
    ]
    (root / "prompts.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = read_pair_folders(root)
    kept = [(r.id, r.prompt, r.meta) for r in result.records]
    assert kept == [("0000", "zero", {"model": "m"}), ("0001", "one", {})]
    assert result.records[1].rejected == str((root / "rejected" / "0001.png").resolve())
    reasons = {(Path(s.source).name, s.row): s.reason for s in result.skipped}
    assert reasons == {
        ("prompts.jsonl", 2): "missing rejected: no rejected/0002.png/.jpg/... for id 0002",
        ("prompts.jsonl", 3): reasons[("prompts.jsonl", 3)],
        ("prompts.jsonl", 4): "missing id: a row needs an 'id' (or a 'file' whose stem is the id)",
        ("prompts.jsonl", 6): "duplicate id: 0000 (first in row 0)",
        ("prompts.jsonl", 7): "empty prompt",
        ("chosen", 3): "no prompt: chosen/0003.png has no row in prompts.jsonl (id 0003)",
        ("rejected", 2): "no prompt: rejected/0003.png has no row in prompts.jsonl (id 0003)",
        ("rejected", 4): "no prompt: rejected/0009.jpg has no row in prompts.jsonl (id 0009)",
    }
    assert reasons[("prompts.jsonl", 3)].startswith("malformed json:")
    with pytest.raises(DataError, match=r"prompts.jsonl:3: missing rejected"):
        read_pair_folders(root, strict=True)
    assert detect_image_format(root) == "pair_folders"
    (root / "prompts.jsonl").unlink()
    with pytest.raises(DataError, match="prompts.jsonl is missing"):
        read_pair_folders(root)


def test_reader_errors_and_options(tmp_path, folders):
    with pytest.raises(DataError, match="pair folders hold pairs"):
        read_pair_folders(folders, kind="unpaired")
    with pytest.raises(DataError, match="no such file"):
        read_pair_folders(tmp_path / "nope")
    with pytest.raises(DataError, match="unknown pair_folders option"):
        read_pair_folders(folders, colour="red")
    (folders / "3" / "rejected.png").write_bytes(_bytes(6)[:60])  # truncated
    assert len(read_pair_folders(folders).records) == 3  # not decoded by default
    checked = read_pair_folders(folders, check_images=True)
    assert [r.id for r in checked.records] == ["2", "10"]
    assert checked.skipped_by_reason()["corrupt image"] == 1


def test_round_trip_folders_pickapic_jsonl_folders(tmp_path, folders):
    originals = {r.id: r for r in read_pair_folders(folders).records}
    parquet = tmp_path / "out" / "pairs.parquet"
    summary = convert(folders, parquet)
    assert (summary.src_format, summary.dst_format, summary.read, summary.written) == ("pair_folders", "pickapic",
                                                                                      3, 3)
    assert len(summary.skipped) == 5 and "missing prompt: 1" in summary.text()
    table = pq.read_table(parquet)
    assert table.column_names == ["caption", "jpg_0", "jpg_1", "label_0", "label_1", "ranking_id"]
    assert table.column("label_0").to_pylist() == [1.0] * 3 and table.column("label_1").to_pylist() == [0.0] * 3
    picked = read_pickapic(parquet)
    assert not picked.skipped
    assert [r.id for r in picked.records] == ["2", "3", "10"]
    for r in picked.records:  # bytes as they were: PNG and JPEG alike
        assert r.prompt == originals[r.id].prompt
        assert r.chosen == Path(originals[r.id].chosen).read_bytes()
        assert r.rejected == Path(originals[r.id].rejected).read_bytes()

    jsonl = tmp_path / "out" / "data.jsonl"
    assert convert(parquet, jsonl).dst_format == "jsonl"
    rows = read_preferences(jsonl).records
    assert [r.chosen for r in rows] == ["data_images/2_chosen.png", "data_images/3_chosen.png",
                                        "data_images/10_chosen.jpg"]  # extension detected from the bytes
    assert detect_image_format(jsonl) == "jsonl"

    back = tmp_path / "back"
    assert convert(jsonl, back, dst_format="pair_folders").written == 3
    again = read_pair_folders(back)
    assert not again.skipped
    for r in again.records:
        o = originals[r.id]
        assert r.prompt == o.prompt
        for side in ("chosen", "rejected"):
            assert Path(getattr(r, side)).suffix == Path(getattr(o, side)).suffix
            assert Path(getattr(r, side)).read_bytes() == Path(getattr(o, side)).read_bytes()
            assert np.array_equal(_pixels(getattr(r, side)), _pixels(getattr(o, side)))
    assert not [p for p in tmp_path.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]  # no leftovers


def test_pickapic_winner_side_and_models_survive(tmp_path):
    rows = [{"caption": f"cap {i}", "jpg_0": _bytes(i, "JPEG"), "jpg_1": _bytes(50 + i, "JPEG"),
             "label_0": float(i % 2), "label_1": float(1 - i % 2), "model_0": f"a{i}", "model_1": f"b{i}",
             "ranking_id": 7 + i} for i in range(3)]
    rows.append({**rows[0], "label_0": 0.5, "label_1": 0.5, "ranking_id": 99})  # a tie: skipped
    src = tmp_path / "shards"
    src.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), src / "train-00000.parquet")
    assert detect_image_format(src) == "pickapic"
    folders = tmp_path / "folders"
    summary = convert(src, folders)
    assert summary.skipped_by_reason() == {"tie": 1} and summary.written == 3
    assert json.loads((folders / "7" / "meta.json").read_text()) == {"model_0": "a0", "model_1": "b0", "winner": 1}
    assert (folders / "7" / "chosen.jpg").read_bytes() == rows[0]["jpg_1"]  # label_1 == 1: jpg_1 won
    out = tmp_path / "again.parquet"
    convert(folders, out)
    table = pq.read_table(out).to_pylist()
    assert table == rows[:3]  # same sides, labels, models and ids


def test_writers_accept_bytes_paths_and_pil_and_are_atomic(tmp_path):
    (tmp_path / "w.png").write_bytes(_bytes(1))
    records = [
        PreferencePair("a path and bytes", "w.png", _bytes(4, "JPEG"), "a/b"),
        PreferencePair("pil and webp", _image(2), {"bytes": _webp(3), "path": None}, "a_b"),
    ]
    out = write_pair_folders(records, tmp_path / "folders", base_dir=tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["a_b", "a_b-2"]  # made safe, then unique
    assert sorted(p.name for p in (out / "a_b-2").iterdir()) == ["chosen.png", "prompt.txt", "rejected.webp"]
    parquet = write_pickapic(records, tmp_path / "p.parquet", base_dir=tmp_path)
    got = read_pickapic(parquet).records
    assert [r.id for r in got] == ["a/b", "a_b"]  # string ranking ids
    assert got[1].rejected[:8] == b"\x89PNG\r\n\x1a\n"  # WebP re-encoded losslessly
    assert np.array_equal(_pixels(got[1].rejected), np.asarray(Image.open(io.BytesIO(_webp(3))).convert("RGB")))
    jsonl = write_image_jsonl(records, tmp_path / "d.jsonl", base_dir=tmp_path)
    assert [r.rejected for r in read_preferences(jsonl).records] == ["d_images/a_b_rejected.jpg",
                                                                     "d_images/a_b-2_rejected.webp"]
    # a failing write leaves the old output as it was and no temporary files
    bad = [*records, PreferencePair("gone", "missing.png", _bytes(5), "x")]
    before = sorted(p.name for p in out.iterdir())
    for writer, target in ((write_pair_folders, out), (write_pickapic, parquet), (write_image_jsonl, jsonl)):
        with pytest.raises(DataError, match=r"record 2 \(id 'x'\): chosen: no such image file missing.png"):
            writer(bad, target, base_dir=tmp_path)
    assert sorted(p.name for p in out.iterdir()) == before
    assert len(read_pickapic(parquet).records) == 2 and len(read_preferences(jsonl).records) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(DataError, match="text prompts"):
        write_pickapic([PreferencePair([{"role": "user"}], _bytes(1), _bytes(2))], tmp_path / "q.parquet")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing to replace"):
        write_pair_folders(records, tmp_path / "mine", base_dir=tmp_path)


def _webp(seed: int) -> bytes:
    buf = io.BytesIO()
    _image(seed).save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def test_jsonl_source_skips_missing_corrupt_and_text(tmp_path):
    (tmp_path / "a.png").write_bytes(_bytes(1))
    (tmp_path / "b.jpg").write_bytes(_bytes(2, "JPEG"))
    (tmp_path / "cut.jpg").write_bytes(_bytes(3, "JPEG")[:100])
    rows = [{"prompt": "ok", "chosen": "a.png", "rejected": str(tmp_path / "b.jpg")},
            {"prompt": "gone", "chosen": "nope.png", "rejected": "a.png"},
            {"prompt": "cut", "chosen": "a.png", "rejected": "cut.jpg"},
            {"prompt": "text", "chosen": "a cat", "rejected": "a dog"}]
    src = tmp_path / "src.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = read_image_pairs(src)
    assert [r.prompt for r in result.records] == ["ok"]
    assert [(s.row, s.reason.split(":")[0]) for s in result.skipped] == [
        (1, "missing file"), (2, "corrupt image"), (3, "not an image")]
    with pytest.raises(DataError, match=r"src.jsonl:2: missing file: chosen: nope.png"):
        convert(src, tmp_path / "x.parquet", strict=True)
    assert not (tmp_path / "x.parquet").exists()
    with pytest.raises(DataError, match="same"):
        convert(src, src)


def test_cli_convert(tmp_path, folders, capsys):
    dst = tmp_path / "cli.bin"
    assert main(["convert", "image", str(folders), str(dst), "--to", "pickapic"]) == 0
    out = capsys.readouterr().out
    assert "read 3 pairs from" in out and "skipped 5 rows" in out and "wrote 3 pairs to" in out
    assert "pairs/4: row 2 (0-based): missing prompt" in out
    assert len(read_pickapic(dst, format="parquet").records) == 3
    assert convert_main([str(folders), str(tmp_path / "s.parquet"), "--strict"]) == 2
    assert "error: " in capsys.readouterr().err
    assert main(["convert", "image", str(tmp_path / "nothing"), str(tmp_path / "x.jsonl")]) == 2
    assert "error: " in capsys.readouterr().err
    assert main(["convert", "image", str(folders), str(tmp_path / "x.txt")]) == 2
    assert "cannot tell the output format" in capsys.readouterr().err
