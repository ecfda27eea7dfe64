"""audio/speech_adapter.py: Diffusion-DPO on a flow-matching speech model through the real trainer.

Each test builds a tiny world in tmp: harmonic-tone utterances written as wav files, a speech_pairs manifest
(degraded, chosen = clean + a little noise, rejected = clean + more noise) and a saved tiny FlowEnhancer. Checked:
one shared (t, ε) per pair (chosen, rejected and the reference pass), DPO through ``mm-align train`` (loss ln 2 at
step 0, LoRA trained, base frozen, the LoRA directory loading in peft and in ``mm-align restore speech``), full
fine-tuning, cached = live reference, resume = uninterrupted, unpaired KTO, fingerprints, and a user-defined
module (on our STFT, or with its own representation) trained through the same adapter.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from mm_align.audio.flow_enhancer import USER_MODEL_FILE, FlowEnhancer, load_speech_model, restore_main
from mm_align.audio.io import load_audio, save_audio
from mm_align.audio.speech_adapter import FlowSpeechAdapter, FlowSpeechModel
from mm_align.audio.speech_records import read_speech_pairs
from torch import nn

import mm_align.trainer as trainer_mod
from mm_align import cli, recipes
from mm_align.orchestration import run_training
from mm_align.run_config import DataConfig, RunConfig, TrainConfig
from mm_align.types import check_adapter

SR = 16_000
LN2 = math.log(2)
N_PAIRS = 8


def _tone(i: int, n: int) -> torch.Tensor:
    t = torch.arange(n) / SR
    f0 = 120.0 + 23.0 * i
    return sum(0.15 / k * torch.sin(2 * math.pi * k * f0 * t + k) for k in range(1, 5)) * (
        0.7 + 0.3 * torch.sin(2 * math.pi * 3.0 * t))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("speech_world")
    g = torch.Generator().manual_seed(0)
    pairs, unpaired = [], []
    for i in range(N_PAIRS):
        n = int((0.5 if i % 2 == 0 else 0.4) * SR)
        clean = _tone(i, n)
        waves = {"deg": clean + 0.08 * torch.randn(n, generator=g), "ch": clean + 0.01 * torch.randn(n, generator=g),
                 "rj": clean + 0.04 * torch.randn(n, generator=g)}
        for name, w in waves.items():
            save_audio(root / "wav" / f"{name}{i}.wav", w, SR)
        pairs.append({"id": f"p{i}", "degraded": f"wav/deg{i}.wav", "chosen": f"wav/ch{i}.wav",
                      "rejected": f"wav/rj{i}.wav", "text": "a tone"})
        unpaired.append({"id": f"u{i}", "degraded": f"wav/deg{i}.wav",
                         "completion": f"wav/{'ch' if i % 2 else 'rj'}{i}.wav", "label": bool(i % 2)})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (root / "unpaired.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unpaired))
    torch.manual_seed(0)
    FlowEnhancer(channels=(4, 8), norm_groups=2).save_pretrained(root / "model")
    return root


def _adapter(world: Path, **model) -> FlowSpeechAdapter:
    adapter = FlowSpeechAdapter.from_config({"pretrained": str(world / "model"), "crop_seconds": 0.25, **model})
    adapter.base_dir = world
    return adapter


def _config(world: Path, out: Path, data: str = "pairs.jsonl", **train) -> RunConfig:
    kw = dict(output_dir=str(out), loss=["diffusion_dpo"], beta=500.0, learning_rate=1e-3, lr_scheduler="constant",
              max_steps=3, batch_size=2, log_every=1, checkpointing_steps=2, report_to=["none"],
              cache_dir=str(out.parent / "cache"))
    kw.update(train)
    return RunConfig(adapter="speech_flow", data=DataConfig(train=str(world / data), format="speech_pairs"),
                     train=TrainConfig(**kw))


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in _rows(run_dir) if "loss" in r]


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture()
def lora_init(monkeypatch) -> dict[str, torch.Tensor]:
    """The model's state right after the trainer injects LoRA (B = 0), before any step."""
    snapshot: dict[str, torch.Tensor] = {}
    real = trainer_mod.add_lora

    def spy(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        snapshot.update(_params(model))
        return out

    monkeypatch.setattr(trainer_mod, "add_lora", spy)
    return snapshot


def _assert_only_lora_trained(model: nn.Module, init: dict[str, torch.Tensor]) -> None:
    assert init, "the trainer never injected LoRA"
    state = _params(model)
    lora = [k for k in state if "lora_" in k]
    assert lora and all((init[k] == 0).all() for k in lora if "lora_B" in k)  # policy = reference at step 0
    for k in lora:
        assert not torch.equal(state[k], init[k]), f"{k} did not train"
    for k in state.keys() - set(lora):
        assert torch.equal(state[k], init[k]), f"{k} (frozen) changed"


class _Recorder(nn.Module):
    """Wraps a velocity field and keeps every call's (x_t, t, cond)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x_t, t, cond):
        self.calls.append((x_t.detach().clone(), t.detach().clone(), cond.detach().clone()))
        return self.inner(x_t, t, cond)


# ---- the batch -----------------------------------------------------------------------------------
def test_one_shared_t_and_eps_per_pair(world):
    adapter = _adapter(world)
    check_adapter(adapter, construction=True)
    records = read_speech_pairs(world / "pairs.jsonl").records
    batch = adapter.collate(records[:3], [11, 12, 13])
    assert batch["y"].shape == (6, 2, 256, 32) and batch["eps"].shape == (3, 2, 256, 32) and batch["t"].shape == (3,)
    rec = _Recorder(adapter.model)
    scores = adapter.scores(batch, rec)
    (x_t, t, cond), = rec.calls  # chosen and rejected run as ONE batch of 2B rows: [chosen ; rejected]
    assert torch.equal(t[:3], t[3:]) and torch.equal(cond[:3], cond[3:])
    tb = t[:3].reshape(-1, 1, 1, 1)
    y = batch["y"]
    assert not torch.allclose(y[:3], y[3:])  # the two restorations differ...
    eps_w, eps_l = (x_t[:3] - tb * y[:3]) / (1 - tb), (x_t[3:] - tb * y[3:]) / (1 - tb)
    assert torch.allclose(eps_w, eps_l, atol=1e-5) and torch.allclose(eps_w, batch["eps"], atol=1e-5)  # ...ε does not
    assert len(set(t[:3].tolist())) == 3 and not torch.allclose(batch["eps"][0], batch["eps"][1])  # pairs differ
    assert scores.chosen.shape == scores.rejected.shape == (3,)
    # the draw is a function of the record's seed alone: the same in another batch (so a cache is exact)
    alone = adapter.collate(records[1:2], [12])
    assert torch.equal(alone["t"][0], batch["t"][1]) and torch.equal(alone["eps"][0], batch["eps"][1])
    assert not torch.equal(adapter.collate(records[1:2], [99])["eps"][0], alone["eps"][0])


def test_a_condition_source_model_starts_each_pair_at_its_degraded_input(world, tmp_path):
    torch.manual_seed(0)
    FlowEnhancer(channels=(4, 8), norm_groups=2, source="condition").save_pretrained(tmp_path / "m")
    records = read_speech_pairs(world / "pairs.jsonl").records[:2]
    noise_batch = _adapter(world).collate(records, [11, 12])
    adapter = FlowSpeechAdapter.from_config({"pretrained": str(tmp_path / "m"), "crop_seconds": 0.25})
    adapter.base_dir = world
    batch = adapter.collate(records, [11, 12])
    torch.testing.assert_close(batch["eps"], noise_batch["eps"] + batch["cond"])  # ε = c + σ·z, same z
    assert adapter._scoring_settings()["source"] == "condition"


def test_policy_and_reference_passes_see_the_same_draws(world, tmp_path):
    adapter = _adapter(world)
    calls = []
    adapter.model.register_forward_hook(
        lambda mod, args, out: calls.append((torch.is_grad_enabled(), [a.detach().clone() for a in args])))
    run_training(_config(world, tmp_path / "run", max_steps=2), adapter=adapter)
    assert [grad for grad, _ in calls] == [False, True, False, True]  # reference first, then the policy, per step
    for ref, pol in ((calls[0][1], calls[1][1]), (calls[2][1], calls[3][1])):
        assert all(torch.equal(a, b) for a, b in zip(ref, pol))  # the same x_t, t, cond
    assert not torch.equal(calls[0][1][1], calls[2][1][1])  # a new draw at the next step


def test_variable_length_clips_score_alone(world):
    """crop_seconds: null: clips of different lengths score exactly as they do alone (no padding leaks in)."""
    adapter = _adapter(world, crop_seconds=None)
    records = read_speech_pairs(world / "pairs.jsonl").records[:2]  # 0.5 s and 0.4 s
    batch = adapter.collate(records, [1, 2])
    assert batch["frames"].tolist() == [63, 51] and batch["mask"][1, ..., 51:].sum() == 0
    with torch.no_grad():
        both = adapter.scores(batch, adapter.model)
        one = adapter.scores(adapter.collate(records[1:], [2]), adapter.model)
    assert torch.equal(both.chosen[1:], one.chosen) and torch.equal(both.rejected[1:], one.rejected)


# ---- DPO through the trainer ---------------------------------------------------------------------
def test_dpo_through_mm_align_train(world, tmp_path, monkeypatch):
    """`mm-align train` on a speech_pairs manifest: ln 2 at step 0; the LoRA directory loads in peft, in our
    loader and in `mm-align restore speech`, as the trained model, with the base weights untouched."""
    monkeypatch.setitem(recipes.ADAPTERS, "speech_flow", "mm_align.audio.speech_adapter:FlowSpeechAdapter")
    run = {"adapter": "speech_flow", "model": {"pretrained": str(world / "model"), "crop_seconds": 0.25},
           "data": {"train": str(world / "pairs.jsonl"), "format": "speech_pairs"},
           "train": {"output_dir": str(tmp_path / "run"), "loss": ["diffusion_dpo"], "beta": 500.0,
                     "learning_rate": 3e-3, "max_steps": 3, "batch_size": 2, "log_every": 1,
                     "report_to": ["none"], "lr_scheduler": "constant"}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    assert cli.main(["train", "--config", str(tmp_path / "run.yaml")]) == 0
    rows = _rows(tmp_path / "run")
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-6) and rows[0]["rewards/margins"] == 0.0
    assert rows[0]["err/policy_chosen"] == rows[0]["err/ref_chosen"]
    assert any(abs(r["loss"] - LN2) > 1e-5 for r in rows[1:])
    final = tmp_path / "run" / "final"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in final.iterdir()}
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == str(world / "model")

    from peft import PeftModel

    base = FlowEnhancer.from_pretrained(world / "model")
    ours = load_speech_model(final)
    peft_model = PeftModel.from_pretrained(FlowEnhancer.from_pretrained(world / "model"), str(final)).eval()
    merged = load_speech_model(final, merge_lora=True)
    g = torch.Generator().manual_seed(0)
    x, c, t = torch.randn(2, 2, 256, 16, generator=g), torch.randn(2, 2, 256, 16, generator=g), torch.rand(2)
    with torch.no_grad():
        out = ours(x, t, c)
        assert torch.allclose(out, peft_model(x, t, c), atol=1e-6) and torch.allclose(out, merged(x, t, c), atol=1e-5)
        assert (out - base(x, t, c)).abs().max() > 1e-5  # the LoRA moved the model
    frozen = {k.replace(".base_layer", ""): v for k, v in ours.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(frozen[k], v) for k, v in base.state_dict().items())  # the base is untouched
    # restore with the trained LoRA directory
    save_audio(tmp_path / "in.wav", load_audio(world / "wav" / "deg0.wav")[0], SR)
    assert restore_main(["--model", str(final), "--steps", "2", str(tmp_path / "in.wav"), str(tmp_path / "o.wav")
                         ]) == 0
    assert load_audio(tmp_path / "o.wav")[0].numel() == int(0.5 * SR)


def test_lora_dpo_trains_only_the_adapters(world, tmp_path, lora_init):
    adapter = _adapter(world)
    result = run_training(_config(world, tmp_path / "run", learning_rate=3e-3), adapter=adapter)
    assert result.step == 3 and _losses(tmp_path / "run")[0] == pytest.approx(LN2, abs=1e-6)
    _assert_only_lora_trained(adapter.model, lora_init)


def test_full_finetune_dpo(world, tmp_path):
    """finetune=full: a frozen reference copy (ln 2 at step 0, then not), every weight trains, the saved model
    reloads through FlowEnhancer.from_pretrained as the trained one."""
    adapter = _adapter(world)
    before = _params(adapter.model)
    result = run_training(_config(world, tmp_path / "run", finetune="full"), adapter=adapter)
    after = _params(adapter.model)
    assert after.keys() == before.keys() and all(not torch.equal(before[k], after[k]) for k in before)
    losses = _losses(tmp_path / "run")
    assert losses[0] == pytest.approx(LN2, abs=1e-6) and abs(losses[-1] - LN2) > 1e-5
    reloaded = FlowEnhancer.from_pretrained(result.final_dir)
    assert all(torch.equal(v, after[k]) for k, v in reloaded.state_dict().items())


def test_cached_reference_trains_as_the_live_one(world, tmp_path):
    """precompute_reference: the reference errors of each epoch's (t, ε) computed once, on disk; 5 steps of 4 per
    epoch cross into epoch 1 (a second cache file). Same weights and losses as the live reference pass."""
    live = _adapter(world)
    run_training(_config(world, tmp_path / "live", max_steps=5), adapter=live)
    cached = _adapter(world)
    run_training(_config(world, tmp_path / "cached", max_steps=5, precompute_reference=True), adapter=cached)
    assert _max_diff(_params(live.model), _params(cached.model)) <= 1e-6
    assert _losses(tmp_path / "cached") == pytest.approx(_losses(tmp_path / "live"), abs=1e-6)
    assert len(list((tmp_path / "cache").glob("ref-*.safetensors"))) == 2


def test_resume_equals_the_uninterrupted_run(world, tmp_path):
    straight = _adapter(world)
    run_training(_config(world, tmp_path / "straight", max_steps=4), adapter=straight)
    run_training(_config(world, tmp_path / "split", max_steps=2), adapter=_adapter(world))
    resumed = _adapter(world)  # a fresh process would rebuild the adapter from the model directory
    result = run_training(_config(world, tmp_path / "split", max_steps=4, resume_from="latest"), adapter=resumed)
    assert result.step == 4
    assert _max_diff(_params(straight.model), _params(resumed.model)) <= 1e-6
    assert [r["step"] for r in _rows(tmp_path / "split")] == [1, 2, 3, 4]
    assert _losses(tmp_path / "split") == pytest.approx(_losses(tmp_path / "straight"), abs=1e-7)


def test_unpaired_kto(world, tmp_path):
    adapter = _adapter(world)
    records = read_speech_pairs(world / "unpaired.jsonl", kind="unpaired").records
    batch = adapter.collate(records[:4], [1, 2, 3, 4])
    assert batch["y"].shape[0] == 4 and batch["desirable"].tolist() == [False, True, False, True]
    run_training(_config(world, tmp_path / "run", data="unpaired.jsonl", loss=["diffusion_kto"], beta=100.0,
                         batch_size=4), adapter=adapter)
    assert all(math.isfinite(v) for v in _losses(tmp_path / "run"))


def test_fingerprint_follows_weights_and_settings(world, tmp_path):
    a = _adapter(world).fingerprint()
    assert _adapter(world).fingerprint() == a
    shutil.copytree(world / "model", tmp_path / "copy")  # content-addressed: another path, the same fingerprint
    copied = FlowSpeechAdapter.from_config({"pretrained": str(tmp_path / "copy"), "crop_seconds": 0.25})
    assert copied.fingerprint() == a
    assert _adapter(world, crop_seconds=0.3).fingerprint() != a
    assert _adapter(world, sigma=0.9).fingerprint() != a
    torch.manual_seed(1)
    FlowEnhancer(channels=(4, 8), norm_groups=2).save_pretrained(tmp_path / "other")
    assert FlowSpeechAdapter.from_config({"pretrained": str(tmp_path / "other"), "crop_seconds": 0.25}
                                         ).fingerprint() != a


def test_saves_from_a_gathered_state_dict(world, tmp_path):
    """Under a sharded engine the trainer hands save() the gathered state dict: full and LoRA saves are written
    from it (here: weights that differ from the module's own), and reload as those weights."""
    from mm_align.lora import LoraSettings, add_lora

    adapter = _adapter(world)
    state = {k: v + 0.5 for k, v in adapter.model.state_dict().items()}
    adapter.save(adapter.model, str(tmp_path / "full"), lora=False, state_dict=state)
    reloaded = FlowEnhancer.from_pretrained(tmp_path / "full")
    assert all(torch.equal(v, state[k]) for k, v in reloaded.state_dict().items())
    add_lora(adapter.model, LoraSettings(r=2), adapter.lora_target_modules)
    gathered = {k: (v + 1.0 if "lora_B" in k else v) for k, v in adapter.model.state_dict().items()}
    adapter.save(adapter.model, str(tmp_path / "lora"), lora=True, state_dict=gathered)
    loaded = load_speech_model(tmp_path / "lora")
    assert all(torch.equal(v, gathered[k]) for k, v in loaded.state_dict().items() if "lora_" in k)


# ---- a user-defined model ----------------------------------------------------------------------
class TinyUserFlow(nn.Module):
    """A user's velocity field on the adapter's STFT representation: ``forward(x_t, t, cond) -> v``."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, width, 3, padding=1)
        self.t_proj = nn.Linear(1, width)
        self.conv_out = nn.Conv2d(width, 2, 3, padding=1)

    def forward(self, x_t, t, cond):
        h = torch.relu(self.conv_in(torch.cat([x_t, cond], dim=1)) + self.t_proj(t[:, None])[:, :, None, None])
        return self.conv_out(h)


class TinyFramedFlow(nn.Module):
    """A user's model with its own representation: 64-sample frames ``(B, 1, 64, N)`` (time last)."""

    frame = 64

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.Tanh(), nn.Conv2d(width, 1, 3, padding=1))
        self.sample_rate, self.sigma = SR, 0.2

    def encode(self, wave):
        n = math.ceil(wave.shape[-1] / self.frame)
        padded = torch.nn.functional.pad(wave, (0, n * self.frame - wave.shape[-1]))
        return padded.reshape(wave.shape[0], 1, n, self.frame).transpose(2, 3)  # (B, 1, 64, N)

    def decode(self, spec, length):
        return spec.transpose(2, 3).reshape(spec.shape[0], -1)[:, :length]

    def num_frames(self, length):
        return math.ceil(length / self.frame)

    def forward(self, x_t, t, cond):
        tt = t.reshape(-1, 1, 1, 1).expand_as(x_t)
        return self.net(torch.cat([x_t, cond, tt], dim=1))


@pytest.mark.parametrize("user_class", [TinyUserFlow, TinyFramedFlow])
def test_a_user_module_trains_through_the_same_adapter(world, tmp_path, lora_init, user_class):
    """``model.model_class=module:Class`` with init kwargs: DPO with LoRA (ln 2 at step 0, adapters trained, base
    frozen); the saved LoRA directory carries the base (built in memory) and reloads as the trained model."""
    spec = f"{user_class.__module__}:{user_class.__name__}"
    torch.manual_seed(0)
    adapter = FlowSpeechAdapter.from_config({"model_class": spec, "model_kwargs": {"width": 6}, "crop_seconds": 0.25})
    adapter.base_dir = world
    assert isinstance(adapter.model, user_class) and isinstance(adapter.model, FlowSpeechModel)
    own = user_class is TinyFramedFlow
    assert (adapter.representation is adapter.model) == own and adapter.sigma == (0.2 if own else 0.5)
    result = run_training(_config(world, tmp_path / "run", learning_rate=3e-3), adapter=adapter)
    assert _losses(tmp_path / "run")[0] == pytest.approx(LN2, abs=1e-6)
    _assert_only_lora_trained(adapter.model, lora_init)
    final = result.final_dir
    assert json.loads((final / USER_MODEL_FILE).read_text()) == {"model_class": spec, "model_kwargs": {"width": 6}}
    assert (final / "base" / "model.safetensors").is_file()
    reloaded = load_speech_model(final)
    assert isinstance(reloaded, user_class)
    batch = adapter.collate(read_speech_pairs(world / "pairs.jsonl").records[:2], [5, 6])
    adapter.model.eval()
    with torch.no_grad():
        trained, again = adapter.scores(batch, adapter.model), adapter.scores(batch, reloaded)
    assert torch.allclose(trained.chosen, again.chosen, atol=1e-6)
    # a full save of the user module (the LoRA merged) reloads through the same loader
    adapter.save(load_speech_model(final, merge_lora=True), str(tmp_path / "full"), lora=False)
    full = load_speech_model(tmp_path / "full")
    with torch.no_grad():
        assert torch.allclose(adapter.scores(batch, full).rejected, trained.rejected, atol=1e-5)
