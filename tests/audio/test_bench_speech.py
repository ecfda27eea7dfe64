"""audio/bench.py: ``mm-align bench speech`` end to end with tiny untrained restorers (flow and masked) on three short
synthetic clips: every metric and model in results.json, ordered intervals, paired seeds (a model benchmarked twice
differs from itself by exactly 0), determinism, the report's players and spectrograms, bad inputs named."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from mm_align.audio import bench as bench_module
from mm_align.audio.bench import bench_main, bench_speech, default_metrics, parse_model, results_markdown
from mm_align.audio.bench_report import spectrogram_db, spectrogram_png
from mm_align.audio.datasets import SpeechClip
from mm_align.audio.io import AudioError, save_audio
from mm_align.audio.token_models import MaskedRestorerConfig, MaskedTokenRestorer, save_restorer

from .speech_signals import add_white_noise, speech_like
from .tiny_restorers import TOKEN_SHAPE, tiny_codec, write_tiny_restorers

SR = 16000
CHEAP = ["si_sdr", "lsd", "estoi"]
SHAPE = TOKEN_SHAPE


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny untrained restorers whose outputs the suite can score (about −31 dBFS: not silent, not clipped)."""
    return write_tiny_restorers(tmp_path_factory.mktemp("bench_models"))


def _write_set(root, n: int = 3, seconds: float = 0.75):
    """``n`` speech-like clips plus white noise (5, 10, 15 dB) with clean references and transcripts."""
    rows = []
    for i in range(n):
        clean = speech_like(seconds, SR, seed=i, f0=110.0 + 25 * i)
        save_audio(root / f"clean/u{i}.wav", clean, SR)
        save_audio(root / f"noisy/u{i}.wav", add_white_noise(clean, 5.0 + 5 * i, seed=i), SR)
        rows.append({"id": f"spk/u{i}", "degraded": f"noisy/u{i}.wav", "clean": f"clean/u{i}.wav",
                     "text": f"utterance {i}"})
    (root / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "set.jsonl"


@pytest.fixture
def manifest(tmp_path):
    return _write_set(tmp_path / "set")


def _argv(models, manifest, out, *extra):
    return ["--model", f"base={models / 'flow'}", "--model", f"aligned={models / 'masked'}",
            "--model", f"twin={models / 'flow'}", "--inputs", str(manifest), "--out", str(out),
            *sum((["--metric", m] for m in CHEAP), []), "--steps", "2", "--num-workers", "0", "--n-boot", "500",
            "--examples", "2", *extra]


def _without_timing(path):
    data = json.loads(path.read_text())
    assert isinstance(data.pop("timing"), dict)
    return data


def test_results_every_metric_and_model_paired_and_deterministic(models, manifest, tmp_path, capsys):
    out = tmp_path / "bench"
    assert bench_main(_argv(models, manifest, out)) == 0
    printed = capsys.readouterr().out
    assert "| SI-SDR (dB) | higher |" in printed and "report:" in printed
    r = json.loads((out / "results.json").read_text())
    assert set(r) >= {"inputs", "models", "order", "baseline", "metrics", "directions", "degraded", "bootstrap",
                      "seed", "steps", "left_out", "timing", "versions"}
    assert r["order"] == ["base", "aligned", "twin"] and r["baseline"] == "base" and r["metrics"] == CHEAP
    assert r["directions"] == {"si_sdr": "higher", "lsd": "lower", "estoi": "higher"} and r["left_out"] == {}
    assert r["inputs"]["ids"] == ["spk/u0", "spk/u1", "spk/u2"] and r["inputs"]["clips"] == 3
    assert {n: m["paradigm"] for n, m in r["models"].items()} == {"base": "flow", "aligned": "masked", "twin": "flow"}
    assert set(r["timing"]) >= {"restore_seconds", "total_seconds"}
    for m in CHEAP:
        degraded = r["degraded"]["metrics"][m]
        assert len(degraded["per_clip"]) == 3 and degraded["mean"] == pytest.approx(np.mean(degraded["per_clip"]))
    # the degraded row: SI-SDR near each clip's SNR (5, 10, 15 dB)
    assert r["degraded"]["metrics"]["si_sdr"]["per_clip"] == pytest.approx([5, 10, 15], abs=0.5)
    for name, model in r["models"].items():
        assert set(model["metrics"]) == set(CHEAP)
        for m, e in model["metrics"].items():
            assert e["direction"] == r["directions"][m] and len(e["per_clip"]) == 3
            assert all(np.isfinite(e["per_clip"])) and e["mean"] == pytest.approx(np.mean(e["per_clip"]))
            comparisons = [e["vs_degraded"]] + ([e["vs_baseline"]] if name != "base" else [])
            assert ("vs_baseline" in e) == (name != "base")
            for vs in comparisons:
                low, high = vs["ci"]
                assert low <= vs["mean_diff"] <= high and vs["n"] == 3 and vs["n_boot"] == 500
                assert vs["improved"] == (low > 0) and vs["worse"] == (high < 0)
        assert sorted(f.name[:6] for f in (out / model["audio"]).glob("*.wav")) == ["spk_u0", "spk_u1", "spk_u2"]
    # the same seed per clip for every model: the twin of the baseline restores identically
    for m in CHEAP:
        twin = r["models"]["twin"]["metrics"][m]
        assert twin["per_clip"] == r["models"]["base"]["metrics"][m]["per_clip"]
        assert twin["vs_baseline"]["mean_diff"] == 0 and twin["vs_baseline"]["ci"] == [0.0, 0.0]
        assert not twin["vs_baseline"]["improved"] and not twin["vs_baseline"]["worse"]
    # lower is better for LSD: the oriented difference is baseline − model
    lsd = r["models"]["aligned"]["metrics"]["lsd"]
    base_lsd = r["models"]["base"]["metrics"]["lsd"]["mean"]
    assert lsd["vs_baseline"]["mean_diff"] == pytest.approx(base_lsd - lsd["mean"])

    md = (out / "results.md").read_text()
    assert md == results_markdown(r) and "aligned − base [95% CI]" in md and "| LSD | lower |" in md
    page = (out / "report.html").read_text()
    assert page.count("<audio ") == 2 * 5  # 2 examples × (degraded, 3 models, clean)
    assert page.count('src="data:image/png;base64,') == 2 * 5 and page.count("<svg ") == len(CHEAP)
    links = re.findall(r'<audio [^>]*src="([^"]+)"', page)
    assert all(not s.startswith(("/", "data:")) and (out / s).is_file() for s in links)  # relative, and there
    assert "audio/degraded/spk_u0-" in page and "audio/clean/spk_u0-" in page and "https://" not in page
    assert "utterance 0" in page

    before = _without_timing(out / "results.json")
    assert bench_main(_argv(models, manifest, out)) == 0
    assert _without_timing(out / "results.json") == before  # the same command, the same results


def test_baseline_option_embedded_audio_and_api(models, manifest, tmp_path):
    r = bench_speech({"a": models / "masked", "b": models / "flow"}, manifest, tmp_path / "o", metrics=["si_sdr"],
                     baseline="b", steps=1, num_workers=0, n_boot=200, examples=1, max_inputs=2, embed_audio=True,
                     progress=False)
    assert r["baseline"] == "b" and "vs_baseline" in r["models"]["a"]["metrics"]["si_sdr"]
    assert "vs_baseline" not in r["models"]["b"]["metrics"]["si_sdr"] and r["inputs"]["clips"] == 2
    page = (tmp_path / "o" / "report.html").read_text()
    assert page.count('src="data:audio/wav;base64,') == 4  # degraded, a, b, clean
    with pytest.raises(TypeError, match="unknown bench speech option"):
        bench_speech({"a": models / "flow"}, manifest, tmp_path / "x", metrics=["si_sdr"], colour="red")


def test_a_silent_degraded_input_is_an_error_naming_the_file(models, manifest, tmp_path, monkeypatch, capsys):
    silent = manifest.parent / "noisy" / "u1.wav"
    save_audio(silent, np.zeros(SR // 2, dtype=np.float32), SR)

    def no_model(*a, **k):
        raise AssertionError("a bad input must fail before any model runs")

    monkeypatch.setattr(bench_module, "load_restorer_any", no_model)
    with pytest.raises(AudioError, match=re.escape(str(silent)) + ": silent"):
        bench_speech({"base": models / "flow"}, manifest, tmp_path / "o", metrics=CHEAP, num_workers=0, progress=False)
    assert bench_main(_argv(models, manifest, tmp_path / "o2")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # the line after the suite's progress bar
    assert err.startswith("error: ") and str(silent) in err and "silent" in err and "Traceback" not in err


def test_a_silent_restoration_is_an_error_naming_the_file(models, manifest, tmp_path):
    """An untrained codec at its own scale decodes to about −64 dBFS: silent, an error naming the restored file."""
    codec = tiny_codec()
    torch.manual_seed(0)
    save_restorer(MaskedTokenRestorer(MaskedRestorerConfig(**SHAPE)), codec, tmp_path / "quiet")
    with pytest.raises(AudioError, match=r"audio/quiet/spk_u0-[0-9a-f]{8}\.wav: silent"):
        bench_speech({"quiet": tmp_path / "quiet"}, manifest, tmp_path / "o", metrics=["si_sdr"], steps=1,
                     num_workers=0, max_inputs=1, progress=False)


def test_default_metrics_follow_what_the_set_has(tmp_path):
    full = [SpeechClip("a", tmp_path / "a.wav", tmp_path / "c.wav", "hi")]
    specs, left = default_metrics(full, tmp_path / "asr")
    assert specs[:9] == ["pesq_wb", "estoi", "si_sdr", "lsd", "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl",
                         "dnsmos_p808", "speaker_similarity"]
    assert specs[9:] == [f"wer:asr={(tmp_path / 'asr').resolve()}", f"cer:asr={(tmp_path / 'asr').resolve()}"]
    assert left == {}
    specs, left = default_metrics(full, None)
    assert "wer" not in " ".join(specs) and "--asr" in left["wer"] and set(left) == {"wer", "cer"}
    blind = [SpeechClip("a", tmp_path / "a.wav"), SpeechClip("b", tmp_path / "b.wav", tmp_path / "c.wav", "x")]
    specs, left = default_metrics(blind, tmp_path / "asr")
    assert specs == ["dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808"]
    assert set(left) == {"pesq_wb", "estoi", "si_sdr", "lsd", "speaker_similarity", "wer", "cer"}
    assert "1 of 2 clips have no clean reference (e.g. 'a')" in left["si_sdr"] and "transcript" in left["wer"]


def test_full_default_metric_set_on_one_clip(models, tmp_path):
    """Every default metric of a set with references and transcripts (WER / CER with the speech world's
    recogniser), one clip, one model."""
    from mm_align.audio.toyworld.asr_weights import speech_asr_dir

    manifest = _write_set(tmp_path / "one", n=1, seconds=1.0)
    r = bench_speech({"base": models / "flow"}, manifest, tmp_path / "o", asr=str(speech_asr_dir()), steps=1,
                     num_workers=0, n_boot=100, examples=1, progress=False)
    expected = ["pesq_wb", "estoi", "si_sdr", "lsd", "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808",
                "speaker_similarity", "wer", "cer"]
    assert r["metrics"] == expected and r["left_out"] == {}
    assert r["directions"]["wer"] == "lower" and r["directions"]["dnsmos_ovrl"] == "higher"
    for m in expected:
        assert np.isfinite(r["models"]["base"]["metrics"][m]["mean"])
        assert np.isfinite(r["degraded"]["metrics"][m]["mean"])
    assert (tmp_path / "o" / "report.html").read_text().count("<svg ") == 0  # only the baseline: no chart


def test_spectrogram_png():
    from io import BytesIO

    from PIL import Image

    wave = speech_like(0.5, SR, seed=3)
    db = spectrogram_db(wave, SR)
    assert db.shape == (257, len(wave) // 128 + 1) and np.isfinite(db).all()
    image = Image.open(BytesIO(spectrogram_png(db, float(db.max()), seconds=0.5)))
    assert image.format == "PNG" and image.size == (60, 128) and image.mode == "P"
    assert spectrogram_db(np.zeros(10, dtype=np.float32), SR).shape[0] == 257  # shorter than a window: padded


def test_command_line_errors(models, manifest, tmp_path, capsys):
    out = str(tmp_path / "o")
    flow = str(models / "flow")
    cases = [
        ([], "needs --model and --inputs and --out"),
        (["--model", "base", "--inputs", str(manifest), "--out", out], "not NAME=DIR"),
        (["--model", f"degraded={flow}", "--inputs", str(manifest), "--out", out], "reserved"),
        (["--model", f"a/b={flow}", "--inputs", str(manifest), "--out", out], "names a folder"),
        (["--model", f"a={tmp_path / 'nope'}", "--inputs", str(manifest), "--out", out], "no such directory"),
        (["--model", f"a={flow}", "--model", f"a={flow}", "--inputs", str(manifest), "--out", out], "share a name"),
        (["--model", f"a={flow}", "--baseline", "b", "--inputs", str(manifest), "--out", out], "--baseline 'b'"),
        (["--model", f"a={flow}", "--inputs", str(tmp_path / "none.jsonl"), "--out", out], "no such file"),
        (["--model", f"a={flow}", "--inputs", "world:nowhere", "--out", out], "split"),
        (["--model", f"a={flow}", "--inputs", str(manifest), "--out", out, "--metric", "nope"], "not one of"),
        (["--model", f"a={flow}", "--inputs", str(manifest), "--out", out, "--steps", "two"], "invalid int"),
    ]
    for argv, expected in cases:
        assert bench_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
    assert parse_model(f"x={flow}").name == "x"
    assert bench_main(["--help"]) == 0
    assert "mm-align bench speech" in capsys.readouterr().out
