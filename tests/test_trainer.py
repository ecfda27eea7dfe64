"""The training loop on the synthetic adapter: learning, exact resume, atomic checkpoints, the
non-finite guard, reference caching, accumulation, full fine-tuning."""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from conftest import small_train_config
from safetensors.torch import load_file

import mm_align.checkpoint as checkpoint_mod
import mm_align.trainer as trainer_mod
from mm_align.checkpoint import find_latest, list_checkpoints
from mm_align.config import load_config
from mm_align.lora import LoraSettings, add_lora, load_lora_state_dict, lora_disabled
from mm_align.run_config import TrainConfig
from mm_align.synthetic import (
    SyntheticAdapter,
    SyntheticModelConfig,
    SyntheticPolicy,
    SyntheticWorld,
    preference_accuracy,
)
from mm_align.trainer import NonFiniteLossError, train

WORLD = SyntheticWorld(seed=1234)
LN2 = math.log(2)


_cfg = partial(small_train_config, max_steps=8, checkpointing_steps=4)  # conftest.py: the shared config


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> list[float]:
    return [x["loss"] for x in _rows(run_dir) if "loss" in x]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture()
def lora_init(monkeypatch) -> dict[str, torch.Tensor]:
    """The model's state right after the trainer injects LoRA (B = 0, A at its random init), before any step."""
    snapshot: dict[str, torch.Tensor] = {}
    real = trainer_mod.add_lora

    def spy(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        snapshot.update(_params(model))
        return out

    monkeypatch.setattr(trainer_mod, "add_lora", spy)
    return snapshot


def _assert_only_lora_trained(model: torch.nn.Module, init: dict[str, torch.Tensor]) -> None:
    """Every LoRA tensor (A and B) moved off its initial value; every other tensor is bitwise unchanged."""
    assert init, "the trainer never injected LoRA through mm_align.trainer.add_lora"
    state = _params(model)
    assert state.keys() == init.keys()
    lora = [k for k in state if "lora_" in k]
    assert {k.split("lora_")[1].split(".")[0] for k in lora} == {"A", "B"}
    for k in lora:
        assert not torch.equal(state[k], init[k]), f"{k} did not train"
    for k in state.keys() - set(lora):
        assert torch.equal(state[k], init[k]), f"{k} (frozen) changed"
    assert all((init[k] == 0).all() for k in lora if "lora_B" in k)  # B = 0 at init: policy = reference


class _CountingAdapter(SyntheticAdapter):
    """Counts the policy passes (grad enabled) and the reference passes (no grad) of ``scores``."""

    def __init__(self, config: SyntheticModelConfig | None = None) -> None:
        super().__init__(config)
        self.calls, self.reference_calls = 0, 0

    def scores(self, batch, model):
        s = super().scores(batch, model)
        if torch.is_grad_enabled():
            self.calls += 1
        else:
            self.reference_calls += 1
        return s


class _PoisonedAdapter(_CountingAdapter):
    """Returns NaN scores for the policy passes listed in ``bad_calls`` (1-based scores() calls of the policy)."""

    def __init__(self, bad_calls: set[int]) -> None:
        super().__init__()
        self.bad_calls = bad_calls

    def scores(self, batch, model):
        s = super().scores(batch, model)
        if torch.is_grad_enabled() and self.calls in self.bad_calls:
            s.chosen = s.chosen * float("nan")
        return s


def test_dpo_learns_the_hidden_preference(tmp_path, lora_init):
    """DPO through the real loop: held-out accuracy starts near 50% and ends >= 90%.

    Measured (seed 1234 world, init seed 0): 0.480 before, 0.938 after 800 steps; the last 100 steps'
    mean loss 0.07 (from ln 2 = 0.693 at step 1). The bounds leave headroom for float/BLAS drift."""
    train_pairs, heldout = WORLD.pairs(3000, seed=1), WORLD.pairs(500, seed=2)
    adapter = SyntheticAdapter()
    before = preference_accuracy(adapter.model, heldout)
    assert 0.44 <= before <= 0.56, before
    cfg = _cfg(tmp_path, max_steps=800, batch_size=64, beta=1.0, learning_rate=3e-3, weight_decay=0.0,
               lora=LoraSettings(r=16), checkpointing_steps=1000)
    result = train(adapter, train_pairs, cfg)
    after = preference_accuracy(adapter.model, heldout)
    assert after >= 0.90 and after - before >= 0.40, (before, after)
    assert result.step == 800 and result.skipped_steps == 0
    with lora_disabled(adapter.model):  # the reference is untouched
        assert preference_accuracy(adapter.model, heldout) == before
    _assert_only_lora_trained(adapter.model, lora_init)
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 801))
    # policy = reference at step 0 (LoRA B = 0): Δ = 0 exactly, so the loss is ln 2 and every reward 0
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert rows[0]["rewards/margins"] == 0.0 and rows[0]["rewards/accuracies"] == 0.0
    late = rows[-100:]
    assert sum(r["loss"] for r in late) / len(late) < 0.2
    assert sum(r["rewards/accuracies"] for r in late) / len(late) > 0.9


