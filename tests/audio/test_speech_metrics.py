"""The speech metric suite: reference values, direction, agreement with the packages, resampling, bad audio, ASR.

All signals are synthetic (tests/audio/speech_signals.py): 2.3 s clips, a length DNSMOS scores in one 9.01 s
window (speechmos tiles a short clip to length: 2.3 s → 9.2 s).
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from mm_align.audio.asr import ASR, TransformersCTCASR, normalize_transcript
from mm_align.audio.io import AudioError, resample, save_audio
from mm_align.audio.metric_suite import MetricSuite, SpeechClip, SuiteConfig, check_wave, evaluate_clips
from mm_align.audio.metrics import (
    METRICS,
    DnsmosMetric,
    ErrorRate,
    Pesq,
    SpeechMetric,
    Stoi,
    build_metric,
    build_metrics,
    parse_metric_spec,
)

from mm_align.config import ConfigError
from tests.audio.speech_signals import add_white_noise, speech_like

SR = 16000
SECONDS = 2.3
SIGNAL_METRICS = ["pesq_wb", "estoi", "si_sdr", "lsd", "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808",
                  "speaker_similarity"]


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    return speech_like(SECONDS, SR, seed=0)


@pytest.fixture(scope="module")
def noisy(clean) -> dict[int, np.ndarray]:
    return {snr: add_white_noise(clean, snr, seed=7) for snr in (20, 0)}


@pytest.fixture(scope="module")
def metrics() -> list[SpeechMetric]:
    return build_metrics(SIGNAL_METRICS)


@pytest.fixture(scope="module")
def scored(clean, noisy, metrics):
    """Every signal metric on 20 dB and 0 dB white noise, in this process."""
    clips = [SpeechClip(f"snr{snr}", wave, SR, reference=clean) for snr, wave in noisy.items()]
    return evaluate_clips(clips, metrics, num_workers=0, progress=False)


# ---------------------------------------------------------------------------------------------------
# Reference values and direction
# ---------------------------------------------------------------------------------------------------


def test_identical_signals(clean, metrics):
    intrusive = [m for m in metrics if m.needs_reference]
    result = evaluate_clips([SpeechClip("clean", clean, SR, reference=clean)], intrusive, num_workers=0,
                            progress=False)
    s = {k: v[0] for k, v in result.scores.items()}
    assert s["pesq_wb"] == pytest.approx(4.644, abs=0.01)  # the P.862.2 ceiling
    assert s["estoi"] == pytest.approx(1.0, abs=1e-6)
    assert s["si_sdr"] > 50.0
    assert s["lsd"] == pytest.approx(0.0, abs=1e-9)
    assert s["speaker_similarity"] == pytest.approx(1.0, abs=1e-5)


def test_noise_at_0db_is_worse_than_at_20db_on_every_metric(scored):
    i20, i0 = scored.names.index("snr20"), scored.names.index("snr0")
    assert set(scored.scores) == set(SIGNAL_METRICS)
    for name, values in scored.scores.items():
        better, worse = (values[i20], values[i0]) if scored.higher_is_better[name] else (-values[i20], -values[i0])
        assert better > worse, f"{name}: 20 dB {values[i20]:.4f} vs 0 dB {values[i0]:.4f}"


def test_metric_declarations(metrics):
    decl = {m.name: (m.higher_is_better, m.sample_rate, m.needs_reference, m.needs_text) for m in metrics}
    assert decl["pesq_wb"] == (True, 16000, True, False)
    assert decl["estoi"] == (True, 16000, True, False)
    assert decl["si_sdr"] == (True, 16000, True, False)
    assert decl["lsd"] == (False, 16000, True, False)
    for part in ("sig", "bak", "ovrl", "p808"):
        assert decl[f"dnsmos_{part}"] == (True, 16000, False, False)
    assert decl["speaker_similarity"] == (True, 16000, True, False)
    assert all(isinstance(m, SpeechMetric) for m in metrics)
    assert Pesq(build_metric("pesq_nb").cfg).sample_rate == 8000


# ---------------------------------------------------------------------------------------------------
# Our values are the reference packages' values
# ---------------------------------------------------------------------------------------------------


def test_values_equal_the_reference_packages(clean, noisy, scored):
    import pesq
    import pystoi
    from resemblyzer import VoiceEncoder, preprocess_wav
    from speechmos import dnsmos
    from torchmetrics.functional.audio import scale_invariant_signal_distortion_ratio

    encoder = VoiceEncoder("cpu", verbose=False)
    ref_embed = encoder.embed_utterance(preprocess_wav(clean))
    for snr, wave in noisy.items():
        s = {k: v[scored.names.index(f"snr{snr}")] for k, v in scored.scores.items()}
        assert s["pesq_wb"] == pesq.pesq(SR, clean, wave, "wb")
        assert s["estoi"] == pytest.approx(pystoi.stoi(clean, wave, SR, extended=True), abs=1e-12)
        if snr == 0:  # one DNSMOS inference is enough to compare
            d = dnsmos.run(wave, SR)
            for part in ("sig", "bak", "ovrl", "p808"):
                assert s[f"dnsmos_{part}"] == pytest.approx(float(d[f"{part}_mos"]), abs=1e-6)
        si = scale_invariant_signal_distortion_ratio(torch.from_numpy(wave).double(), torch.from_numpy(clean).double(),
                                                     zero_mean=True)
        assert s["si_sdr"] == pytest.approx(float(si), abs=1e-9)
        cos = float(np.dot(encoder.embed_utterance(preprocess_wav(wave)), ref_embed))
        assert s["speaker_similarity"] == pytest.approx(cos, abs=1e-6)


def test_parallel_workers_give_the_in_process_values(clean, noisy, scored):
    clips = [SpeechClip(f"snr{snr}", wave, SR, reference=clean) for snr, wave in noisy.items()]  # one per worker
    result = evaluate_clips(clips, ["pesq_wb", "estoi", "si_sdr", "lsd", "dnsmos_ovrl"], num_workers=2,
                            progress=False)
    assert result.names == [c.name for c in clips]
    for name, values in result.scores.items():
        expected = [scored.scores[name][scored.names.index(c.name)] for c in clips]
        np.testing.assert_allclose(values, expected, rtol=0, atol=1e-6, err_msg=name)


def test_dnsmos_four_scores_from_one_inference(clean, metrics, scored):
    dnsmos = [m for m in metrics if isinstance(m, DnsmosMetric)]
    model = dnsmos[0].model  # loaded by `scored`
    assert len(dnsmos) == 4 and all(m.model is model for m in dnsmos) and model._model is not None
    calls = []
    inner = model._model
    model._model = lambda *a: calls.append(1) or inner(*a)
    try:
        values = [m.score(0.5 * clean) for m in dnsmos]
    finally:
        model._model = inner
    assert len(calls) == 1 and len(set(values)) == 4


def test_loaded_metrics_pickle_without_their_models(metrics):
    clone = pickle.loads(pickle.dumps(metrics))  # what a spawn worker receives
    assert [m.name for m in clone] == SIGNAL_METRICS
    dnsmos = [m for m in clone if isinstance(m, DnsmosMetric)]
    assert len({id(m.model) for m in dnsmos}) == 1 and dnsmos[0].model._model is None


# ---------------------------------------------------------------------------------------------------
# Rates
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 48000])
def test_other_rates_are_resampled_and_scored(clean, noisy, rate):
    wave = torch.from_numpy(noisy[20])
    est = resample(wave, SR, rate).numpy()
    ref = resample(torch.from_numpy(clean), SR, rate).numpy()
    names = ["pesq_wb", "estoi", "si_sdr"]
    result = evaluate_clips([SpeechClip("x", est, rate, reference=ref, reference_sample_rate=rate)], names,
                            num_workers=0, progress=False)
    back_est = resample(torch.from_numpy(est), rate, SR).numpy()
    back_ref = resample(torch.from_numpy(ref), rate, SR).numpy()
    n = min(len(back_est), len(back_ref))
    for m in build_metrics(names):
        assert result.scores[m.name][0] == pytest.approx(m.score(back_est[:n], back_ref[:n]), abs=1e-6), m.name
    assert np.all(np.isfinite([v[0] for v in result.scores.values()]))


def test_mixed_rates_within_one_clip(clean):
    ref48 = resample(torch.from_numpy(clean), SR, 48000).numpy()
    result = evaluate_clips([SpeechClip("mixed", clean, SR, reference=ref48, reference_sample_rate=48000)],
                            ["pesq_wb", "si_sdr"], num_workers=0, progress=False)
    assert result.scores["pesq_wb"][0] > 4.5 and result.scores["si_sdr"][0] > 30.0


def test_files_at_another_rate(tmp_path, clean, noisy):
    est = save_audio(tmp_path / "est.wav", resample(torch.from_numpy(noisy[20]), SR, 8000), 8000, "FLOAT")
    ref = save_audio(tmp_path / "ref.flac", resample(torch.from_numpy(clean), SR, 48000), 48000)
    result = evaluate_clips([SpeechClip(str(est), est, reference=ref)], ["estoi", "si_sdr"], num_workers=0,
                            progress=False)
    assert result.names == [str(est)] and 0.3 < result.scores["estoi"][0] < 1.0


# ---------------------------------------------------------------------------------------------------
# Bad audio
# ---------------------------------------------------------------------------------------------------


def _bad_cases(clean: np.ndarray) -> dict[str, tuple[SpeechClip, str]]:
    rng = np.random.default_rng(0)
    nan, inf, clipped = clean.copy(), clean.copy(), clean.copy() * 4.0
    nan[100] = np.nan
    inf[200] = np.inf
    clipped = np.clip(clipped, -1.0, 1.0)
    quiet = (rng.standard_normal(len(clean)) * 10 ** (-70 / 20)).astype(np.float32)
    return {
        "zeros": (SpeechClip("zeros.wav", np.zeros_like(clean), SR, reference=clean), "silent"),
        "quiet": (SpeechClip("quiet.wav", quiet, SR, reference=clean), "silent"),
        "silent_reference": (SpeechClip("silref.wav", clean, SR, reference=np.zeros_like(clean)), "silent"),
        "nan": (SpeechClip("nan.wav", nan, SR, reference=clean), "non-finite"),
        "inf": (SpeechClip("inf.wav", clean, SR, reference=inf), "non-finite"),
        "clipped": (SpeechClip("clipped.wav", clipped, SR, reference=clean), "clipped"),
        "short": (SpeechClip("short.wav", clean[: int(0.2 * SR)], SR, reference=clean[: int(0.2 * SR)]),
                  "too short"),
        "empty": (SpeechClip("empty.wav", clean[:0], SR, reference=clean), "too short"),
        "mismatch": (SpeechClip("long.wav", np.concatenate([clean, clean]), SR, reference=clean), "length mismatch"),
        "no_reference": (SpeechClip("noref.wav", clean, SR), "missing reference"),
        "missing_file": (SpeechClip("gone.wav", "/nonexistent/gone.wav", reference=clean, reference_sample_rate=SR),
                         "unreadable"),
    }


CASES = ["zeros", "quiet", "silent_reference", "nan", "inf", "clipped", "short", "empty", "mismatch", "no_reference",
         "missing_file"]


@pytest.mark.parametrize("case", CASES)
def test_bad_audio_raises_naming_the_clip(clean, case):
    clip, category = _bad_cases(clean)[case]
    good = SpeechClip("good.wav", clean, SR, reference=clean)
    with pytest.raises(AudioError, match=rf"^{clip.name}: {category}"):
        evaluate_clips([good, clip], ["si_sdr"], num_workers=0, progress=False)


def test_bad_audio_is_skipped_and_counted(clean):
    cases = _bad_cases(clean)
    good = [SpeechClip(f"good{i}.wav", clean, SR, reference=clean) for i in range(2)]
    clips = [good[0], *(cases[c][0] for c in CASES), good[1]]
    result = evaluate_clips(clips, ["si_sdr"], num_workers=0, on_bad="skip", progress=False)
    assert result.names == ["good0.wav", "good1.wav"] and len(result.scores["si_sdr"]) == 2
    assert [s.name for s in result.skipped] == [cases[c][0].name for c in CASES]
    assert result.skipped_by_reason() == {"silent": 3, "non-finite": 2, "clipped": 1, "too short": 2,
                                          "length mismatch": 1, "missing reference": 1, "unreadable": 1}


def test_bad_audio_in_workers(clean):
    cases = _bad_cases(clean)
    clips = [SpeechClip(f"good{i}", clean, SR, reference=clean) for i in range(3)] + [cases["nan"][0]]
    with pytest.raises(AudioError, match=r"^nan.wav: non-finite"):
        evaluate_clips(clips, ["si_sdr"], num_workers=2, progress=False)
    result = evaluate_clips(clips, ["si_sdr"], num_workers=2, on_bad="skip", progress=False)
    assert result.names == ["good0", "good1", "good2"] and result.skipped_by_reason() == {"non-finite": 1}


def test_length_within_tolerance_is_trimmed(clean, noisy):
    longer = np.concatenate([noisy[20], noisy[20][: int(0.05 * len(clean))]])  # 5% longer
    result = evaluate_clips([SpeechClip("pad", longer, SR, reference=clean)], ["si_sdr", "pesq_wb"], num_workers=0,
                            progress=False)
    assert result.scores["si_sdr"][0] == pytest.approx(build_metric("si_sdr").score(noisy[20], clean))


def test_check_wave_thresholds(clean):
    cfg = SuiteConfig()
    assert check_wave(clean, SR, "estimate", cfg) is None
    assert check_wave(clean[: int(0.26 * SR)], SR, "estimate", cfg) is None
    rail = clean.copy()
    rail[: int(0.009 * len(rail))] = 1.0  # 0.9% at the rail: still fine
    assert check_wave(rail, SR, "estimate", cfg) is None
    assert check_wave(clean * 10 ** (-30 / 20), SR, "estimate", cfg) is None  # about -54 dBFS
    assert check_wave(clean * 10 ** (-40 / 20), SR, "estimate", cfg).startswith("silent")  # about -64 dBFS


def test_metric_failures_are_audio_errors(clean):
    with pytest.raises(AudioError, match="pesq_wb: NoUtterancesError"):
        Pesq().score(np.zeros(SR, np.float32), np.zeros(SR, np.float32))
    with pytest.raises(AudioError, match="pesq_wb: BufferTooShortError"):
        Pesq().score(clean[:1000], clean[:1000])
    with pytest.raises(AudioError, match="estoi: not enough speech frames"):
        Stoi().score(clean[:2000], clean[:2000])


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------


def test_registry_specs_and_errors():
    assert parse_metric_spec("wer:asr=/m/w2v2,device=cpu") == {"type": "wer", "asr": "/m/w2v2", "device": "cpu"}
    assert build_metric("si_sdr:zero_mean=false,name=si_sdr_raw").name == "si_sdr_raw"
    assert build_metric({"type": "lsd", "n_fft": 1024}).cfg.n_fft == 1024
    with pytest.raises(ConfigError, match="pesq_wb"):
        build_metric("pesq")
    with pytest.raises(ConfigError, match="unknown config key"):
        build_metric("estoi:extnded=true")
    with pytest.raises(ConfigError, match="fixes"):
        build_metric("estoi:extended=false")
    with pytest.raises(ValueError, match="share a name"):
        build_metrics(["si_sdr", "si_sdr"])
    with pytest.raises(ValueError, match="at least one"):
        MetricSuite([])
    assert set(METRICS) >= {"pesq_wb", "estoi", "si_sdr", "lsd", "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl",
                            "dnsmos_p808", "speaker_similarity", "wer", "cer"}


# ---------------------------------------------------------------------------------------------------
# WER / CER
# ---------------------------------------------------------------------------------------------------

CHARS = list("abcdefghijklmnopqrstuvwxyz'")


@pytest.fixture(scope="module")
def tiny_asr_dir(tmp_path_factory):
    """A random tiny Wav2Vec2ForCTC with a character tokenizer, saved with its processor."""
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    path = tmp_path_factory.mktemp("tiny_w2v2")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, **{c: i + 5 for i, c in enumerate(CHARS)}}
    (path / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(path / "vocab.json"), unk_token="<unk>", pad_token="<pad>",
                                     word_delimiter_token="|")
    extractor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True,
                                         return_attention_mask=False)
    Wav2Vec2Processor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(path)
    torch.manual_seed(0)
    config = Wav2Vec2Config(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, conv_dim=(32, 32, 32), conv_stride=(5, 4, 4),
                            conv_kernel=(10, 8, 4), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                            pad_token_id=0, do_stable_layer_norm=True, feat_extract_norm="layer")
    model = Wav2Vec2ForCTC(config).eval()
    with torch.no_grad():  # spread the logits so greedy decoding emits a mix of characters, blanks and spaces
        model.lm_head.weight.mul_(50.0)
    model.save_pretrained(path)
    return path


def test_wer_cer_from_a_local_ctc_model(tiny_asr_dir, clean):
    import jiwer

    text = "the quick brown fox"
    wer, cer = build_metrics([f"wer:asr={tiny_asr_dir}", f"cer:asr={tiny_asr_dir}"])
    assert wer.asr is cer.asr and wer.sample_rate == 16000 and wer.needs_text and not wer.higher_is_better
    decoded = TransformersCTCASR(tiny_asr_dir).transcribe(clean)
    assert isinstance(decoded, str)
    hyp = normalize_transcript(decoded)
    assert wer.score(clean, text=text) == pytest.approx(jiwer.wer(text, hyp), abs=1e-12)
    assert cer.score(clean, text=text) == pytest.approx(jiwer.cer(text, hyp), abs=1e-12)
    result = evaluate_clips([SpeechClip("u1", clean, SR, text=text)], [wer, cer], num_workers=0, progress=False)
    assert result.scores["wer"][0] == pytest.approx(jiwer.wer(text, hyp), abs=1e-12)


def test_ctc_decoding_merges_repeats_and_reads_bos_eos_as_blanks(tiny_asr_dir):
    from types import SimpleNamespace

    asr = TransformersCTCASR(tiny_asr_dir)
    asr.transcribe(np.zeros(SR, np.float32))  # loads the model and processor
    tok = asr._processor.tokenizer
    frames = ["a", "a", "<pad>", "a", "<s>", "|", "b", "</s>", "b"]
    ids = torch.tensor(tok.convert_tokens_to_ids(frames))
    logits = torch.nn.functional.one_hot(ids, len(tok)).float()[None]  # (1, frames, vocab)
    asr._model = lambda **inputs: SimpleNamespace(logits=logits)
    assert asr.transcribe(np.zeros(SR, np.float32)) == "aa bb"


class _Broken:
    """A metric with a bug: its exception must name the clip."""

    name, higher_is_better, sample_rate, needs_reference, needs_text = "broken", True, SR, False, False

    def score(self, estimate, reference=None, text=None) -> float:
        raise RuntimeError("boom")


@pytest.mark.parametrize("workers", [0, 2])
def test_other_metric_errors_propagate_with_the_clip_named(clean, workers):
    clips = [SpeechClip(f"c{i}", clean, SR) for i in range(2)]
    with pytest.raises(RuntimeError, match="boom") as info:
        evaluate_clips(clips, [_Broken()], num_workers=workers, progress=False)
    assert any("'broken'" in n and "clip 'c" in n for n in info.value.__notes__)


def test_suite_options_are_checked(clean):
    with pytest.raises(TypeError, match="valid: on_bad"):
        MetricSuite(["si_sdr"], on_bd="skip")
    with pytest.raises(ValueError, match="on_bad must be"):
        MetricSuite(["si_sdr"], on_bad="skipp")
    with pytest.raises(ValueError, match="^x: the estimate is a waveform: give its sample rate"):
        evaluate_clips([SpeechClip("x", clean, reference=clean)], ["si_sdr"], num_workers=0, progress=False)


class _EchoASR:
    """A stub recogniser that "hears" a fixed transcript."""

    sample_rate = 16000

    def __init__(self, text: str) -> None:
        self.text = text

    def transcribe(self, wave: np.ndarray) -> str:
        return self.text


def test_perfect_transcript_scores_zero(clean):
    asr = _EchoASR("The cat sat, on the MAT.")
    assert isinstance(asr, ASR)
    for unit in ("word", "char"):
        assert ErrorRate(asr, unit).score(clean, text="the cat sat on the mat") == 0.0
    assert ErrorRate(_EchoASR("the cat"), "word").score(clean, text="the cat sat on the mat") == pytest.approx(4 / 6)
    with pytest.raises(AudioError, match="^u2: missing text"):
        evaluate_clips([SpeechClip("u2", clean, SR)], [ErrorRate(asr)], num_workers=0, progress=False)


def test_asr_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such ASR model"):
        TransformersCTCASR(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="feature extractor config"):
        TransformersCTCASR(tmp_path)


@pytest.mark.slow
def test_spawned_workers(clean, noisy, scored):
    clips = [SpeechClip(f"snr{snr}", wave, SR, reference=clean) for snr, wave in noisy.items()]
    result = evaluate_clips(clips, SIGNAL_METRICS, num_workers=2, start_method="spawn", progress=False)
    for name, values in result.scores.items():
        expected = [scored.scores[name][scored.names.index(c.name)] for c in clips]
        np.testing.assert_allclose(values, expected, rtol=0, atol=1e-6, err_msg=name)
