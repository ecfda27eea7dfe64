"""Seeded, composable speech degradations: noise, reverberation, clipping, band-limiting, packet loss.

Every degradation is a dataclass config called as ``step(wave, sr, rng) -> wave`` on a mono float32
``(T,)`` waveform at ``sr`` Hz, with a :class:`numpy.random.Generator` for its random draws; the output
has the input's length, dtype and device. A :class:`DegradationChain` applies several in order from one
integer seed, so the same ``(chain, wave, sr, seed)`` always gives a bit-identical result::

    chain = DegradationChain.from_spec("noise:kind=pink,snr=5|reverb:rt60=0.4|clip:threshold=0.3|"
                                       "bandlimit:cutoff=4000|packet_loss:rate=0.1,ms=20")
    degraded = chain(clean, 16000, seed=7)

The spec grammar is ``NAME:KEY=VALUE,KEY=VALUE|NAME...`` with the names and keys of :data:`DEGRADATIONS`
(``chain.spec()`` writes it back). :func:`gensr_mix` draws the general-restoration mix of GenSR
(noise + reverberation + clipping + bandwidth loss) from a seed.

Built on maintained packages where one does the job: :func:`torchaudio.functional.add_noise` (SNR
scaling), pyroomacoustics (room impulse responses), :func:`scipy.signal.fftconvolve` and
:func:`mm_align.audio.io.resample` (torchaudio's windowed sinc). Coloured noise, hum, babble mixing and
packet loss are a few lines of numpy each and have no maintained equivalent there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
import torchaudio.functional as AF
from mm_align.audio.io import AudioError, resample

__all__ = [
    "Degradation", "Noise", "Reverb", "Clip", "BandLimit", "PacketLoss", "DegradationChain", "DEGRADATIONS",
    "NOISE_KINDS", "DegradationSpecError", "parse_chain", "gensr_mix", "room_impulse_response", "GENSR_RANGES",
]

NOISE_KINDS = ("white", "pink", "brown", "hum", "babble")


class DegradationSpecError(ValueError):
    """A degradation spec string or config value is invalid; the message names the bad part and the valid options."""


class Degradation(Protocol):
    """One degradation step: ``(wave (T,), sample rate, rng) -> wave (T,)``."""

    name: ClassVar[str]

    def __call__(self, wave: torch.Tensor, sr: int, rng: np.random.Generator) -> torch.Tensor: ...


def _check_wave(wave: torch.Tensor, sr: int, what: str) -> None:
    if not isinstance(wave, torch.Tensor) or wave.dim() != 1 or wave.numel() == 0:
        shape = tuple(wave.shape) if isinstance(wave, torch.Tensor) else type(wave).__name__
        raise AudioError(f"{what}: expected a non-empty mono waveform of shape (T,), got {shape}")
    if sr <= 0:
        raise AudioError(f"{what}: the sample rate must be positive, got {sr}")


def _power(x: np.ndarray) -> float:
    return float(np.mean(np.square(x, dtype=np.float64)))


# ---- additive noise ---------------------------------------------------------------------------------------


def _coloured(n: int, sr: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """White Gaussian noise shaped to a power spectrum ∝ 1/f**exponent (1: pink, 2: brown); DC removed.

    The rFFT of white noise is multiplied by ``f**(-exponent/2)`` (amplitude), so the power falls by
    ``10·exponent`` dB per decade (3 dB/octave for pink, 6 dB/octave for brown).
    """
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    gain = np.zeros_like(freqs)
    gain[1:] = freqs[1:] ** (-exponent / 2.0)
    return np.fft.irfft(spectrum * gain, n=n)


def _hum(n: int, sr: int, f0: float, harmonics: int, rng: np.random.Generator) -> np.ndarray:
    """Mains hum: ``sum_{k=1..H} (1/k)·sin(2π·k·f0·t + φ_k)``, φ_k ~ U[0, 2π), harmonics above Nyquist dropped."""
    t = np.arange(n) / sr
    phases = rng.uniform(0.0, 2.0 * math.pi, size=harmonics)
    out = np.zeros(n)
    for k in range(1, harmonics + 1):
        if k * f0 < sr / 2:
            out += np.sin(2.0 * math.pi * k * f0 * t + phases[k - 1]) / k
    return out


def _babble(n: int, talkers: int, babble: Sequence[torch.Tensor], rng: np.random.Generator) -> np.ndarray:
    """The sum of ``talkers`` other utterances, each looped to cover ``n`` samples, cropped at a random
    offset and scaled to unit RMS first (so every talker is equally loud)."""
    picks = rng.choice(len(babble), size=talkers, replace=talkers > len(babble))
    out = np.zeros(n)
    for i in picks:
        w = babble[int(i)].detach().cpu().double().numpy().reshape(-1)
        if w.size == 0 or _power(w) == 0.0:
            raise AudioError(f"noise kind=babble: babble wave {int(i)} is empty or silent")
        looped = np.tile(w, math.ceil((n + w.size) / w.size))  # long enough for any offset in [0, len(w))
        start = int(rng.integers(0, w.size))
        piece = looped[start: start + n]
        out += piece / math.sqrt(_power(piece) or 1.0)
    return out


@dataclass
class Noise:
    """Additive noise at a signal-to-noise ratio measured on the whole clip.

    ``SNR = 10·log10(P_signal / P_noise)`` with ``P = mean(x²)`` over all samples; the noise is scaled by
    :func:`torchaudio.functional.add_noise` so the output is ``wave + g·noise`` with exactly that SNR.

    Args:
        kind: ``white`` (Gaussian), ``pink`` (power ∝ 1/f), ``brown`` (∝ 1/f²) — both by spectral shaping of
            white noise —, ``hum`` (``hum_freq`` Hz and its harmonics, amplitude 1/k), or ``babble`` (the
            sum of ``talkers`` utterances from ``babble``, looped or cropped to length).
        snr: The SNR in dB.
        hum_freq: The mains frequency for ``hum``: 50 or 60 Hz.
        harmonics: Number of hum partials (the fundamental included).
        talkers: Number of babble talkers drawn (without replacement when there are enough).
        babble: The other utterances for ``babble`` (mono ``(T,)`` waves at the clip's sample rate). Not part
            of the spec string: pass them to :meth:`DegradationChain.from_spec`.
    """

    name: ClassVar[str] = "noise"
    kind: str = "white"
    snr: float = 10.0
    hum_freq: float = 50.0
    harmonics: int = 4
    talkers: int = 4
    babble: tuple[torch.Tensor, ...] = field(default=(), repr=False, compare=False, metadata={"spec": False})

    def __post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            raise DegradationSpecError(f"noise kind must be one of {', '.join(NOISE_KINDS)}, got {self.kind!r}")
        if self.hum_freq not in (50.0, 60.0):
            raise DegradationSpecError(f"noise hum_freq must be 50 or 60 (Hz), got {self.hum_freq:g}")
        if self.harmonics < 1 or self.talkers < 1:
            raise DegradationSpecError("noise harmonics and talkers must be at least 1")
        if not math.isfinite(self.snr):
            raise DegradationSpecError(f"noise snr must be a finite number of dB, got {self.snr}")
        self.babble = tuple(self.babble)

    def __call__(self, wave: torch.Tensor, sr: int, rng: np.random.Generator) -> torch.Tensor:
        _check_wave(wave, sr, "noise")
        n = wave.numel()
        if self.kind == "white":
            noise = rng.standard_normal(n)
        elif self.kind in ("pink", "brown"):
            noise = _coloured(n, sr, 1.0 if self.kind == "pink" else 2.0, rng)
        elif self.kind == "hum":
            noise = _hum(n, sr, self.hum_freq, self.harmonics, rng)
        else:
            if not self.babble:
                raise DegradationSpecError("noise kind=babble needs other utterances: pass babble=[wave, ...] "
                                           "(DegradationChain.from_spec(spec, babble=...))")
            noise = _babble(n, self.talkers, self.babble, rng)
        clean = wave.detach().cpu().double()
        if float(clean.pow(2).sum()) == 0.0:
            raise AudioError("noise: the waveform is digital silence, so no SNR can be set against it")
        mixed = AF.add_noise(clean, torch.from_numpy(noise), torch.tensor(float(self.snr), dtype=torch.float64))
        return mixed.to(dtype=torch.float32, device=wave.device)


# ---- reverberation ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def _rir(rt60: float, room: tuple[float, float, float], source: tuple[float, ...], mic: tuple[float, ...],
         sr: int, max_order: int | None) -> tuple[np.ndarray, int]:
    import pyroomacoustics as pra

    try:
        absorption, order = pra.inverse_sabine(rt60, list(room))
    except ValueError:
        raise DegradationSpecError(
            f"reverb rt60={rt60:g} s is too short for a {'x'.join(f'{d:g}' for d in room)} m room (the Sabine "
            "absorption would exceed 1); use a longer rt60 or a smaller room") from None
    if max_order is not None:
        order = min(order, max_order)
    shoebox = pra.ShoeBox(list(room), fs=sr, materials=pra.Material(absorption), max_order=order)
    shoebox.add_source(list(source))
    shoebox.add_microphone(list(mic))
    shoebox.compute_rir()
    # Where pyroomacoustics puts the direct path: distance / c, plus half its fractional-delay filter. Not
    # argmax|h|: a direct path between two samples is split over both, and an on-sample reflection can be larger.
    distance = float(np.linalg.norm(np.subtract(source, mic)))
    direct = int(round(distance / shoebox.c * sr)) + pra.constants.get("frac_delay_length") // 2
    return np.asarray(shoebox.rir[0][0], dtype=np.float64), direct


def room_impulse_response(rt60: float, sr: int, rng: np.random.Generator,
                          room: tuple[float, float, float] = (6.0, 4.5, 3.0), max_order: int | None = None,
                          margin: float = 0.5) -> tuple[np.ndarray, int]:
    """A shoebox room impulse response with a target RT60, simulated by pyroomacoustics' image source method.

    The wall energy absorption ``α`` and the image-source order come from the inverse Sabine formula
    (:func:`pyroomacoustics.inverse_sabine`): ``RT60 = 24·ln(10)·V / (c·S·α)`` for a room of volume ``V``
    and surface ``S``, so ``α = 24·ln(10)·V / (c·S·RT60)``, and the order is the one whose image sources
    reach ``c·RT60`` metres. Source and microphone are drawn uniformly in the room, ``margin`` metres from
    every wall. The image source model's decay is close to, usually a little slower than, the Sabine
    target (pyroomacoustics documents this).

    The simulation costs grow as order³ (about 0.1 s at RT60 0.4 s, 1 s at 0.8 s in the default room);
    ``max_order`` caps the order (a shorter tail) and identical parameters are served from a small cache.

    Returns:
        `tuple[np.ndarray, int]`: the float64 impulse response at ``sr``, and the sample index of its
        direct-path arrival.
    """
    if rt60 <= 0:
        raise DegradationSpecError(f"reverb rt60 must be positive (seconds), got {rt60:g}")
    room = tuple(float(d) for d in room)
    if len(room) != 3 or min(room) <= 2 * margin:
        raise DegradationSpecError(f"reverb room must be 3 sides longer than {2 * margin:g} m, got {room}")
    source = tuple(float(rng.uniform(margin, d - margin)) for d in room)
    mic = tuple(float(rng.uniform(margin, d - margin)) for d in room)
    h, direct = _rir(float(rt60), room, source, mic, int(sr), max_order)
    return h.copy(), direct


@dataclass
class Reverb:
    """Room reverberation: the clip convolved with a simulated shoebox RIR (:func:`room_impulse_response`).

    ``y = (x * h)[d : d + T] · rms(x) / rms(...)``: the convolution (:func:`scipy.signal.fftconvolve`) is
    cut from the direct-path arrival ``d`` on, so the degraded clip stays time-aligned with the clean one,
    trimmed to the input length ``T`` and rescaled to the input's RMS.

    Args:
        rt60: The target reverberation time in seconds (energy decay by 60 dB).
        room: The room's sides in metres (spec: ``room=6x4.5x3``).
        max_order: Cap on the image-source order (``None``: what the inverse Sabine formula asks for).
    """

    name: ClassVar[str] = "reverb"
    rt60: float = 0.4
    room: tuple[float, float, float] = (6.0, 4.5, 3.0)
    max_order: int | None = None

    def __post_init__(self) -> None:
        if not self.rt60 > 0:
            raise DegradationSpecError(f"reverb rt60 must be positive (seconds), got {self.rt60}")
        self.room = tuple(float(d) for d in self.room)  # type: ignore[assignment]
        if len(self.room) != 3:
            raise DegradationSpecError(f"reverb room must have 3 sides (e.g. room=6x4.5x3), got {self.room}")

    def __call__(self, wave: torch.Tensor, sr: int, rng: np.random.Generator) -> torch.Tensor:
        from scipy.signal import fftconvolve

        _check_wave(wave, sr, "reverb")
        h, start = room_impulse_response(self.rt60, sr, rng, self.room, self.max_order)
        x = wave.detach().cpu().double().numpy()
        wet = fftconvolve(x, h)[start: start + x.size]
        rms_in, rms_out = math.sqrt(_power(x)), math.sqrt(_power(wet))
        if rms_out > 0:
            wet = wet * (rms_in / rms_out)
        return torch.from_numpy(np.ascontiguousarray(wet)).to(dtype=torch.float32, device=wave.device)


# ---- clipping, band-limiting, packet loss -----------------------------------------------------------------


@dataclass
class Clip:
    """Hard clipping: ``y = clamp(x, -c, c)`` with ``c = threshold·max|x|`` (``relative``) or ``c = threshold``.

    Args:
        threshold: The ceiling, as a fraction of the clip's peak (``relative=True``) or in full-scale units.
        relative: Whether ``threshold`` is relative to the peak.
    """

    name: ClassVar[str] = "clip"
    threshold: float = 0.3
    relative: bool = True

    def __post_init__(self) -> None:
        if not self.threshold > 0 or (self.relative and self.threshold > 1):
            raise DegradationSpecError(f"clip threshold must be in (0, 1] of the peak (relative) or positive, "
                                       f"got {self.threshold}")

    def __call__(self, wave: torch.Tensor, sr: int, rng: np.random.Generator) -> torch.Tensor:
        _check_wave(wave, sr, "clip")
        ceiling = self.threshold * float(wave.abs().max()) if self.relative else self.threshold
        return wave.clamp(-ceiling, ceiling).to(torch.float32)


@dataclass
class BandLimit:
    """Bandwidth loss: resample down to ``2·cutoff`` Hz and back up (:func:`mm_align.audio.io.resample`).

    torchaudio's windowed-sinc low-pass at the lower rate removes what lies above ``cutoff`` (its roll-off
    ends about 15 % above the cutoff, where the residual energy is 40 dB down); nothing happens when
    ``cutoff`` is at or above the clip's Nyquist frequency. The intermediate rate is ``2·cutoff`` rounded to
    a multiple of 100 Hz, which keeps torchaudio's polyphase kernel small (its size grows with
    ``rate / gcd(rates)``).

    Args:
        cutoff: The new bandwidth in Hz.
    """

    name: ClassVar[str] = "bandlimit"
    cutoff: float = 4000.0

    def __post_init__(self) -> None:
        if not self.cutoff >= 50:
            raise DegradationSpecError(f"bandlimit cutoff must be at least 50 (Hz), got {self.cutoff}")

    def __call__(self, wave: torch.Tensor, sr: int, rng: np.random.Generator) -> torch.Tensor:
        _check_wave(wave, sr, "bandlimit")
        low = int(round(2 * self.cutoff / 100.0)) * 100
        if low >= sr:
            return wave.to(torch.float32)
        x = wave.detach().cpu().float()
        back = resample(resample(x, sr, low), low, sr)
        n = x.numel()
        back = back[:n] if back.numel() >= n else torch.nn.functional.pad(back, (0, n - back.numel()))
        return back.to(dtype=torch.float32, device=wave.device)


@dataclass
class PacketLoss:
    """Packet loss: the clip cut into frames of ``ms`` milliseconds, each zeroed with probability ``rate``.

    Frame ``k`` covers samples ``[k·L, (k+1)·L)`` with ``L = round(ms·sr/1000)``; a lost frame is set to 0
    (no concealment), as in the packet-loss simulation of the PLC challenges.

    Args:
        rate: The loss probability of each frame, in [0, 1].
        ms: The frame (packet) length in milliseconds.
    """

    name: ClassVar[str] = "packet_loss"
    rate: float = 0.1
    ms: float = 20.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise DegradationSpecError(f"packet_loss rate must be in [0, 1], got {self.rate}")
        if not self.ms > 0:
            raise DegradationSpecError(f"packet_loss ms must be positive, got {self.ms}")

    def __call__(self, wave: torch.Tensor, sr: int, rng: np.random.Generator) -> torch.Tensor:
        _check_wave(wave, sr, "packet_loss")
        frame = max(1, int(round(self.ms * sr / 1000.0)))
        lost = rng.random(math.ceil(wave.numel() / frame)) < self.rate  # (n_frames,)
        keep = torch.from_numpy(~lost).repeat_interleave(frame)[: wave.numel()].to(wave.device)
        return (wave * keep).to(torch.float32)


DEGRADATIONS: dict[str, type] = {cls.name: cls for cls in (Noise, Reverb, Clip, BandLimit, PacketLoss)}
"""Spec name -> degradation config class."""


# ---- the chain and its spec strings -----------------------------------------------------------------------


def _spec_fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.metadata.get("spec", True)}


def _parse_value(text: str, hint: Any) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if text.lower() == "none" and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    if hint is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError("expected true or false")
    if hint is int:
        return int(text)
    if hint is float:
        return float(text)
    if typing.get_origin(hint) is tuple:
        return tuple(float(v) for v in text.lower().split("x"))
    return text


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "x".join(_format_value(float(v)) for v in value)
    return str(value)


def _step_spec(step: Any) -> str:
    values = {k: getattr(step, k) for k in _spec_fields(type(step))}
    keys = [f"{k}={_format_value(v)}" for k, v in values.items() if v is not None]  # None is every such default
    return f"{step.name}:{','.join(keys)}" if keys else step.name


def _parse_part(part: str, index: int, babble: Sequence[torch.Tensor]) -> Any:
    where = f"degradation spec part {index + 1} {part.strip()!r}"
    name, _, args = part.strip().partition(":")
    name = name.strip()
    if name not in DEGRADATIONS:
        raise DegradationSpecError(f"{where}: unknown degradation {name!r}; valid: {', '.join(DEGRADATIONS)}")
    cls = DEGRADATIONS[name]
    fields = _spec_fields(cls)
    kwargs: dict[str, Any] = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, text = item.partition("=")
        key = key.strip()
        if key not in fields:
            raise DegradationSpecError(f"{where}: unknown key {key!r} for {name}; valid: {', '.join(fields)}")
        if not eq or not text.strip():
            raise DegradationSpecError(f"{where}: {key!r} needs a value ({key}=VALUE)")
        try:
            kwargs[key] = _parse_value(text.strip(), fields[key])
        except ValueError:
            raise DegradationSpecError(f"{where}: bad value {text.strip()!r} for {key}") from None
    if cls is Noise:
        kwargs["babble"] = tuple(babble)
    try:
        return cls(**kwargs)
    except DegradationSpecError as exc:
        raise DegradationSpecError(f"{where}: {exc}") from None


@dataclass
class DegradationChain:
    """Degradations applied in order, from one seed.

    Step ``k`` draws from its own generator, ``numpy.random.default_rng(SeedSequence(seed).spawn(n)[k])``,
    so a step's draws do not depend on the other steps' parameters, and the same seed gives a
    bit-identical output.

    Args:
        steps: The degradation configs (e.g. :class:`Noise`, :class:`Reverb`).
    """

    steps: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        self.steps = tuple(self.steps)

    @classmethod
    def from_spec(cls, spec: str, babble: Sequence[torch.Tensor] = ()) -> DegradationChain:
        """Parse ``"noise:kind=pink,snr=5|reverb:rt60=0.4|clip:threshold=0.3|bandlimit:cutoff=4000"``.

        Args:
            spec: ``|``-separated steps, each ``NAME`` or ``NAME:KEY=VALUE,...`` (names: :data:`DEGRADATIONS`;
                keys: the config's fields; a room is ``6x4.5x3``; an empty spec is the identity).
            babble: The other utterances a ``noise:kind=babble`` step mixes.

        Raises:
            DegradationSpecError: A part names an unknown degradation or key, or a bad value; the message
                names the part and lists the valid names or keys.
        """
        parts = [p for p in spec.split("|") if p.strip()]
        return cls(tuple(_parse_part(p, i, babble) for i, p in enumerate(parts)))

    def spec(self) -> str:
        """The chain as a spec string that :meth:`from_spec` parses back into an equal chain."""
        return "|".join(_step_spec(s) for s in self.steps)

    def __call__(self, wave: torch.Tensor, sr: int, seed: int) -> torch.Tensor:
        """Degrade ``wave`` (mono ``(T,)`` at ``sr`` Hz); the output is float32 of the same length."""
        _check_wave(wave, sr, "degradation chain")
        rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(len(self.steps))]
        out = wave.to(torch.float32)
        for step, rng in zip(self.steps, rngs):
            out = step(out, sr, rng)
        return out


def parse_chain(spec: str, babble: Sequence[torch.Tensor] = ()) -> DegradationChain:
    """:meth:`DegradationChain.from_spec` as a function."""
    return DegradationChain.from_spec(spec, babble)


GENSR_RANGES: dict[str, Any] = {
    "noise_kind": ("white", "pink", "brown", "hum"),
    "snr_db": (-5.0, 20.0),
    "rt60_s": (0.2, 0.6),
    "room_m": ((4.0, 8.0), (3.0, 6.0), (2.5, 3.5)),
    "clip_threshold": (0.2, 0.8),
    "cutoff_hz": (2000.0, 6000.0),
}
"""The ranges :func:`gensr_mix` draws from (uniform; ``cutoff_hz``'s upper end is also capped at 0.4·sr)."""


def gensr_mix(seed: int, sample_rate: int = 16000, babble: Sequence[torch.Tensor] = ()) -> DegradationChain:
    """The general speech restoration mix of GenSR: reverb → noise → clipping → bandwidth loss, drawn by ``seed``.

    General speech restoration (VoiceFixer, Liu et al. 2022; GenSR-Pref's Voicefixer-GSR test set) degrades
    each clip with all four at once. The parameters are drawn uniformly from :data:`GENSR_RANGES` (the
    ranges are this library's, in the spirit of VoiceFixer's simulation, not a published table):

    - room sides ``U[4, 8] × U[3, 6] × U[2.5, 3.5]`` m and ``RT60 ~ U[0.2, 0.6]`` s (longer tails make the
      image-source simulation slow: its cost grows as order³);
    - noise kind uniform over white, pink, brown, hum (and babble when ``babble`` waves are given), mains
      50 or 60 Hz, ``SNR ~ U[-5, 20]`` dB;
    - clipping at ``U[0.2, 0.8]`` of the peak;
    - cutoff ``~ U[2000, min(6000, 0.4·sr)]`` Hz, rounded to 100 Hz.

    Reverberation comes first (it acts on the talker in the room), the noise is added at the microphone, then
    clipping (the converter) and band-limiting (the channel) last, so the output has the stated bandwidth.

    Returns:
        :class:`DegradationChain`: concrete values (``chain.spec()`` records them); call it with the same or
        any other seed for the noise, room positions and phases.
    """
    rng = np.random.default_rng(int(seed))
    r = GENSR_RANGES
    kinds = r["noise_kind"] + (("babble",) if babble else ())
    room = tuple(round(float(rng.uniform(lo, hi)), 2) for lo, hi in r["room_m"])
    rt60 = round(float(rng.uniform(*r["rt60_s"])), 3)
    kind = str(kinds[int(rng.integers(len(kinds)))])
    hum_freq = 50.0 if rng.random() < 0.5 else 60.0
    snr = round(float(rng.uniform(*r["snr_db"])), 2)
    threshold = round(float(rng.uniform(*r["clip_threshold"])), 3)
    lo, hi = r["cutoff_hz"]
    cutoff = round(float(rng.uniform(lo, max(lo, min(hi, 0.4 * sample_rate)))) / 100.0) * 100.0
    return DegradationChain((
        Reverb(rt60=rt60, room=room),  # type: ignore[arg-type]
        Noise(kind=kind, snr=snr, hum_freq=hum_freq, babble=tuple(babble)),
        Clip(threshold=threshold),
        BandLimit(cutoff=cutoff),
    ))