def test_resume_is_exact(tmp_path):
    """8 steps straight == 4 steps + stop + resume=latest + 4 steps (params and losses)."""
    pairs = WORLD.pairs(200, seed=3)
    a = SyntheticAdapter()
    train(a, pairs, _cfg(tmp_path / "straight", max_steps=8))
    b = SyntheticAdapter()
    train(b, pairs, _cfg(tmp_path / "split", max_steps=4))
    split_run = tmp_path / "split" / "run"
    assert [p.name for p in list_checkpoints(split_run)] == ["checkpoint-4"]
    c = _CountingAdapter()  # a fresh process would rebuild the model from scratch
    result = train(c, pairs, _cfg(tmp_path / "split", max_steps=8, resume_from="latest"))
    assert c.calls == 4 and result.step == 8  # it resumed at step 4: only steps 5..8 ran
    pa, pc = _params(a.model), _params(c.model)
    assert _max_diff(pa, pc) <= 1e-6
    assert _max_diff(pa, _params(b.model)) > 1e-4  # steps 5..8 did move the weights
    straight, split = _losses(tmp_path / "straight" / "run"), _losses(split_run)
    assert [r["step"] for r in _rows(split_run)] == list(range(1, 9))  # no duplicated or missing steps
    assert split == pytest.approx(straight, abs=1e-7)


def test_resume_crosses_epochs_and_accumulation(tmp_path):
    """Resume mid-epoch with accumulation: 60 pairs, batch 8 × 2 micro-batches = 3 steps/epoch.

    60 // 8 = 7 micro-batches per epoch, 7 // 2 = 3 steps use 6 of them. After step 4 the run is in
    epoch 1 with 2 micro-batches of it consumed; after step 7, in epoch 2 with 2 consumed."""
    pairs = WORLD.pairs(60, seed=4)
    kw = dict(max_steps=7, gradient_accumulation_steps=2, checkpointing_steps=2)
    a = SyntheticAdapter()
    train(a, pairs, _cfg(tmp_path / "straight", **kw))
    train(SyntheticAdapter(), pairs, _cfg(tmp_path / "split", **{**kw, "max_steps": 4}))
    split_run = tmp_path / "split" / "run"
    state = json.loads((split_run / "checkpoint-4" / "trainer_state.json").read_text())
    assert {k: state["position"][k] for k in ("step", "epoch", "micro_batch")} == {"step": 4, "epoch": 1,
                                                                                  "micro_batch": 2}
    assert state["global_batch"] == 16
    c = _CountingAdapter()
    train(c, pairs, _cfg(tmp_path / "split", **kw, resume_from="latest"))
    assert c.calls == 3 * 2  # steps 5, 6, 7 × 2 micro-batches
    pa, pc = _params(a.model), _params(c.model)
    assert _max_diff(pa, pc) <= 1e-6
    assert _losses(split_run) == pytest.approx(_losses(tmp_path / "straight" / "run"), abs=1e-7)
    end = json.loads((split_run / "checkpoint-7" / "trainer_state.json").read_text())["position"]
    assert (end["step"], end["epoch"], end["micro_batch"]) == (7, 2, 2)


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
    # resuming picks checkpoint-2 (6 steps left to run) and reaches the same weights as an uninterrupted run
    c = _CountingAdapter()
    train(c, pairs, _cfg(tmp_path, max_steps=8, checkpointing_steps=2, resume_from="latest"))
    assert c.calls == 6
    a = SyntheticAdapter()
    train(a, pairs, _cfg(tmp_path / "ref", max_steps=8, checkpointing_steps=2))
    pa, pc = _params(a.model), _params(c.model)
    assert _max_diff(pa, pc) <= 1e-6
    assert not (run / ".checkpoint-4.tmp").exists()
    assert [r["step"] for r in _rows(run)] == list(range(1, 9))


