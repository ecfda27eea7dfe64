"""vlm/length_audit.py through the VLM adapter: a record longer than max_length is resized (fewer image pixels) or
dropped, reported in a table, and never truncated.

Numbers (the tiny models of tests/vlm/tiny_vlms, chosen "red", rejected "blue shape"): on the tiny Qwen2-VL a
64×64 image gives 16 image tokens and a 41-token longest row; at 256 px (16×16) it gives 4 image tokens and 29
tokens, so with max_length 30 it is resized after four halvings of its pixel budget (4096 → 256 px). The tiny
LLaVA crops every image to 24×24 px, 16 image tokens whatever the size: a 29-token record cannot fit 28 tokens
and is dropped.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from mm_align.vlm.length_audit import MAX_PIXELS_KEY, Length, audit_records, fit_record

from mm_align import recipes
from mm_align.data import PreferencePair
from mm_align.data.records import DataError
from mm_align.orchestration import run_training
from mm_align.run_config import DataConfig, RunConfig, TrainConfig

from .tiny_vlms import draw_shape, make_tiny_llava, make_tiny_qwen2vl

PROMPT = "<image>\nWhat colour is the shape?"
LONG = "<image>\n" + " ".join(["what colour is the shape in the image"] * 4) + "?"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlm_audit")
    draw_shape(root / "big.png", "red", size=(64, 64))
    draw_shape(root / "small.png", "red", size=(16, 16))
    return {"llava": make_tiny_llava(root / "llava"), "qwen2vl": make_tiny_qwen2vl(root / "qwen2vl"), "root": root}


def _adapter(world: dict[str, Path], family: str, max_length: int, **kw):
    adapter = recipes.build_adapter("vlm", {"pretrained": str(world[family]), "max_length": max_length,
                                            "min_image_pixels": 64, **kw})
    adapter.base_dir = world["root"]
    return adapter


def _pair(prompt: str, image: str, origin: str) -> PreferencePair:
    return PreferencePair(prompt, "red", "blue shape", meta={"images": [image]}, origin=origin)


def test_resized_dropped_and_the_table(world: dict[str, Path]) -> None:
    """Qwen2-VL, max_length 30: a record that fits stays as it is; the 64×64 one is resized to a 256 px budget
    (4 image tokens, 29 tokens), its budget stored in meta; the long-text one is dropped at the floor. The table
    names each row (file:line), its tokens before → after, the action and why."""
    adapter = _adapter(world, "qwen2vl", 30)
    fits, big, long = (_pair(PROMPT, "small.png", "d.jsonl:1"), _pair(PROMPT, "big.png", "d.jsonl:2"),
                       _pair(LONG, "small.png", "d.jsonl:3"))
    assert adapter.measure(fits).total <= 30 < adapter.measure(big).total
    kept = adapter.prepare([fits, big, long])
    audit = adapter.length_audit
    assert kept == [fits, big] and audit.kept == kept and audit.n_records == 3
    assert MAX_PIXELS_KEY not in fits.meta and big.meta[MAX_PIXELS_KEY] == 256
    resized, dropped = audit.resized, audit.dropped
    assert [r.row for r in resized] == ["d.jsonl:2"] and [r.row for r in dropped] == ["d.jsonl:3"]
    assert (resized[0].tokens, resized[0].tokens_after) == (41, 29)
    assert "the prompt alone (38 tokens, 16 of them image tokens) exceeds max_length 30" in resized[0].why
    assert "image tokens 16 → 4" in resized[0].why
    assert "still" in dropped[0].why and "min_image_pixels is 64" in dropped[0].why
    table = audit.table()
    assert table.splitlines()[0] == "length audit (max_length 30): 3 records, 1 resized, 1 dropped"
    assert "| d.jsonl:2 | 41 → 29 | resized |" in table
    assert f"| d.jsonl:3 | {dropped[0].tokens} | dropped |" in table
    # collate scores the resized record at its budget: within max_length, nothing cut
    batch = adapter.collate([fits, big], [0, 1])
    lengths = batch["inputs"]["attention_mask"].sum(1)
    assert int(lengths.max()) <= 30
    ids = batch["inputs"]["input_ids"]
    assert int((ids[1] == adapter.image_token_id).sum()) == 4
    assert batch["response_mask"].sum(1).tolist() == [2, 2, 3, 3]  # every answer whole (+ end of turn)


def test_fixed_size_images_are_dropped_and_policy_drop(world: dict[str, Path]) -> None:
    """LLaVA gives 16 image tokens whatever the image size, so resizing cannot help: dropped, saying so.
    audit=drop drops a too-long record without trying to resize it."""
    adapter = _adapter(world, "llava", 28)
    rec = _pair(PROMPT, "big.png", "l.jsonl:5")
    assert adapter.prepare([rec]) == []
    (row,) = adapter.length_audit.dropped
    assert row.row == "l.jsonl:5" and row.tokens == 29
    assert "gives 16 image tokens whatever the image size" in row.why
    qwen = _adapter(world, "qwen2vl", 30, audit="drop")
    rec = _pair(PROMPT, "big.png", "q.jsonl:1")
    assert qwen.prepare([rec]) == [] and MAX_PIXELS_KEY not in rec.meta
    assert qwen.length_audit.dropped[0].why.endswith("(policy drop)")


def test_collate_fits_an_unaudited_record_and_refuses_one_that_cannot_fit(
    world: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Eval data (and direct train() calls) skip prepare: collate fits a too-long record the same way (with a
    warning), and raises a DataError naming the record when it cannot fit: never a silent truncation."""
    adapter = _adapter(world, "qwen2vl", 30)
    with caplog.at_level(logging.WARNING):
        batch = adapter.collate([_pair(PROMPT, "big.png", "e.jsonl:1")], [0])
    assert int(batch["inputs"]["attention_mask"].sum(1).max()) <= 30
    assert "e.jsonl:1" in caplog.text and "fitted at collate" in caplog.text
    with pytest.raises(DataError, match=r"e.jsonl:2: does not fit max_length 30 .*nothing is ever truncated"):
        adapter.collate([_pair(LONG, "small.png", "e.jsonl:2")], [0])


