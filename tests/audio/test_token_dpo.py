"""audio/token_adapters.py: DPO on speech restoration pairs for the masked-token and the autoregressive restorer,
through the real trainer (``mm_align.orchestration.run_training``, the adapter built by name).

A speech_pairs manifest is written in the test (0.4–0.5 s clips: tones, degraded = clean + noise, the chosen
restoration closer to the clean one than the rejected); the tiny codec is trained for a moment so its codes
vary; the restorers are random. Checked: the adapter contract; the ONE shared mask of the masked model (chosen,
rejected and the reference pass on the same positions; pairs and seeds differ); the AR log-probs against a
hand computation, padding excluded; a few DPO steps each (loss ln 2 at step 0, every LoRA weight moved, the
restorer's base and the codec untouched, the output reloads through load_restorer and peft); cached reference
= live; resume = uninterrupted; the full fine-tune output.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mm_align.audio.codec import CodecConfig, SpeechCodec, train_codec
from mm_align.audio.io import save_audio
from mm_align.audio.speech_records import read_speech_pairs
from mm_align.audio.token_models import (
    ARRestorerConfig,
    ARTokenRestorer,
    MaskedRestorerConfig,
    MaskedTokenRestorer,
    load_restorer,
    save_restorer,
)
from torch import nn

from mm_align import recipes
from mm_align.lora import LoraSettings, add_lora, lora_disabled
from mm_align.orchestration import run_training
from mm_align.run_config import DataConfig, RunConfig, TrainConfig
from mm_align.types import check_adapter

SR = 16000
Q, K, D = 2, 16, 16
SHAPE = dict(num_quantizers=Q, codebook_size=K, cond_dim=D, dim=32, depth=2, heads=2, attn_window=4)
NAMES = {"masked": "speech_masked", "ar": "speech_ar"}
SPECS = {"speech_masked": "mm_align.audio.token_adapters:MaskedTokenSpeechAdapter",
         "speech_ar": "mm_align.audio.token_adapters:ARSpeechAdapter"}


@pytest.fixture(autouse=True)
def _registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """The names the lead registers in mm_align.recipes.ADAPTERS."""
    for name, spec in SPECS.items():
        monkeypatch.setitem(recipes.ADAPTERS, name, spec)


def _tones(seed: int, seconds: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(SR * seconds)) / SR
    freqs = 150 + 300 * torch.rand(3, generator=g)
    env = 0.5 + 0.5 * torch.sin(2 * math.pi * (1 + 3 * torch.rand(1, generator=g)) * t)
    return 0.2 * env * sum(torch.sin(2 * math.pi * f * t + 6 * torch.rand(1, generator=g)) for f in freqs)


def _noisy(wave: torch.Tensor, level: float, seed: int) -> torch.Tensor:
    return wave + level * torch.randn(wave.shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A codec, a masked and an AR restorer directory, and a manifest of 8 pairs (clips of 0.5 s; pair 7: 0.4 s)."""
    root = tmp_path_factory.mktemp("speech_token_world")
    torch.manual_seed(0)
    codec = SpeechCodec(CodecConfig(n_fft=256, hop_length=128, hidden=32, latent_dim=D, num_quantizers=Q,
                                    codebook_size=K))
    train_codec(codec, [_tones(i, 0.5) for i in range(8)], steps=20, batch_size=4, segment_seconds=0.25, lr=3e-3)
    torch.manual_seed(1)
    save_restorer(MaskedTokenRestorer(MaskedRestorerConfig(**SHAPE, decode_block_frames=4)), codec, root / "masked")
    torch.manual_seed(2)
    save_restorer(ARTokenRestorer(ARRestorerConfig(**SHAPE)), codec, root / "ar")
    data = root / "data"
    rows = []
    for i in range(8):
        clean = _tones(i, 0.4 if i == 7 else 0.5)
        for name, wave in (("clean", clean), ("deg", _noisy(clean, 0.1, 100 + i)),
                           ("good", _noisy(clean, 0.01, 200 + i)), ("bad", _noisy(clean, 0.08, 300 + i))):
            save_audio(data / name / f"u{i}.wav", wave, SR)
        rows.append({"id": f"u{i}", "degraded": f"deg/u{i}.wav", "chosen": f"good/u{i}.wav",
                     "rejected": f"bad/u{i}.wav", "clean": f"clean/u{i}.wav", "text": "tones"})
    (data / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"masked": root / "masked", "ar": root / "ar", "manifest": data / "pairs.jsonl", "root": root}


