"""audio/stft.py and audio/flow_enhancer.py: the exact STFT round trip, the save → load round trip, flow matching
and its samplers, supervised training, chunked restoration (= unchunked, memory bounded) and the restore CLI."""

from __future__ import annotations

import json
import math

import pytest
import soundfile as sf
import torch
from mm_align.audio import flow_enhancer as fe
from mm_align.audio.flow_enhancer import (
    FlowEnhancer,
    flow_matching_loss,
    flow_path,
    frame_noise,
    peak_gain,
    restore,
    restore_main,
    sample_flow,
    temporal_receptive_field,
    train_supervised,
)
from mm_align.audio.io import load_audio, save_audio
from mm_align.audio.stft import CompressedStft
from torch import nn

SR = 16_000


def _clip(i: int, n: int, g: torch.Generator, noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """A (degraded, clean) pair: a harmonic tone with a slow envelope, and it plus white noise."""
    t = torch.arange(n) / SR
    f0 = 110.0 + 17.0 * i
    clean = sum(0.2 / k * torch.sin(2 * math.pi * k * f0 * t + k) for k in range(1, 6))
    clean = clean * (0.7 + 0.3 * torch.sin(2 * math.pi * 2.0 * t + i))
    return clean + noise * torch.randn(n, generator=g), clean


def _tiny(seed: int = 0, **kw) -> FlowEnhancer:
    torch.manual_seed(seed)
    return FlowEnhancer(**{"channels": (4, 8), "norm_groups": 2, **kw}).eval()


# ---- the representation ------------------------------------------------------------------------
@pytest.mark.parametrize("length", [8000, 8001, 4000 + 77])
def test_stft_round_trip_is_exact(length):
    stft = CompressedStft()
    wave = 0.5 * torch.randn(3, length, generator=torch.Generator().manual_seed(length))
    spec = stft.encode(wave)
    assert spec.shape == (3, 2, 256, length // 128 + 1) == (3, 2, stft.n_freq, stft.num_frames(length))
    assert (stft.decode(spec, length) - wave).abs().max() < 1e-5
    # the compression is SGMSE+'s: |Z| = 0.15 |X|^0.5, the phase kept
    x = torch.stft(wave, 510, 128, window=torch.hann_window(510, periodic=True), return_complex=True)
    z = torch.complex(spec[:, 0], spec[:, 1])
    assert torch.allclose(z.abs(), 0.15 * x.abs().sqrt(), atol=1e-5)
    big = x.abs() > 1e-3
    assert torch.allclose(torch.angle(z)[big], torch.angle(x)[big], atol=1e-4)
    assert stft.encode(torch.zeros(1000)).abs().max() == 0  # silence stays exactly zero (no NaN phase)


# ---- the model -----------------------------------------------------------------------------------
def test_save_from_pretrained_round_trip(tmp_path):
    model = _tiny(3, sigma=0.7, hop_length=64, n_fft=254, normalize=False)
    model.save_pretrained(tmp_path / "m")
    assert {"config.json", "model.safetensors"} <= {p.name for p in (tmp_path / "m").iterdir()}
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["sigma"] == 0.7 and config["hop_length"] == 64 and config["channels"] == [4, 8]
    loaded = FlowEnhancer.from_pretrained(tmp_path / "m")
    assert (loaded.sigma, loaded.stft, loaded.normalize) == (0.7, model.stft, False)
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(2, 2, 128, 21, generator=g), torch.randn(2, 2, 128, 21, generator=g)
    t = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        assert torch.equal(model(x, t, c), loaded(x, t, c))
    wave = _clip(0, 6000, g)[0]
    assert torch.equal(restore(model, wave, SR, steps=2, chunk_seconds=None),
                       restore(loaded, wave, SR, steps=2, chunk_seconds=None))
    # strict: a missing weight is an error, not a silent random init
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "m" / "model.safetensors")
    state.pop("conv_out.bias")
    save_file(state, tmp_path / "m" / "model.safetensors")
    with pytest.raises(RuntimeError, match="conv_out.bias"):
        FlowEnhancer.from_pretrained(tmp_path / "m")


def test_flow_path_and_frame_noise():
    g = torch.Generator().manual_seed(1)
    y, eps = torch.randn(3, 2, 4, 5, generator=g), torch.randn(3, 2, 4, 5, generator=g)
    t = torch.tensor([0.0, 0.25, 1.0])
    x_t, target = flow_path(y, eps, t)
    assert torch.equal(x_t[0], eps[0]) and torch.equal(x_t[2], y[2])  # x_0 = ε, x_1 = y
    assert torch.allclose(x_t[1], 0.75 * eps[1] + 0.25 * y[1]) and torch.equal(target, y - eps)
    # the noise of a frame is a function of its global index: a chunk's noise is the whole input's slice
    whole = frame_noise(7, 0, 300, 16, sigma=0.5)
    assert whole.shape == (1, 2, 16, 300)
    assert torch.equal(frame_noise(7, 100, 130, 16, sigma=0.5), whole[..., 100:230])
    assert not torch.equal(frame_noise(8, 0, 300, 16), frame_noise(7, 0, 300, 16))
    assert abs(float(whole.std()) - 0.5) < 0.02


class _LinearInTime(nn.Module):
    """``v(x, t, c) = 2t·c``: the exact flow from x_0 ends at ``x_0 + c``."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, cond):
        return 2.0 * t.reshape(-1, 1, 1, 1) * cond + 0 * x


def test_samplers_integrate_from_noise_to_data():
    """Euler with N steps gives Σ 2 t_k h = 1 − 1/N of the exact displacement; midpoint is exact (v linear in t)."""
    x0, c = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    model = _LinearInTime()
    for n in (1, 4):
        assert torch.allclose(sample_flow(model, c, x0, steps=n, method="euler"), x0 + (1 - 1 / n) * c, atol=1e-6)
        assert torch.allclose(sample_flow(model, c, x0, steps=n, method="midpoint"), x0 + c, atol=1e-6)
    with pytest.raises(ValueError, match="valid: euler, midpoint"):
        sample_flow(model, c, x0, method="heun")


def test_supervised_training_lowers_the_flow_loss_and_is_deterministic():
    g = torch.Generator().manual_seed(0)
    data = [_clip(i, 8000, g) for i in range(8)]
    held = [_clip(i + 50, 4000, g) for i in range(4)]

    def held_loss(model: FlowEnhancer) -> float:
        """The flow-matching loss on held-out clips at fixed draws (4 (t, ε) per clip)."""
        gg, total = torch.Generator().manual_seed(123), 0.0
        with torch.no_grad():
            for d, c in held:
                gain = peak_gain(d)
                y, cond = model.encode(c[None] * gain), model.encode(d[None] * gain)
                for _ in range(4):
                    t, eps = torch.rand(1, generator=gg), torch.randn(y.shape, generator=gg) * model.sigma
                    total += float(flow_matching_loss(model, y, cond, eps, t).mean())
        return total / 16

    model = _tiny(0, channels=(8, 16), norm_groups=4)
    before = held_loss(model)
    losses = train_supervised(model, data, steps=25, lr=3e-3, batch_size=4, crop_seconds=0.25, seed=0)
    after = held_loss(model)
    assert after < 0.5 * before, (before, after)  # measured: 0.41 -> 0.10
    again = _tiny(0, channels=(8, 16), norm_groups=4)
    assert train_supervised(again, data, steps=3, lr=3e-3, batch_size=4, crop_seconds=0.25, seed=0) == losses[:3]
    # clean clips with a degradation drawn from the run's generator work the same way
    clean = [c for _, c in data]
    noisy = train_supervised(_tiny(1), clean, steps=2, batch_size=2, seed=0,
                             degrade=lambda c, gen: c + 0.1 * torch.randn(c.shape, generator=gen))
    assert len(noisy) == 2 and all(math.isfinite(v) for v in noisy)


# ---- chunked restoration -------------------------------------------------------------------------
def test_chunked_restore_equals_unchunked():
    """Tolerance: 1e-5 × the output's peak, everywhere (float rounding; measured ≤ 2e-7 at 1 step, ≤ 2e-6 at 8).

    Regime: the tiny 2-resolution U-Net has a temporal receptive field of R = 20 frames per evaluation, so a
    chunk edge reaches (K·R + 2)·128 + 255 samples with K evaluations: 3 071 samples for 1 Euler step, within
    the quarter (3 200 samples) of a 0.8 s overlap, where the cross-fade gives a chunk's own edge weight 0:
    chunked = unchunked is then exact up to rounding. With 8 Euler steps (K·R = 160 frames, past the quarter) the
    edge's influence has decayed below rounding before it reaches the fade, on this model; the same tolerance
    holds. The bite: a chunk's raw output near its own edge does differ from the unchunked one.
    """
    model = _tiny(0)
    assert temporal_receptive_field(model) == 20
    g = torch.Generator().manual_seed(5)
    wave = torch.cat([_clip(i, SR, g)[0] for i in range(4)])  # 4 s
    for steps in (1, 8):
        whole = restore(model, wave, SR, steps=steps, seed=3, chunk_seconds=None)
        chunked = restore(model, wave, SR, steps=steps, seed=3, chunk_seconds=2.0, overlap_seconds=0.8)
        assert whole.shape == chunked.shape == wave.shape
        assert (whole - chunked).abs().max() <= 1e-5 * whole.abs().max(), steps
    # the second chunk starts at 2.0 - 0.8 = 1.2 s; restored alone, its first samples are not the whole input's
    gain = peak_gain(wave)
    start = int(1.2 * SR)
    alone = fe._restore_segment(model, wave[start: start + 2 * SR] * gain, start // 128, 1, "euler", 3) / gain
    whole = restore(model, wave, SR, steps=1, seed=3, chunk_seconds=None)
    assert (alone[:200] - whole[start: start + 200]).abs().max() > 1e-3 * whole.abs().max()
    with pytest.raises(ValueError, match="at most half"):
        restore(model, wave, SR, chunk_seconds=1.0, overlap_seconds=0.8)


def test_restore_memory_is_bounded_by_the_chunk(monkeypatch):
    """A 12 s input restored in 2 s chunks: no network call ever sees more than one chunk's frames."""
    model = _tiny(0)
    seen: list[int] = []
    model.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[-1]))
    wave = 0.1 * torch.randn(12 * SR, generator=torch.Generator().manual_seed(0))
    out = restore(model, wave, SR, steps=2, chunk_seconds=2.0, overlap_seconds=0.5)
    assert out.shape == wave.shape and torch.isfinite(out).all()
    chunk_frames = 2 * SR // 128 + 1
    stride = 2 * SR - math.ceil(0.5 * SR / 256) * 256
    n_chunks = math.ceil((12 * SR - 2 * SR) / stride) + 1
    assert max(seen) <= chunk_frames and len(seen) == 2 * n_chunks
    # the restored level follows the input's (peak normalisation undone)
    loud = restore(model, 4 * wave[: SR], SR, steps=1, chunk_seconds=None)
    assert torch.allclose(loud, 4 * restore(model, wave[: SR], SR, steps=1, chunk_seconds=None), atol=1e-5)


