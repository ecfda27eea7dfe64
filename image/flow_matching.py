"""The rectified-flow training form, in ONE place for every flow-matching adapter (images now, video later).

Rectified flow as SD3 and FLUX train it (Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis", eq. 1–3 and §3.1):

    x_t = (1 − σ)·x_0 + σ·ε,        velocity target  v = ε − x_0,        err = mean over non-batch dims (v̂ − v)²

with ``x_0`` the (scaled, shifted) VAE latent, ``ε ~ N(0, I)`` and ``σ ∈ (0, 1)`` the noise level.
Every preference loss of the suite consumes ``err`` (Flow-DPO is Diffusion-DPO on it).

How σ is drawn (per sample, from the sample's seed, in the adapter's ``collate``; the chosen, the
rejected and the reference pass share it and ε):

1. ``u`` from the weighting scheme of SD3 §3.1 — ``logit_normal`` (default, m = 0, s = 1:
   ``u = sigmoid(n)``, ``n ~ N(m, s)``), ``uniform``, or ``mode`` (``u = 1 − v − s_m·(cos²(πv/2) − 1 + v)``,
   ``v ~ U(0, 1)``, s_m = 1.29). The same densities as diffusers'
   ``training_utils.compute_density_for_timestep_sampling``.
2. The scheduler's shift (SD3 §5.3.2, resolution-dependent timestep shifting):
   ``σ = shift·u / (1 + (shift − 1)·u)``. The shift is the one the scheduler trains with:
   ``FlowMatchEulerDiscreteScheduler.config.shift`` (3.0 for SD3/SD3.5), or 1 when the scheduler uses
   dynamic shifting (FLUX.1), whose ``__init__`` leaves its training sigmas unshifted.
3. The timestep the transformer is fed: ``σ·num_train_timesteps`` (SD3Transformer2DModel), ``σ`` for
   FluxTransformer2DModel, which multiplies by 1000 itself (:func:`model_timestep`).

Relation to diffusers' training scripts (``examples/dreambooth/train_dreambooth_lora_sd3.py`` and
``train_dreambooth_lora_flux.py``, read at commit 58eb52c of huggingface/diffusers): they draw ``u`` with
``compute_density_for_timestep_sampling``, take ``indices = (u·T).long()`` and look up
``timesteps = scheduler.timesteps[indices]`` and the matching ``scheduler.sigmas`` (already shifted),
then feed ``timestep=timesteps`` to SD3 and ``timestep=timesteps / 1000`` to FLUX. Because the table
runs from σ = 1 down, their σ is ``shift(1 − ⌊u·T⌋/T)``. We use ``σ = shift(u)`` without the
1/T quantisation: the three densities are symmetric about ½ (logit-normal with m = 0; ``mode`` maps
``v ↦ 1 − v`` onto ``u ↦ 1 − u``), so both give the same distribution up to the 1/T grid; only with
``logit_mean ≠ 0`` do they differ, and we follow the paper's orientation (m > 0 puts more weight on
noisier σ, as SD3 §3.1 describes), where the scripts' index lookup mirrors it. The transformer's
timestep embedding is continuous (the samplers feed non-integer timesteps too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mm_align.config import option
from mm_align.scores import denoising_error

__all__ = [
    "FlowMatchingConfig", "draw_u", "shift_sigma", "scheduler_shift", "draw_sigma", "draw_flow_sample",
    "noisy_latents", "velocity_target", "model_timestep", "flow_error",
]

WeightingScheme = Literal["logit_normal", "uniform", "mode"]


@dataclass
class FlowMatchingConfig:
    """How the noise level σ of rectified-flow training is drawn (SD3 §3.1)."""

    weighting_scheme: WeightingScheme = option(
        "logit_normal", help="Density of σ: logit_normal (SD3's default), uniform, or mode (SD3 §3.1)."
    )
    logit_mean: float = option(0.0, help="Mean m of the logit-normal density (m > 0: noisier σ more often).")
    logit_std: float = option(1.0, help="Std s of the logit-normal density.")
    mode_scale: float = option(1.29, help="Scale s of the mode density (SD3 §3.1; diffusers' default 1.29).")
    shift: float | None = option(
        None, help="Timestep shift σ' = shift·σ/(1+(shift−1)·σ); None = the scheduler's own (1 under dynamic "
                   "shifting, as FLUX trains)."
    )

    def __post_init__(self) -> None:
        if self.weighting_scheme not in ("logit_normal", "uniform", "mode"):
            raise ValueError(f"weighting_scheme must be logit_normal, uniform or mode, got {self.weighting_scheme!r}")
        if not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        if self.shift is not None and not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")


def draw_u(config: FlowMatchingConfig, generator: torch.Generator) -> float:
    """One draw ``u ∈ (0, 1)`` of SD3's training density (Esser et al. 2024, §3.1), before any shift.

    ``logit_normal``: ``u = sigmoid(n)``, ``n ~ N(logit_mean, logit_std)``; ``uniform``: ``u ~ U(0, 1)``;
    ``mode``: ``u = 1 − v − mode_scale·(cos²(π·v/2) − 1 + v)``, ``v ~ U(0, 1)``.
    """
    if config.weighting_scheme == "logit_normal":
        n = torch.normal(config.logit_mean, config.logit_std, size=(1,), generator=generator)
        return float(torch.sigmoid(n))
    v = float(torch.rand(1, generator=generator))
    if config.weighting_scheme == "uniform":
        return v
    return 1.0 - v - config.mode_scale * (math.cos(math.pi * v / 2) ** 2 - 1.0 + v)


def shift_sigma(sigma: float | torch.Tensor, shift: float) -> float | torch.Tensor:
    """The timestep shift of SD3 §5.3.2 / ``FlowMatchEulerDiscreteScheduler``: ``shift·σ / (1 + (shift − 1)·σ)``."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def scheduler_shift(scheduler_config: Any) -> float:
    """The shift a ``FlowMatchEulerDiscreteScheduler`` config trains with: ``shift``, or 1 under dynamic shifting.

    With ``use_dynamic_shifting`` (FLUX.1) the scheduler's ``__init__`` keeps its sigmas unshifted and
    shifts only at inference, by the image's sequence length; diffusers' FLUX training script therefore
    trains on unshifted σ, and so do we unless :attr:`FlowMatchingConfig.shift` says otherwise.
    """
    if scheduler_config.get("use_dynamic_shifting", False):
        return 1.0
    return float(scheduler_config.get("shift", 1.0))