def _model_cfg(world: dict[str, Path], paradigm: str, **kw) -> dict:
    return {"pretrained": str(world[paradigm]), "crop_seconds": 0.3, **kw}


def _adapter(world: dict[str, Path], paradigm: str, **kw):
    adapter = recipes.build_adapter(NAMES[paradigm], _model_cfg(world, paradigm, **kw))
    adapter.base_dir = world["manifest"].parent
    return adapter


def _records(world: dict[str, Path]) -> list:
    return list(read_speech_pairs(world["manifest"]).records)


def _train_cfg(out: Path, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), loss=["sigmoid"], beta=0.1, learning_rate=1e-2, weight_decay=0.0,
                lr_scheduler="constant", max_steps=3, batch_size=4, lora=LoraSettings(r=4), log_every=1,
                checkpointing_steps=1000, report_to=["none"], cache_dir=str(out.parent / f"{out.name}-cache"),
                save_final=False)
    base.update(kw)
    return TrainConfig(**base)


def _run(world: dict[str, Path], paradigm: str, out: Path, adapter=None, **kw):
    """run_training on the manifest (format speech_pairs); returns (adapter, result, metric rows)."""
    data = DataConfig(train=str(world["manifest"]), format="speech_pairs")
    config = RunConfig(adapter=NAMES[paradigm], model=_model_cfg(world, paradigm), data=data,
                       train=_train_cfg(out, **kw))
    adapter = adapter if adapter is not None else _adapter(world, paradigm)
    result = run_training(config, adapter=adapter)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return adapter, result, rows


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- the adapters on their own -----------------------------------------------------------------------------
@pytest.mark.parametrize("paradigm", ["masked", "ar"])
def test_adapter_contract_and_config(world: dict[str, Path], paradigm: str, tmp_path: Path) -> None:
    """Built by name from a model: section; meets the whole contract; log-prob scores, stochastic only for the
    masked model; reads speech_pairs; LoRA targets that exist; a fingerprint that names the weights and the
    settings; a wrong paradigm, a LoRA directory or a foreign sample rate is refused by name."""
    adapter = _adapter(world, paradigm)
    check_adapter(adapter, construction=True)
    assert adapter.score_kind == "logp" and adapter.stochastic_scores is (paradigm == "masked")
    assert adapter.dataset_formats == {"speech_pairs": "mm_align.audio.speech_records:read_speech_pairs"}
    names = [n for n, _ in adapter.model.named_modules()]
    assert all(any(n.endswith(t) for n in names) for t in adapter.lora_target_modules)
    assert adapter.fingerprint() == _adapter(world, paradigm).fingerprint()
    assert adapter.fingerprint() != _adapter(world, paradigm, crop_seconds=0.2).fingerprint()
    other = "ar" if paradigm == "masked" else "masked"
    with pytest.raises(ValueError, match=f"holds a '{other}' restorer; this adapter needs '{paradigm}'"):
        recipes.build_adapter(NAMES[paradigm], {"pretrained": str(world[other])})
    with pytest.raises(ValueError, match="the codec runs at 16000 Hz"):
        _adapter(world, paradigm, sample_rate=8000)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="is a LoRA directory"):
        recipes.build_adapter(NAMES[paradigm], {"pretrained": str(tmp_path)})


