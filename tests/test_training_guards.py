"""The training guards: non-finite steps name their records and too many of them fail the run; a diverging
run stops naming the last good checkpoint; a healthy run warns of neither."""

from __future__ import annotations

import json
import logging
from functools import partial

import pytest
import torch
from conftest import small_train_config

from mm_align.checkpoint import list_checkpoints
from mm_align.data import PreferencePair, read_preferences
from mm_align.run_config import TrainConfig
from mm_align.synthetic import SyntheticAdapter, SyntheticWorld
from mm_align.trainer import NonFiniteLossError, epoch_batches, train

try:  # added with the divergence guard
    from mm_align.trainer import DivergenceError
except ImportError:  # pragma: no cover - the code before the guard
    DivergenceError = RuntimeError

WORLD = SyntheticWorld(seed=1234)


_cfg = partial(small_train_config, max_steps=20, checkpointing_steps=5)  # conftest.py: the shared config


class _PoisonedRecordsAdapter(SyntheticAdapter):
    """The policy's chosen score is NaN for the records whose id is in ``bad_ids`` (a NaN reward in the data)."""

    def __init__(self, bad_ids: set[str]) -> None:
        super().__init__()
        self.bad_ids = bad_ids

    def collate(self, records, seeds):
        batch = super().collate(records, seeds)
        batch["poison"] = torch.tensor([r.id in self.bad_ids for r in records])  # (B,)
        return batch

    def scores(self, batch, model):
        s = super().scores(batch, model)
        if torch.is_grad_enabled():
            s.chosen = torch.where(batch["poison"], torch.full_like(s.chosen, float("nan")), s.chosen)
        return s


def _sourced(pairs: list[PreferencePair]) -> list[PreferencePair]:
    """The pairs as a reader returns them: each knows where it was found (jsonl line = index + 1)."""
    return [PreferencePair(p.prompt, p.chosen, p.rejected, p.id, p.meta, origin=f"train.jsonl:{i + 1}")
            for i, p in enumerate(pairs)]


def _in_batches(*batch_numbers: int) -> list[int]:
    """The first record (by index) of each of these micro-batches of epoch 0 (200 records, batch 8, seed 0)."""
    batches = epoch_batches(200, 0, 0, 8, 1, 0)
    return [batches[b][0] for b in batch_numbers]


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_skipped_step_names_its_poisoned_records(tmp_path, caplog):
    pairs = _sourced(WORLD.pairs(200, seed=7))
    a, b = _in_batches(2, 6)  # steps 3 and 6 (step 3 is skipped, so batch 6 is step 6)
    with caplog.at_level(logging.WARNING):
        result = train(_PoisonedRecordsAdapter({pairs[a].id, pairs[b].id}), pairs,
                       _cfg(tmp_path, max_skipped_fraction=0.5))
    assert result.step == 20 and result.skipped_steps == 2
    skipped = [m for m in _warnings(caplog) if "step skipped" in m]
    assert len(skipped) == 2
    # exactly the poisoned records are named (their file row, id and index), none of their batch-mates
    assert "at step 3" in skipped[0] and f"record train.jsonl:{a + 1}, id 's7-{a}', index {a}" in skipped[0]
    assert "at step 6" in skipped[1] and f"record train.jsonl:{b + 1}, id 's7-{b}', index {b}" in skipped[1]
    assert all(m.count("record ") == 1 for m in skipped)
    assert (tmp_path / "run" / "final").is_dir()  # under the threshold: the run completes


def test_records_without_a_source_are_named_by_id_and_index(tmp_path, caplog):
    pairs = WORLD.pairs(200, seed=7)
    (a,) = _in_batches(1)
    with caplog.at_level(logging.WARNING):
        train(_PoisonedRecordsAdapter({pairs[a].id}), pairs, _cfg(tmp_path, max_steps=4, max_skipped_fraction=None))
    assert any(f"non-finite scores in: record id 's7-{a}', index {a}" in m for m in _warnings(caplog))


def test_a_run_past_the_skipped_threshold_fails_listing_the_records(tmp_path):
    pairs = _sourced(WORLD.pairs(200, seed=7))
    bad = _in_batches(1, 4, 9, 15)  # 4 of 24 attempted steps skipped: 17% > 5%
    match = r"4 of 24 optimiser steps \(16.7%\) were skipped.*max_skipped_fraction=0.05"
    with pytest.raises(NonFiniteLossError, match=match) as info:
        train(_PoisonedRecordsAdapter({pairs[i].id for i in bad}), pairs, _cfg(tmp_path))
    message = str(info.value)
    for i in bad:
        assert f"record train.jsonl:{i + 1}, id 's7-{i}', index {i}" in message
    run = tmp_path / "run"
    assert not (run / "final").exists()  # nothing more than the run had already saved
    assert [p.name for p in list_checkpoints(run)][-1] == "checkpoint-20"
    assert "checkpoint-20" in message


