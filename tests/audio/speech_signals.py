"""A deterministic speech-like test signal, made without a synthesiser (espeak-ng is absent where tests run).

:func:`speech_like` strings syllables into words: each syllable is a voiced vowel (a glottal-pulse-like
harmonic series on a gliding f0, shaped by three formant resonators from a small vowel table and by lip
radiation, under a raised-cosine syllable envelope), optionally preceded by an unvoiced fricative (band-passed
noise); words are separated by short pauses. It is loud enough (about −20 dBFS RMS) and varied enough in spectrum and
level over time that speech metrics (PESQ, STOI, DNSMOS, a speaker encoder) treat it as speech.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import butter, lfilter

__all__ = ["speech_like", "add_white_noise", "VOWELS"]

# (F1, F2, F3) in Hz of a few vowels (Peterson & Barney 1952, adult male averages)
VOWELS: tuple[tuple[float, float, float], ...] = (
    (730.0, 1090.0, 2440.0),  # a
    (270.0, 2290.0, 3010.0),  # i
    (300.0, 870.0, 2240.0),  # u
    (530.0, 1840.0, 2480.0),  # e
    (570.0, 840.0, 2410.0),  # o
)


def _resonator(x: np.ndarray, freq: float, bandwidth: float, sr: int) -> np.ndarray:
    """A second-order all-pole resonance (a formant) at ``freq`` with ``bandwidth`` Hz, unit gain at DC."""
    r = np.exp(-np.pi * bandwidth / sr)
    theta = 2.0 * np.pi * freq / sr
    a = [1.0, -2.0 * r * np.cos(theta), r * r]
    return lfilter([sum(a)], a, x)


def _vowel(n: int, f0_start: float, f0_end: float, formants: tuple[float, float, float], sr: int) -> np.ndarray:
    f0 = np.linspace(f0_start, f0_end, n)
    phase = 2.0 * np.pi * np.cumsum(f0) / sr
    source = np.zeros(n)
    for k in range(1, int(sr / 2 / max(f0_start, f0_end))):
        source += np.sin(k * phase) / k  # a sawtooth-like glottal source, -6 dB/octave
    out = source
    for freq, bw in zip(formants, (80.0, 100.0, 140.0)):
        out = _resonator(out, freq, bw, sr)
    return np.diff(out, prepend=0.0)  # lip radiation: +6 dB/octave


def speech_like(seconds: float = 3.0, sr: int = 16000, seed: int = 0, f0: float = 120.0) -> np.ndarray:
    """A speech-like float32 waveform of ``seconds`` at ``sr``, peak-normalised to 0.5 (about −20 dBFS RMS).

    Args:
        seconds: the length.
        sr: the sample rate.
        seed: picks the syllables (vowels, lengths, f0 glides, fricatives, pauses); same seed, same signal.
        f0: the speaker's mean fundamental frequency in Hz (a different "voice" for another value).
    """
    rng = np.random.default_rng(seed)
    n_total = int(round(seconds * sr))
    out = np.zeros(n_total)
    pos = int(0.05 * sr)
    syllable_in_word = 0
    while pos < n_total:
        if rng.random() < 0.4:  # an unvoiced consonant before the vowel
            n_fric = int(rng.uniform(0.04, 0.09) * sr)
            lo = rng.uniform(2500.0, 4000.0)
            b, a = butter(2, [lo / (sr / 2), min(0.95, (lo + 2500.0) / (sr / 2))], btype="band")
            fric = lfilter(b, a, rng.standard_normal(n_fric)) * np.hanning(n_fric) * 0.25
            end = min(n_total, pos + n_fric)
            out[pos:end] += fric[: end - pos]
            pos = end
        n_syl = int(rng.uniform(0.14, 0.26) * sr)
        start_f0 = f0 * rng.uniform(0.9, 1.2)
        vowel = _vowel(n_syl, start_f0, start_f0 * rng.uniform(0.8, 1.05), VOWELS[rng.integers(len(VOWELS))], sr)
        envelope = np.sin(np.linspace(0.0, np.pi, n_syl)) ** 0.7 * rng.uniform(0.6, 1.0)
        end = min(n_total, pos + n_syl)
        out[pos:end] += (vowel * envelope)[: end - pos]
        pos = end
        syllable_in_word += 1
        if syllable_in_word >= rng.integers(1, 4):  # the end of a word: a pause
            pos += int(rng.uniform(0.06, 0.15) * sr)
            syllable_in_word = 0
    return (0.5 * out / np.abs(out).max()).astype(np.float32)


def add_white_noise(clean: np.ndarray, snr_db: float, seed: int = 1) -> np.ndarray:
    """``clean`` plus white Gaussian noise at ``snr_db`` (signal power over noise power), float32."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(len(clean))
    noise *= np.sqrt(np.mean(clean.astype(np.float64) ** 2) / np.mean(noise**2) / 10.0 ** (snr_db / 10.0))
    return (clean + noise).astype(np.float32)
