"""`mm-align doctor --modality speech` and `mm-align convert speech` go through the CLI's registry."""

from __future__ import annotations

import json

from mm_align.audio.io import save_audio

from mm_align.cli import main

from .speech_signals import speech_like


def _pairs(root, rate=16000):
    wave = speech_like(seconds=1.0, seed=0)
    for name in ("deg", "w", "l"):
        save_audio(root / f"{name}.wav", wave * 0.5, rate)
    save_audio(root / "silent.wav", wave * 0.0, rate)
    rows = [{"id": "a", "degraded": "deg.wav", "chosen": "w.wav", "rejected": "l.wav"},
            {"id": "b", "degraded": "deg.wav", "chosen": "silent.wav", "rejected": "l.wav"}]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "pairs.jsonl"


def test_doctor_speech_names_the_silent_file(tmp_path, capsys):
    assert main(["doctor", str(_pairs(tmp_path)), "--modality", "speech"]) == 1
    out = capsys.readouterr().out
    assert "pairs.jsonl:2" in out and "silent.wav" in out


def test_doctor_sample_rate_flag(tmp_path, capsys):
    data = _pairs(tmp_path, rate=8000)
    main(["doctor", str(data), "--modality", "speech"])
    assert "wrong_sample_rate" in capsys.readouterr().out  # 8 kHz files against the default 16 kHz
    main(["doctor", str(data), "--modality", "speech", "--sample-rate", "8000"])
    assert "wrong_sample_rate" not in capsys.readouterr().out
    assert main(["doctor", str(data), "--sample-rate", "8000"]) == 2
    assert "--modality speech only" in capsys.readouterr().err


def test_convert_speech_is_registered(tmp_path, capsys):
    vb = tmp_path / "vb"
    wave = speech_like(seconds=0.5, seed=1)
    for sub in ("clean_testset_wav", "noisy_testset_wav"):
        save_audio(vb / sub / "p232_001.wav", wave * 0.3, 16000)
    assert main(["convert", "speech", "--from", "voicebank", str(vb), "--to", "manifest",
                 str(tmp_path / "out.jsonl")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["id"] == "p232_001"