def test_keep_last_k_checkpoints(tmp_path):
    adapter = SyntheticAdapter()
    train(adapter, WORLD.pairs(100, seed=6), _cfg(tmp_path, max_steps=10, checkpointing_steps=2,
                                                  checkpoints_total_limit=2))
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-8", "checkpoint-10"]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".checkpoint")]  # no temporaries left
    files = {p.name for p in (run / "checkpoint-10").iterdir()}
    assert {"model.safetensors", "optimizer.pt", "scheduler.json", "rng_state_0.json", "trainer_state.json"} <= files
    for step in (8, 10):
        assert json.loads((run / f"checkpoint-{step}" / "trainer_state.json").read_text())["position"]["step"] == step
    # checkpoint-10 holds exactly the trained LoRA weights (the trainable parameters), checkpoint-8 older ones
    trained = {n: p.detach() for n, p in adapter.model.named_parameters() if p.requires_grad}
    last, older = (load_file(str(run / f"checkpoint-{s}" / "model.safetensors")) for s in (10, 8))
    assert last.keys() == trained.keys() == older.keys() and all("lora_" in k for k in trained)
    assert all(torch.equal(last[k], trained[k]) for k in trained)
    assert any(not torch.equal(older[k], trained[k]) for k in trained)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    """Policy passes 3 and 5 are NaN: passes 1, 2, 4, 6, 7, 8 make steps 1..6; the skips leave no trace
    in the weights (all finite) and the optimiser stepped 6 times."""
    adapter = _PoisonedAdapter({3, 5})
    result = train(adapter, WORLD.pairs(200, seed=7), _cfg(tmp_path, max_steps=6, max_skipped_fraction=None))
    assert result.step == 6 and result.skipped_steps == 2 and adapter.calls == 8
    assert all(torch.isfinite(p).all() for p in adapter.model.parameters())
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2, 2, 2]
    assert all(isinstance(r["loss"], float) and math.isfinite(r["loss"]) for r in rows)
    opt = torch.load(tmp_path / "run" / "checkpoint-6" / "optimizer.pt", weights_only=True)
    assert opt["state"] and {int(s["step"]) for s in opt["state"].values()} == {6}


def test_nonfinite_in_a_row_stops_with_the_last_good_checkpoint_intact(tmp_path):
    pairs = WORLD.pairs(200, seed=8)
    adapter = _PoisonedAdapter(set(range(5, 100)))
    with pytest.raises(NonFiniteLossError, match=r"3 optimiser steps in a row.*at step 5.*checkpoint-4"):
        train(adapter, pairs, _cfg(tmp_path, max_steps=20, checkpointing_steps=2, max_consecutive_nonfinite=3))
    assert adapter.calls == 4 + 3  # 4 good steps, then 3 NaN attempts at step 5
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2", "checkpoint-4"]
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4]
    c = _CountingAdapter()  # the checkpoint is intact: resume loads it and trains on
    result = train(c, pairs, _cfg(tmp_path, max_steps=6, checkpointing_steps=2, resume_from="latest"))
    assert result.step == 6 and c.calls == 2
    clean = SyntheticAdapter()  # ... to exactly where an uninterrupted clean run is at step 6
    train(clean, pairs, _cfg(tmp_path / "clean", max_steps=6, checkpointing_steps=2))
    assert _max_diff(_params(clean.model), _params(c.model)) <= 1e-6