class _Spy(nn.Module):
    """Records the token input of every forward of the wrapped restorer."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.inputs = inner, []

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor, frame_mask: torch.Tensor | None = None):
        self.inputs.append(tokens.clone())
        return self.inner(tokens, cond, frame_mask)


def test_masked_scores_share_one_mask(world: dict[str, Path]) -> None:
    """ONE mask per pair, from the pair's seed: the chosen and the rejected row of a pair are masked (and scored)
    at the same positions, in the policy and in the reference pass (LoRA disabled, the same batch); different
    pairs and different seeds get different masks, the same seed the same one. logπ is the sum of log p(true
    token) over exactly the masked positions (checked by hand), n_tokens their count."""
    adapter = _adapter(world, "masked")
    records = _records(world)[:4]
    batch = adapter.collate(records, [11, 12, 13, 14])
    mask = batch["score_mask"]  # (B, Q, N)
    b = len(records)
    assert mask.shape == (b, Q, batch["codes"].shape[-1]) and mask.any(dim=(1, 2)).all()
    assert torch.equal(adapter.collate(records, [11, 12, 13, 14])["score_mask"], mask)
    assert not torch.equal(adapter.collate(records, [21, 22, 23, 24])["score_mask"], mask)
    assert all(not torch.equal(mask[i], mask[j]) for i in range(b) for j in range(i + 1, b))

    add_lora(adapter.model, LoraSettings(r=2), adapter.lora_target_modules)
    spy = _Spy(adapter.model)
    with torch.no_grad():
        policy = adapter.scores(batch, spy)
        with lora_disabled(adapter.model):
            reference = adapter.scores(batch, spy)
    policy_in, reference_in = spy.inputs
    masked_at = policy_in == adapter.mask_id  # (2B, Q, N)
    assert torch.equal(masked_at[:b], mask) and torch.equal(masked_at[b:], mask)  # chosen, rejected: one mask
    assert torch.equal(reference_in, policy_in)  # the reference pass: the same positions
    assert torch.equal(policy.n_tokens_chosen, mask.sum(dim=(1, 2)).float())
    assert torch.equal(policy.n_tokens_rejected, policy.n_tokens_chosen)
    assert torch.allclose(policy.chosen, reference.chosen)  # LoRA B = 0: policy = reference

    with torch.no_grad():
        logp = adapter.model(policy_in, batch["cond"].repeat(2, 1, 1), batch["frame_mask"].repeat(2, 1))
        logp = logp.log_softmax(-1)  # (2B, Q, N, K)
    codes = batch["codes"]
    for row, want in [(i, policy.chosen[i]) for i in range(b)] + [(b + i, policy.rejected[i]) for i in range(b)]:
        by_hand = sum(logp[row, q, n, codes[row, q, n]].item() for q, n in mask[row % b].nonzero().tolist())
        assert want.item() == pytest.approx(by_hand, abs=1e-4)


def test_ar_logps_equal_a_hand_computation(world: dict[str, Path]) -> None:
    """Whole clips (crop null): pair 7 (0.4 s) is padded to 0.5 s; its padded frames are neither scored nor
    attended to. logπ of each row = Σ over real frames and codebooks of log_softmax(logits)[true token], with
    logits[:, :, n] the model's prediction of frame n from frames < n; n_tokens = Q × real frames."""
    adapter = _adapter(world, "ar", crop_seconds=None)
    records = [_records(world)[0], _records(world)[7]]
    batch = adapter.collate(records, [0, 0])
    frames = batch["frame_mask"].sum(1)
    assert frames.tolist() == [int(0.5 * SR) // 128 + 1, int(0.4 * SR) // 128 + 1]
    with torch.no_grad():
        s = adapter.scores(batch, adapter.model)
    assert s.n_tokens_chosen.tolist() == (Q * frames).float().tolist()
    for row, (want, side) in enumerate([(s.chosen, 0), (s.chosen, 1), (s.rejected, 0), (s.rejected, 1)]):
        pair = row % 2
        n_real = int(frames[pair])
        codes = batch["codes"][row: row + 1, :, :n_real]  # the real frames only: no padding anywhere
        with torch.no_grad():
            logits = ARTokenRestorer.forward(adapter.model, codes, batch["cond"][pair: pair + 1, :, :n_real])
        logsm = logits.log_softmax(-1)[0]  # (Q, n, K)
        by_hand = sum(logsm[q, n, codes[0, q, n]].item() for q in range(Q) for n in range(n_real))
        assert want[side].item() == pytest.approx(by_hand, abs=1e-3)
    # the AR scores draw nothing: any seeds give the same batch
    again = adapter.collate(records, [5, 6])
    assert all(torch.equal(again[k], batch[k]) for k in batch)


@pytest.mark.parametrize("paradigm", ["masked", "ar"])
def test_unpaired_records_score_one_row_each(world: dict[str, Path], paradigm: str) -> None:
    """KTO-style records (one completion, desirable or not) give one row per record: ``chosen`` holds every
    sample's log-prob, ``desirable`` their labels, ``n_tokens`` the scored tokens."""
    from mm_align.data import UnpairedSample

    adapter = _adapter(world, paradigm)
    records = [UnpairedSample(prompt=f"deg/u{i}.wav", completion=f"{'good' if i % 2 else 'bad'}/u{i}.wav",
                              desirable=bool(i % 2), id=f"u{i}") for i in range(3)]
    batch = adapter.collate(records, [1, 2, 3])
    assert batch["codes"].shape[0] == 3 and batch["desirable"].tolist() == [False, True, False]
    with torch.no_grad():
        s = adapter.scores(batch, adapter.model)
    assert s.rejected is None and s.chosen.shape == (3,) and torch.isfinite(s.chosen).all()
    assert s.desirable.tolist() == [False, True, False] and (s.n_tokens_chosen > 0).all()


# ---- training through the trainer ----------------------------------------------------------------------------
@pytest.mark.parametrize("paradigm", ["masked", "ar"])
def test_dpo_steps(world: dict[str, Path], tmp_path: Path, paradigm: str) -> None:
    """Three DPO steps through run_training: loss ln 2 at step 0 (policy = reference), finite after; every
    LoRA weight moved; the restorer's base weights and the codec unchanged; final/ is a peft LoRA directory that
    load_restorer and peft's PeftModel.from_pretrained both turn back into the trained policy."""
    from peft import PeftModel

    adapter, result, rows = _run(world, paradigm, tmp_path / "run", save_final=True)
    assert result.step == 3 and result.skipped_steps == 0
    assert rows[0]["loss"] == pytest.approx(math.log(2.0), rel=1e-5)
    assert all(math.isfinite(r["loss"]) for r in rows)
    trained = _state(adapter.model)
    fresh = _adapter(world, paradigm)
    cfg = _train_cfg(tmp_path / "unused")
    torch.manual_seed(cfg.seed)  # train() seeds (set_seed) before it injects LoRA
    add_lora(fresh.model, cfg.lora, fresh.lora_target_modules)
    init = {k: v for k, v in _state(fresh.model).items() if "lora_" in k}
    assert init and set(init) == {k for k in trained if "lora_" in k}
    assert [k for k, v in init.items() if torch.equal(trained[k], v)] == []  # every LoRA weight moved
    base = {k: v for k, v in trained.items() if "lora_" not in k}
    assert all(torch.equal(v, _state(fresh.model)[k]) for k, v in base.items())  # the base did not
    codec_now = adapter.codec.state_dict()
    codec_saved = SpeechCodec.from_pretrained(world[paradigm] / "codec").state_dict()
    assert all(torch.equal(codec_now[k], v) for k, v in codec_saved.items())  # nor the codec

    final = result.final_dir
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    batch = adapter.collate(_records(world)[:2], [1, 2])
    cond, tokens = batch["cond"], batch["codes"][:2]
    if paradigm == "masked":
        tokens = torch.where(batch["score_mask"], K, tokens)
    adapter.model.eval()
    loaded, _ = load_restorer(final)
    cls = MaskedTokenRestorer if paradigm == "masked" else ARTokenRestorer
    via_peft = PeftModel.from_pretrained(cls.from_pretrained(world[paradigm]), final).eval()
    with torch.no_grad():
        want = adapter.model(tokens, cond)
        with lora_disabled(adapter.model):
            assert not torch.allclose(adapter.model(tokens, cond), want, atol=1e-5)  # the LoRA does something
        assert torch.allclose(loaded(tokens, cond), want, atol=1e-6)
        assert torch.allclose(via_peft(tokens, cond), want, atol=1e-6)


@pytest.mark.parametrize("paradigm", ["masked", "ar"])
def test_cached_reference_trains_like_the_live_one(world: dict[str, Path], tmp_path: Path, paradigm: str) -> None:
    """train.precompute_reference=true (reference log-probs scored once per epoch — the masked model's masks
    are per (sample, epoch) — cached on disk) gives the live run's metrics and LoRA weights over 4 steps (two
    epochs of 8 records in batches of 4)."""
    runs = {}
    for precompute in (False, True):
        out = tmp_path / f"pre{precompute}"
        adapter, _, rows = _run(world, paradigm, out, max_steps=4, precompute_reference=precompute)
        runs[precompute] = (rows, _state(adapter.model))
    assert list((tmp_path / "preTrue-cache").glob("ref-*.safetensors"))
    assert not (tmp_path / "preFalse-cache").exists()
    (live_rows, live_state), (cached_rows, cached_state) = runs[False], runs[True]
    assert len(live_rows) == len(cached_rows) == 4
    for a, b in zip(live_rows, cached_rows):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
            # relative too: a summed log-prob of ~ -224 carries float32 rounding of ~2e-5 from its batch
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-5), (a["step"], key)
    for k, v in live_state.items():
        assert torch.allclose(cached_state[k], v, atol=1e-5), k