def test_fit_record_rules() -> None:
    """The rules on a synthetic measure (tokens = 10 + pixels // 100): the first budget that fits is kept; a
    floor that is hit drops; a record without images drops; bad settings are refused."""
    def measure(record, budget):
        px = record["pixels"] if budget is None else min(record["pixels"], budget)
        return Length(10 + px // 100, 5 + px // 100, px // 100, px)

    length, row = fit_record({"pixels": 1000}, measure, 14, min_image_pixels=100)
    assert row.action == "resized" and row.max_image_pixels == 250 and length.total == 12
    _, row = fit_record({"pixels": 1000}, measure, 11, min_image_pixels=200)
    assert row.action == "dropped" and "still 12 tokens" in row.why
    _, row = fit_record({"pixels": 0}, measure, 5)
    assert row.action == "dropped" and "no image to resize" in row.why
    assert fit_record({"pixels": 300}, measure, 100) == (measure({"pixels": 300}, None), None)
    with pytest.raises(ValueError, match="unknown length-audit policy 'cut'"):
        fit_record({"pixels": 1}, measure, 5, policy="cut")
    with pytest.raises(ValueError, match="resize_step must be in"):
        audit_records([], measure, 5, resize_step=1.0)


def test_a_dropped_record_never_reaches_collate(world: dict[str, Path], tmp_path: Path) -> None:
    """Through run_training: the audit (prepare) drops the long record, the trainer trains on the list prepare
    returns, and no batch ever holds the dropped record."""
    import json

    root = world["root"]
    rows = [{"prompt": PROMPT, "chosen": "red", "rejected": "blue shape", "images": ["small.png"]}] * 3
    rows.insert(1, {"prompt": LONG, "chosen": "red", "rejected": "blue shape", "images": ["small.png"]})
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = {"pretrained": str(world["qwen2vl"]), "max_length": 30, "min_image_pixels": 64}
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=3, report_to=["none"],
                      log_every=1, save_final=False, cache_dir=str(tmp_path / "cache"))
    adapter = recipes.build_adapter("vlm", model)
    seen: list[str] = []
    collate = adapter.collate
    adapter.collate = lambda records, seeds: (seen.extend(r.origin for r in records), collate(records, seeds))[1]
    result = run_training(RunConfig(adapter="vlm", model=model, data=DataConfig(train=str(data)), train=cfg),
                          adapter=adapter)
    assert result.step == 2 and seen and not any(o.endswith(":2") for o in seen)
    assert torch.isfinite(torch.tensor(result.last_metrics["loss"]))