@pytest.mark.parametrize("noise_scale, sample_seeds", [(0.0, "per_epoch"), (0.5, "per_epoch"), (0.5, "fixed")])
def test_cached_reference_equals_live_reference(tmp_path, noise_scale, sample_seeds):
    """Precomputed (on-disk) reference scores train exactly as the live reference pass does,
    for deterministic scores and for stochastic ones (per-sample seeded draws), across epochs."""
    pairs = WORLD.pairs(48, seed=9)  # 48 / 16 = 3 steps per epoch; 7 steps cross two epochs
    kw = dict(max_steps=7, batch_size=16, sample_seeds=sample_seeds)
    live = _CountingAdapter(SyntheticModelConfig(noise_scale=noise_scale))
    train(live, pairs, _cfg(tmp_path / "live", **kw))
    assert live.reference_calls == 7  # one live reference pass per step
    cached = _CountingAdapter(SyntheticModelConfig(noise_scale=noise_scale))
    train(cached, pairs, _cfg(tmp_path / "cached", precompute_reference=True, **kw))
    pl, pc = _params(live.model), _params(cached.model)
    assert _max_diff(pl, pc) <= 1e-6
    assert _losses(tmp_path / "live" / "run") == pytest.approx(_losses(tmp_path / "cached" / "run"), abs=1e-6)
    files = sorted((tmp_path / "cached" / "cache").glob("ref-*.safetensors"))
    expected = 3 if (noise_scale > 0 and sample_seeds == "per_epoch") else 1  # 7 steps touch epochs 0, 1, 2
    assert len(files) == expected
    assert cached.reference_calls == 3 * expected  # each cache file built once, 48 / 16 batches; no live pass
    stamps = [f.stat().st_mtime_ns for f in files]
    # a second run reuses the cache files (no new ones, none rewritten, no reference pass at all)
    again = _CountingAdapter(SyntheticModelConfig(noise_scale=noise_scale))
    shared = str(tmp_path / "cached" / "cache")  # the first cached run's cache directory
    train(again, pairs, _cfg(tmp_path / "again", precompute_reference=True, cache_dir=shared,
                             **{**kw, "max_steps": 2}))
    assert again.reference_calls == 0 and again.calls == 2
    assert sorted((tmp_path / "cached" / "cache").glob("ref-*.safetensors")) == files
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_gradient_accumulation_matches_the_larger_batch(tmp_path):
    pairs = WORLD.pairs(128, seed=10)
    a = SyntheticAdapter()
    init = _params(a.model)
    train(a, pairs, _cfg(tmp_path / "big", batch_size=16, max_steps=5))
    b = _CountingAdapter()
    train(b, pairs, _cfg(tmp_path / "acc", batch_size=8, gradient_accumulation_steps=2, max_steps=5))
    assert b.calls == 10
    pa, pb = _params(a.model), _params(b.model)
    assert _max_diff(pa, pb) <= 1e-6
    lora_b = [k for k in pa if "lora_B" in k]
    assert lora_b and all(pa[k].abs().sum() > 0 for k in lora_b)  # both moved, and moved alike
    assert init.keys() <= {k.replace(".base_layer", "") for k in pa}
    # the logged loss of a step is the mean over its micro-batches = the loss of the whole batch
    assert _losses(tmp_path / "acc" / "run") == pytest.approx(_losses(tmp_path / "big" / "run"), abs=1e-6)


