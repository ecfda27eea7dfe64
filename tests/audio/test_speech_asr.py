"""The speech world's shipped recogniser (a tiny transformers CTC model): it loads through the public loader
(``TransformersCTCASR``: ``AutoModelForCTC`` + ``AutoProcessor``), fits the weights budget, transcribes unseen-voice
DEV speech well, and reads badly degraded speech clearly worse — so the content metric tells a good restoration
from a bad one."""

from __future__ import annotations

import jiwer
import pytest
import torch
from mm_align.audio.asr import TransformersCTCASR, normalize_transcript
from mm_align.audio.degradations import DegradationChain, Noise
from mm_align.audio.io import load_audio
from mm_align.audio.toyworld.asr_weights import speech_asr_dir
from mm_align.audio.toyworld.speech_world import SAMPLE_RATE, read_split

N_DEV = 8
# measured on these 8 clips: clean CER 0.019 / WER 0.089 (the whole dev split: 0.011 / 0.046); white noise at
# -5 dB SNR: CER 0.28 / WER 0.61. CER has a floor from the grammar's fixed words ("the ... the"), WER separates more.
CLEAN_CER_MAX = 0.08
NOISY_CER_MIN = 0.2


@pytest.fixture(scope="module")
def asr_and_dev():
    asr = TransformersCTCASR(speech_asr_dir())
    dev = read_split("dev", limit=N_DEV)
    waves = [load_audio(u.clean, SAMPLE_RATE)[0] for u in dev]
    return asr, dev, waves


def _rates(asr: TransformersCTCASR, waves: list[torch.Tensor], texts: list[str]) -> tuple[float, float]:
    """Corpus (CER, WER) of the transcripts, both sides through ``normalize_transcript``."""
    hyps = [normalize_transcript(asr.transcribe(w.numpy())) for w in waves]
    refs = [normalize_transcript(t) for t in texts]
    return float(jiwer.cer(refs, hyps)), float(jiwer.wer(refs, hyps))


def test_shipped_files_and_size():
    d = speech_asr_dir()
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "tokenizer_config.json"} <= names
    assert all(p.suffix in (".json", ".safetensors") for p in d.iterdir())  # what package-data ships
    assert sum(p.stat().st_size for p in d.iterdir()) <= 5 * 2**20


def test_transcribes_unseen_voice_dev_speech(asr_and_dev):
    asr, dev, waves = asr_and_dev
    assert asr.sample_rate == SAMPLE_RATE
    assert _rates(asr, waves, [u.text for u in dev])[0] <= CLEAN_CER_MAX


def test_strong_degradation_is_read_clearly_worse(asr_and_dev):
    asr, dev, waves = asr_and_dev
    noisy = [DegradationChain((Noise(kind="white", snr=-5.0),))(w, SAMPLE_RATE, seed=i) for i, w in enumerate(waves)]
    texts = [u.text for u in dev]
    (clean_cer, clean_wer), (bad_cer, bad_wer) = _rates(asr, waves, texts), _rates(asr, noisy, texts)
    assert bad_cer >= NOISY_CER_MIN and bad_cer >= clean_cer + 0.15
    assert bad_wer >= clean_wer + 0.3
