"""The training loop on the synthetic adapter: learning, exact resume, atomic checkpoints, the
non-finite guard, reference caching, accumulation, full fine-tuning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import mm_align.checkpoint as checkpoint_mod
from mm_align.checkpoint import find_latest, list_checkpoints
from mm_align.lora import LoraSettings, lora_disabled
from mm_align.run_config import TrainConfig
from mm_align.synthetic import SyntheticAdapter, SyntheticModelConfig, SyntheticWorld, preference_accuracy
from mm_align.trainer import NonFiniteLossError, train

WORLD = SyntheticWorld(seed=1234)


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(
        output_dir=str(tmp_path / "run"),
        loss=["sigmoid"],
        beta=0.1,
        learning_rate=1e-2,
        lr_scheduler="constant",
        max_steps=8,
        batch_size=8,
        checkpointing_steps=4,
        log_every=1,
        report_to=["none"],
        cache_dir=str(tmp_path / "cache"),
    )
    base.update(kw)
    return TrainConfig(**base)


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


def test_dpo_learns_the_hidden_preference(tmp_path):
    """DPO through the real loop: held-out accuracy starts near 50% and ends >= 90%."""
    train_pairs, heldout = WORLD.pairs(3000, seed=1), WORLD.pairs(500, seed=2)
    adapter = SyntheticAdapter()
    before = preference_accuracy(adapter.model, heldout)
    assert 0.35 <= before <= 0.65, before
    cfg = _cfg(tmp_path, max_steps=800, batch_size=64, beta=1.0, learning_rate=3e-3, weight_decay=0.0,
               lora=LoraSettings(r=16), checkpointing_steps=1000)
    result = train(adapter, train_pairs, cfg)
    after = preference_accuracy(adapter.model, heldout)
    assert after >= 0.90, (before, after)
    assert result.step == 800 and result.skipped_steps == 0
    with lora_disabled(adapter.model):  # the reference is untouched
        assert preference_accuracy(adapter.model, heldout) == pytest.approx(before)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy = reference at step 0 (LoRA B = 0)


def test_resume_is_exact(tmp_path):
    """8 steps straight == 4 steps + stop + resume=latest + 4 steps (params and losses)."""
    pairs = WORLD.pairs(200, seed=3)
    a = SyntheticAdapter()
    train(a, pairs, _cfg(tmp_path / "straight", max_steps=8))
    b = SyntheticAdapter()
    train(b, pairs, _cfg(tmp_path / "split", max_steps=4))
    c = SyntheticAdapter()  # a fresh process would rebuild the model from scratch
    train(c, pairs, _cfg(tmp_path / "split", max_steps=8, resume_from="latest"))
    pa, pc = _params(a.model), _params(c.model)
    assert max((pa[k] - pc[k]).abs().max().item() for k in pa) <= 1e-6
    straight, split = _losses(tmp_path / "straight" / "run"), _losses(tmp_path / "split" / "run")
    assert len(split) == 8  # the resumed log has no duplicated steps
    assert split == pytest.approx(straight, abs=1e-7)


def test_resume_crosses_epochs_and_accumulation(tmp_path):
    """Resume mid-epoch with accumulation: 60 pairs, batch 8 × 2 micro-batches = 3 steps/epoch."""
    pairs = WORLD.pairs(60, seed=4)
    kw = dict(max_steps=7, gradient_accumulation_steps=2, checkpointing_steps=2)
    a = SyntheticAdapter()
    train(a, pairs, _cfg(tmp_path / "straight", **kw))
    train(SyntheticAdapter(), pairs, _cfg(tmp_path / "split", **{**kw, "max_steps": 4}))
    c = SyntheticAdapter()
    train(c, pairs, _cfg(tmp_path / "split", **kw, resume_from="latest"))
    pa, pc = _params(a.model), _params(c.model)
    assert max((pa[k] - pc[k]).abs().max().item() for k in pa) <= 1e-6


def test_half_written_checkpoint_is_never_loaded(tmp_path, monkeypatch):
    """A save killed after the weights but before the rename leaves no checkpoint-N to resume from."""
    pairs = WORLD.pairs(200, seed=5)
    real_save = checkpoint_mod.torch.save
    calls = {"n": 0}

    def dying_save(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint (step 4) dies mid-write
            Path(path).write_bytes(b"\x00partial")
            raise KeyboardInterrupt("killed while writing the optimiser state")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(checkpoint_mod.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(SyntheticAdapter(), pairs, _cfg(tmp_path, max_steps=8, checkpointing_steps=2))
    monkeypatch.setattr(checkpoint_mod.torch, "save", real_save)
    run = tmp_path / "run"
    assert (run / ".checkpoint-4.tmp").exists()
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2"]
    assert find_latest(run).name == "checkpoint-2"
    # resuming picks checkpoint-2 and reaches the same weights as an uninterrupted run
    c = SyntheticAdapter()
    train(c, pairs, _cfg(tmp_path, max_steps=8, checkpointing_steps=2, resume_from="latest"))
    a = SyntheticAdapter()
    train(a, pairs, _cfg(tmp_path / "ref", max_steps=8, checkpointing_steps=2))
    pa, pc = _params(a.model), _params(c.model)
    assert max((pa[k] - pc[k]).abs().max().item() for k in pa) <= 1e-6
    assert not (run / ".checkpoint-4.tmp").exists()


def test_keep_last_k_checkpoints(tmp_path):
    train(SyntheticAdapter(), WORLD.pairs(100, seed=6), _cfg(tmp_path, max_steps=10, checkpointing_steps=2,
                                                              checkpoints_total_limit=2))
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-8", "checkpoint-10"]
    files = {p.name for p in (tmp_path / "run" / "checkpoint-10").iterdir()}
    assert {"model.safetensors", "optimizer.pt", "scheduler.json", "rng_state_0.json", "trainer_state.json"} <= files


class _PoisonedAdapter(SyntheticAdapter):
    """Returns NaN scores for the optimiser steps listed in ``bad_calls`` (1-based scores() calls of the policy)."""

    def __init__(self, bad_calls: set[int]) -> None:
        super().__init__()
        self.bad_calls, self.calls = bad_calls, 0

    def scores(self, batch, model):
        s = super().scores(batch, model)
        if torch.is_grad_enabled():  # the policy pass
            self.calls += 1
            if self.calls in self.bad_calls:
                s.chosen = s.chosen * float("nan")
        return s


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    adapter = _PoisonedAdapter({3, 5})
    result = train(adapter, WORLD.pairs(200, seed=7), _cfg(tmp_path, max_steps=6))
    assert result.step == 6 and result.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in adapter.model.parameters())
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["skipped_steps"] == 2 and math.isfinite(last["loss"])


def test_nonfinite_in_a_row_stops_with_the_last_good_checkpoint_intact(tmp_path):
    adapter = _PoisonedAdapter(set(range(5, 100)))
    with pytest.raises(NonFiniteLossError, match=r"3 optimiser steps in a row.*checkpoint-4"):
        train(adapter, WORLD.pairs(200, seed=8), _cfg(tmp_path, max_steps=20, checkpointing_steps=2,
                                                      max_consecutive_nonfinite=3))
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2", "checkpoint-4"]
    c = SyntheticAdapter()  # the checkpoint is intact: resume loads it and trains on
    result = train(c, WORLD.pairs(200, seed=8), _cfg(tmp_path, max_steps=6, checkpointing_steps=2,
                                                     resume_from="latest"))
    assert result.step == 6


@pytest.mark.parametrize("noise_scale, sample_seeds", [(0.0, "per_epoch"), (0.5, "per_epoch"), (0.5, "fixed")])
def test_cached_reference_equals_live_reference(tmp_path, noise_scale, sample_seeds):
    """Precomputed (on-disk) reference scores train exactly as the live reference pass does,
    for deterministic scores and for stochastic ones (per-sample seeded draws), across epochs."""
    pairs = WORLD.pairs(48, seed=9)  # 48 / 16 = 3 steps per epoch; 7 steps cross two epochs
    kw = dict(max_steps=7, batch_size=16, sample_seeds=sample_seeds)
    live = SyntheticAdapter(SyntheticModelConfig(noise_scale=noise_scale))
    train(live, pairs, _cfg(tmp_path / "live", **kw))
    cached = SyntheticAdapter(SyntheticModelConfig(noise_scale=noise_scale))
    train(cached, pairs, _cfg(tmp_path / "cached", precompute_reference=True, **kw))
    pl, pc = _params(live.model), _params(cached.model)
    assert max((pl[k] - pc[k]).abs().max().item() for k in pl) <= 1e-6
    assert _losses(tmp_path / "live" / "run") == pytest.approx(_losses(tmp_path / "cached" / "run"), abs=1e-6)
    files = list((tmp_path / "cached" / "cache").glob("ref-*.safetensors"))
    expected = 3 if (noise_scale > 0 and sample_seeds == "per_epoch") else 1  # 7 steps touch epochs 0, 1, 2
    assert len(files) == expected
    # a second run reuses the cache files (no new ones)
    train(SyntheticAdapter(SyntheticModelConfig(noise_scale=noise_scale)), pairs,
          _cfg(tmp_path / "again", precompute_reference=True, **{**kw, "max_steps": 2}))
    assert len(list((tmp_path / "cached" / "cache").glob("ref-*.safetensors"))) == expected


def test_gradient_accumulation_matches_the_larger_batch(tmp_path):
    pairs = WORLD.pairs(128, seed=10)
    a = SyntheticAdapter()
    train(a, pairs, _cfg(tmp_path / "big", batch_size=16, max_steps=5))
    b = SyntheticAdapter()
    train(b, pairs, _cfg(tmp_path / "acc", batch_size=8, gradient_accumulation_steps=2, max_steps=5))
    pa, pb = _params(a.model), _params(b.model)
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) <= 1e-6


def test_full_finetune_uses_a_frozen_reference_copy(tmp_path):
    adapter = SyntheticAdapter()
    before = _params(adapter.model)
    result = train(adapter, WORLD.pairs(200, seed=11), _cfg(tmp_path, finetune="full", learning_rate=1e-3))
    after = _params(adapter.model)
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every weight trained
    assert (result.final_dir / "model.safetensors").is_file()
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_lora_trains_only_adapters_and_saves_them(tmp_path):
    adapter = SyntheticAdapter()
    base = _params(adapter.model)
    result = train(adapter, WORLD.pairs(200, seed=12), _cfg(tmp_path))
    state = adapter.model.state_dict()
    for k, v in base.items():  # base weights are unchanged (they now live under base_layer)
        key = k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state[key], v), k
    lora = {k: v for k, v in state.items() if "lora_B" in k}
    assert lora and all(v.abs().sum() > 0 for v in lora.values())  # every LoRA B moved off zero
    assert (result.final_dir / "adapter_model.safetensors").is_file()


def test_kto_on_unpaired_data(tmp_path):
    adapter = SyntheticAdapter()
    result = train(adapter, WORLD.unpaired(400, seed=13), _cfg(tmp_path, loss=["kto"], max_steps=20))
    assert result.step == 20 and math.isfinite(result.last_metrics["loss"])


def test_bf16_autocast_runs(tmp_path):
    result = train(SyntheticAdapter(), WORLD.pairs(100, seed=14), _cfg(tmp_path, mixed_precision="bf16",
                                                                        max_steps=3))
    assert math.isfinite(result.last_metrics["loss"])


def test_resolved_config_and_versions_written(tmp_path):
    train(SyntheticAdapter(), WORLD.pairs(50, seed=15), _cfg(tmp_path, max_steps=2))
    run = tmp_path / "run"
    assert "learning_rate" in (run / "config.yaml").read_text()
    assert "torch" in json.loads((run / "versions.json").read_text())
    assert (run / "tensorboard").exists() is False  # report_to none


def test_wrong_loss_kind_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="diffusion_dpo.*error"):
        train(SyntheticAdapter(), WORLD.pairs(50, seed=16), _cfg(tmp_path, loss=["diffusion_dpo"]))
