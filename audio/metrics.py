"""Speech metrics: PESQ-WB, ESTOI, SI-SDR, log-spectral distance, DNSMOS, speaker similarity, WER / CER.

Each metric is a :class:`SpeechMetric`: it declares its ``name``, direction (``higher_is_better``), the
``sample_rate`` its inputs must be at, and whether it needs the clean reference (intrusive metrics) or the
transcript (content metrics), and scores one clip::

    metrics = build_metrics(["pesq_wb", "estoi", "si_sdr", "dnsmos_ovrl", "wer:asr=/models/wav2vec2-base-960h"])
    value = metrics[0].score(estimate, reference)  # mono arrays already at metrics[0].sample_rate

:mod:`mm_align.audio.metric_suite` scores many clips with a list of them: it resamples every input to each
metric's rate, validates the audio first, and runs in parallel worker processes.

Maintained implementations do the work wherever one exists: ``pesq`` (ITU-T P.862.2), ``pystoi``
(ESTOI), ``torchmetrics`` (SI-SDR), ``speechmos`` (DNSMOS, the ONNX models its wheel ships),
``resemblyzer`` (speaker encoder, weights in its wheel) and ``jiwer`` (WER / CER). Models are loaded
lazily, once per process; the four DNSMOS outputs come from one evaluation per clip, and ``wer``/``cer``
built together share one recogniser and one transcription per clip.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from mm_align.audio.asr import ASR, TransformersCTCASR, normalize_transcript
from mm_align.audio.io import AudioError

from mm_align.config import ConfigError, from_dict, option

__all__ = [
    "SpeechMetric", "PesqConfig", "Pesq", "StoiConfig", "Stoi", "SiSdrConfig", "SiSdr", "LsdConfig",
    "LogSpectralDistance", "DnsmosConfig", "DNSMOSModel", "DnsmosMetric", "SpeakerSimilarityConfig",
    "SpeakerSimilarity", "ErrorRateConfig", "ErrorRate", "METRICS", "build_metric", "build_metrics",
    "parse_metric_spec", "limit_threads",
]

ArrayLike = np.ndarray | torch.Tensor

# Threads each loaded model may use; None = the library's default. The suite's workers set 1 (one clip per core).
_THREADS: int | None = None


def limit_threads(n: int | None) -> None:
    """Cap the threads of the models loaded from now on in this process (ONNX sessions, torch); ``None`` resets."""
    global _THREADS
    _THREADS = n
    if n is not None:
        torch.set_num_threads(n)


@runtime_checkable
class SpeechMetric(Protocol):
    """What the suite asks of a speech metric.

    ``score`` takes mono ``(T,)`` numpy arrays or tensors already at :attr:`sample_rate` (the suite resamples),
    the reference when :attr:`needs_reference`, the transcript when :attr:`needs_text`, and returns one float.
    It raises :class:`AudioError` when the audio cannot be scored (the suite names the clip).
    """

    name: str
    higher_is_better: bool
    sample_rate: int
    needs_reference: bool
    needs_text: bool

    def score(self, estimate: ArrayLike, reference: ArrayLike | None = None, text: str | None = None) -> float: ...


def _np(x: ArrayLike | None, what: str = "estimate") -> np.ndarray:
    """A 1-D floating numpy array (float32/float64 kept as they are, so values equal the reference packages')."""
    if x is None:
        raise ValueError(f"the {what} is required")
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.numpy() if x.dtype in (torch.float32, torch.float64) else x.float().numpy()
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    if x.ndim != 1:
        raise ValueError(f"the {what} must be mono (T,), got shape {x.shape}")
    return x


def _digest(x: np.ndarray) -> tuple:
    """A cache key for one clip: dtype, length and a 128-bit hash of the samples."""
    return x.dtype.str, x.shape, hashlib.blake2b(np.ascontiguousarray(x).tobytes(), digest_size=16).digest()


class _LRU:
    """A small least-recently-used cache (per-clip model outputs shared between metrics)."""

    def __init__(self, size: int = 8) -> None:
        self.size, self.data = size, OrderedDict()

    def get(self, key: Any, compute: Callable[[], Any]) -> Any:
        if key in self.data:
            self.data.move_to_end(key)
            return self.data[key]
        value = self.data[key] = compute()
        if len(self.data) > self.size:
            self.data.popitem(last=False)
        return value


# ---------------------------------------------------------------------------------------------------
# Intrusive signal metrics
# ---------------------------------------------------------------------------------------------------


@dataclass
class PesqConfig:
    mode: Literal["wb", "nb"] = option("wb", help="wb: wide-band P.862.2 at 16 kHz; nb: narrow-band P.862 at 8 kHz.")
    name: str | None = option(None, help="The score's name; default 'pesq_wb' / 'pesq_nb'.")


class Pesq:
    """PESQ (ITU-T P.862; wide band: P.862.2) from the ``pesq`` package: MOS-LQO, 1.04–4.64 (wb), higher is better.

    ``pesq.pesq(fs, reference, estimate, mode)`` on the arrays as given. The ITU licence of the reference code
    does not allow commercial use. An input without detectable speech is an :class:`AudioError`.
    """

    higher_is_better = True
    needs_reference = True
    needs_text = False

    def __init__(self, cfg: PesqConfig | None = None) -> None:
        self.cfg = cfg or PesqConfig()
        self.name = self.cfg.name or f"pesq_{self.cfg.mode}"
        self.sample_rate = 16000 if self.cfg.mode == "wb" else 8000

    def score(self, estimate: ArrayLike, reference: ArrayLike | None = None, text: str | None = None) -> float:
        import pesq

        try:
            return float(pesq.pesq(self.sample_rate, _np(reference, "reference"), _np(estimate), self.cfg.mode))
        except pesq.PesqError as err:  # NoUtterancesError, BufferTooShortError: a property of the audio
            raise AudioError(f"{self.name}: {type(err).__name__}: {err}") from None


@dataclass
class StoiConfig:
    extended: bool = option(True, help="ESTOI (Jensen & Taal 2016) when true, STOI (Taal et al. 2011) when false.")
    sample_rate: int = option(16000, help="Rate the inputs are brought to (pystoi resamples to 10 kHz inside).")
    name: str | None = option(None, help="The score's name; default 'estoi' / 'stoi'.")


class Stoi:
    """(E)STOI from ``pystoi``: ``pystoi.stoi(reference, estimate, fs, extended)``, 0–1 (about), higher is better.

    ESTOI: Jensen & Taal, "An Algorithm for Predicting the Intelligibility of Speech Masked by Modulated Noise
    Maskers", IEEE/ACM TASLP 2016. When no speech frames are left after pystoi's silent-frame removal it warns and
    returns 1e-5; that is an :class:`AudioError` here instead of a score.
    """

    higher_is_better = True
    needs_reference = True
    needs_text = False

    def __init__(self, cfg: StoiConfig | None = None) -> None:
        self.cfg = cfg or StoiConfig()
        self.name = self.cfg.name or ("estoi" if self.cfg.extended else "stoi")
        self.sample_rate = self.cfg.sample_rate

    def score(self, estimate: ArrayLike, reference: ArrayLike | None = None, text: str | None = None) -> float:
        from pystoi import stoi

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = stoi(_np(reference, "reference"), _np(estimate), self.sample_rate, extended=self.cfg.extended)
        if any("Not enough STFT frames" in str(w.message) for w in caught):
            raise AudioError(f"{self.name}: not enough speech frames after pystoi's silent-frame removal")
        return float(value)


@dataclass
class SiSdrConfig:
    zero_mean: bool = option(True, help="Remove each signal's mean first (as asteroid and SpeechBrain do; "
                                        "torchmetrics' own default is false).")
    sample_rate: int = option(16000, help="Rate the inputs are brought to.")
    name: str = option("si_sdr", help="The score's name.")


class SiSdr:
    """Scale-invariant SDR (Le Roux et al., "SDR — half-baked or well done?", ICASSP 2019) in dB, higher is better.

    ``10 log10(‖α s‖² / ‖α s − ŝ‖²)`` with ``α = ⟨ŝ, s⟩ / ‖s‖²``, from
    ``torchmetrics.functional.audio.scale_invariant_signal_distortion_ratio`` in float64 (identical signals give
    well over 100 dB).
    """

    higher_is_better = True
    needs_reference = True
    needs_text = False

    def __init__(self, cfg: SiSdrConfig | None = None) -> None:
        self.cfg = cfg or SiSdrConfig()
        self.name, self.sample_rate = self.cfg.name, self.cfg.sample_rate

    def score(self, estimate: ArrayLike, reference: ArrayLike | None = None, text: str | None = None) -> float:
        from torchmetrics.functional.audio import scale_invariant_signal_distortion_ratio

        est = torch.from_numpy(_np(estimate)).double()
        ref = torch.from_numpy(_np(reference, "reference")).double()
        return float(scale_invariant_signal_distortion_ratio(est, ref, zero_mean=self.cfg.zero_mean))


@dataclass
class LsdConfig:
    n_fft: int = option(512, help="STFT size (512 = 32 ms at 16 kHz).")
    hop_length: int = option(128, help="STFT hop.")
    eps: float = option(1e-8, help="Added to the power spectrum before the log (silence floor).")
    sample_rate: int = option(16000, help="Rate the inputs are brought to.")
    name: str = option("lsd", help="The score's name.")


class LogSpectralDistance:
    """Log-spectral distance (as in bandwidth extension: Kuleshov et al. 2017, NVSR, AudioSR), lower is better.

    With ``P = |STFT(x)|²`` (Hann window ``n_fft``, hop ``hop_length``, centred frames)::

        LSD = mean_t sqrt( mean_f ( log10(P_ref[t, f] + eps) − log10(P_est[t, f] + eps) )² )

    i.e. the RMS over frequency of the log10 power difference (in bels, not dB), averaged over frames; 0 for
    identical signals. Plain torch, float64.
    """

    higher_is_better = False
    needs_reference = True
    needs_text = False

    def __init__(self, cfg: LsdConfig | None = None) -> None:
        self.cfg = cfg or LsdConfig()
        self.name, self.sample_rate = self.cfg.name, self.cfg.sample_rate

    def _log_power(self, x: torch.Tensor) -> torch.Tensor:
        window = torch.hann_window(self.cfg.n_fft, dtype=torch.float64)
        spec = torch.stft(x, self.cfg.n_fft, self.cfg.hop_length, window=window, center=True, return_complex=True)
        return torch.log10(spec.abs().pow(2) + self.cfg.eps)  # (freq, frames)

    def score(self, estimate: ArrayLike, reference: ArrayLike | None = None, text: str | None = None) -> float:
        est = torch.from_numpy(_np(estimate)).double()
        ref = torch.from_numpy(_np(reference, "reference")).double()
        n = min(len(est), len(ref))
        diff = self._log_power(ref[:n]) - self._log_power(est[:n])  # (freq, frames)
        return float(diff.pow(2).mean(dim=0).sqrt().mean())


# ---------------------------------------------------------------------------------------------------
# DNSMOS (non-intrusive)
# ---------------------------------------------------------------------------------------------------

DNSMOS_OUTPUTS = {"sig": "sig_mos", "bak": "bak_mos", "ovrl": "ovrl_mos", "p808": "p808_mos"}


@dataclass
class DnsmosConfig:
    output: Literal["sig", "bak", "ovrl", "p808"] = option("ovrl", help="Which of the four DNSMOS scores.")
    personalized: bool = option(False, help="The personalised P.835 model (pDNSMOS), which also penalises "
                                            "interfering talkers.")
    name: str | None = option(None, help="The score's name; default 'dnsmos_<output>'.")


class DNSMOSModel:
    """DNSMOS P.835 (Reddy et al., ICASSP 2022) and P.808 (Reddy et al., ICASSP 2021) from ``speechmos``.

    The ONNX models shipped inside the ``speechmos`` wheel (``dnsmos_models/sig_bak_ovr.onnx``,
    ``model_v8.onnx``; ``pdnsmos_models/`` for the personalised one) are run by speechmos' own ``DNSMOS`` class
    (9.01 s windows, hop 1 s, a short clip tiled to length, the polynomial calibration of P.835), so the values
    are speechmos'. One evaluation gives all four scores; it is cached per clip, so ``dnsmos_sig``,
    ``dnsmos_bak``, ``dnsmos_ovrl`` and ``dnsmos_p808`` cost one inference. Needs ``onnxruntime``. Samples are
    clipped to [−1, 1] first (speechmos refuses anything outside).
    """

    sample_rate = 16000

    def __init__(self, personalized: bool = False) -> None:
        self.personalized = personalized
        self._model = None
        self._cache = _LRU()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_model": None, "_cache": _LRU()}

    def release(self) -> None:
        """Drop the sessions and the cached scores (a worker process reloads on first use)."""
        self._model, self._cache = None, _LRU()

    def clear_cache(self) -> None:
        """Forget the scores of the last clips (the next call on the same audio runs the models again)."""
        self._cache = _LRU()

    def _load(self) -> Any:
        try:
            import onnxruntime as ort
            from speechmos import dnsmos
        except ImportError as err:
            raise ImportError(f"DNSMOS needs speechmos and onnxruntime (pip install speechmos onnxruntime): {err}") \
                from err
        base = Path(dnsmos.__file__).resolve().parent
        primary = base / ("pdnsmos_models" if self.personalized else "dnsmos_models") / "sig_bak_ovr.onnx"
        p808 = base / "dnsmos_models" / "model_v8.onnx"
        model = dnsmos.DNSMOS(str(primary), str(p808))
        if _THREADS is not None:  # speechmos builds its sessions with the default (all cores) thread pools
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = _THREADS
            model.onnx_sess = ort.InferenceSession(str(primary), opts, providers=["CPUExecutionProvider"])
            model.p808_onnx_sess = ort.InferenceSession(str(p808), opts, providers=["CPUExecutionProvider"])
        return model

    def scores(self, wave: ArrayLike) -> dict[str, float]:
        """``{"sig", "bak", "ovrl", "p808"}`` of one 16 kHz clip."""
        x = np.clip(_np(wave), -1.0, 1.0)
        if self._model is None:
            self._model = self._load()

        def compute() -> dict[str, float]:
            out = self._model(x, self.sample_rate, self.personalized)
            return {k: float(out[v]) for k, v in DNSMOS_OUTPUTS.items()}

        return self._cache.get(_digest(x), compute)


class DnsmosMetric:
    """One of the DNSMOS scores (1–5 MOS, higher is better) read from a shared :class:`DNSMOSModel`."""

    higher_is_better = True
    needs_reference = False
    needs_text = False
    sample_rate = DNSMOSModel.sample_rate

    def __init__(self, cfg: DnsmosConfig | None = None, model: DNSMOSModel | None = None) -> None:
        self.cfg = cfg or DnsmosConfig()
        self.name = self.cfg.name or f"dnsmos_{self.cfg.output}"
        self.model = model or DNSMOSModel(self.cfg.personalized)

    def release(self) -> None:
        self.model.release()

    def score(self, estimate: ArrayLike, reference: ArrayLike | None = None, text: str | None = None) -> float:
        return self.model.scores(estimate)[self.cfg.output]


# ---------------------------------------------------------------------------------------------------
# Speaker similarity
# ---------------------------------------------------------------------------------------------------


@dataclass
class SpeakerSimilarityConfig:
    device: str = option("cpu", help="Where the speaker encoder runs.")
    preprocess: bool = option(True, help="resemblyzer's preprocess_wav first: volume normalised to -30 dBFS "
                                         "(raise only) and long silences trimmed by WebRTC VAD.")
    name: str = option("speaker_similarity", help="The score's name.")


class SpeakerSimilarity:
    """Cosine similarity of resemblyzer speaker embeddings of the estimate and the reference, higher is better.

    resemblyzer's ``VoiceEncoder`` (the GE2E speaker encoder of Wan et al., ICASSP 2018; weights
    ``pretrained.pt`` shipped in its wheel) on CPU; embeddings are L2-normalised, so the cosine is their dot
    product (in [0, 1]: the embeddings are non-negative). When VAD trimming would leave under 0.25 s, the
    untrimmed (volume-normalised) clip is embedded. Reference embeddings are cached, so many estimates scored
    against one reference embed it once.
    """

    higher_is_better = True
    needs_reference = True
    needs_text = False
    sample_rate = 16000

    def __init__(self, cfg: SpeakerSimilarityConfig | None = None) -> None:
        self.cfg = cfg or SpeakerSimilarityConfig()
        self.name = self.cfg.name
        self._encoder = None
        self._cache = _LRU(32)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_encoder": None, "_cache": _LRU(32)}

    def release(self) -> None:
        self._encoder, self._cache = None, _LRU(32)

    def _embed(self, wave: np.ndarray) -> np.ndarray:
        from resemblyzer import audio as ra

        wav = wave.astype(np.float32)
        if self.cfg.preprocess:
            wav = ra.normalize_volume(wav, ra.audio_norm_target_dBFS, increase_only=True)
            trimmed = ra.trim_long_silences(wav)
            wav = trimmed if len(trimmed) >= 0.25 * self.sample_rate else wav
        return self._encoder.embed_utterance(wav)

    def score(self, estimate: ArrayLike, reference: ArrayLike | None = None, text: str | None = None) -> float:
        if self._encoder is None:
            from resemblyzer import VoiceEncoder

            self._encoder = VoiceEncoder(self.cfg.device, verbose=False)
        est, ref = _np(estimate), _np(reference, "reference")
        e_ref = self._cache.get(_digest(ref), lambda: self._embed(ref))
        return float(np.dot(self._embed(est), e_ref))


# ---------------------------------------------------------------------------------------------------
# Content: WER / CER
# ---------------------------------------------------------------------------------------------------


@dataclass
class ErrorRateConfig:
    asr: str = option(help="A local transformers CTC model directory (model + processor, save_pretrained).")
    unit: Literal["word", "char"] = option("word", help="word: WER; char: CER.")
    device: str = option("cpu", help="Where the ASR model runs.")
    normalize: bool = option(True, help="Lower-case and strip punctuation on both sides first "
                                        "(mm_align.audio.asr.normalize_transcript).")
    name: str | None = option(None, help="The score's name; default 'wer' / 'cer'.")


class _CachedASR:
    """An ASR whose transcripts are cached per clip, so ``wer`` and ``cer`` transcribe a clip once."""

    def __init__(self, asr: ASR) -> None:
        self.asr, self.sample_rate, self._cache = asr, asr.sample_rate, _LRU()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": _LRU()}

    def release(self) -> None:
        self._cache = _LRU()
        getattr(self.asr, "release", lambda: None)()

    def transcribe(self, wave: np.ndarray) -> str:
        return self._cache.get(_digest(wave), lambda: self.asr.transcribe(wave))


class ErrorRate:
    """WER or CER (``jiwer.wer`` / ``jiwer.cer``) of an ASR transcript of the estimate against the clip's text.

    ``(substitutions + deletions + insertions) / reference length`` in words or characters; 0 is perfect, lower
    is better, and it can pass 1. Both sides are normalised first unless ``normalize=False``.

    Args:
        asr: any :class:`~mm_align.audio.asr.ASR` (e.g. :class:`~mm_align.audio.asr.TransformersCTCASR`).
        unit: ``"word"`` (WER) or ``"char"`` (CER).
    """

    higher_is_better = False
    needs_reference = False
    needs_text = True

    def __init__(self, asr: ASR, unit: Literal["word", "char"] = "word", normalize: bool = True,
                 name: str | None = None) -> None:
        if unit not in ("word", "char"):
            raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")
        self.asr, self.unit, self.normalize = asr, unit, normalize
        self.name = name or ("wer" if unit == "word" else "cer")
        self.sample_rate = int(asr.sample_rate)

    def release(self) -> None:
        getattr(self.asr, "release", lambda: None)()

    def transcribe(self, estimate: ArrayLike) -> str:
        return self.asr.transcribe(_np(estimate))

    def score(self, estimate: ArrayLike, reference: ArrayLike | None = None, text: str | None = None) -> float:
        import jiwer

        if text is None:
            raise ValueError(f"{self.name} needs the clip's transcript")
        ref, hyp = text, self.transcribe(estimate)
        if self.normalize:
            ref, hyp = normalize_transcript(ref), normalize_transcript(hyp)
        if not ref.strip():
            raise ValueError(f"{self.name}: the reference transcript is empty")
        return float(jiwer.wer(ref, hyp) if self.unit == "word" else jiwer.cer(ref, hyp))


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------

# name -> (config class, preset fields)
METRICS: dict[str, tuple[type, dict[str, Any]]] = {
    "pesq_wb": (PesqConfig, {"mode": "wb"}),
    "pesq_nb": (PesqConfig, {"mode": "nb"}),
    "estoi": (StoiConfig, {"extended": True}),
    "stoi": (StoiConfig, {"extended": False}),
    "si_sdr": (SiSdrConfig, {}),
    "lsd": (LsdConfig, {}),
    "dnsmos_sig": (DnsmosConfig, {"output": "sig"}),
    "dnsmos_bak": (DnsmosConfig, {"output": "bak"}),
    "dnsmos_ovrl": (DnsmosConfig, {"output": "ovrl"}),
    "dnsmos_p808": (DnsmosConfig, {"output": "p808"}),
    "speaker_similarity": (SpeakerSimilarityConfig, {}),
    "wer": (ErrorRateConfig, {"unit": "word"}),
    "cer": (ErrorRateConfig, {"unit": "char"}),
}


def parse_metric_spec(text: str) -> dict[str, Any]:
    """``name:key=value,key=value`` → ``{"type": name, key: value}`` (values parsed as YAML scalars).

    ``wer:asr=/models/w2v2`` → ``{"type": "wer", "asr": "/models/w2v2"}``.
    """
    import yaml

    kind, _, rest = text.partition(":")
    spec: dict[str, Any] = {"type": kind.strip()}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"metric option {item!r} in {text!r} is not key=value")
        spec[key.strip()] = yaml.safe_load(value)
    return spec


