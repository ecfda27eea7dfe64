"""Score many speech clips with a list of metrics: validated, resampled, in parallel worker processes.

::

    clips = [SpeechClip("u1/s0", "gen/u1_0.wav", reference="clean/u1.wav", text="the cat sat"), ...]
    result = evaluate_clips(clips, ["pesq_wb", "estoi", "si_sdr", "dnsmos_ovrl"], num_workers=4)
    result.scores["pesq_wb"]  # (n_kept,) float64, aligned with result.names
    result.skipped_by_reason()  # {"silent": 2} with on_bad="skip"

Every clip is checked before it is scored, estimate and reference alike (thresholds in :class:`SuiteConfig`):

- **non-finite**: any NaN or inf sample;
- **too short**: under 0.25 s (PESQ needs about that much to align);
- **silent**: all zeros, or an RMS level below −60 dBFS;
- **clipped**: more than 1% of the samples at ``|x| >= 0.999`` (the rail);
- **length mismatch**: estimate and reference durations differ by more than 10% of the longer one; within that
  both are trimmed to the shorter (a vocoder's or codec's few frames of padding are not an error);
- **missing reference / missing text**: a metric needs what the clip does not have.

With ``on_bad="raise"`` (the default) the first bad clip raises :class:`~mm_align.audio.io.AudioError` naming
the clip and the reason: in an evaluation set a bad clip is nearly always an upstream bug (a wrong path, a
broken decoder), and silently scoring fewer clips would change the reported means. ``on_bad="skip"`` (for
scoring a model's own samples before pair building, where a broken sample simply forms no pair) leaves such
clips out, lists them in :attr:`SuiteResult.skipped` and counts them by reason. An :class:`AudioError` a metric
raises (PESQ finding no utterance) is treated the same way; any other exception propagates with a note naming
the clip and metric.

Inputs at any rate are resampled (torchaudio windowed sinc, :func:`mm_align.audio.io.resample`) to each
metric's rate, never refused. Clips are scored in ``num_workers`` processes (default ``min(cores, clips)``),
each loading the models once and limited to one thread, under one tqdm bar for the job. Workers are forked
on Linux (they start in milliseconds and inherit the imports); a metric on a CUDA device (an ASR with
``device=cuda``) needs ``start_method="spawn"`` or ``num_workers=0``, since CUDA does not survive a fork.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from mm_align.audio.io import AudioError, load_audio, resample, to_mono
from mm_align.audio.metrics import SpeechMetric, build_metrics, limit_threads
from tqdm.auto import tqdm

from mm_align.config import option

__all__ = ["SpeechClip", "SuiteConfig", "SkippedClip", "SuiteResult", "MetricSuite", "evaluate_clips",
           "clips_from_files", "check_wave"]

logger = logging.getLogger(__name__)

Wave = np.ndarray | torch.Tensor | str | os.PathLike


@dataclass
class SpeechClip:
    """One clip to score.

    Args:
        name: names the clip in messages and in :attr:`SuiteResult.names` (a path or an id).
        estimate: the audio to score: a waveform (``(T,)``, or multi-channel, mixed down) or an audio file path.
        sample_rate: the estimate's rate; required for a waveform, read from the file for a path.
        reference: the clean reference (waveform or path), for intrusive metrics.
        reference_sample_rate: the reference's rate; default ``sample_rate`` (read from the file for a path).
        text: the transcript, for WER / CER.
    """

    name: str
    estimate: Wave
    sample_rate: int | None = None
    reference: Wave | None = None
    reference_sample_rate: int | None = None
    text: str | None = None


@dataclass
class SuiteConfig:
    on_bad: Literal["raise", "skip"] = option("raise", help="A bad clip raises AudioError naming it (raise), or is "
                                                            "left out and counted by reason (skip).")
    num_workers: int | None = option(None, help="Worker processes; default min(cores, clips); 0 or 1: in this "
                                                "process.")
    start_method: Literal["fork", "spawn", "forkserver"] | None = option(
        None, help="multiprocessing start method; default fork on Linux (workers start in ms), spawn elsewhere.")
    progress: bool = option(True, help="Show one tqdm bar for the job.")
    min_seconds: float = option(0.25, help="Shorter clips are bad (too short).")
    silence_dbfs: float = option(-60.0, help="Clips with an RMS level below this are bad (silent).")
    rail: float = option(0.999, help="|x| at or above this counts as a clipped sample.")
    max_clipped_fraction: float = option(0.01, help="More clipped samples than this fraction: bad (clipped).")
    max_length_mismatch: float = option(0.10, help="Estimate/reference durations may differ by this fraction of "
                                                   "the longer (both are trimmed to the shorter); more is bad.")

    def __post_init__(self) -> None:
        if self.on_bad not in ("raise", "skip"):
            raise ValueError(f"on_bad must be 'raise' or 'skip', got {self.on_bad!r}")
        if self.start_method not in (None, "fork", "spawn", "forkserver"):
            raise ValueError(f"start_method must be fork, spawn, forkserver or None, got {self.start_method!r}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not 0.0 <= self.max_length_mismatch < 1.0:
            raise ValueError(f"max_length_mismatch must be in [0, 1), got {self.max_length_mismatch}")


@dataclass
class SkippedClip:
    """A clip left out with ``on_bad="skip"``; ``reason`` is ``"<category>: <detail>"``."""

    name: str
    reason: str


@dataclass
class SuiteResult:
    """Per-metric scores of the kept clips (in input order) and the clips skipped."""

    names: list[str]
    scores: dict[str, np.ndarray]  # metric name -> (len(names),) float64
    higher_is_better: dict[str, bool]
    skipped: list[SkippedClip] = field(default_factory=list)

    def skipped_by_reason(self) -> dict[str, int]:
        """Skipped clips counted by reason category (the text before the first ``':'``), e.g. ``{"silent": 2}``."""
        return dict(Counter(s.reason.split(":", 1)[0].strip() for s in self.skipped))

    def means(self) -> dict[str, float]:
        """The mean of each metric over the kept clips (NaN when none was kept)."""
        return {k: float(v.mean()) if len(v) else math.nan for k, v in self.scores.items()}


def check_wave(wave: np.ndarray, sample_rate: int, role: str, cfg: SuiteConfig) -> str | None:
    """Why ``wave`` (mono, at ``sample_rate``) cannot be scored, as ``"<category>: <detail>"``; ``None`` if it can."""
    n = len(wave)
    if n == 0:
        return f"too short: the {role} holds no samples"
    bad = int(np.count_nonzero(~np.isfinite(wave)))
    if bad:
        return f"non-finite: the {role} has {bad} NaN/inf samples of {n}"
    seconds = n / sample_rate
    if seconds < cfg.min_seconds:
        return f"too short: the {role} lasts {seconds:.3f} s (< {cfg.min_seconds} s)"
    rms = float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))
    level = -math.inf if rms == 0.0 else 20.0 * math.log10(rms)
    if level < cfg.silence_dbfs:
        return f"silent: the {role}'s RMS level is {level:.1f} dBFS (< {cfg.silence_dbfs:g} dBFS)"
    clipped = float(np.mean(np.abs(wave) >= cfg.rail))
    if clipped > cfg.max_clipped_fraction:
        return (f"clipped: {100 * clipped:.1f}% of the {role}'s samples are at |x| >= {cfg.rail} "
                f"(> {100 * cfg.max_clipped_fraction:g}%)")
    return None


class _Bad(Exception):
    """A clip that cannot be scored (internal: becomes a skip or an AudioError naming the clip)."""


def _mono(wave: Wave, sample_rate: int | None, role: str, clip: str) -> tuple[np.ndarray, int]:
    if isinstance(wave, (str, os.PathLike)):
        try:
            tensor, sr = load_audio(wave)
        except AudioError as err:
            raise _Bad(f"unreadable: {err}") from None
        return tensor.numpy(), sr
    if sample_rate is None:
        raise ValueError(f"{clip}: the {role} is a waveform: give its sample rate")
    if isinstance(wave, np.ndarray):
        wave = torch.from_numpy(np.ascontiguousarray(wave))
    wave = to_mono(wave.detach().cpu())
    if not wave.is_floating_point():
        raise _Bad(f"not float audio: the {role} has dtype {wave.dtype} (give float samples in [-1, 1])")
    return wave.numpy(), int(sample_rate)


def _at_rate(wave: np.ndarray, sr: int, target: int) -> np.ndarray:
    if sr == target:
        return wave  # the same array: scores equal the packages' on it
    return resample(torch.from_numpy(wave).float(), sr, target).numpy()


class _ClipScorer:
    """Loads, validates, resamples and scores one clip with every metric (run in a worker or in-process)."""

    def __init__(self, metrics: Sequence[SpeechMetric], cfg: SuiteConfig) -> None:
        self.metrics, self.cfg = list(metrics), cfg
        self.needs_reference = [m.name for m in self.metrics if m.needs_reference]
        self.needs_text = [m.name for m in self.metrics if m.needs_text]

    def __call__(self, clip: SpeechClip) -> dict[str, float]:
        cfg = self.cfg
        est, sr_e = _mono(clip.estimate, clip.sample_rate, "estimate", clip.name)
        reason = check_wave(est, sr_e, "estimate", cfg)
        if reason:
            raise _Bad(reason)
        ref = sr_r = None
        if self.needs_reference:
            if clip.reference is None:
                raise _Bad(f"missing reference: {', '.join(self.needs_reference)} need the clean reference")
            ref_sr = clip.reference_sample_rate if clip.reference_sample_rate is not None else clip.sample_rate
            ref, sr_r = _mono(clip.reference, ref_sr, "reference", clip.name)
            reason = check_wave(ref, sr_r, "reference", cfg)
            if reason:
                raise _Bad(reason)
            d_e, d_r = len(est) / sr_e, len(ref) / sr_r
            if abs(d_e - d_r) > cfg.max_length_mismatch * max(d_e, d_r):
                raise _Bad(f"length mismatch: the estimate lasts {d_e:.3f} s, the reference {d_r:.3f} s "
                           f"(more than {100 * cfg.max_length_mismatch:g}% apart)")
        if self.needs_text and not (clip.text and clip.text.strip()):
            raise _Bad(f"missing text: {', '.join(self.needs_text)} need the clip's transcript")

        by_rate: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        out: dict[str, float] = {}
        for m in self.metrics:
            if m.sample_rate not in by_rate:
                e = _at_rate(est, sr_e, m.sample_rate)
                r = None if ref is None else _at_rate(ref, sr_r, m.sample_rate)
                if r is not None and len(r) != len(e):
                    n = min(len(e), len(r))
                    e, r = e[:n], r[:n]
                by_rate[m.sample_rate] = (e, r)
            e, r = by_rate[m.sample_rate]
            try:
                out[m.name] = float(m.score(e, r if m.needs_reference else None, clip.text))
            except AudioError as err:
                raise _Bad(f"{m.name} failed: {err}") from None
            except Exception as err:
                err.add_note(f"while scoring clip {clip.name!r} with speech metric {m.name!r}")
                raise
        return out


_WORKER: _ClipScorer | None = None


def _init_worker(metrics: Sequence[SpeechMetric], cfg: SuiteConfig) -> None:
    global _WORKER
    limit_threads(1)
    for m in metrics:
        getattr(m, "release", lambda: None)()  # a forked worker must not reuse the parent's loaded sessions
    _WORKER = _ClipScorer(metrics, cfg)


def _score_in_worker(index: int, clip: SpeechClip) -> tuple[int, dict[str, float] | None, str | None]:
    assert _WORKER is not None
    return _run(_WORKER, index, clip)


def _run(scorer: _ClipScorer, index: int, clip: SpeechClip) -> tuple[int, dict[str, float] | None, str | None]:
    try:
        return index, scorer(clip), None
    except _Bad as bad:
        return index, None, str(bad)


class MetricSuite:
    """A list of speech metrics and how to run them over many clips (see the module docstring).

    Args:
        metrics: :class:`SpeechMetric` objects or specs for :func:`~mm_align.audio.metrics.build_metrics`
            (``"pesq_wb"``, ``"wer:asr=/path/to/model"``).
        config: a :class:`SuiteConfig`; keyword arguments override its fields.
    """

    def __init__(self, metrics: Sequence[SpeechMetric | str | dict[str, Any]], config: SuiteConfig | None = None,
                 **overrides: Any) -> None:
        from dataclasses import fields, replace

        self.metrics = build_metrics(metrics)
        if not self.metrics:
            raise ValueError("a metric suite needs at least one metric")
        valid = [f.name for f in fields(SuiteConfig)]
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise TypeError(f"unknown metric suite option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
        self.config = replace(config or SuiteConfig(), **overrides)

    def _workers(self, n: int) -> int:
        if self.config.num_workers is not None:
            return min(self.config.num_workers, n)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return min(cores, n)

    def evaluate(self, clips: Iterable[SpeechClip]) -> SuiteResult:
        """Score every clip with every metric.

        Raises:
            AudioError: with ``on_bad="raise"``, the first bad clip found (the message names it and the reason).
        """
        clips = list(clips)
        names = [m.name for m in self.metrics]
        results: dict[int, dict[str, float]] = {}
        skipped: dict[int, str] = {}
        workers = self._workers(len(clips))
        bar = tqdm(total=len(clips), desc="speech metrics", unit="clip", disable=not self.config.progress,
                   dynamic_ncols=True)
        try:
            if workers <= 1:
                scorer = _ClipScorer(self.metrics, self.config)
                for i, clip in enumerate(clips):
                    self._collect(_run(scorer, i, clip), clips, results, skipped)
                    bar.update()
            else:
                self._parallel(clips, workers, results, skipped, bar)
        finally:
            bar.close()
        kept = sorted(results)
        result = SuiteResult(
            names=[clips[i].name for i in kept],
            scores={n: np.array([results[i][n] for i in kept], dtype=np.float64) for n in names},
            higher_is_better={m.name: bool(m.higher_is_better) for m in self.metrics},
            skipped=[SkippedClip(clips[i].name, skipped[i]) for i in sorted(skipped)],
        )
        if result.skipped:
            counts = ", ".join(f"{k}: {v}" for k, v in result.skipped_by_reason().items())
            logger.warning("speech metrics: skipped %d of %d clips (%s); first: %s: %s", len(result.skipped),
                           len(clips), counts, result.skipped[0].name, result.skipped[0].reason)
        return result

    def _collect(self, item: tuple[int, dict[str, float] | None, str | None], clips: list[SpeechClip],
                 results: dict[int, dict[str, float]], skipped: dict[int, str]) -> None:
        index, scores, reason = item
        if reason is None:
            results[index] = scores  # type: ignore[assignment]
        elif self.config.on_bad == "raise":
            raise AudioError(f"{clips[index].name}: {reason}")
        else:
            skipped[index] = reason

    def _parallel(self, clips: list[SpeechClip], workers: int, results: dict[int, dict[str, float]],
                  skipped: dict[int, str], bar: Any) -> None:
        method = self.config.start_method or ("fork" if sys.platform.startswith("linux") else "spawn")
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=_init_worker,
                                   initargs=(self.metrics, self.config))
        try:
            pending: set[Future] = set()
            todo = iter(enumerate(clips))
            # a bounded window of submitted clips, so paths are loaded lazily and a raise stops the job early
            for i, clip in todo:
                pending.add(pool.submit(_score_in_worker, i, clip))
                if len(pending) >= 4 * workers:
                    break
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    self._collect(fut.result(), clips, results, skipped)
                    bar.update()
                    nxt = next(todo, None)
                    if nxt is not None:
                        pending.add(pool.submit(_score_in_worker, *nxt))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def evaluate_clips(clips: Iterable[SpeechClip], metrics: Sequence[SpeechMetric | str | dict[str, Any]],
                   **config: Any) -> SuiteResult:
    """``MetricSuite(metrics, **config).evaluate(clips)``; ``config`` holds :class:`SuiteConfig` fields."""
    return MetricSuite(metrics, **config).evaluate(clips)


def clips_from_files(estimates: Sequence[str | Path], references: Sequence[str | Path] | None = None,
                     texts: Sequence[str | None] | None = None) -> list[SpeechClip]:
    """Clips from parallel lists of files (the estimate path names each clip)."""
    refs = list(references) if references is not None else [None] * len(estimates)
    txts = list(texts) if texts is not None else [None] * len(estimates)
    if not len(refs) == len(txts) == len(estimates):
        raise ValueError(f"{len(estimates)} estimates, {len(refs)} references, {len(txts)} texts")
    return [SpeechClip(str(e), e, reference=r, text=t) for e, r, t in zip(estimates, refs, txts)]