def test_a_huge_learning_rate_stops_at_the_update_that_explodes(tmp_path, caplog):
    """lr 1e6 on the synthetic world: step 1's loss is still ln 2 (computed before the update, LoRA B = 0), but its
    update multiplies the LoRA weights' norm ~1e7-fold: the update rule flags step 1 itself, so checkpoint-1 (which
    would hold the exploded weights) is never written; from step 2 the loss rule fires too."""
    cfg = _cfg(tmp_path, learning_rate=1e6, checkpointing_steps=1, max_steps=30)
    with caplog.at_level(logging.WARNING), pytest.raises(DivergenceError, match=r"none \(no checkpoint written yet\)"):
        train(SyntheticAdapter(), WORLD.pairs(200, seed=7), cfg)
    diverged = [m for m in _warnings(caplog) if "diverged" in m]
    assert len(diverged) == 3  # divergence_patience=3 by default
    first = diverged[0].removeprefix("[RANK 0] ")
    assert first.startswith("step 1 diverged: the update changed the trainable weights' norm")
    assert "loss" not in diverged[0].split("diverged:")[1].split("(")[0]  # the loss had not moved yet
    assert "loss 4.9" in diverged[1] and "divergence_update_ratio" in diverged[1]
    assert list_checkpoints(tmp_path / "run") == []  # no diverged step saved
    assert not (tmp_path / "run" / "final").exists()


def test_the_update_rule_alone_stops_a_run_whose_loss_stays_put(tmp_path, caplog):
    """With the loss rule out of reach (divergence_factor 1e30), the update rule still stops the run."""
    cfg = _cfg(tmp_path, learning_rate=1e6, checkpointing_steps=1, max_steps=30, divergence_factor=1e30)
    with caplog.at_level(logging.WARNING), pytest.raises(DivergenceError, match="divergence_update_ratio 1"):
        train(SyntheticAdapter(), WORLD.pairs(200, seed=7), cfg)
    assert len([m for m in _warnings(caplog) if "diverged" in m]) == 3


class _ExplodesAfter(SyntheticAdapter):
    """Healthy for ``good`` optimiser steps, then the policy's scores are scaled 1e9-fold (a loss that explodes)."""

    def __init__(self, good: int) -> None:
        super().__init__()
        self.good, self.calls = good, 0

    def after_optimizer_step(self, model) -> None:
        self.calls += 1

    def scores(self, batch, model):
        s = super().scores(batch, model)
        if torch.is_grad_enabled() and self.calls >= self.good:
            s.chosen = s.chosen * 1e9
        return s


def test_a_loss_that_explodes_later_stops_naming_the_last_good_checkpoint(tmp_path, caplog):
    cfg = _cfg(tmp_path, checkpointing_steps=2, max_steps=30)
    with caplog.at_level(logging.WARNING), pytest.raises(DivergenceError, match=r"checkpoint-4\b"):
        train(_ExplodesAfter(good=4), WORLD.pairs(200, seed=7), cfg)
    diverged = [m for m in _warnings(caplog) if "diverged" in m]
    assert len(diverged) == 3 and diverged[0].removeprefix("[RANK 0] ").startswith("step 5 diverged: loss")
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-2", "checkpoint-4"]


def test_the_divergence_guard_can_be_switched_off(tmp_path, caplog):
    cfg = _cfg(tmp_path, learning_rate=1e6, max_steps=3, divergence_patience=None, max_skipped_fraction=None)
    with caplog.at_level(logging.WARNING):
        result = train(SyntheticAdapter(), WORLD.pairs(200, seed=7), cfg)
    assert result.step == 3
    assert not [m for m in _warnings(caplog) if "diverged" in m]


def test_a_healthy_run_warns_of_nothing(tmp_path, caplog):
    """The quickstart's settings (lr 3e-3, β 1, LoRA r 16): neither guard fires."""
    from mm_align.lora import LoraSettings

    cfg = _cfg(tmp_path, max_steps=150, batch_size=64, beta=1.0, learning_rate=3e-3, weight_decay=0.0,
               lora=LoraSettings(r=16), checkpointing_steps=50, log_every=10)
    with caplog.at_level(logging.WARNING):
        result = train(SyntheticAdapter(), WORLD.pairs(3000, seed=1), cfg)
    assert result.step == 150 and result.skipped_steps == 0
    assert not [m for m in _warnings(caplog) if "diverged" in m or "skipped" in m]


def test_a_skipped_step_names_the_file_line_of_its_record(tmp_path, caplog):
    pairs = SyntheticWorld(seed=1234).pairs(64, seed=3)
    pairs[5] = PreferencePair(pairs[5].prompt, 3, 4, id="bad")
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "id": p.id})
                            + "\n" for p in pairs))
    records = read_preferences(path).records  # each knows its file line (origin)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=8, batch_size=8, report_to=["none"],
                      max_skipped_fraction=None, checkpointing_steps=100, save_final=False)
    with caplog.at_level(logging.WARNING):
        train(_PoisonedRecordsAdapter({"bad"}), records, cfg)
    warnings = [r.getMessage() for r in caplog.records if "step skipped" in r.getMessage()]
    assert warnings, "the poisoned record's step was never skipped"
    assert all(f"non-finite scores in: record {path}:6, id 'bad', index 5" in w for w in warnings), warnings


def test_a_cpu_run_prints_no_deepspeed_device_warning(tmp_path):
    """With DeepSpeed installed (the test extra), a CPU run must not print its 'Setting accelerator to CPU' warning
    when accelerate unwraps the model (issue 11, item 7: no warnings from our own calls)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    code = ("from mm_align.run_config import TrainConfig\n"
            "from mm_align.synthetic import SyntheticAdapter, SyntheticWorld\n"
            "from mm_align.trainer import train\n"
            f"cfg = TrainConfig(output_dir={str(tmp_path / 'run')!r}, loss=['sigmoid'], max_steps=2, batch_size=4, "
            "report_to=['none'])\n"
            "train(SyntheticAdapter(), SyntheticWorld(seed=1).pairs(16, seed=0), cfg)\n")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Setting accelerator to CPU" not in proc.stdout + proc.stderr
