"""A small neural speech codec of our own: STFT frames → conv encoder → residual VQ → conv decoder → iSTFT.

The token space of the masked-token and autoregressive restoration models (:mod:`mm_align.audio.token_models`).
Residual vector quantisation as in SoundStream (Zeghidour et al. 2021, Algorithm 1) and EnCodec (Défossez et
al. 2022): ``Q`` codebooks of ``K`` entries, each quantising the residual the previous ones left, codebooks
updated by an exponential moving average (``vector_quantize_pytorch.ResidualVQ``); unlike those, the codec
works on STFT frames rather than on the waveform, so the encoder and decoder are small 1-D convolution stacks
over time and the waveform comes back through ``torch.istft`` (as Vocos does for its decoder).

Signal path, shapes for a batch of ``B`` waves of ``T`` samples:

- ``X = stft(wave)`` with a periodic Hann window of ``n_fft``, hop ``hop_length``, ``center=True``:
  ``(B, F, N)`` complex, ``F = n_fft // 2 + 1``, ``N = T // hop_length + 1`` frames;
- **compressed complex spectrum**: ``Xc = |X|^c · X / |X|`` (power-law magnitude compression, ``c =
  compress``, 0.3 by default, the phase kept), stacked as ``(B, 2F, N)`` real and imaginary channels;
- encoder: ``num_layers`` convolutions (kernel ``kernel_size``, GELU) and a 1×1 projection → ``(B, D, N)``
  continuous latents (``D = latent_dim``; :meth:`SpeechCodec.features`, the restorers' conditioning);
- residual VQ over the ``D``-dim frame vectors → codes ``(B, Q, N)`` (:meth:`SpeechCodec.encode`);
- decoder: the mirror stack → ``(B, 2F, N)`` compressed complex → ``|Y| = |Yc|^(1/c)`` with ``Yc``'s phase →
  ``istft`` to ``length`` samples (:meth:`SpeechCodec.decode`).

Frame rate: ``sample_rate / hop_length`` — the defaults (16 kHz, hop 256, ``n_fft`` 1024) give 62.5 frames
per second, i.e. ``62.5 · Q`` tokens per second. Every layer is local in time: a frame's code depends on the
samples within ``receptive_field_frames`` frames of it, which is what makes chunked restoration exact away
from chunk edges (:func:`mm_align.audio.token_models.restore`).

Training (:func:`train_codec`): multi-resolution STFT loss (spectral convergence + log-magnitude L1 at three
FFT sizes around ``n_fft``, as Parallel WaveGAN / EnCodec), an L1 loss on the compressed complex spectrum
(it carries the phase the magnitude losses do not see), and the VQ commitment loss. Deterministic on CPU
for a given seed.

Save/load: ``save_pretrained(dir)`` / ``SpeechCodec.from_pretrained(dir)`` (``config.json`` +
``model.safetensors``, huggingface_hub ``PyTorchModelHubMixin``; loading is strict).
"""

# No ``from __future__ import annotations``: PyTorchModelHubMixin reads the ``config`` annotation of
# ``__init__`` at runtime to rebuild the dataclass from config.json.

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from vector_quantize_pytorch import ResidualVQ

from mm_align.config import option

__all__ = ["CodecConfig", "SpeechCodec", "multi_resolution_stft_loss", "train_codec", "load_strict"]


