"""The speech world's shipped base restorers: their names resolve, they load through the user-facing loaders, they
restore an unseen dev clip to a finite wave of its length, they are imperfect (alignment has room), the shipped
weights fit the size budget, and the committed training script runs end to end (a tiny budget here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mm_align.audio.generate import load_restorer_any, sample_seed
from mm_align.audio.metrics import build_metrics
from mm_align.audio.toyworld import train_speech_restorers as trainer
from mm_align.audio.toyworld.asr_weights import WEIGHTS_DIR
from mm_align.audio.toyworld.speech_world import degrade, read_split
from mm_align.audio.toyworld.world_models import WORLD_RESTORERS, resolve_restorer, restorer_dir

PARADIGMS = ("flow", "masked", "ar")


TORCH_THREADS = 2  # the shipped speech-world models (tests/audio/conftest.py)


def test_names_resolve_to_the_shipped_directories(tmp_path, monkeypatch):
    for name, paradigm in WORLD_RESTORERS.items():
        assert resolve_restorer(name) == str(restorer_dir(paradigm))
    assert resolve_restorer("/some/dir") == "/some/dir"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "speech_flow").mkdir()  # a local directory of that name wins
    assert resolve_restorer("speech_flow") == "speech_flow"
    with pytest.raises(ValueError, match="paradigm"):
        restorer_dir("diffusion")


def test_shipped_weights_fit_the_budget():
    files = [f for f in WEIGHTS_DIR.rglob("*") if f.is_file() and f.suffix in (".json", ".safetensors")]
    assert sum(f.stat().st_size for f in files) <= 25 * 2**20  # the three bases, their codec and the recogniser
    for paradigm in PARADIGMS:
        assert (restorer_dir(paradigm) / "model.safetensors").is_file()


@pytest.mark.parametrize("paradigm", PARADIGMS)
def test_base_restores_an_unseen_clip_imperfectly(paradigm):
    utt = read_split("dev", limit=1)[0]
    degraded, clean = degrade(utt, 0)
    sampler = load_restorer_any(f"speech_{paradigm}")
    assert sampler.paradigm == paradigm and sampler.sample_rate == 16000
    with torch.no_grad():
        out = sampler(degraded, 16000, sample_seed(0, utt.id, 0))
        again = sampler(degraded, 16000, sample_seed(0, utt.id, 0))
        other = sampler(degraded, 16000, sample_seed(0, utt.id, 1))
    assert out.shape == clean.shape and torch.isfinite(out).all()
    assert torch.equal(out, again) and not torch.equal(out, other)  # seeded, and seeds give different samples
    estoi = build_metrics(["estoi"])[0]
    assert estoi.score(out.numpy(), clean.numpy()) < 0.95  # imperfect: room for alignment


def test_training_script_runs_and_saves_loadable_models(tmp_path, monkeypatch):
    utts = read_split("train", limit=3)
    pairs = [degrade(u, 1) for u in utts]
    monkeypatch.setattr(trainer, "read_split", lambda split, limit=None: utts)
    small = {k: trainer.Recipe(**{**trainer.asdict(r), "steps": 2, "batch_size": 2})
             for k, r in trainer.RECIPES.items()}
    monkeypatch.setattr(trainer, "RECIPES", small)
    log = trainer.train_flow(pairs, tmp_path / "flow")
    log.update(trainer.train_tokens(pairs, tmp_path / "masked", tmp_path / "ar"))
    assert {"recipe", "first_loss", "last_loss"} <= set(log) and {"codec", "masked", "ar"} <= set(log)
    for name in ("flow", "masked", "ar"):
        sampler = load_restorer_any(Path(tmp_path / name))
        assert sampler.paradigm == name
    first = (tmp_path / "ar" / "model.safetensors").read_bytes()
    trainer.train_tokens(pairs, tmp_path / "masked2", tmp_path / "ar2")
    assert (tmp_path / "ar2" / "model.safetensors").read_bytes() == first  # deterministic on a CPU
