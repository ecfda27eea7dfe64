"""``mm-align quickstart --world vlm`` end to end at a tiny size: generate (MIA-DPO pairs from the shipped shapes
model's own answers) → DPO → bench on the dev split, through the function the command runs."""

from __future__ import annotations

import json
import math

import pytest
from mm_align.vlm.quickstart import VLMQuickstart, run_vlm_quickstart

from mm_align.recipes import QUICKSTARTS, load_object


def test_vlm_quickstart_runs_the_three_stages(tmp_path):
    assert load_object(QUICKSTARTS["vlm"]) is run_vlm_quickstart
    cfg = VLMQuickstart(train_scenes=8, n_per_item=3, dev_scenes=2, dev_multi_items=3, batch_size=2)
    report = run_vlm_quickstart(tmp_path, steps=2, cfg=cfg, log=lambda *a, **k: None)
    assert report.is_file() and "<img" in report.read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["split"] == "dev" and summary["pairs"] >= 1
    assert set(summary["accuracy"]) == {"mantis_shapes_single", "mantis_shapes_sequence", "mantis_shapes_grid",
                                        "mantis_shapes_pic_in_pic"}
    assert all(set(v) == {"base", "mia_dpo"} for v in summary["accuracy"].values())
    rows = [json.loads(x) for x in (tmp_path / "mia_dpo" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and losses[0] == pytest.approx(math.log(2.0), rel=1e-4)  # policy = reference at step 0
    assert (tmp_path / "mia_dpo" / "final" / "adapter_config.json").is_file()
    pairs = [json.loads(x) for x in (tmp_path / "generate" / "train.jsonl").read_text().splitlines()]
    assert all(p["chosen"] != p["rejected"] for p in pairs)


def test_cli_offers_the_vlm_world():
    from mm_align.cli import _parser

    args = _parser().parse_args(["quickstart", "--world", "vlm", "--steps", "3"])
    assert args.world == "vlm" and args.steps == 3
