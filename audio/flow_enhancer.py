"""A flow-matching speech enhancer on the compressed complex STFT (the SGMSE / FlowSE family).

The representation (:class:`~mm_align.audio.stft.CompressedStft`, SGMSE+, Richter et al. 2023) turns a
16 kHz waveform into ``(B, 2, F, N)`` (real and imaginary part of ``β|X|^α e^{i∠X}``). A small
conditional U-Net (:class:`FlowEnhancer`) predicts the velocity ``v_θ(x_t, t, c)`` of the straight
(rectified-flow / conditional optimal-transport) path of flow matching (Lipman et al., "Flow Matching
for Generative Modeling", ICLR 2023, eq. 20–23 with σ_min = 0; ALGORITHMS.md §7):

    x_t = (1 − t)·ε + t·y,     target u_t = y − ε,     loss = E_{t, ε} ‖v_θ(x_t, t, c) − (y − ε)‖²

where ``y`` is the clean compressed spectrogram, ``c`` the degraded one (concatenated on the channels,
as FlowSE, Lee et al. 2025, and SGMSE+ condition their networks), ``t ~ U(0, 1)`` (uniform, no shift)
and ``ε ~ N(0, σ²I)`` with ``σ = 0.5`` by default: SGMSE+'s terminal noise scale σ_max = 0.5 in this
same compressed domain, about the spread of clean speech values there.

The source ``ε`` is pure noise by default (``source="noise"``, the form of §7). With ``source="condition"``
it is the degraded spectrogram plus noise, ``ε = c + σ·z`` (FlowSE, Lee et al. 2025, eq. 5: the path
starts at the noisy observation), and the same formulas hold with that ``ε``: the network then learns
only the residual from degraded to clean, which a small model on a small budget learns far better than
the whole spectrogram. :func:`flow_source` makes ``ε`` from ``σ·z`` for either; training, sampling and
the speech adapter all go through it, so a model's ``source`` is honoured everywhere.

Sampling integrates ``dx/dt = v_θ(x, t, c)`` from ``t = 0`` (``x_0 = σ·ε``) to ``t = 1`` with Euler or
midpoint steps; the result is decoded by the exact inverse STFT.

Long inputs (:func:`restore`) are restored in overlapping chunks, cross-faded: the network's work is
bounded by the chunk whatever the input's length. Chunked restoration equals unchunked restoration to
float rounding wherever the chunk edges' influence cannot reach — the network normalises per time frame
(:class:`FrameNorm`, never across frames) and the initial noise is a function of the GLOBAL frame
index (:func:`frame_noise`), so an interior frame of a chunk sees exactly what it sees in the whole
input; only frames within the edge-influence depth of a chunk edge differ, and the cross-fade gives
those weight 0 (see :func:`restore`).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from mm_align.audio.io import AUDIO_SUFFIXES, load_audio, save_audio
from mm_align.audio.stft import CompressedStft
from safetensors.torch import load_file
from torch import nn

from mm_align.scores import masked_denoising_error

__all__ = [
    "FlowEnhancer",
    "FrameNorm",
    "flow_path",
    "flow_source",
    "flow_matching_loss",
    "frame_noise",
    "sample_flow",
    "train_supervised",
    "restore",
    "restore_main",
    "load_speech_model",
    "temporal_receptive_field",
    "peak_gain",
    "SAMPLERS",
    "USER_MODEL_FILE",
]

SAMPLERS = ("euler", "midpoint")
FLOW_SOURCES = ("noise", "condition")
USER_MODEL_FILE = "mm_align_speech_model.json"  # a user module saved by the speech adapter: class + init kwargs
NOISE_BLOCK = 64  # frames per seeded noise block (frame_noise)


# ---- the network -------------------------------------------------------------------------------
class FrameNorm(nn.Module):
    """Group normalisation over (channels of a group, frequency) of EACH time frame, with an affine map.

    GroupNorm (Wu & He 2018) over the whole ``(C/G, F, N)`` block would make every output frame depend on
    every input frame, so a chunk of a long input would not see what the whole input sees; normalising
    per frame keeps the network's receptive field in time finite (chunked restoration, :func:`restore`).
    """

    def __init__(self, channels: int, groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        if channels % groups:
            raise ValueError(f"FrameNorm: {channels} channels do not split into {groups} groups")
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, f, n = x.shape
        g = x.view(b, self.groups, c // self.groups, f, n)  # (B, G, C/G, F, N)
        var, mean = torch.var_mean(g, dim=(2, 3), keepdim=True, unbiased=False)  # (B, G, 1, 1, N)
        # normalise and apply the affine map in one pass: y = x·scale + shift
        scale = torch.rsqrt(var + self.eps) * self.weight.view(1, self.groups, -1, 1, 1)  # (B, G, C/G, 1, N)
        shift = self.bias.view(1, self.groups, -1, 1, 1) - mean * scale
        return torch.addcmul(shift, g, scale).view(b, c, f, n)


class _ResBlock(nn.Module):
    """norm → SiLU → conv → (+ time embedding) → norm → SiLU → conv, plus a (1×1) skip."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = FrameNorm(c_in, math.gcd(groups, c_in))
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, c_out)
        self.norm2 = FrameNorm(c_out, math.gcd(groups, c_out))
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(emb)[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


def _timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of ``1000·t`` (Vaswani et al. 2017; DDPM/NCSN++'s), ``(B,) -> (B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim - 2 * half))


class FlowEnhancer(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="mm-align",
    tags=["speech-enhancement", "flow-matching"],
):
    """Conditional U-Net velocity field ``v_θ(x_t, t, c)`` on the compressed complex STFT.

    Input ``concat(x_t, c)`` on the channels (4 = real/imag of the state and of the degraded condition);
    ``len(channels)`` resolutions, each halving frequency and time (stride-2 convolutions) with skip
    connections; a sinusoidal time embedding added in every residual block. Every init argument is
    the model's config: ``save_pretrained(dir)`` writes ``config.json`` + ``model.safetensors``
    (:class:`huggingface_hub.PyTorchModelHubMixin`) and ``FlowEnhancer.from_pretrained(dir or hub id)``
    rebuilds it. The representation (:class:`CompressedStft` settings, sample rate, peak normalisation)
    and the flow's noise scale σ are part of the config, so a saved model carries how it must be fed.

    Args:
        channels: feature channels per resolution (``len(channels)`` resolutions).
        num_res_blocks: residual blocks per resolution on the way down (and up).
        norm_groups: groups of :class:`FrameNorm` (reduced to a divisor of each width).
        emb_dim: time-embedding width; None = ``4 · channels[0]``.
        sample_rate: the rate the model works at (Hz).
        n_fft, hop_length, alpha, beta: the :class:`CompressedStft` settings (SGMSE+ defaults).
        sigma: the std of the flow's source noise ε.
        normalize: scale every input by its degraded wave's peak (SGMSE+'s ``normalize="noisy"``); the
            restored wave is scaled back.
        source: where the path starts: ``"noise"`` (``ε ~ N(0, σ²)``) or ``"condition"`` (``ε ~ N(c, σ²)``,
            FlowSE); see :func:`flow_source`.
    """

    lora_target_modules = ["conv1", "conv2", "emb_proj"]  # peft suffix match: every residual block

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64),
        num_res_blocks: int = 1,
        norm_groups: int = 4,
        emb_dim: int | None = None,
        sample_rate: int = 16_000,
        n_fft: int = 510,
        hop_length: int = 128,
        alpha: float = 0.5,
        beta: float = 0.15,
        sigma: float = 0.5,
        normalize: bool = True,
        source: str = "noise",
    ) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if not channels or min(channels) < 1 or num_res_blocks < 1:
            raise ValueError(f"FlowEnhancer needs channels >= 1 and num_res_blocks >= 1, got {channels}, "
                             f"{num_res_blocks}")
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if source not in FLOW_SOURCES:
            raise ValueError(f"source must be one of {', '.join(FLOW_SOURCES)}, got {source!r}")
        self.source = source
        self.stft = CompressedStft(n_fft, hop_length, alpha, beta)
        self.sample_rate, self.sigma, self.normalize = int(sample_rate), float(sigma), bool(normalize)
        self.channels = channels
        self.frame_multiple = 2 ** (len(channels) - 1)  # time (and frequency) must divide by this: padded to it
        emb_dim = emb_dim or 4 * channels[0]
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(4, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        prev = channels[0]
        for i, c in enumerate(channels):
            self.down.append(nn.ModuleList([_ResBlock(prev if j == 0 else c, c, emb_dim, norm_groups)
                                            for j in range(num_res_blocks)]))
            prev = c
            if i < len(channels) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        self.mid = _ResBlock(prev, prev, emb_dim, norm_groups)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(channels))):
            c = channels[i]
            self.up.append(nn.ModuleList([_ResBlock((prev + c) if j == 0 else c, c, emb_dim, norm_groups)
                                          for j in range(num_res_blocks)]))
            prev = c
            if i > 0:
                self.upsample.append(nn.Conv2d(c, channels[i - 1], 3, padding=1))
                prev = channels[i - 1]
        self.norm_out = FrameNorm(channels[0], math.gcd(norm_groups, channels[0]))
        self.conv_out = nn.Conv2d(channels[0], 2, 3, padding=1)

    # ---- the representation (the speech adapter protocol's encode / decode) -------------------
    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` waveform at :attr:`sample_rate` -> ``(B, 2, F, N)`` compressed spectrogram."""
        return self.stft.encode(wave)

    def decode(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        """``(B, 2, F, N)`` -> ``(B, length)`` waveform (the exact inverse of :meth:`encode`)."""
        return self.stft.decode(spec, length)

    def num_frames(self, length: int) -> int:
        """Frames (the representation's last dim) that ``length`` samples of audio fill."""
        return self.stft.num_frames(length)

    # ---- the velocity field ------------------------------------------------------------------
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The velocity ``v_θ(x_t, t, c)``: x_t, cond ``(B, 2, F, N)`` and t ``(B,)`` in [0, 1] -> ``(B, 2, F, N)``."""
        if x_t.shape != cond.shape or x_t.dim() != 4 or x_t.shape[1] != 2:
            raise ValueError(f"FlowEnhancer expects x_t and cond of one shape (B, 2, F, N), got "
                             f"{tuple(x_t.shape)} and {tuple(cond.shape)}")
        b, _, f, n = x_t.shape
        m = self.frame_multiple
        pad_f, pad_n = (-f) % m, (-n) % m
        h = torch.cat([x_t, cond], dim=1)  # (B, 4, F, N)
        if pad_f or pad_n:
            h = F.pad(h, (0, pad_n, 0, pad_f))  # zeros at the high-frequency and late-time ends
        t = t.to(h.dtype).reshape(-1).expand(b) if t.numel() == 1 else t.reshape(b)
        emb = self.time_mlp(_timestep_embedding(t, self.emb_dim).to(h.dtype))  # (B, E)
        h = self.conv_in(h)
        skips = []
        for i, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)  # (B, C, F/2^(i+1), N/2^(i+1))
        h = self.mid(h, emb)
        for i, blocks in enumerate(self.up):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, emb)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        out = self.conv_out(F.silu(self.norm_out(h)))  # (B, 2, F + pad_f, N + pad_n)
        return out[:, :, :f, :n]

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None, cache_dir: str | Path | None,
                         force_download: bool, local_files_only: bool, token: str | bool | None,
                         map_location: str = "cpu", strict: bool = True, **model_kwargs: Any) -> FlowEnhancer:
        """The mixin's loader, strict by default (a missing or unexpected weight is an error) and silent."""
        from huggingface_hub import hf_hub_download
        from safetensors.torch import load_model

        model = cls(**model_kwargs)
        if Path(model_id).is_dir():
            weights = Path(model_id) / "model.safetensors"
            if not weights.is_file():
                raise FileNotFoundError(f"{weights} not found: not a FlowEnhancer directory (save_pretrained)")
        else:
            weights = Path(hf_hub_download(model_id, "model.safetensors", revision=revision, cache_dir=cache_dir,
                                           force_download=force_download, token=token,
                                           local_files_only=local_files_only))
        load_model(model, str(weights), strict=strict, device=map_location)
        return model.eval()


# ---- flow matching -----------------------------------------------------------------------------
def flow_path(y: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The straight flow-matching path (Lipman et al. 2023, σ_min = 0; ALGORITHMS.md §7).

    ``x_t = (1 − t)·ε + t·y`` and its velocity target ``u_t = y − ε``, for ``y``, ``ε`` of shape ``(B, ...)``
    and ``t`` of shape ``(B,)``. ``ε`` already carries its scale σ.
    """
    tb = t.reshape(-1, *([1] * (y.dim() - 1))).to(y.dtype)  # (B,) -> (B, 1, ..., 1)
    return (1.0 - tb) * eps + tb * y, y - eps


def flow_source(model: nn.Module, cond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The path's source sample ``ε`` from ``noise = σ·z``: ``noise`` itself, or ``cond + noise`` when the model's
    ``source`` is ``"condition"`` (FlowSE's start at the degraded observation). Models without ``source``: noise."""
    source = getattr(model, "source", "noise")
    if source == "condition":
        return cond + noise.to(cond)
    if source != "noise":
        raise ValueError(f"model.source must be one of {', '.join(FLOW_SOURCES)}, got {source!r}")
    return noise


def flow_matching_loss(model: nn.Module, y: torch.Tensor, cond: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample conditional flow-matching error ``mean ‖v_θ(x_t, t, c) − (y − ε)‖²`` over every valid element.

    Args:
        model: the velocity field ``model(x_t, t, cond)``.
        y, cond, eps: ``(B, 2, F, N)`` clean spectrogram, condition and σ-scaled noise.
        t: ``(B,)`` times in [0, 1].
        mask: ``(B, 1, 1, N)`` valid frames (padding excluded, :func:`~mm_align.scores.masked_denoising_error`);
            None = all.

    Returns:
        ``(B,)`` float32 errors.
    """
    x_t, target = flow_path(y, eps, t)
    pred = model(x_t, t, cond)
    if mask is None:
        mask = torch.ones(y.shape[0], 1, 1, y.shape[-1], device=y.device)
    return masked_denoising_error(pred, target, mask)


def peak_gain(wave: torch.Tensor) -> float:
    """``1 / max|wave|`` (1 for digital silence): the SGMSE+ input normalisation by the degraded wave's peak."""
    peak = float(wave.abs().max()) if wave.numel() else 0.0
    return 1.0 / peak if peak > 0 else 1.0


def _mix_seed(*parts: int) -> int:
    key = ":".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def frame_noise(seed: int, start_frame: int, n_frames: int, n_freq: int, sigma: float = 1.0,
                batch: int = 1) -> torch.Tensor:
    """Standard normal noise ``(batch, 2, F, n_frames)`` × σ that is a function of the GLOBAL frame index.

    Frames are grouped in blocks of :data:`NOISE_BLOCK`; block ``k`` of batch row ``b`` is drawn from a
    generator seeded by ``(seed, b, k)``. So the noise of frame ``start_frame + j`` is the same whether a
    sampler works on the whole input or on a chunk of it that starts at ``start_frame``.
    """
    if n_frames <= 0:
        return torch.zeros(batch, 2, n_freq, 0)
    first, last = start_frame // NOISE_BLOCK, (start_frame + n_frames - 1) // NOISE_BLOCK
    rows = []
    for b in range(batch):
        blocks = [torch.randn(2, n_freq, NOISE_BLOCK, generator=torch.Generator().manual_seed(_mix_seed(seed, b, k)))
                  for k in range(first, last + 1)]
        off = start_frame - first * NOISE_BLOCK
        rows.append(torch.cat(blocks, dim=-1)[..., off: off + n_frames])
    return torch.stack(rows) * sigma


@torch.no_grad()
def sample_flow(model: nn.Module, cond: torch.Tensor, noise: torch.Tensor, steps: int = 8,
                method: Literal["euler", "midpoint"] = "euler") -> torch.Tensor:
    """Integrate ``dx/dt = v_θ(x, t, c)`` from ``x_0 = noise`` at ``t = 0`` to ``t = 1`` in ``steps`` equal steps.

    Euler: ``x ← x + h·v(x, t)``; midpoint (explicit, 2nd order): ``x ← x + h·v(x + h/2·v(x, t), t + h/2)``.
    ``steps`` Euler steps cost ``steps`` network evaluations, midpoint ``2·steps``.

    Args:
        model: the velocity field.
        cond: ``(B, 2, F, N)`` degraded condition.
        noise: ``(B, 2, F, N)`` source sample ``σ·ε`` (e.g. :func:`frame_noise`).
        steps: ODE steps (≥ 1).
        method: ``"euler"`` or ``"midpoint"``.

    Returns:
        ``(B, 2, F, N)`` the sample at ``t = 1``.
    """
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; valid: {', '.join(SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    x = noise.to(cond.dtype)
    h = 1.0 / steps
    ones = torch.ones(cond.shape[0], device=cond.device, dtype=cond.dtype)
    for k in range(steps):
        t = k * h
        v = model(x, ones * t, cond)
        if method == "midpoint":
            v = model(x + 0.5 * h * v, ones * (t + 0.5 * h), cond)
        x = x + h * v
    return x


def temporal_receptive_field(model: nn.Module, n_frames: int = 256, n_freq: int | None = None) -> int:
    """The half-width, in frames, of ONE network evaluation's dependence on its inputs along time.

    Measured with autograd: the gradient of the centre output frame with respect to ``x_t`` and ``cond``
    is nonzero exactly on the frames it depends on. A sampler with ``K`` evaluations spreads a chunk
    edge's influence at most ``K ×`` this far (see :func:`restore`).
    """
    p = next(model.parameters())
    f = n_freq or getattr(getattr(model, "stft", None), "n_freq", 256)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, f, n_frames, generator=g).to(p).requires_grad_(True)
    c = torch.randn(1, 2, f, n_frames, generator=g).to(p).requires_grad_(True)
    centre = n_frames // 2
    with torch.enable_grad():
        out = model(x, torch.full((1,), 0.5, device=p.device, dtype=p.dtype), c)
        gx, gc = torch.autograd.grad(out[..., centre].sum(), (x, c))  # the inputs only: no parameter .grad left
    grad = (gx.abs() + gc.abs()).sum(dim=(0, 1, 2))  # (N,)
    hit = torch.nonzero(grad > 0).flatten()
    return int(max(centre - hit.min(), hit.max() - centre)) if hit.numel() else 0


# ---- supervised training -----------------------------------------------------------------------
def _valid_mask(lengths: Sequence[int], n_frames: int, num_frames: Callable[[int], int]) -> torch.Tensor:
    mask = torch.zeros(len(lengths), 1, 1, n_frames)
    for i, n in enumerate(lengths):
        mask[i, ..., : min(n_frames, num_frames(int(n)))] = 1.0
    return mask


def train_supervised(
    model: FlowEnhancer,
    data: Sequence[tuple[torch.Tensor, torch.Tensor] | torch.Tensor],
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 4,
    crop_seconds: float | None = 1.0,
    seed: int = 0,
    degrade: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    max_grad_norm: float | None = 1.0,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Conditional flow-matching training (Lipman et al. 2023): ``E ‖v_θ((1−t)ε + t·y, t, c) − (y − ε)‖²``.

    Every random choice (which clips, the crop offsets, a degradation, ``t ~ U(0, 1)``, ``ε ~ N(0, σ²)``)
    comes from one ``torch.Generator`` seeded by ``seed``, so a run is deterministic on CPU. Each
    degraded/clean pair is scaled by the degraded crop's peak (:func:`peak_gain`) when ``model.normalize``.

    Args:
        model: the enhancer, trained in place (AdamW).
        data: ``(degraded, clean)`` waveform pairs ``(T,)`` at ``model.sample_rate``, time-aligned; or clean
            clips alone, with ``degrade(clean, generator) -> degraded``.
        steps: optimiser steps.
        lr: AdamW learning rate.
        batch_size: clips per step (drawn with replacement).
        crop_seconds: random crop per clip (zero-padded and masked when shorter); None = whole clips,
            padded to the batch's longest.
        seed: seeds every draw.
        degrade: makes the degraded input of a clean clip (required when ``data`` holds clean clips).
        max_grad_norm: gradient clipping; None = off.
        on_step: ``on_step(step, loss)`` after every step (progress, logging).

    Returns:
        The loss of every step.
    """
    if not data:
        raise ValueError("train_supervised: no training data")
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    crop = None if crop_seconds is None else max(1, round(crop_seconds * model.sample_rate))
    model.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=g).tolist()
        degraded, clean, lengths = [], [], []
        for i in idx:
            item = data[i]
            if isinstance(item, torch.Tensor):
                if degrade is None:
                    raise ValueError("train_supervised: clean clips need degrade=")
                c = item.float()
                d = degrade(c, g).float()
            else:
                d, c = item[0].float(), item[1].float()
            n = min(d.numel(), c.numel())
            d, c = d[:n], c[:n]
            if crop is not None:
                off = int(torch.randint(max(1, n - crop + 1), (1,), generator=g))
                d, c = d[off: off + crop], c[off: off + crop]
            if model.normalize:
                gain = peak_gain(d)
                d, c = d * gain, c * gain
            degraded.append(d), clean.append(c), lengths.append(d.numel())
        width = crop if crop is not None else max(lengths)
        d = torch.stack([F.pad(w, (0, width - w.numel())) for w in degraded]).to(device)  # (B, T)
        c = torch.stack([F.pad(w, (0, width - w.numel())) for w in clean]).to(device)
        cond, y = model.encode(d), model.encode(c)  # (B, 2, F, N)
        t = torch.rand(batch_size, generator=g).to(device)
        eps = flow_source(model, cond, (torch.randn(y.shape, generator=g) * model.sigma).to(device))
        mask = _valid_mask(lengths, y.shape[-1], model.num_frames).to(device)
        loss = flow_matching_loss(model, y, cond, eps, t, mask).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        opt.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, losses[-1])
    model.eval()
    return losses


# ---- restoration -------------------------------------------------------------------------------
def _crossfade(length: int, overlap: int, fade_in: bool, fade_out: bool) -> torch.Tensor:
    """A chunk's weights: 0 on the quarter of an overlap next to its own edge, a sin² / cos² fade over the
    overlap's middle half, 1 elsewhere. A chunk's fade-out and the next one's fade-in cover the same
    samples and sum to 1 (``sin² + cos² = 1``).
    """
    w = torch.ones(length, dtype=torch.float64)
    margin = overlap // 4
    fade = overlap - 2 * margin
    ramp = torch.sin(0.5 * math.pi * (torch.arange(fade, dtype=torch.float64) + 0.5) / fade) ** 2  # 0 → 1
    if fade_in:
        w[:margin] = 0.0
        w[margin: margin + fade] *= ramp
    if fade_out:
        w[length - margin:] = 0.0
        w[length - margin - fade: length - margin] *= ramp.flip(0)
    return w.float()


@torch.no_grad()
def _restore_segment(model: nn.Module, wave: torch.Tensor, start_frame: int, steps: int, method: str,
                     seed: int) -> torch.Tensor:
    """Restore one (already normalised) segment ``(T,)`` whose first frame is global frame ``start_frame``."""
    p = next(model.parameters())
    cond = model.encode(wave[None].to(p.device, p.dtype))  # (1, 2, F, N)
    noise = frame_noise(seed, start_frame, cond.shape[-1], cond.shape[2], model.sigma).to(cond)
    noise = flow_source(model, cond, noise)
    spec = sample_flow(model, cond, noise, steps, method)
    return model.decode(spec, wave.numel())[0].float().cpu()


@torch.no_grad()
def restore(
    model: nn.Module,
    wave: torch.Tensor,
    sample_rate: int,
    steps: int = 8,
    method: Literal["euler", "midpoint"] = "euler",
    seed: int = 0,
    chunk_seconds: float | None = 8.0,
    overlap_seconds: float = 1.0,
) -> torch.Tensor:
    """Restore a degraded waveform of any length: flow sampling (:func:`sample_flow`) chunk by chunk.

    The input is resampled to ``model.sample_rate`` and (``model.normalize``) scaled by its peak over the
    WHOLE input (so every chunk sees one level). It is then cut into chunks of ``chunk_seconds`` that
    overlap by ``overlap_seconds`` (both rounded to whole multiples of ``hop · model.frame_multiple``
    samples, so a chunk's STFT frames and its U-Net grid are those of the whole input); each chunk is
    restored on its own, with the initial noise of its global frames (:func:`frame_noise`), and the
    chunks are cross-faded (:func:`_crossfade`: weight 0 on the quarter of an overlap next to a chunk's
    own edge, a sin²/cos² fade over the middle half). Only one chunk is in the network at a time, so
    memory is bounded by the chunk; the waveform itself (4 bytes a sample in and out) is held whole.

    Chunked = unchunked: a chunk's edge changes its output only within the edge's influence depth, about
    ``(K · R + 2) · hop + n_fft/2`` samples for ``K`` network evaluations (``steps``, or ``2·steps`` for
    midpoint) of temporal receptive field ``R`` frames (:func:`temporal_receptive_field`), ``+ 2`` frames of
    STFT edge padding. When the overlap's quarter is at least that deep, chunked and unchunked
    restoration agree to float rounding everywhere (tested: 1e-5 relative to the output's peak); with a
    shallower overlap they differ only inside the cross-fades, by the (decaying) reach of the edge.

    Args:
        model: a flow model with ``forward(x_t, t, cond)``, ``encode``, ``decode``, ``sigma``, ``sample_rate``
            (:class:`FlowEnhancer`, or a user model following the speech adapter protocol).
        wave: ``(T,)`` degraded waveform.
        sample_rate: its rate.
        steps: ODE steps.
        method: ``"euler"`` or ``"midpoint"``.
        seed: seeds the initial noise.
        chunk_seconds: chunk length; None = the whole input at once.
        overlap_seconds: overlap of consecutive chunks (at most half a chunk).

    Returns:
        ``(T',)`` float32 restored waveform at ``model.sample_rate`` (``T' = T`` when the rates agree).
    """
    from mm_align.audio.io import resample, to_mono

    sr = int(getattr(model, "sample_rate", sample_rate))
    wave = resample(to_mono(wave.float()), sample_rate, sr)
    gain = peak_gain(wave) if getattr(model, "normalize", True) else 1.0
    x = wave * gain
    hop = int(getattr(getattr(model, "stft", None), "hop_length", 0) or getattr(model, "hop_length", 1))
    grid = hop * int(getattr(model, "frame_multiple", 1))
    if chunk_seconds is None or x.numel() <= round(chunk_seconds * sr):
        return _restore_segment(model, x, 0, steps, method, seed) / gain
    chunk = max(grid, int(chunk_seconds * sr) // grid * grid)
    overlap = math.ceil(overlap_seconds * sr / grid) * grid
    if overlap <= 0 or 2 * overlap > chunk:
        raise ValueError(f"overlap_seconds {overlap_seconds} must be > 0 and at most half of chunk_seconds "
                         f"{chunk_seconds} (after rounding to {grid} samples: overlap {overlap}, chunk {chunk})")
    stride = chunk - overlap
    total = x.numel()
    out = torch.zeros(total)
    start = 0
    while True:
        last = start + chunk >= total
        piece = x[start: min(start + chunk, total)]
        restored = _restore_segment(model, piece, start // hop, steps, method, seed)
        out[start: start + piece.numel()] += restored * _crossfade(piece.numel(), overlap, start > 0, not last)
        if last:
            break
        start += stride
    return out / gain


def _import(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"{spec!r} is not 'module:attribute'")
    return getattr(importlib.import_module(module), attr)


def load_speech_model(path: str | Path | None, model_class: str | Callable[..., nn.Module] | None = None,
                      model_kwargs: dict[str, Any] | None = None, merge_lora: bool = False,
                      revision: str | None = None) -> nn.Module:
    """A speech restoration model from a directory or hub id, in any of the forms the speech adapter saves.

    - a :class:`FlowEnhancer` ``save_pretrained`` directory (``config.json`` + ``model.safetensors``) or hub id;
    - a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``, what
      ``peft.PeftModel.save_pretrained`` writes): its base (``base_model_name_or_path``, or the user class
      named in the directory's :data:`USER_MODEL_FILE`) is loaded and the LoRA injected under peft's adapter
      name ``default``; ``merge_lora`` merges it into the base weights and removes the LoRA layers;
    - a user module's directory (:data:`USER_MODEL_FILE` naming its ``module:Class`` and init kwargs, plus
      ``model.safetensors``);
    - with ``model_class`` (``"module:Class"``, or a class or factory): ``Class.from_pretrained(path)`` when
      the class has it, else ``Class(**model_kwargs)`` with ``path/model.safetensors`` loaded strictly
      (when ``path`` is given).

    Raises:
        FileNotFoundError: ``path`` is none of these (the message names what was looked for).
    """
    p = Path(path) if path else None
    if p is not None and (p / "adapter_config.json").is_file():
        from peft import LoraConfig, inject_adapter_in_model

        from mm_align.lora import ADAPTER_NAME, load_lora_state_dict

        config = LoraConfig.from_pretrained(str(p))
        if model_class is None and (p / USER_MODEL_FILE).is_file():
            saved = json.loads((p / USER_MODEL_FILE).read_text())
            model_class, model_kwargs = saved["model_class"], {**saved.get("model_kwargs", {}), **(model_kwargs or {})}
        base_ref = config.base_model_name_or_path
        if base_ref and not Path(base_ref).is_absolute() and (p / base_ref).exists():
            base_ref = str(p / base_ref)  # a base saved inside the LoRA directory ("base")
        base = load_speech_model(base_ref, model_class, model_kwargs, revision=revision)
        inject_adapter_in_model(config, base, adapter_name=ADAPTER_NAME)
        state = load_file(str(p / "adapter_model.safetensors"))
        prefix = "base_model.model."  # peft's PeftModel naming
        load_lora_state_dict(base, {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()})
        if merge_lora:
            from peft.tuners.tuners_utils import BaseTunerLayer

            for name, module in list(base.named_modules()):
                if isinstance(module, BaseTunerLayer):
                    module.merge()
                    parent, _, child = name.rpartition(".")
                    setattr(base.get_submodule(parent) if parent else base, child, module.get_base_layer())
            base.__dict__.pop("peft_config", None)
        return base.eval()
    if model_class is None and p is not None and (p / USER_MODEL_FILE).is_file():
        saved = json.loads((p / USER_MODEL_FILE).read_text())
        model_class, model_kwargs = saved["model_class"], {**saved.get("model_kwargs", {}), **(model_kwargs or {})}
    if model_class is not None:
        factory = _import(model_class) if isinstance(model_class, str) else model_class
        own_save = p is not None and (p / USER_MODEL_FILE).is_file()
        if p is not None and not own_save and hasattr(factory, "from_pretrained"):
            return factory.from_pretrained(str(path), **(model_kwargs or {}))
        model = factory(**(model_kwargs or {}))
        if p is not None:
            weights = p / "model.safetensors"
            if not weights.is_file():
                raise FileNotFoundError(f"{weights} not found: the weights of {model_class}")
            model.load_state_dict(load_file(str(weights)), strict=True)
        return model
    if p is None:
        raise FileNotFoundError("no speech model given: name a FlowEnhancer directory or hub id, or a model class")
    if p.is_dir() and not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p}: not a speech model directory (no config.json, adapter_config.json or "
                                f"{USER_MODEL_FILE})")
    return FlowEnhancer.from_pretrained(str(path), revision=revision)


def _audio_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)


def restore_main(argv: list[str]) -> int:
    """``mm-align restore speech --model DIR IN OUT``: restore a file, or every audio file of a folder."""
    p = argparse.ArgumentParser(prog="mm-align restore speech", description=restore_main.__doc__)
    p.add_argument("--model", required=True, help="a FlowEnhancer directory or hub id, or a LoRA directory of one")
    p.add_argument("input", help="a degraded audio file, or a folder of them (searched recursively)")
    p.add_argument("output", help="the restored file, or a folder (the input's layout is kept)")
    p.add_argument("--steps", type=int, default=8, help="ODE steps (default: 8)")
    p.add_argument("--method", choices=SAMPLERS, default="euler", help="ODE sampler (default: euler)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default: 0)")
    p.add_argument("--chunk-seconds", type=float, default=8.0, help="chunk length; 0 = whole files (default: 8)")
    p.add_argument("--overlap-seconds", type=float, default=1.0, help="chunk overlap (default: 1)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    args = p.parse_args(argv)
    from tqdm.auto import tqdm

    model = load_speech_model(args.model, merge_lora=True).to(args.device).eval()
    src, dst = Path(args.input), Path(args.output)
    if src.is_dir():
        jobs = [(f, dst / f.relative_to(src)) for f in _audio_files(src)]
        if not jobs:
            raise FileNotFoundError(f"{src}: no audio files ({', '.join(AUDIO_SUFFIXES)})")
    elif src.is_file():
        jobs = [(src, dst / src.name if dst.is_dir() else dst)]
    else:
        raise FileNotFoundError(f"{src}: no such file or folder")
    chunk = args.chunk_seconds or None
    for f, out in tqdm(jobs, desc="restore", disable=len(jobs) == 1):
        wave, sr = load_audio(f)
        restored = restore(model, wave, sr, args.steps, args.method, args.seed, chunk, args.overlap_seconds)
        save_audio(out, restored, model.sample_rate)
    print(f"restored {len(jobs)} file(s) into {dst}")
    return 0