@dataclass
class CodecConfig:
    """The codec's shape: STFT framing, conv stacks and the residual VQ (``Q`` codebooks of ``K`` entries)."""

    sample_rate: int = option(16000, help="Sample rate the codec runs at (Hz).")
    n_fft: int = option(1024, help="STFT size (and Hann window length) in samples.")
    hop_length: int = option(256, help="STFT hop in samples: the frame rate is sample_rate / hop_length.")
    compress: float = option(0.3, help="Power-law magnitude compression c: features are |X|^c with X's phase.")
    hidden: int = option(256, help="Channels of the encoder/decoder convolutions.")
    latent_dim: int = option(64, help="Dimension D of the continuous latents that are quantised.")
    kernel_size: int = option(3, help="Temporal kernel of the convolutions (odd).")
    num_layers: int = option(2, help="Convolutions (kernel_size) in the encoder and in the decoder.")
    num_quantizers: int = option(4, help="Q: residual VQ codebooks (tokens per frame).")
    codebook_size: int = option(256, help="K: entries per codebook.")
    commitment_weight: float = option(1.0, help="Weight of the VQ commitment loss.")
    ema_decay: float = option(0.9, help="EMA decay of the codebook updates.")
    dead_code_threshold: int = option(2, help="Replace codes used fewer than this (EMA count) by batch vectors.")

    def __post_init__(self) -> None:
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {self.kernel_size}")
        if self.hop_length < 1 or self.hop_length > self.n_fft:
            raise ValueError(f"hop_length must be in [1, n_fft={self.n_fft}], got {self.hop_length}")
        if not 0.0 < self.compress <= 1.0:
            raise ValueError(f"compress must be in (0, 1], got {self.compress}")
        for name in ("num_layers", "num_quantizers", "codebook_size", "hidden", "latent_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def frame_rate(self) -> float:
        """Frames (and tokens per codebook) per second."""
        return self.sample_rate / self.hop_length


def _conv_stack(c_in: int, c_hidden: int, c_out: int, kernel: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    c = c_in
    for _ in range(layers):
        mods += [nn.Conv1d(c, c_hidden, kernel, padding=kernel // 2), nn.GELU()]
        c = c_hidden
    mods.append(nn.Conv1d(c, c_out, 1))
    return nn.Sequential(*mods)


def load_strict(cls: Any, model_id: str, model_kwargs: dict[str, Any]) -> Any:
    """Build ``cls(**model_kwargs)`` and load ``model_id/model.safetensors`` into it, every key required.

    What :meth:`PyTorchModelHubMixin._from_pretrained` does for a local directory, but strict (the mixin's
    default silently ignores missing keys) and without printing.
    """
    from safetensors.torch import load_model

    model = cls(**model_kwargs)
    load_model(model, os.path.join(model_id, "model.safetensors"), strict=True)
    return model.eval()


class SpeechCodec(nn.Module, PyTorchModelHubMixin, library_name="mm-align", tags=["speech-codec", "residual-vq"]):
    """STFT-domain residual-VQ speech codec (SoundStream/EnCodec-style RVQ, Vocos-style iSTFT decoder).

    Args:
        config: the codec's :class:`CodecConfig`.
    """

    def __init__(self, config: CodecConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.n_freq = c.n_fft // 2 + 1
        self.register_buffer("window", torch.hann_window(c.n_fft), persistent=False)
        self.encoder = _conv_stack(2 * self.n_freq, c.hidden, c.latent_dim, c.kernel_size, c.num_layers)
        self.quantizer = ResidualVQ(
            dim=c.latent_dim,
            num_quantizers=c.num_quantizers,
            codebook_size=c.codebook_size,
            decay=c.ema_decay,
            commitment_weight=c.commitment_weight,
            threshold_ema_dead_code=c.dead_code_threshold,
        )
        self.decoder = _conv_stack(c.latent_dim, c.hidden, 2 * self.n_freq, c.kernel_size, c.num_layers)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, **kwargs: Any) -> "SpeechCodec":
        if os.path.isdir(model_id):
            config = kwargs["config"]
            config = CodecConfig(**config) if isinstance(config, dict) else config
            return load_strict(cls, model_id, {"config": config})
        return super()._from_pretrained(model_id=model_id, strict=True, **kwargs)

    # ---- geometry ---------------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    def num_frames(self, num_samples: int) -> int:
        """Frames of a wave of ``num_samples`` samples (``center=True`` STFT): ``num_samples // hop + 1``."""
        return num_samples // self.config.hop_length + 1

    @property
    def receptive_field_frames(self) -> int:
        """How many frames away an input sample can still change a code (encoder), or a code an output sample
        (decoder): the STFT window's half-width in frames plus the convolutions' reach."""
        c = self.config
        return math.ceil(c.n_fft / 2 / c.hop_length) + c.num_layers * (c.kernel_size // 2)

    # ---- spectra -----------------------------------------------------------------------------------
    def spectrum(self, wave: torch.Tensor) -> torch.Tensor:
        """Compressed complex spectrum ``|X|^c · X/|X|`` as ``(B, 2F, N)`` (real channels, then imaginary)."""
        c = self.config
        spec = torch.stft(wave.float(), c.n_fft, c.hop_length, window=self.window, center=True,
                          return_complex=True)  # (B, F, N)
        mag = spec.abs().clamp(min=1e-8)
        spec = spec * (mag.pow(c.compress) / mag)  # keep the phase, compress the magnitude
        return torch.cat([spec.real, spec.imag], dim=1)  # (B, 2F, N)

    def _to_wave(self, features: torch.Tensor, length: int) -> torch.Tensor:
        """Invert :meth:`spectrum`: ``(B, 2F, N)`` compressed complex → ``(B, length)`` waveform."""
        c = self.config
        re, im = features.float().split(self.n_freq, dim=1)  # (B, F, N) each
        mag_c = torch.sqrt(re.pow(2) + im.pow(2) + 1e-12).clamp(max=1e3)  # compressed magnitude
        gain = mag_c.pow(1.0 / c.compress - 1.0)  # |Y| / |Yc| = |Yc|^(1/c - 1)
        spec = torch.complex(re * gain, im * gain)
        return torch.istft(spec, c.n_fft, c.hop_length, window=self.window, center=True, length=length)

    # ---- the codec --------------------------------------------------------------------------------
    @staticmethod
    def _batch(wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() == 1:
            return wave[None]
        if wave.dim() != 2:
            raise ValueError(f"expected a wave (T,) or a batch (B, T), got shape {tuple(wave.shape)}")
        return wave

    def latents(self, wave: torch.Tensor) -> torch.Tensor:
        """Continuous encoder latents ``(B, D, N)`` of ``(B, T)`` waves (differentiable)."""
        return self.encoder(self.spectrum(self._batch(wave)))

    @torch.no_grad()
    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """The encoder's continuous latents ``(B, D, N)``, no gradient: what the restorers are conditioned on."""
        return self.latents(wave)

    @torch.no_grad()
    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, Q, N)`` (int64 in ``[0, K)``) of ``(B, T)`` or ``(T,)`` waves."""
        z = self.latents(wave).transpose(1, 2)  # (B, N, D)
        was = self.quantizer.training
        self.quantizer.eval()  # never an EMA update outside train_codec
        try:
            _, indices, _ = self.quantizer(z)  # (B, N, Q)
        finally:
            self.quantizer.train(was)
        return indices.transpose(1, 2).long().contiguous()  # (B, Q, N)

    def decode_latents(self, z: torch.Tensor, length: int) -> torch.Tensor:
        """Waveforms ``(B, length)`` from quantised latents ``(B, D, N)``."""
        return self._to_wave(self.decoder(z), length)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, length: int) -> torch.Tensor:
        """Waveforms ``(B, length)`` from codes ``(B, Q, N)``."""
        if codes.dim() != 3 or codes.shape[1] != self.config.num_quantizers:
            raise ValueError(f"codes must be (B, Q={self.config.num_quantizers}, N), got {tuple(codes.shape)}")
        z = self.quantizer.get_output_from_indices(codes.transpose(1, 2))  # (B, N, D)
        return self.decode_latents(z.transpose(1, 2), length)

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode, quantise (straight-through), decode: ``(reconstruction (B, T), codes (B, Q, N), commit loss)``."""
        wave = self._batch(wave)
        z = self.latents(wave).transpose(1, 2)  # (B, N, D)
        quantized, indices, commit = self.quantizer(z)  # (B, N, D), (B, N, Q), (Q,) or ()
        recon = self.decode_latents(quantized.transpose(1, 2), wave.shape[-1])
        return recon, indices.transpose(1, 2), commit.sum()


def multi_resolution_stft_loss(pred: torch.Tensor, target: torch.Tensor, fft_sizes: Sequence[int]) -> torch.Tensor:
    """Σ over FFT sizes of spectral convergence ``‖|S|−|Ŝ|‖_F / ‖|S|‖_F`` + log-magnitude L1 (Yamamoto et al. 2020).

    Args:
        pred: ``(B, T)`` reconstruction.
        target: ``(B, T)`` reference.
        fft_sizes: FFT (= Hann window) sizes; the hop of each is a quarter of it.
    """
    total = pred.new_zeros(())
    for n in fft_sizes:
        window = torch.hann_window(n, device=pred.device)
        s_pred = torch.stft(pred, n, n // 4, window=window, return_complex=True).abs()
        s_true = torch.stft(target, n, n // 4, window=window, return_complex=True).abs()
        sc = torch.linalg.norm(s_true - s_pred) / torch.linalg.norm(s_true).clamp(min=1e-7)
        log_l1 = (torch.log(s_true.clamp(min=1e-5)) - torch.log(s_pred.clamp(min=1e-5))).abs().mean()
        total = total + sc + log_l1
    return total / len(fft_sizes)


def train_codec(
    codec: SpeechCodec,
    waves: Sequence[torch.Tensor],
    steps: int = 1000,
    batch_size: int = 8,
    segment_seconds: float = 1.0,
    lr: float = 1e-3,
    seed: int = 0,
    log_every: int = 0,
) -> list[float]:
    """Train ``codec`` on random segments of ``waves``; returns the loss of every step.

    Loss = multi-resolution STFT loss (FFT sizes ``n_fft/2, n_fft, 2·n_fft``) + L1 on the compressed complex
    spectrum + the residual VQ's commitment loss (codebooks follow by EMA, SoundStream/EnCodec). Segments are
    drawn with a generator seeded by ``seed`` and the global RNG (codebook dead-code replacement) is seeded
    too, inside a forked RNG state: the same call gives the same codec on CPU.

    Args:
        codec: the codec, trained in place (left in eval mode).
        waves: ``(T,)`` waveforms at ``codec.sample_rate``; shorter ones are zero-padded to the segment length.
        steps: optimiser steps (Adam).
        batch_size: segments per step.
        segment_seconds: segment length.
        lr: learning rate.
        seed: seeds the segment draws and the VQ's random replacements.
        log_every: log the loss every this many steps (0 = never).
    """
    from accelerate.logging import get_logger

    logger = get_logger(__name__)
    if not waves:
        raise ValueError("train_codec needs at least one waveform")
    seg = int(round(segment_seconds * codec.sample_rate))
    n_fft = codec.config.n_fft
    ffts = [max(64, n_fft // 2), n_fft, 2 * n_fft]
    device = next(codec.parameters()).device
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam([p for p in codec.parameters() if p.requires_grad], lr=lr)
        codec.train()
        for step in range(steps):
            batch = []
            for _ in range(batch_size):
                w = waves[int(torch.randint(len(waves), (1,), generator=g))]
                off = int(torch.randint(max(1, w.numel() - seg + 1), (1,), generator=g))
                piece = w[off: off + seg]
                batch.append(F.pad(piece, (0, seg - piece.numel())))
            x = torch.stack(batch).to(device)  # (B, seg)
            recon, _, commit = codec(x)
            spec_l1 = (codec.spectrum(recon) - codec.spectrum(x)).abs().mean()
            loss = multi_resolution_stft_loss(recon, x, ffts) + spec_l1 + commit
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(codec.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            if log_every and (step + 1) % log_every == 0:
                logger.info(f"codec step {step + 1}/{steps}: loss {losses[-1]:.4f}")
    codec.eval()
    return losses