def test_full_finetune_uses_a_frozen_reference_copy(tmp_path):
    """finetune=full: every weight trains; the reference is a frozen copy of the initial model, so the
    loss starts at ln 2 and then leaves it (with the policy as its own reference it would stay ln 2,
    Δ ≡ 0); the saved model reloads through SyntheticPolicy.from_pretrained as the trained one."""
    adapter = SyntheticAdapter()
    before = _params(adapter.model)
    result = train(adapter, WORLD.pairs(200, seed=11), _cfg(tmp_path, finetune="full", learning_rate=1e-3))
    after = _params(adapter.model)
    assert after.keys() == before.keys()  # no LoRA layers injected
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every weight trained
    rows = _rows(tmp_path / "run")
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-6) and rows[0]["rewards/margins"] == 0.0
    assert max(abs(r["loss"] - LN2) for r in rows[1:]) > 1e-3  # measured: up to 2.7e-3
    assert all(r["rewards/margins"] != 0.0 for r in rows[1:])
    reloaded = SyntheticPolicy.from_pretrained(result.final_dir)
    assert all(torch.equal(v, after[k]) for k, v in reloaded.state_dict().items())


def test_lora_trains_only_adapters_and_saves_them(tmp_path, lora_init):
    """Only LoRA A and B train (base bitwise unchanged); the saved adapter file loads through
    mm_align.lora.load_lora_state_dict into a fresh model that then computes what the trained one does."""
    adapter = SyntheticAdapter()
    base = _params(adapter.model)
    result = train(adapter, WORLD.pairs(200, seed=12), _cfg(tmp_path, weight_decay=0.0))  # moved = by gradient
    state = adapter.model.state_dict()
    for k, v in base.items():  # base weights are unchanged (they now live under base_layer)
        key = k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state[key], v), k
    _assert_only_lora_trained(adapter.model, lora_init)
    lora = {k: v for k, v in state.items() if "lora_B" in k}
    assert lora and all(v.abs().sum() > 0 for v in lora.values())  # every LoRA B moved off zero
    saved = load_file(str(result.final_dir / "adapter_model.safetensors"))
    assert len(saved) == len([k for k in state if "lora_" in k])
    fresh = SyntheticAdapter()
    add_lora(fresh.model, LoraSettings(), fresh.lora_target_modules)
    load_lora_state_dict(fresh.model, saved)
    x = torch.tensor([p.prompt for p in WORLD.pairs(64, seed=99)])
    with torch.no_grad():
        ours, theirs = adapter.model(x), fresh.model(x)
        with lora_disabled(fresh.model):
            plain = fresh.model(x)
    assert torch.equal(ours, theirs)
    assert (ours - plain).abs().max().item() > 1e-3  # the reloaded LoRA really changes the output


def _desirable_gap(model: torch.nn.Module, samples) -> float:
    """Mean log-prob of desirable samples minus that of undesirable ones (held-out KTO separation)."""
    x = torch.tensor([s.prompt for s in samples])
    y = torch.tensor([s.completion for s in samples])
    d = torch.tensor([s.desirable for s in samples])
    with torch.no_grad():
        logp = torch.log_softmax(model(x), dim=-1).gather(1, y[:, None])[:, 0]
    return float(logp[d].mean() - logp[~d].mean())


def test_kto_on_unpaired_data(tmp_path, lora_init):
    """KTO on unpaired samples: each sample's loss is λ/2 = 0.5 at policy = reference (z = 0, z_ref = 0);
    20 steps raise the held-out gap logπ(desirable) − logπ(undesirable) (measured 0.015 → 0.325)."""
    heldout = WORLD.unpaired(1000, seed=99)
    adapter = SyntheticAdapter()
    gap_before = _desirable_gap(adapter.model, heldout)
    result = train(adapter, WORLD.unpaired(400, seed=13), _cfg(tmp_path, loss=["kto"], max_steps=20, weight_decay=0.0))
    assert result.step == 20 and result.skipped_steps == 0
    rows = _rows(tmp_path / "run")
    assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6) and rows[0]["kl"] == 0.0
    assert rows[0]["rewards/chosen"] == 0.0 and rows[0]["rewards/rejected"] == 0.0
    gap_after = _desirable_gap(adapter.model, heldout)
    assert gap_after > gap_before + 0.2, (gap_before, gap_after)
    with lora_disabled(adapter.model):
        assert _desirable_gap(adapter.model, heldout) == gap_before
    _assert_only_lora_trained(adapter.model, lora_init)