def test_restore_main_file_and_folder(tmp_path, capsys):
    model = _tiny(0)
    model.save_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(2)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    save_audio(tmp_path / "in" / "a.wav", _clip(0, 5000, g)[0], SR)
    save_audio(tmp_path / "in" / "sub" / "b.flac", _clip(1, 7000, g)[0], SR)
    sf.write(tmp_path / "in" / "c8k.wav", _clip(2, 4000, g)[0].numpy() * 0.5, 8000)  # resampled to 16 kHz
    (tmp_path / "in" / "notes.txt").write_text("not audio")
    args = ["--model", str(tmp_path / "model"), "--steps", "2", "--chunk-seconds", "0.25", "--overlap-seconds",
            "0.05"]
    assert restore_main([*args, str(tmp_path / "in"), str(tmp_path / "out")]) == 0
    outs = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert outs == ["a.wav", "c8k.wav", "sub/b.flac"]
    for name, n in (("a.wav", 5000), ("sub/b.flac", 7000), ("c8k.wav", 8000)):
        wave, sr = load_audio(tmp_path / "out" / name)
        assert sr == SR and wave.numel() == n
    assert restore_main([*args, str(tmp_path / "in" / "a.wav"), str(tmp_path / "one.wav")]) == 0
    assert load_audio(tmp_path / "one.wav")[0].numel() == 5000
    with pytest.raises(FileNotFoundError, match="not a speech model directory"):
        restore_main(["--model", str(tmp_path / "in"), str(tmp_path / "in"), str(tmp_path / "x")])


