"""audio/codec.py: the STFT residual-VQ codec — shapes, the iSTFT path, save → load, locality, deterministic training.

Tiny configs (n_fft 256, hop 128 at 16 kHz: 125 frames/s; 2 codebooks of 16), waves made in the test.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from mm_align.audio.codec import CodecConfig, SpeechCodec, multi_resolution_stft_loss, train_codec
from safetensors.torch import load_file, save_file

SR = 16000
TINY = dict(n_fft=256, hop_length=128, hidden=32, latent_dim=16, num_quantizers=2, codebook_size=16)


def _utterance(seed: int, seconds: float = 0.5) -> torch.Tensor:
    """Three tones with random pitches under a slow amplitude envelope: codes that change over time."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(SR * seconds)) / SR
    freqs = 150 + 300 * torch.rand(3, generator=g)
    env = 0.5 + 0.5 * torch.sin(2 * math.pi * (1 + 3 * torch.rand(1, generator=g)) * t)
    return 0.2 * env * sum(torch.sin(2 * math.pi * f * t + 6 * torch.rand(1, generator=g)) for f in freqs)


def _codec(seed: int = 0) -> SpeechCodec:
    torch.manual_seed(seed)
    return SpeechCodec(CodecConfig(**TINY)).eval()


def test_encode_decode_shapes_and_frame_rate() -> None:
    """(B, T) → codes (B, Q, T // hop + 1) int64 in [0, K) → (B, T); a (T,) wave is a batch of one. The default
    framing is 16 kHz / hop 256 = 62.5 frames per second."""
    codec = _codec()
    wave = torch.stack([_utterance(0), _utterance(1)])  # (2, 8000)
    codes = codec.encode(wave)
    assert codes.shape == (2, 2, 8000 // 128 + 1) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 16
    assert codec.num_frames(8000) == codes.shape[-1]
    out = codec.decode(codes, 8000)
    assert out.shape == (2, 8000) and torch.isfinite(out).all()
    assert torch.equal(codec.encode(wave[0]), codes[:1])
    assert codec.features(wave).shape == (2, 16, codes.shape[-1])
    assert CodecConfig().frame_rate == 62.5
    with pytest.raises(ValueError, match=r"codes must be \(B, Q=2, N\)"):
        codec.decode(codes[:, :1], 8000)


def test_compressed_spectrum_inverts() -> None:
    """The decoder's output space is invertible: istft of the decompressed |X|^0.3 spectrum of a wave gives the
    wave back (to float32 rounding), so the codec's only loss is the encoder/VQ/decoder's."""
    codec = _codec()
    wave = _utterance(3)[None]
    back = codec._to_wave(codec.spectrum(wave), wave.shape[-1])
    assert (back - wave).abs().max() < 1e-4


def test_save_load_round_trip(tmp_path: Path) -> None:
    """save_pretrained writes config.json + model.safetensors; from_pretrained rebuilds the dataclass config and
    gives the same codes and the same decoded waves (codebooks, EMA buffers included). Loading is strict: a
    weights file missing a tensor is an error, not a silently half-random codec."""
    codec = _codec()
    train_codec(codec, [_utterance(i) for i in range(4)], steps=3, batch_size=2, segment_seconds=0.25)
    codec.save_pretrained(tmp_path / "codec")
    assert {p.name for p in (tmp_path / "codec").iterdir()} >= {"config.json", "model.safetensors"}
    again = SpeechCodec.from_pretrained(tmp_path / "codec")
    assert isinstance(again.config, CodecConfig) and again.config == codec.config
    wave = torch.stack([_utterance(5), _utterance(6)])
    codes = codec.encode(wave)
    assert torch.equal(again.encode(wave), codes)
    assert torch.equal(again.decode(codes, 8000), codec.decode(codes, 8000))
    state = load_file(tmp_path / "codec" / "model.safetensors")
    state.pop(next(k for k in state if k.startswith("decoder.")))
    save_file(state, tmp_path / "codec" / "model.safetensors")
    with pytest.raises(RuntimeError, match="Missing key"):
        SpeechCodec.from_pretrained(tmp_path / "codec")


def test_encoding_never_updates_the_codebooks() -> None:
    """encode runs the quantiser in eval mode even on a codec left in train mode: no EMA update, so a frozen
    codec stays frozen whatever mode the caller left it in."""
    codec = _codec()
    before = {k: v.clone() for k, v in codec.state_dict().items()}
    codec.train()
    codec.encode(torch.stack([_utterance(0), _utterance(1)]))
    assert codec.training and codec.quantizer.training
    assert all(torch.equal(v, codec.state_dict()[k]) for k, v in before.items())


def test_codes_are_local() -> None:
    """A frame's code depends only on samples within ``receptive_field_frames`` frames: encoding a crop that
    starts on the frame grid gives the whole wave's codes away from the crop's edges (what chunked restoration
    relies on). Trained briefly so the codes vary."""
    codec = _codec()
    train_codec(codec, [_utterance(i, 1.0) for i in range(4)], steps=20, batch_size=4, segment_seconds=0.25,
                lr=3e-3)
    wave = _utterance(7, 1.0)
    whole = codec.encode(wave)[0]  # (Q, N)
    assert whole.unique().numel() > 3
    start, stop, r = 20 * 128, 100 * 128, codec.receptive_field_frames
    part = codec.encode(wave[start:stop])[0]
    inner = slice(r, part.shape[-1] - r)
    assert torch.equal(part[:, inner], whole[:, start // 128:][:, inner])
    feats = codec.features(wave[start:stop])[0][:, inner]
    assert torch.allclose(feats, codec.features(wave)[0][:, start // 128:][:, inner], atol=1e-5)


def test_train_codec_is_deterministic_and_learns() -> None:
    """The same init and seed give the same losses and weights; the loss falls; reconstructions get closer to
    their inputs in the multi-resolution STFT sense."""
    waves = [_utterance(i, 1.0) for i in range(6)]
    test = torch.stack([_utterance(50), _utterance(51)])

    def recon_loss(c: SpeechCodec) -> float:
        return float(multi_resolution_stft_loss(c.decode(c.encode(test), 8000), test, [128, 256, 512]))

    runs = []
    for _ in range(2):
        codec = _codec(seed=1)
        untrained = recon_loss(codec)
        losses = train_codec(codec, waves, steps=40, batch_size=4, segment_seconds=0.25, lr=3e-3, seed=3)
        runs.append((losses, codec.state_dict(), untrained, recon_loss(codec)))
    (la, sa, untrained, trained), (lb, sb, _, _) = runs
    assert la == lb
    assert all(torch.equal(v, sb[k]) for k, v in sa.items())
    assert sum(la[-5:]) / 5 < 0.7 * sum(la[:5]) / 5
    assert trained < untrained
    assert not codec.training  # left in eval mode
