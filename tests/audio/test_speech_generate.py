"""audio/generate.py: GenSR-Pref speech pairs. The unanimous rule on graded degradations of one clip with a known
order (the acceptance item), disagreement / margins / the single-metric ablation / bad audio, and the end-to-end
``mm-align generate speech`` with tiny flow and masked restorers (files, manifest read back, counts, resume)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mm_align.audio import generate as gen
from mm_align.audio.datasets import SpeechClip
from mm_align.audio.generate import (
    decide_pairs,
    generate_main,
    generate_speech_pairs,
    pair_rules,
    pairs_from_candidates,
    sample_seed,
)
from mm_align.audio.io import save_audio
from mm_align.audio.metrics import build_metrics
from mm_align.audio.speech_records import read_speech_pairs
from mm_align.audio.token_models import MaskedRestorerConfig, MaskedTokenRestorer, save_restorer

from .tiny_restorers import TOKEN_SHAPE, write_tiny_restorers

SR = 16000
CHEAP = ["si_sdr", "lsd", "estoi"]
SHAPE = TOKEN_SHAPE


def _clean(n: int = SR, f0: float = 150.0) -> torch.Tensor:
    """A harmonic tone with a slow envelope (speech-like enough for SI-SDR, LSD and ESTOI)."""
    t = torch.arange(n) / SR
    wave = sum(0.2 / k * torch.sin(2 * math.pi * k * f0 * t + k) for k in range(1, 6))
    return wave * (0.7 + 0.3 * torch.sin(2 * math.pi * 2.0 * t))


def _at_snr(clean: torch.Tensor, snr_db: float, seed: int = 0) -> torch.Tensor:
    """``clean`` plus white noise scaled to ``snr_db`` (one noise draw, so only the level differs)."""
    noise = torch.randn(clean.numel(), generator=torch.Generator().manual_seed(seed))
    return clean + noise * clean.pow(2).mean().sqrt() / noise.pow(2).mean().sqrt() * 10 ** (-snr_db / 20)


# ---- the rule on graded degradations (acceptance) ------------------------------------------------------------
def test_unanimous_rule_on_graded_degradations_of_one_clip():
    """White noise at 30, 20, 10, 0 dB on one clip: every metric orders them by SNR, so the best-vs-worst
    unanimous pair is 30 dB over 0 dB and every gap (oriented: positive = chosen better) is positive."""
    clean = _clean()
    snrs = [10, 30, 0, 20]  # shuffled: the rule must not depend on the input order
    waves = [_at_snr(clean, s) for s in snrs]
    out = pairs_from_candidates(waves, SR, CHEAP, reference=clean, clip_id="u1")
    assert out.reason is None and out.skipped == {} and len(out.pairs) == 1
    pair = out.pairs[0]
    assert (snrs[pair.chosen.sample], snrs[pair.rejected.sample]) == (30, 0)
    assert set(pair.gaps) == set(CHEAP) and all(g > 0 for g in pair.gaps.values())
    by_snr = sorted(range(4), key=lambda k: snrs[k])  # 0, 10, 20, 30 dB
    for m, higher in (("si_sdr", True), ("lsd", False), ("estoi", True)):
        values = [out.scores[k][m] for k in by_snr]
        assert values == sorted(values, reverse=not higher), (m, values)  # the known order, on every metric
    assert abs(out.scores[snrs.index(30)]["si_sdr"] - 30) < 0.5 and abs(out.scores[snrs.index(0)]["si_sdr"]) < 0.5

    every = pairs_from_candidates(waves, SR, CHEAP, reference=clean, strategy="all_pairs")
    assert len(every.pairs) == 6 and every.discarded == {}
    assert all(snrs[p.chosen.sample] > snrs[p.rejected.sample] for p in every.pairs)


def test_disagreeing_metrics_give_no_pair_and_single_metric_keeps_it():
    """White noise at 20 dB against a hum between the harmonics at 5 dB: SI-SDR prefers the noise (20 > 5 dB);
    LSD and ESTOI prefer the hum (white noise fills the empty bins of the log spectrum): no unanimous winner.
    Each metric alone keeps a pair, and two of them the opposite one (the reward hacking §7 warns of)."""
    clean = _clean()
    tone = torch.sin(2 * math.pi * 225.0 * torch.arange(SR) / SR)
    hum = clean + tone * clean.pow(2).mean().sqrt() / tone.pow(2).mean().sqrt() * 10 ** (-5 / 20)
    noisy = _at_snr(clean, 20)
    out = pairs_from_candidates([noisy, hum], SR, CHEAP, reference=clean, clip_id="u2")
    assert out.pairs == [] and out.reason == "not_unanimous" and out.discarded == {"not_unanimous": 1}
    s = out.scores
    assert s[0]["si_sdr"] > s[1]["si_sdr"] and s[0]["lsd"] > s[1]["lsd"] and s[0]["estoi"] < s[1]["estoi"]
    assert "no unanimous winner" in gen.REASON_LABELS[out.reason]

    single = pairs_from_candidates([noisy, hum], SR, CHEAP, reference=clean, single_metric="si_sdr")
    assert single.reason is None and (single.pairs[0].chosen.sample, single.pairs[0].rejected.sample) == (0, 1)
    assert set(single.pairs[0].gaps) == {"si_sdr"}  # the ablation pairs by one metric; all are still scored
    assert set(single.scores[0]) == set(CHEAP)
    lsd_only = pairs_from_candidates([noisy, hum], SR, CHEAP, reference=clean, single_metric="lsd")
    assert (lsd_only.pairs[0].chosen.sample, lsd_only.pairs[0].rejected.sample) == (1, 0)


def test_margins_discard_pairs_whose_gap_is_below_them():
    clean = _clean()
    waves = [_at_snr(clean, 20), _at_snr(clean, 19)]  # SI-SDR gap about 1 dB
    kept = pairs_from_candidates(waves, SR, ["si_sdr", "lsd"], reference=clean, margins={"si_sdr": 0.5})
    assert kept.reason is None and 0.5 < kept.pairs[0].gaps["si_sdr"] < 2
    cut = pairs_from_candidates(waves, SR, ["si_sdr", "lsd"], reference=clean, margins={"si_sdr": 2.0})
    assert cut.pairs == [] and cut.reason == "below_margin"
    assert "within margin" in gen.REASON_LABELS["below_margin"]
    with pytest.raises(ValueError, match="pesq_wb: not a scored metric"):
        pairs_from_candidates(waves, SR, ["si_sdr"], reference=clean, margins={"pesq_wb": 0.1})
    with pytest.raises(ValueError, match="single metric 'lsd' is not a scored metric"):
        pairs_from_candidates(waves, SR, ["si_sdr"], reference=clean, single_metric="lsd")


def test_crafted_scores_and_bad_audio():
    rules = pair_rules(build_metrics(["si_sdr", "lsd"]))
    assert [(r.name, r.higher_is_better) for r in rules] == [("si_sdr", True), ("lsd", False)]
    # 0 beats 2 on both; 1 wins si_sdr but loses lsd against both: the only unanimous pair is (0, 2)
    scores = [{"si_sdr": 10.0, "lsd": 1.0}, {"si_sdr": 12.0, "lsd": 3.0}, {"si_sdr": 5.0, "lsd": 2.0}, None]
    out = decide_pairs("x", scores, rules, skipped={3: "silent: ..."})
    assert [(p.chosen.sample, p.rejected.sample) for p in out.pairs] == [(0, 2)] and out.skipped == {3: "silent: ..."}
    assert decide_pairs("x", [None, scores[0]], rules).reason == "single_candidate"
    assert decide_pairs("x", [scores[0], dict(scores[0])], rules).reason == "tie"
    # the suite skips silent and clipped restorations with their reason; one usable candidate forms no pair
    clean = _clean(SR // 2)
    clipped = torch.sign(clean) * 1.0
    out = pairs_from_candidates([_at_snr(clean, 20), torch.zeros(SR // 2), clipped], SR, ["si_sdr"], reference=clean)
    assert out.reason == "single_candidate" and sorted(out.skipped) == [1, 2]
    assert out.skipped[1].startswith("silent") and out.skipped[2].startswith("clipped")


def test_sample_seeds_are_stable_and_distinct():
    assert sample_seed(0, "p232_001", 0) == sample_seed(0, "p232_001", 0) == 1828910509
    seeds = {sample_seed(s, i, k) for s in (0, 1) for i in ("a", "b") for k in range(4)}
    assert len(seeds) == 16 and all(0 <= x < 2**31 for x in seeds)


# ---- end to end -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny untrained restorers whose outputs the suite can score, and ``masked_quiet`` (about −64 dBFS: silent)."""
    root = tmp_path_factory.mktemp("speech_models")

    def quiet(codec):  # the same restorer over the unscaled codec
        save_restorer(MaskedTokenRestorer(MaskedRestorerConfig(**SHAPE)), codec, root / "masked_quiet")

    return write_tiny_restorers(root, before_scaling=quiet)


