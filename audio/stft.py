"""The complex STFT representation of the SGMSE / FlowSE family of speech enhancers.

A waveform ``x`` (16 kHz) becomes its STFT ``X = STFT(x)`` (``n_fft`` 510, hop 128, a periodic Hann
window, centred frames: 256 frequency bins, ``T // hop + 1`` frames), amplitude-compressed as

    Z = β · |X|^α · e^{i∠X}        (α = 0.5, β = 0.15)

and stored as a 2-channel real tensor ``(B, 2, F, N)`` (real, imaginary). The compression and its
constants are those of SGMSE+ (Richter, Welker, Lemercier, Lay, Gerkmann, "Speech Enhancement and
Dereverberation with Diffusion-Based Generative Models", IEEE/ACM TASLP 2023, §IV-A: "amplitude
transformation ``c̃ = β|c|^α e^{i∠c}`` with α = 0.5 and β = 0.15", window 510, hop 128, periodic
Hann), which FlowSE (Lee et al., "FlowSE: Efficient and High-Quality Speech Enhancement via Flow
Matching", Interspeech 2025) keeps. The square root lifts the quiet high-frequency bins of speech, so
a network's squared error weighs them closer to the loud low bins; β brings the values to roughly
unit scale.

The inverse is exact: ``|X| = (|Z| / β)^{1/α}`` with the phase kept, then the inverse STFT
(overlap-add, window-sum normalised) trimmed to the original length. A round trip reproduces the
waveform to float32 rounding (~1e-6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CompressedStft"]


@dataclass(frozen=True)
class CompressedStft:
    """The SGMSE+ compressed complex STFT: ``encode`` a waveform to ``(B, 2, F, N)``, ``decode`` it back.

    Args:
        n_fft: FFT size (``F = n_fft // 2 + 1`` bins; SGMSE+ uses 510, so F = 256).
        hop_length: hop in samples (128 at 16 kHz = 8 ms).
        alpha: the amplitude exponent α (0.5).
        beta: the scale β (0.15).
    """

    n_fft: int = 510
    hop_length: int = 128
    alpha: float = 0.5
    beta: float = 0.15

    def __post_init__(self) -> None:
        if self.n_fft < 2 or self.hop_length < 1 or self.hop_length > self.n_fft:
            raise ValueError(f"need 1 <= hop_length <= n_fft, got n_fft {self.n_fft}, hop {self.hop_length}")
        if not 0.0 < self.alpha <= 1.0 or self.beta <= 0.0:
            raise ValueError(f"need 0 < alpha <= 1 and beta > 0, got alpha {self.alpha}, beta {self.beta}")

    @property
    def n_freq(self) -> int:
        """Frequency bins ``F = n_fft // 2 + 1``."""
        return self.n_fft // 2 + 1

    def num_frames(self, length: int) -> int:
        """STFT frames of ``length`` samples (centred frames): ``length // hop + 1``."""
        return length // self.hop_length + 1

    def _window(self, like: torch.Tensor) -> torch.Tensor:
        return torch.hann_window(self.n_fft, periodic=True, dtype=like.dtype, device=like.device)

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """``(T,)`` or ``(B, T)`` waveform -> ``(B, 2, F, N)`` compressed spectrogram ``β|X|^α e^{i∠X}``.

        Computed in the wave's float dtype (float32 for anything that is not float64).
        """
        if wave.dim() == 1:
            wave = wave[None]
        if wave.dim() != 2:
            raise ValueError(f"encode expects a waveform (T,) or (B, T), got shape {tuple(wave.shape)}")
        wave = wave if wave.dtype == torch.float64 else wave.float()
        spec = torch.stft(wave, self.n_fft, self.hop_length, window=self._window(wave), center=True,
                          pad_mode="reflect", return_complex=True)  # (B, F, N) complex
        mag = spec.abs()
        # Z = β |X|^α e^{i∠X} = X · β |X|^(α-1); a zero bin stays exactly zero (0 · finite)
        gain = self.beta * mag.clamp_min(torch.finfo(mag.dtype).tiny).pow(self.alpha - 1.0)
        spec = spec * gain
        return torch.view_as_real(spec).permute(0, 3, 1, 2).contiguous()  # (B, F, N, 2) -> (B, 2, F, N)

    def decode(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        """``(B, 2, F, N)`` compressed spectrogram -> ``(B, length)`` waveform: the exact inverse of :meth:`encode`.

        ``X = Z · |Z|^(1/α − 1) / β^(1/α)`` (the magnitude decompressed, the phase kept), then the inverse STFT.
        """
        if spec.dim() != 4 or spec.shape[1] != 2 or spec.shape[2] != self.n_freq:
            raise ValueError(f"decode expects (B, 2, {self.n_freq}, N), got shape {tuple(spec.shape)}")
        spec = spec if spec.dtype == torch.float64 else spec.float()
        z = torch.view_as_complex(spec.permute(0, 2, 3, 1).contiguous())  # (B, F, N) complex
        mag = z.abs()
        gain = mag.clamp_min(torch.finfo(mag.dtype).tiny).pow(1.0 / self.alpha - 1.0) / self.beta ** (1.0 / self.alpha)
        x = z * gain
        return torch.istft(x, self.n_fft, self.hop_length, window=self._window(spec), center=True, length=length)
