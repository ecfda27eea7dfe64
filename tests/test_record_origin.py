"""Readers note where each record was found; messages name it; the record's value and fingerprint ignore it."""

from __future__ import annotations

import json
import logging

import torch

from mm_align.data import PreferencePair, read_preferences
from mm_align.reference_cache import records_fingerprint
from mm_align.run_config import TrainConfig
from mm_align.synthetic import SyntheticAdapter, SyntheticWorld
from mm_align.trainer import train


def test_jsonl_records_know_their_line_and_parquet_rows_their_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "a"}\n'  # a tie: skipped, but counts as a line
                    '{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    (record,) = read_preferences(path).records
    assert record.origin == f"{path}:2"
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"prompt": ["x", "y"], "chosen": ["a", "c"], "rejected": ["b", "d"]})
    pq.write_table(table, tmp_path / "d.parquet")
    assert [r.origin for r in read_preferences(tmp_path / "d.parquet").records] == [
        f"{tmp_path / 'd.parquet'}: row 0 (0-based)", f"{tmp_path / 'd.parquet'}: row 1 (0-based)"]


def test_origin_is_not_part_of_the_value_or_the_cache_key():
    a = PreferencePair("p", "a", "b", id="1", origin="x.jsonl:3")
    b = PreferencePair("p", "a", "b", id="1", origin="moved/x.jsonl:9")
    assert a == b
    plain = PreferencePair("p", "a", "b", "1")
    assert records_fingerprint([a]) == records_fingerprint([b]) == records_fingerprint([plain])
    assert records_fingerprint([a]) != records_fingerprint([PreferencePair("p", "a", "c", "1")])


class _NaNFor(SyntheticAdapter):
    """The policy's chosen score is NaN for one record (as a NaN reward in the data would make it)."""

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.bad = bad

    def collate(self, records, seeds):
        batch = super().collate(records, seeds)
        batch["poison"] = torch.tensor([r.chosen == self.bad and r.rejected == self.bad + 1 for r in records])
        return batch

    def scores(self, batch, model):
        s = super().scores(batch, model)
        if torch.is_grad_enabled():
            s.chosen = torch.where(batch["poison"], torch.full_like(s.chosen, float("nan")), s.chosen)
        return s


def test_a_skipped_step_names_the_file_line_of_its_record(tmp_path, caplog):
    pairs = SyntheticWorld(seed=1234).pairs(64, seed=3)
    pairs[5] = PreferencePair(pairs[5].prompt, 3, 4, id="bad")
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "id": p.id})
                            + "\n" for p in pairs))
    records = read_preferences(path).records
    others = [i for i, r in enumerate(records) if r.chosen == 3 and r.rejected == 4 and i != 5]
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=8, batch_size=8, report_to=["none"],
                      max_skipped_fraction=None, checkpointing_steps=100, save_final=False)
    with caplog.at_level(logging.WARNING):
        train(_NaNFor(3), records, cfg)
    warnings = [r.getMessage() for r in caplog.records if "step skipped" in r.getMessage()]
    assert warnings, "the poisoned record's step was never skipped"
    assert all(f"{path}:6, id 'bad', index 5" in w or any(f"{path}:{i + 1}," in w for i in others) for w in warnings)
    assert any(f"{path}:6, id 'bad', index 5" in w for w in warnings)
