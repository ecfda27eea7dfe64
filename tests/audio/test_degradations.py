"""audio/degradations.py: realized SNR, noise colours, hum, babble, reverb tails, clip ceiling, band limit,
packet loss, seeded determinism, spec parsing and the GenSR mix."""

import math

import numpy as np
import pytest
import torch
from mm_align.audio.degradations import (
    DEGRADATIONS,
    GENSR_RANGES,
    BandLimit,
    Clip,
    DegradationChain,
    DegradationSpecError,
    Noise,
    PacketLoss,
    Reverb,
    gensr_mix,
    room_impulse_response,
)
from mm_align.audio.io import AudioError
from scipy.signal import welch

SR = 16000


def speech_like(seconds=1.0, sr=SR, f0=140.0, seed=0):
    """A harmonic tone (partials up to 4 kHz, amplitude 1/k) under a 4 Hz syllable envelope, peak ~0.5."""
    t = torch.arange(int(seconds * sr), dtype=torch.float64) / sr
    g = torch.Generator().manual_seed(seed)
    phases = torch.rand(40, generator=g, dtype=torch.float64) * 2 * math.pi
    tone = sum(torch.sin(2 * math.pi * k * f0 * t + phases[k - 1]) / k for k in range(1, int(4000 // f0) + 1))
    envelope = (0.5 - 0.5 * torch.cos(2 * math.pi * 4.0 * t)) ** 2
    wave = tone * envelope
    return (0.5 * wave / wave.abs().max()).float()


def band_energy(wave, sr, lo, hi):
    spec = torch.fft.rfft(wave.double()).abs() ** 2
    freqs = torch.fft.rfftfreq(wave.numel(), 1.0 / sr)
    return float(spec[(freqs >= lo) & (freqs < hi)].sum())


def snr_db(clean, degraded):
    noise = degraded.double() - clean.double()
    return 10 * math.log10(float(clean.double().pow(2).mean()) / float(noise.pow(2).mean()))


def rng(seed=0):
    return np.random.default_rng(seed)


# ---- noise ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["white", "pink", "brown", "hum", "babble"])
@pytest.mark.parametrize("snr", [0.0, 20.0, -5.0])
def test_noise_realized_snr_within_a_tenth_of_a_db(kind, snr):
    clean = speech_like()
    babble = (speech_like(0.7, f0=210.0, seed=1), speech_like(1.3, f0=110.0, seed=2))
    out = Noise(kind=kind, snr=snr, babble=babble)(clean, SR, rng())
    assert out.shape == clean.shape and out.dtype == torch.float32
    assert abs(snr_db(clean, out) - snr) < 0.1


def test_zero_db_is_noisier_than_twenty_db():
    clean = speech_like()
    p0 = float((Noise(snr=0.0)(clean, SR, rng()) - clean).pow(2).mean())
    p20 = float((Noise(snr=20.0)(clean, SR, rng()) - clean).pow(2).mean())
    assert 10 * math.log10(p0 / p20) == pytest.approx(20.0, abs=0.1)


@pytest.mark.parametrize("kind,slope", [("white", 0.0), ("pink", -1.0), ("brown", -2.0)])
def test_noise_colour_is_the_power_law_slope(kind, slope):
    clean = speech_like(4.0)
    noise = (Noise(kind=kind, snr=0.0)(clean, SR, rng(3)) - clean).double().numpy()
    freqs, psd = welch(noise, SR, nperseg=4096)
    band = (freqs >= 100) & (freqs <= 4000)
    fitted = np.polyfit(np.log10(freqs[band]), np.log10(psd[band]), 1)[0]
    assert fitted == pytest.approx(slope, abs=0.15)


@pytest.mark.parametrize("f0", [50.0, 60.0])
def test_hum_is_the_mains_frequency_and_its_harmonics(f0):
    clean = speech_like(2.0)
    noise = Noise(kind="hum", snr=0.0, hum_freq=f0, harmonics=3)(clean, SR, rng()) - clean
    total = band_energy(noise, SR, 0, SR / 2)
    near = sum(band_energy(noise, SR, k * f0 - 2, k * f0 + 2) for k in (1, 2, 3))
    assert near / total > 0.99
    assert band_energy(noise, SR, f0 - 2, f0 + 2) > band_energy(noise, SR, 2 * f0 - 2, 2 * f0 + 2)
    assert band_energy(noise, SR, 4 * f0 - 2, 4 * f0 + 2) / total < 1e-4  # only 3 partials asked for


def test_babble_is_the_other_utterance_looped_to_length():
    clean = speech_like(1.0)
    other = speech_like(0.3, f0=230.0, seed=5)  # shorter than the clip: it must loop
    noise = (Noise(kind="babble", snr=5.0, talkers=1, babble=(other,))(clean, SR, rng(2)) - clean).double()
    looped = other.double().repeat(5)
    best = max(float(torch.nn.functional.cosine_similarity(noise, looped[s: s + noise.numel()], dim=0))
               for s in range(other.numel()))
    assert best > 0.999


def test_babble_without_waves_and_noise_on_silence_are_errors():
    with pytest.raises(DegradationSpecError, match="babble"):
        Noise(kind="babble")(speech_like(), SR, rng())
    with pytest.raises(AudioError, match="silence"):
        Noise()(torch.zeros(1000), SR, rng())


# ---- reverberation ----------------------------------------------------------------------------------------

def _schroeder_rt60(h, sr):
    """RT60 from the T20 of the Schroeder backward integral (the -5 to -25 dB decay, extrapolated)."""
    edc = np.cumsum((h ** 2)[::-1])[::-1]
    edc_db = 10 * np.log10(edc / edc[0] + 1e-30)
    i5, i25 = int(np.argmax(edc_db <= -5)), int(np.argmax(edc_db <= -25))
    return 3.0 * (i25 - i5) / sr


def test_rir_decay_follows_the_target_rt60():
    short = _schroeder_rt60(room_impulse_response(0.25, SR, rng(1))[0], SR)
    long = _schroeder_rt60(room_impulse_response(0.5, SR, rng(1))[0], SR)
    assert 0.7 * 0.25 < short < 1.6 * 0.25
    assert 0.7 * 0.5 < long < 1.6 * 0.5
    assert long > 1.5 * short


def test_reverb_adds_a_decaying_tail_keeps_length_rms_and_alignment():
    burst = torch.zeros(SR)
    burst[1600:1760] = torch.from_numpy(np.random.default_rng(0).standard_normal(160)).float() * 0.5
    wet = Reverb(rt60=0.4)(burst, SR, rng(4))
    assert wet.shape == burst.shape and wet.dtype == torch.float32
    assert float(wet.pow(2).mean()) == pytest.approx(float(burst.pow(2).mean()), rel=1e-4)
    tail1 = float(wet[1760 + 800: 1760 + 2400].pow(2).sum())  # 50-150 ms after the burst
    tail2 = float(wet[1760 + 4000: 1760 + 5600].pow(2).sum())  # 250-350 ms after
    assert tail1 > 1e-3 * float(wet.pow(2).sum())  # a tail where the dry signal is exactly 0
    assert tail2 < tail1  # ... that decays
    # the direct path stays in place: the wet onset is the dry one (sample 1600), not the propagation delay later
    onset = int(torch.nonzero(wet.abs() > 0.1 * wet.abs().max())[0])
    assert 1595 <= onset <= 1610
    assert float(wet[:1400].pow(2).sum()) < 0.01 * float(wet.pow(2).sum())  # pyroomacoustics' zero-phase HPF


def test_reverb_too_short_for_the_room_is_named():
    with pytest.raises(DegradationSpecError, match="rt60=0.05 s is too short for a 6x4.5x3 m room"):
        Reverb(rt60=0.05)(speech_like(0.2), SR, rng())


# ---- clipping, band limit, packet loss --------------------------------------------------------------------

def test_clip_ceiling_relative_and_absolute():
    clean = speech_like()
    peak = float(clean.abs().max())
    out = Clip(threshold=0.3)(clean, SR, rng())
    assert float(out.abs().max()) == pytest.approx(0.3 * peak, rel=1e-6)
    below = clean.abs() < 0.3 * peak
    assert torch.equal(out[below], clean[below])
    assert float((out.abs() >= 0.3 * peak - 1e-7).float().mean()) > 0.05
    assert float(Clip(threshold=0.1, relative=False)(clean, SR, rng()).abs().max()) == pytest.approx(0.1)
    with pytest.raises(DegradationSpecError, match="clip threshold"):
        Clip(threshold=1.5)


@pytest.mark.parametrize("cutoff", [2000.0, 4000.0])
def test_bandlimit_removes_energy_above_the_cutoff(cutoff):
    white = torch.from_numpy(np.random.default_rng(0).standard_normal(SR)).float() * 0.1
    out = BandLimit(cutoff=cutoff)(white, SR, rng())
    assert out.shape == white.shape
    assert band_energy(white, SR, 1.2 * cutoff, SR / 2) / band_energy(white, SR, 0, SR / 2) > 0.3
    assert band_energy(out, SR, 1.2 * cutoff, SR / 2) / band_energy(out, SR, 0, SR / 2) < 1e-3
    kept = band_energy(out, SR, 100, 0.8 * cutoff) / band_energy(white, SR, 100, 0.8 * cutoff)
    assert kept == pytest.approx(1.0, abs=0.05)
    assert torch.equal(BandLimit(cutoff=8000.0)(white, SR, rng()), white)  # at Nyquist: nothing to remove


def test_packet_loss_zeroes_whole_frames():
    clean = speech_like(2.0) + 0.01  # no sample is 0 before the loss
    out = PacketLoss(rate=0.3, ms=20)(clean, SR, rng(5))
    frames_in, frames_out = clean.view(-1, 320), out.view(-1, 320)  # (100 frames, 20 ms)
    lost = (frames_out == 0).all(dim=1)
    assert torch.equal(frames_out[~lost], frames_in[~lost])
    assert (frames_out[lost] == 0).all() and 15 <= int(lost.sum()) <= 45
    assert torch.equal(PacketLoss(rate=0.0)(clean, SR, rng()), clean)
    assert not PacketLoss(rate=1.0)(clean, SR, rng()).any()


@pytest.mark.parametrize("name", list(DEGRADATIONS))
def test_every_degradation_keeps_an_odd_length(name):
    clean = speech_like(0.5)[:7777]
    step = DEGRADATIONS[name](rt60=0.2) if name == "reverb" else DEGRADATIONS[name]()
    out = step(clean, SR, rng())
    assert out.shape == clean.shape and out.dtype == torch.float32 and torch.isfinite(out).all()


# ---- chains, specs, seeds ---------------------------------------------------------------------------------

SPEC = "noise:kind=pink,snr=5|reverb:rt60=0.3|clip:threshold=0.3|bandlimit:cutoff=4000|packet_loss:rate=0.1,ms=20"


def test_chain_is_bit_identical_for_a_seed_and_differs_across_seeds():
    clean = speech_like()
    chain = DegradationChain.from_spec(SPEC)
    a, b, c = chain(clean, SR, 11), chain(clean, SR, 11), chain(clean, SR, 12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == clean.shape and torch.isfinite(a).all()
    assert float(a.abs().max()) <= 1.05 * float(clean.abs().max())  # clipped at 0.3 of the peak, then filtered


def test_spec_round_trips_and_parses_typed_values():
    chain = DegradationChain.from_spec(SPEC + "|reverb:rt60=0.5,room=5x4x3,max_order=20|clip:relative=false")
    assert DegradationChain.from_spec(chain.spec()) == chain
    assert [s.name for s in chain.steps] == ["noise", "reverb", "clip", "bandlimit", "packet_loss", "reverb", "clip"]
    assert chain.steps[0] == Noise(kind="pink", snr=5.0)
    assert chain.steps[5] == Reverb(rt60=0.5, room=(5.0, 4.0, 3.0), max_order=20)
    assert chain.steps[6].relative is False
    assert DegradationChain.from_spec("").steps == ()


@pytest.mark.parametrize("spec,message", [
    ("noise:snr=5|revrb:rt60=0.4", r"part 2 'revrb:rt60=0.4': unknown degradation 'revrb'; valid: noise, reverb, "
                                   r"clip, bandlimit, packet_loss"),
    ("noise:snrr=5", r"part 1 'noise:snrr=5': unknown key 'snrr' for noise; valid: kind, snr, hum_freq"),
    ("clip:threshold=high", r"bad value 'high' for threshold"),
    ("packet_loss:rate", r"'rate' needs a value"),
    ("noise:kind=purple", r"part 1 'noise:kind=purple': noise kind must be one of white, pink, brown, hum, babble"),
    ("packet_loss:rate=2", r"packet_loss rate must be in \[0, 1\]"),
])
def test_spec_errors_name_the_part_and_the_valid_options(spec, message):
    with pytest.raises(DegradationSpecError, match=message):
        DegradationChain.from_spec(spec)


def test_babble_waves_reach_the_chain():
    other = speech_like(0.5, f0=200.0, seed=9)
    chain = DegradationChain.from_spec("noise:kind=babble,snr=0,talkers=2", babble=[other])
    clean = speech_like()
    assert abs(snr_db(clean, chain(clean, SR, 0)) - 0.0) < 0.1


def test_gensr_mix_is_seeded_and_within_its_ranges():
    specs = {gensr_mix(s).spec() for s in range(6)}
    assert len(specs) == 6 and gensr_mix(3) == gensr_mix(3)
    for s in range(20):
        reverb, noise, clip, band = gensr_mix(s).steps
        assert GENSR_RANGES["rt60_s"][0] <= reverb.rt60 <= GENSR_RANGES["rt60_s"][1]
        assert all(lo <= d <= hi for d, (lo, hi) in zip(reverb.room, GENSR_RANGES["room_m"]))
        assert noise.kind in GENSR_RANGES["noise_kind"] and -5.0 <= noise.snr <= 20.0
        assert 0.2 <= clip.threshold <= 0.8 and clip.relative
        assert 2000 <= band.cutoff <= 6000 and band.cutoff % 100 == 0
    assert all(gensr_mix(s, sample_rate=8000).steps[3].cutoff <= 3200 for s in range(20))
    other = [speech_like(0.5)]
    assert any(gensr_mix(s, babble=other).steps[1].kind == "babble" for s in range(40))


def test_gensr_mix_degrades_all_four_ways():
    clean = speech_like()
    chain = gensr_mix(2)
    out = chain(clean, SR, 2)
    reverb, noise, clip, band = chain.steps
    assert out.shape == clean.shape and torch.isfinite(out).all()
    assert torch.equal(out, chain(clean, SR, 2))
    assert band_energy(out, SR, 1.2 * band.cutoff, SR / 2) / band_energy(out, SR, 0, SR / 2) < 1e-3
    assert snr_db(clean, out) < 10.0  # far from the clean clip
