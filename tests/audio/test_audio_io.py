"""audio/io.py: read/write round trips, resampling, mono mixdown, RMS normalisation, bad files named."""

import math
import stat

import numpy as np
import pytest
import soundfile as sf
import torch
from mm_align.audio.io import AudioError, load_audio, normalize_rms, resample, rms_dbfs, save_audio, to_mono


def _tone(sr=16000, seconds=0.5, freq=440.0):
    t = torch.arange(int(sr * seconds)) / sr
    return 0.5 * torch.sin(2 * math.pi * freq * t)


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_round_trip_within_pcm16_step(tmp_path, suffix):
    wave = _tone()
    path = save_audio(tmp_path / f"a{suffix}", wave, 16000)
    back, sr = load_audio(path)
    assert sr == 16000 and back.shape == wave.shape and back.dtype == torch.float32
    assert (back - wave).abs().max() <= 1.0 / 32768 + 1e-6
    assert stat.S_IMODE(path.stat().st_mode) & 0o044  # umask permissions, not the temp file's 0600


def test_load_resamples_and_mixes_down(tmp_path):
    stereo = np.stack([_tone(8000).numpy(), np.zeros(4000, np.float32)], axis=1)
    sf.write(tmp_path / "s.wav", stereo, 8000)
    wave, sr = load_audio(tmp_path / "s.wav", sample_rate=16000)
    assert sr == 16000 and wave.dim() == 1 and abs(wave.numel() - 8000) <= 1
    assert abs(float(wave.abs().max()) - 0.25) < 0.02  # the channel mean of 0.5·sin and silence


def test_resample_keeps_a_tone():
    up = resample(_tone(8000, freq=300.0), 8000, 16000)
    spec = torch.fft.rfft(up).abs()
    assert abs(int(spec.argmax()) * 16000 / up.numel() - 300.0) < 3


def test_to_mono_layouts():
    x = torch.randn(2, 100)
    assert torch.allclose(to_mono(x), x.mean(0))
    assert torch.allclose(to_mono(x.T), x.mean(0))


def test_normalize_rms_hits_target_and_limits_peak():
    wave = _tone() * 0.01
    out = normalize_rms(wave, -20.0)
    assert abs(rms_dbfs(out) - (-20.0)) < 1e-3
    loud = normalize_rms(wave, 0.0)
    assert float(loud.abs().max()) <= 0.99 + 1e-6
    assert torch.equal(normalize_rms(torch.zeros(10)), torch.zeros(10))


def test_bad_files_are_named(tmp_path):
    with pytest.raises(AudioError, match="missing.wav: audio file not found"):
        load_audio(tmp_path / "missing.wav")
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")
    with pytest.raises(AudioError, match="junk.wav: not a readable audio file"):
        load_audio(tmp_path / "junk.wav")
    sf.write(tmp_path / "empty.wav", np.zeros((0,), np.float32), 16000)
    with pytest.raises(AudioError, match="empty.wav: the file holds no samples"):
        load_audio(tmp_path / "empty.wav")
    with pytest.raises(AudioError, match="NaN or inf"):
        save_audio(tmp_path / "nan.wav", torch.tensor([0.0, float("nan")]), 16000)


def test_speech_pairs_manifest_and_shared_crop(tmp_path):
    import json

    from mm_align.audio.speech_records import load_pair_waves, read_speech_pairs

    for name, scale in (("deg", 1.0), ("w", 0.5), ("l", 0.25)):
        save_audio(tmp_path / f"{name}.wav", _tone(16000, 1.0) * scale, 16000)
    row = {"id": "p1", "degraded": "deg.wav", "chosen": "w.wav", "rejected": "l.wav", "text": "hi"}
    (tmp_path / "pairs.jsonl").write_text(json.dumps(row) + "\n")
    result = read_speech_pairs(tmp_path / "pairs.jsonl")
    rec = result.records[0]
    assert rec.prompt == "deg.wav" and rec.meta["text"] == "hi"
    a = load_pair_waves(rec, tmp_path, 16000, 4000, seed=7)
    b = load_pair_waves(rec, tmp_path, 16000, 4000, seed=7)
    assert a.degraded.shape == (4000,) and all(w.shape == (4000,) for w in a.outputs)
    assert torch.equal(a.degraded, b.degraded)
    # one offset for all three: the chosen crop is the degraded crop at half the amplitude
    assert torch.allclose(a.outputs[0], a.degraded * 0.5, atol=2e-4)
    assert torch.allclose(a.outputs[1], a.degraded * 0.25, atol=2e-4)
    rec.chosen = "missing.wav"
    with pytest.raises(AudioError, match=r"pairs.jsonl:1: .*missing.wav: audio file not found"):
        load_pair_waves(rec, tmp_path, 16000, 4000, seed=7)