def test_bf16_autocast_runs(tmp_path):
    """bf16 autocast: step 1 is still exactly ln 2 (both passes in bf16 agree), the losses track the
    fp32 run's to 1e-3 but are not bit-identical to them (autocast really ran the matmuls in bf16),
    and the trained weights stay float32."""
    pairs = WORLD.pairs(100, seed=14)
    adapter = SyntheticAdapter()
    result = train(adapter, pairs, _cfg(tmp_path / "bf16", mixed_precision="bf16", max_steps=3))
    train(SyntheticAdapter(), pairs, _cfg(tmp_path / "fp32", max_steps=3))
    assert result.step == 3 and result.skipped_steps == 0
    bf16, fp32 = _rows(tmp_path / "bf16" / "run"), _rows(tmp_path / "fp32" / "run")
    assert bf16[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert [r["loss"] for r in bf16] == pytest.approx([r["loss"] for r in fp32], abs=1e-3)
    assert [r["rewards/margins"] for r in bf16] != [r["rewards/margins"] for r in fp32]
    assert all(p.dtype == torch.float32 for p in adapter.model.parameters())


def test_resolved_config_and_versions_written(tmp_path):
    cfg = _cfg(tmp_path, max_steps=2, checkpointing_steps=2, learning_rate=3e-3, beta=0.25)
    train(SyntheticAdapter(), WORLD.pairs(50, seed=15), cfg)
    run = tmp_path / "run"
    assert load_config(TrainConfig, run / "config.yaml") == cfg  # loads back into an equal config
    raw = yaml.safe_load((run / "config.yaml").read_text())
    assert raw["learning_rate"] == 3e-3 and raw["beta"] == 0.25 and raw["max_steps"] == 2
    versions = json.loads((run / "versions.json").read_text())
    assert versions["torch"] == importlib.metadata.version("torch") and torch.__version__.startswith(versions["torch"])
    assert versions["peft"] == importlib.metadata.version("peft")
    assert versions["python"] == platform.python_version()
    assert (run / "checkpoint-2" / "config.yaml").read_text() == (run / "config.yaml").read_text()
    assert (run / "tensorboard").exists() is False  # report_to none


def test_wrong_loss_kind_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"loss 'diffusion_dpo' needs 'error' scores; adapter gives 'logp'"):
        train(SyntheticAdapter(), WORLD.pairs(50, seed=16), _cfg(tmp_path, loss=["diffusion_dpo"]))
    assert not (tmp_path / "run").exists()  # rejected before anything is written


class _FilteringAdapter(SyntheticAdapter):
    """``prepare`` keeps every other record (as a length audit drops samples); collate records what it sees."""

    def __init__(self, drop_all: bool = False) -> None:
        super().__init__()
        self.drop_all, self.seen = drop_all, []

    def prepare(self, records):
        return [] if self.drop_all else records[::2]

    def collate(self, records, seeds):
        self.seen.extend(id(r) for r in records)
        return super().collate(records, seeds)


def test_records_returned_by_prepare_are_the_ones_trained_on(tmp_path):
    pairs = WORLD.pairs(32, seed=5)
    adapter = _FilteringAdapter()
    train(adapter, pairs, _cfg(tmp_path, max_steps=4, checkpointing_steps=4))
    kept = {id(r) for r in pairs[::2]}
    assert adapter.seen and set(adapter.seen) <= kept  # a dropped record never reaches collate
    with pytest.raises(ValueError, match=r"no training records left after _FilteringAdapter.prepare\(\)"):
        train(_FilteringAdapter(drop_all=True), pairs, _cfg(tmp_path / "none", max_steps=2, checkpointing_steps=2))
