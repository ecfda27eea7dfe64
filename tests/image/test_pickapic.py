"""Pick-a-Pic-schema parquet built here: a tie, a corrupt JPEG and an empty caption are reported
with their rows and counted, and training on the file runs to the end."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from mm_align.image.pickapic import read_pickapic
from PIL import Image

from mm_align.cli import main
from mm_align.data import DataError

from .tiny_pipeline import save_tiny_sd15


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture()
def shard(tmp_path) -> Path:
    rows = []
    for i in range(6):
        rows.append({"caption": f"a blue square {i}", "jpg_0": _jpeg(i), "jpg_1": _jpeg(100 + i),
                     "label_0": float(i % 2), "label_1": float(1 - i % 2), "model_0": "m0", "model_1": "m1",
                     "ranking_id": 1000 + i})
    rows[2]["label_0"] = rows[2]["label_1"] = 0.5  # a tie
    rows[3]["jpg_1"] = rows[3]["jpg_1"][: len(rows[3]["jpg_1"]) // 3]  # a truncated (corrupt) JPEG
    rows[4]["caption"] = "   "  # an empty caption
    path = tmp_path / "train-00000.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_bad_rows_are_reported_and_counted(shard):
    result = read_pickapic(shard)
    assert [r.id for r in result.records] == ["1000", "1001", "1005"]
    assert {s.row: s.reason.split(":")[0] for s in result.skipped} == {2: "tie", 3: "corrupt image", 4: "empty prompt"}
    assert result.skipped_by_reason() == {"tie": 1, "corrupt image": 1, "empty prompt": 1}
    # label_0 == 1 → jpg_0 wins; label_1 == 1 → jpg_1 wins
    first, second = result.records[0], result.records[1]
    assert first.chosen == _jpeg(100) and first.rejected == _jpeg(0)  # row 0: label_0 = 0
    assert second.chosen == _jpeg(1) and second.meta["winner"] == 0
    with pytest.raises(DataError, match=r"train-00000.parquet: row 2 \(0-based\): tie"):
        read_pickapic(shard, strict=True)


def test_training_on_pickapic_skips_and_finishes(tmp_path, shard, capsys):
    model = save_tiny_sd15(tmp_path / "model")
    cfg = {"adapter": "sd", "model": {"pretrained": str(model), "resolution": 16},
           "data": {"train": str(shard), "format": "pickapic"},
           "train": {"output_dir": str(tmp_path / "run"), "loss": ["diffusion_dpo"], "max_steps": 2,
                     "batch_size": 1, "report_to": ["none"]}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(tmp_path / "cfg.yaml")]) == 0
    out = capsys.readouterr().out
    assert "3 records, 3 rows skipped (tie: 1, corrupt image: 1, empty prompt: 1)" in out
    assert "trained 2 steps" in out
