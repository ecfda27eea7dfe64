"""Audio files in and out: soundfile for wav/flac, torchaudio.functional for resampling.

Every waveform inside the speech modality is a float32 ``torch.Tensor`` of shape ``(T,)`` (mono) at a
known sample rate. Files are read with :mod:`soundfile` (wav, flac, ogg), mixed down to mono by the
channel mean and resampled with :func:`torchaudio.functional.resample` (windowed-sinc, the
library's default kernel), so a file at any rate is usable. Loudness is normalised by RMS to a target
dBFS, documented here rather than with pyloudnorm's BS.1770 gating: the speech world's clips are
short single utterances with no long silences, where the two agree to a fraction of a dB, and RMS
needs no extra dependency.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from mm_align.atomic import atomic_write_bytes

__all__ = ["AudioError", "load_audio", "save_audio", "resample", "to_mono", "rms_dbfs", "normalize_rms",
           "AUDIO_SUFFIXES"]

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")


class AudioError(ValueError):
    """An audio file or waveform cannot be used; the message names the file and what is wrong."""


def to_mono(wave: torch.Tensor) -> torch.Tensor:
    """Mix ``(T,)``, ``(T, C)`` (soundfile's layout) or ``(C, T)`` down to ``(T,)`` by the channel mean.

    A 2-D input is read as ``(C, T)`` when its first dimension is the smaller one and at most 8
    (channels), otherwise as ``(T, C)``.
    """
    if wave.dim() == 1:
        return wave
    if wave.dim() != 2:
        raise AudioError(f"expected a waveform of shape (T,), (T, C) or (C, T), got {tuple(wave.shape)}")
    channels_first = wave.shape[0] <= 8 and wave.shape[0] < wave.shape[1]
    return wave.mean(dim=0 if channels_first else 1)


def resample(wave: torch.Tensor, orig_sr: int, target_sr: int) -> torch.Tensor:
    """Resample with torchaudio's windowed-sinc interpolation; identity when the rates agree."""
    if orig_sr == target_sr:
        return wave
    if orig_sr <= 0 or target_sr <= 0:
        raise AudioError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    return AF.resample(wave, orig_sr, target_sr)


def load_audio(path: str | os.PathLike, sample_rate: int | None = None, mono: bool = True) -> tuple[torch.Tensor, int]:
    """Read an audio file as float32 in [-1, 1].

    Args:
        path: a wav, flac or ogg file.
        sample_rate: resample to this rate; ``None`` keeps the file's.
        mono: mix the channels down to ``(T,)``; otherwise return ``(C, T)``.

    Returns:
        ``(wave, sample_rate)``.

    Raises:
        AudioError: the file is missing, unreadable or holds no samples (the message names it).
    """
    p = Path(path)
    if not p.is_file():
        raise AudioError(f"{p}: audio file not found")
    try:
        data, sr = sf.read(str(p), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"{p}: not a readable audio file ({e})") from None
    if data.shape[0] == 0:
        raise AudioError(f"{p}: the file holds no samples")
    wave = torch.from_numpy(np.ascontiguousarray(data.T))  # (C, T)
    if mono:
        wave = wave.mean(dim=0)
    if sample_rate is not None and sample_rate != sr:
        wave = resample(wave, sr, sample_rate)
        sr = sample_rate
    return wave, int(sr)


def save_audio(path: str | os.PathLike, wave: torch.Tensor | np.ndarray, sample_rate: int,
               subtype: str | None = None) -> Path:
    """Write ``(T,)`` or ``(C, T)`` audio atomically; the format follows the suffix (.wav, .flac, .ogg).

    Values are clipped to [-1, 1] first (a restoration model may overshoot; soundfile would wrap
    integer PCM). ``subtype`` defaults to PCM_16, soundfile's default for wav and flac.
    """
    import io

    p = Path(path)
    if p.suffix.lower() not in AUDIO_SUFFIXES:
        raise AudioError(f"{p}: unsupported audio suffix; use one of {', '.join(AUDIO_SUFFIXES)}")
    arr = wave.detach().cpu().float().numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave, np.float32)
    if arr.ndim == 2:
        arr = arr.T  # soundfile wants (T, C)
    if not np.all(np.isfinite(arr)):
        raise AudioError(f"{p}: refusing to write a waveform with NaN or inf samples")
    arr = np.clip(arr, -1.0, 1.0)
    buf = io.BytesIO()
    fmt = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG"}[p.suffix.lower()]
    sf.write(buf, arr, int(sample_rate), format=fmt, subtype=subtype)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(p, buf.getvalue())
    return p


def rms_dbfs(wave: torch.Tensor) -> float:
    """The waveform's RMS level in dB relative to full scale (−inf for digital silence)."""
    rms = float(wave.float().pow(2).mean().sqrt())
    return -math.inf if rms == 0.0 else 20.0 * math.log10(rms)


def normalize_rms(wave: torch.Tensor, target_dbfs: float = -25.0, peak_limit: float = 0.99) -> torch.Tensor:
    """Scale to ``target_dbfs`` RMS, then down further if the peak would pass ``peak_limit``.

    −25 dBFS is the level DNS-Challenge data is mixed at. Digital silence is returned unchanged.
    """
    level = rms_dbfs(wave)
    if level == -math.inf:
        return wave
    out = wave * (10.0 ** ((target_dbfs - level) / 20.0))
    peak = float(out.abs().max())
    if peak > peak_limit:
        out = out * (peak_limit / peak)
    return out