@pytest.mark.parametrize("paradigm", ["masked", "ar"])
def test_resume_equals_the_uninterrupted_run(world: dict[str, Path], tmp_path: Path, paradigm: str) -> None:
    """A run stopped at step 2 and resumed from its checkpoint (a fresh adapter, as a new process would build)
    ends exactly where the uninterrupted 4-step run does: the same metrics at steps 3-4, the same LoRA weights
    bit for bit (data order, crops and masks are functions of (seed, epoch, index))."""
    adapter, _, full_rows = _run(world, paradigm, tmp_path / "full", max_steps=4, checkpointing_steps=2)
    _run(world, paradigm, tmp_path / "split", max_steps=2, checkpointing_steps=2)
    resumed, _, rows = _run(world, paradigm, tmp_path / "split", max_steps=4, checkpointing_steps=2,
                            resume_from="latest")
    assert [r["step"] for r in rows][-2:] == [3, 4]
    for a, b in zip(full_rows[2:], rows[-2:]):
        assert a["step"] == b["step"] and a["loss"] == b["loss"] and a["rewards/margins"] == b["rewards/margins"]
    want, got = _state(adapter.model), _state(resumed.model)
    assert all(torch.equal(got[k], v) for k, v in want.items())


def test_full_finetune_saves_a_restorer_directory(world: dict[str, Path], tmp_path: Path) -> None:
    """finetune=full: the reference is a frozen copy (step-0 loss ln 2); final/ is a restorer directory with the
    codec in codec/, which load_restorer loads to the trained weights."""
    adapter, result, rows = _run(world, "ar", tmp_path / "full", finetune="full", learning_rate=1e-3, max_steps=2,
                                 save_final=True)
    assert rows[0]["loss"] == pytest.approx(math.log(2.0), rel=1e-5)
    loaded, codec = load_restorer(result.final_dir)
    assert (result.final_dir / "codec" / "model.safetensors").is_file()
    trained = adapter.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())
    fresh = ARTokenRestorer.from_pretrained(world["ar"]).state_dict()
    assert any(not torch.equal(fresh[k], trained[k]) for k in trained)