def draw_sigma(config: FlowMatchingConfig, generator: torch.Generator, shift: float) -> float:
    """σ for one sample: :func:`draw_u` then :func:`shift_sigma` (``config.shift`` overrides ``shift``)."""
    return float(shift_sigma(draw_u(config, generator), config.shift if config.shift is not None else shift))


def draw_flow_sample(seed: int, shape: tuple[int, ...], config: FlowMatchingConfig,
                     shift: float) -> tuple[float, torch.Tensor, torch.Generator]:
    """The per-sample draw ``(σ, ε)`` from the sample's seed: ε ``(shape)`` first, then σ.

    Returns the generator too, positioned after both draws, for any further per-sample draw (the
    VAE latent sample). A function of ``seed`` alone, so the policy pass, the reference pass, every
    process and every resume see the same (σ, ε).
    """
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(shape, generator=g)
    return draw_sigma(config, g, shift), noise, g


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if sigma.ndim != 1 or sigma.shape[0] != like.shape[0]:
        raise ValueError(f"sigma must be (B,) for a batch of {like.shape[0]}, got shape {tuple(sigma.shape)}")
    return sigma.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))  # (B, 1, ..., 1)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 − σ)·x_0 + σ·ε`` per sample; ``x0`` and ``noise`` ``(B, ...)`` (any ndim), ``sigma`` ``(B,)``."""
    if x0.shape != noise.shape:
        raise ValueError(f"latents {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    s = _per_sample(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rectified-flow velocity ``dx_t/dσ = ε − x_0`` the transformer regresses (SD3 eq. 3 with this x_t)."""
    return noise - x0


def model_timestep(sigma: torch.Tensor, num_train_timesteps: int, family: str) -> torch.Tensor:
    """The ``timestep`` argument of the transformer for noise level σ ``(B,)``.

    SD3-type (``SD3Transformer2DModel``): ``σ·num_train_timesteps``, the scheduler's ``timesteps``;
    FLUX-type (``FluxTransformer2DModel``): ``σ``, since it multiplies by 1000 itself (the FLUX training
    script and ``FluxPipeline`` pass ``timestep / 1000``).
    """
    if family == "flux":
        return sigma
    if family == "sd3":
        return sigma * num_train_timesteps
    raise ValueError(f"unknown flow model family {family!r}; valid: sd3, flux")


def flow_error(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample squared velocity error ``mean over every non-batch dim of (v̂ − (ε − x_0))²``, ``(B,)`` float32."""
    return denoising_error(pred, velocity_target(x0, noise))