# ---- the path's source (FlowSE's start at the condition) ----------------------------------------
def test_flow_source_noise_and_condition():
    cond = torch.randn(2, 2, 9, 5, generator=torch.Generator().manual_seed(1))
    noise = 0.5 * torch.randn(2, 2, 9, 5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(fe.flow_source(_tiny(), cond, noise), noise)
    assert torch.equal(fe.flow_source(_tiny(source="condition"), cond, noise), cond + noise)
    assert torch.equal(fe.flow_source(nn.Identity(), cond, noise), noise)  # a user model without `source`
    with pytest.raises(ValueError, match="source"):
        FlowEnhancer(channels=(4,), norm_groups=2, source="clean")


def test_condition_source_round_trips_and_starts_sampling_at_the_degraded_input(tmp_path):
    model = _tiny(source="condition")
    model.save_pretrained(tmp_path / "m")
    assert FlowEnhancer.from_pretrained(tmp_path / "m").source == "condition"
    for p in model.parameters():  # a zero velocity field: the sample is where the path starts
        p.data.zero_()
    degraded, _ = _clip(0, 4096, torch.Generator().manual_seed(0))
    cond = model.encode(degraded[None] * peak_gain(degraded))
    noise = frame_noise(7, 0, cond.shape[-1], cond.shape[2], model.sigma)
    out = restore(model, degraded, SR, steps=2, seed=7, chunk_seconds=None)
    expected = model.decode(cond + noise, degraded.numel())[0] / peak_gain(degraded)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
