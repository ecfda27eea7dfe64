"""``mm-align quickstart --world speech`` end to end at a tiny size: generate → DPO → bench on the shipped bases,
through the CLI's own entry (the same function the command runs), with the report and the summary written."""

from __future__ import annotations

import json
import math

import pytest
from mm_align.audio.quickstart import SpeechQuickstart, run_speech_quickstart

from mm_align.recipes import QUICKSTARTS, load_object

TORCH_THREADS = 2  # the shipped speech-world models (tests/audio/conftest.py)


def test_speech_quickstart_runs_the_three_stages(tmp_path):
    assert load_object(QUICKSTARTS["speech"]) is run_speech_quickstart
    cfg = SpeechQuickstart(paradigm="masked", samples_per_input=3, train_inputs=6, dev_inputs=2, batch_size=2,
                           num_workers=1)
    report = run_speech_quickstart(tmp_path, steps=2, cfg=cfg, log=lambda *a, **k: None)
    assert report.is_file() and "<audio" in report.read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["split"] == "dev" and summary["paradigm"] == "masked" and summary["pairs"] >= 1
    rows = [json.loads(x) for x in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and losses[0] == pytest.approx(math.log(2.0), rel=1e-5)  # policy = reference at step 0
    assert {"pesq_wb", "estoi", "dnsmos_ovrl", "wer"} <= set(summary["vs_base"])
    assert (tmp_path / "dpo" / "final" / "adapter_config.json").is_file()


def test_unknown_paradigm_is_refused(tmp_path):
    with pytest.raises(ValueError, match="paradigm"):
        run_speech_quickstart(tmp_path, cfg=SpeechQuickstart(paradigm="diffusion"))