@pytest.fixture
def manifest(tmp_path):
    """Three degraded inputs with clean references and transcripts, in a restoration manifest."""
    d = tmp_path / "set"
    rows = []
    for i, snr in enumerate((5, 10, 15)):
        clean = _clean(SR // 2, 120.0 + 30 * i)
        save_audio(d / f"clean/u{i}.wav", clean, SR)
        save_audio(d / f"noisy/u{i}.wav", _at_snr(clean, snr, i), SR)
        rows.append({"id": f"spk/u{i}", "degraded": f"noisy/u{i}.wav", "clean": f"clean/u{i}.wav", "text": f"utt {i}"})
    (d / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d / "set.jsonl"


def _check_output(out, summary, n_inputs, n):
    assert summary["inputs"] == n_inputs and summary["candidates"] == n_inputs * n
    assert summary["inputs_paired"] + sum(summary["inputs_discarded"].values()) == n_inputs  # kept + discarded
    assert summary["candidates_scored"] + sum(summary["candidates_bad_audio"].values()) == n_inputs * n
    read = read_speech_pairs(out / "pairs.jsonl", strict=True)
    assert len(read.records) == summary["pairs"]
    rows = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    for rec, row in zip(read.records, rows):
        chosen, rejected = out / rec.chosen, out / rec.rejected
        assert chosen.is_file() and rejected.is_file() and chosen != rejected
        assert rec.chosen.startswith("samples/") and rec.rejected.startswith("samples/")  # the model's own samples
        assert rec.chosen != row["clean"] and rec.rejected != row["clean"]  # the clean target is never a candidate
        assert set(row) >= {"id", "degraded", "chosen", "rejected", "clean", "text", "scores"}
        degraded = Path(rec.prompt)
        assert (degraded if degraded.is_absolute() else out / degraded).is_file()
        assert rec.meta["text"].startswith("utt")
        for m, (w, l) in row["scores"].items():
            assert (w > l) if m != "lsd" else (w < l)  # the winner beats the loser on every metric
    return rows


def test_end_to_end_flow_resumes_and_redoes_only_missing_inputs(models, manifest, tmp_path, monkeypatch):
    out = tmp_path / "pairs"
    kw = dict(n=3, metrics=["si_sdr", "lsd"], steps=1, num_workers=0, progress=False)
    first = generate_speech_pairs(models / "flow", manifest, out, **kw)
    summary = json.loads((out / "summary.json").read_text())
    assert summary == first.summary and summary["new_inputs"] == 3 and summary["rule"] == "unanimous"
    rows = _check_output(out, summary, 3, 3)
    assert summary["pairs"] >= 1, summary
    assert {r["id"] for r in rows} <= {"spk/u0", "spk/u1", "spk/u2"}
    dirs = sorted(p for p in (out / "samples").iterdir())
    assert len(dirs) == 3 and all(sorted(f.name for f in d.iterdir()) == ["0.wav", "1.wav", "2.wav", "scores.json"]
                                  for d in dirs)
    state = json.loads((dirs[0] / "scores.json").read_text())
    assert [c["seed"] for c in state["candidates"]] == [sample_seed(0, state["id"], k) for k in range(3)]
    before = (out / "pairs.jsonl").read_bytes()

    def no_model(*a, **k):
        raise AssertionError("a rerun of finished inputs must not load the model")

    monkeypatch.setattr(gen, "load_restorer_any", no_model)
    again = generate_speech_pairs(models / "flow", manifest, out, **kw)
    assert again.summary["new_inputs"] == 0 and (out / "pairs.jsonl").read_bytes() == before
    monkeypatch.undo()

    mtimes = {d.name: (d / "scores.json").stat().st_mtime_ns for d in dirs}
    (dirs[1] / "scores.json").unlink()  # as if interrupted before that input finished
    (dirs[2] / "1.wav").unlink()  # a sample lost: that input is redone too
    redo = generate_speech_pairs(models / "flow", manifest, out, **kw)
    assert redo.summary["new_inputs"] == 2 and (out / "pairs.jsonl").read_bytes() == before
    assert (dirs[0] / "scores.json").stat().st_mtime_ns == mtimes[dirs[0].name]
    # other settings (here N) are another run: its inputs are redone
    assert generate_speech_pairs(models / "flow", manifest, out, **{**kw, "n": 2}).summary["new_inputs"] == 3
    assert sorted(f.name for f in dirs[0].iterdir()) == ["0.wav", "1.wav", "scores.json"]  # no stale sample


def test_end_to_end_masked_command(models, manifest, tmp_path, capsys):
    out = tmp_path / "masked"
    argv = ["--model", str(models / "masked"), "--inputs", str(manifest), "--out", str(out), "-n", "3",
            "--metric", "si_sdr", "--metric", "lsd", "--margin", "lsd=0.0", "--steps", "2", "--num-workers", "0"]
    assert generate_main(argv) == 0
    printed = capsys.readouterr().out
    assert "(unanimous over si_sdr, lsd)" in printed and "never the clean target" in printed
    summary = json.loads((out / "summary.json").read_text())
    _check_output(out, summary, 3, 3)
    states = [json.loads(p.read_text()) for p in sorted((out / "samples").glob("*/scores.json"))]
    scores = [tuple(c["scores"]["si_sdr"] for c in s["candidates"]) for s in states]
    assert all(len(set(s)) == 3 for s in scores)  # sampling is on: three seeds, three restorations
    before = (out / "pairs.jsonl").read_bytes()
    assert generate_main(argv) == 0 and (out / "pairs.jsonl").read_bytes() == before
    assert "0 new, 3 already done" in capsys.readouterr().out

    single = tmp_path / "single"
    assert generate_main([*argv[:5], str(single), *argv[6:], "--single-metric", "si_sdr", "--max-inputs", "2"]) == 0
    s = json.loads((single / "summary.json").read_text())
    assert s["rule"] == "single_metric" and s["pairs"] == s["inputs"] == 2  # one metric: always a best vs worst


def test_speech_world_inputs(models, tmp_path, capsys):
    out = tmp_path / "w"
    assert generate_main(["--model", str(models / "flow"), "--inputs", "world:dev", "--out", str(out), "--max-inputs",
                          "1", "-n", "2", "--metric", "si_sdr", "--steps", "1", "--num-workers", "0"]) == 0
    assert (out / "inputs" / "dev.jsonl").is_file()
    row = json.loads((out / "pairs.jsonl").read_text())  # one metric, two samples: one pair
    assert row["degraded"].startswith("inputs/degraded/") and Path(row["clean"]).is_absolute() and row["text"]
    assert row["chosen"] != row["clean"] and read_speech_pairs(out / "pairs.jsonl", strict=True).records


def test_bad_audio_is_counted_by_reason(models, manifest, tmp_path):
    """An untrained codec decodes to about −64 dBFS: every restoration is silent, skipped and counted."""
    r = generate_speech_pairs(models / "masked_quiet", manifest, tmp_path / "q", n=2, metrics=["si_sdr"], steps=1,
                              num_workers=0, max_inputs=2, progress=False)
    assert r.summary["candidates_bad_audio"] == {"silent": 4} and r.summary["pairs"] == 0
    assert r.summary["inputs_discarded"] == {"single_candidate": 2}
    state = json.loads(next((tmp_path / "q" / "samples").glob("*/scores.json")).read_text())
    assert all(c["skipped"].startswith("silent") and c["scores"] is None for c in state["candidates"])


def test_blind_inputs_and_missing_references(models, tmp_path):
    save_audio(tmp_path / "d.wav", _at_snr(_clean(SR // 2), 10), SR)
    clips = [SpeechClip("blind", tmp_path / "d.wav")]
    with pytest.raises(ValueError, match="si_sdr need the clean reference; 1 of 1 inputs have none"):
        generate_speech_pairs(models / "flow", clips, tmp_path / "o", metrics=["si_sdr"], progress=False)
    with pytest.raises(ValueError, match="n must be at least 2"):
        generate_speech_pairs(models / "flow", clips, tmp_path / "o", n=1, progress=False)


# ---- the command line -------------------------------------------------------------------------------------
def test_every_option_has_help_and_bad_input_is_one_line(monkeypatch, capsys, tmp_path, models):
    import argparse

    seen = {}
    real = argparse.ArgumentParser.parse_args

    def catch(self, *a, **k):
        seen["parser"] = self
        return real(self, *a, **k)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    assert generate_main(["--help"]) == 0
    parser = seen["parser"]
    assert parser.prog == "mm-align generate speech"
    assert [a.option_strings or a.dest for a in parser._actions if not a.help] == []
    assert "``" not in parser.format_help()
    monkeypatch.undo()
    capsys.readouterr()

    cases = [
        ([], "needs --model"),
        (["--model", str(tmp_path / "nope"), "--inputs", "x.jsonl", "--out", str(tmp_path / "o")], "no such"),
        (["--model", str(models / "flow"), "--inputs", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")],
         "no such file"),
        (["--model", str(models / "flow"), "--inputs", "world:nowhere", "--out", str(tmp_path / "o")], "split"),
        (["--model", str(models / "flow"), "--inputs", "world:dev", "--out", str(tmp_path / "o"), "--margin", "x"],
         "METRIC=VALUE"),
        (["--model", str(models / "flow"), "--inputs", "x", "--out", "o", "-n", "two"], "invalid int"),
    ]
    for argv, expected in cases:
        assert generate_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