def build_metric(spec: str | dict[str, Any], _shared: dict[Any, Any] | None = None) -> SpeechMetric:
    """One metric from a spec string (``name`` or ``name:key=value,...``) or ``{"type": name, **config}``.

    Raises:
        ConfigError: an unknown metric (the message lists the known ones), an unknown key or an ill-typed value.
    """
    shared = {} if _shared is None else _shared
    spec = parse_metric_spec(spec) if isinstance(spec, str) else dict(spec)
    kind = spec.pop("type", None)
    if kind not in METRICS:
        raise ConfigError(f"speech metric {kind!r} is not one of {', '.join(sorted(METRICS))}")
    config_cls, preset = METRICS[kind]
    for key in preset:
        if key in spec and spec[key] != preset[key]:
            raise ConfigError(f"metric {kind!r} fixes {key}={preset[key]!r}; got {key}={spec[key]!r}")
    cfg = from_dict(config_cls, {**preset, **spec}, path=f"metric.{kind}")
    if isinstance(cfg, PesqConfig):
        return Pesq(cfg)
    if isinstance(cfg, StoiConfig):
        return Stoi(cfg)
    if isinstance(cfg, SiSdrConfig):
        return SiSdr(cfg)
    if isinstance(cfg, LsdConfig):
        return LogSpectralDistance(cfg)
    if isinstance(cfg, DnsmosConfig):
        model = shared.setdefault(("dnsmos", cfg.personalized), DNSMOSModel(cfg.personalized))
        return DnsmosMetric(cfg, model)
    if isinstance(cfg, SpeakerSimilarityConfig):
        return SpeakerSimilarity(cfg)
    assert isinstance(cfg, ErrorRateConfig)
    key = ("asr", str(Path(cfg.asr).resolve()), cfg.device)
    if key not in shared:
        shared[key] = _CachedASR(TransformersCTCASR(cfg.asr, cfg.device))
    return ErrorRate(shared[key], cfg.unit, cfg.normalize, cfg.name)


def build_metrics(specs: Sequence[str | dict[str, Any] | SpeechMetric]) -> list[SpeechMetric]:
    """Metrics from spec strings / dicts (see :func:`build_metric`); a :class:`SpeechMetric` passes through.

    Metrics built in one call share their models: the four ``dnsmos_*`` one DNSMOS evaluation per clip, ``wer``
    and ``cer`` on the same ``asr`` path one recogniser and one transcript per clip.

    Raises:
        ValueError: two metrics share a name.
        ConfigError: see :func:`build_metric`.
    """
    shared: dict[Any, Any] = {}
    out = []
    for s in specs:
        if isinstance(s, (str, dict)):
            out.append(build_metric(s, shared))
        elif isinstance(s, SpeechMetric):
            out.append(s)
        else:
            raise TypeError(f"a speech metric spec is a string, a dict or a SpeechMetric, got {type(s).__name__}")
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise ValueError(f"two speech metrics share a name: {names}")
    return out

