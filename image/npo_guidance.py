"""Negative-preference guidance: sampling with an NPO model as the negative branch of CFG.

Diffusion-NPO (Wang et al. 2025, ALGORITHMS.md §2):
``ε̂ = ε_neg(x_t, c_neg) + w · (ε_pos(x_t, c) − ε_neg(x_t, c_neg))``. ``ε_pos`` is the base (or
aligned) UNet, ``ε_neg`` the same UNet with the NPO LoRA enabled. One sampler step costs two
UNet evaluations, as plain classifier-free guidance does: the positive branch runs with the
LoRA layers disabled, the negative one with them enabled. With no NPO LoRA loaded both
branches are the base model and the sampler reproduces plain CFG exactly.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Any

import torch

from mm_align.lora import has_lora, lora_disabled

__all__ = ["npo_guided_sample"]


@torch.no_grad()
def npo_guided_sample(
    pipe: Any,
    prompt: str | list[str],
    negative_prompt: str | list[str] = "",
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    generator: torch.Generator | None = None,
    height: int | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """Sample SD1.5-type images with negative-preference guidance; returns images in [0, 1], ``(B, 3, H, W)``.

    ``pipe`` is a diffusers ``StableDiffusionPipeline`` whose UNet may carry an NPO LoRA (loaded
    with ``pipe.load_lora_weights``); defaults follow the paper for SD1.5 (w = 7.5, 25 steps).
    """
    unet, scheduler, device = pipe.unet, pipe.scheduler, pipe._execution_device
    height = height or unet.config.sample_size * pipe.vae_scale_factor
    width = width or unet.config.sample_size * pipe.vae_scale_factor
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    positive, negative = pipe.encode_prompt(prompts, device, 1, True, negatives)  # (B, L, D) each
    latents = pipe.prepare_latents(len(prompts), unet.config.in_channels, height, width, positive.dtype, device,
                                   generator)
    scheduler.set_timesteps(num_inference_steps, device=device)
    step_kwargs = {}
    params = set(inspect.signature(scheduler.step).parameters)
    if "generator" in params:
        step_kwargs["generator"] = generator
    if "eta" in params:
        step_kwargs["eta"] = 0.0
    npo = has_lora(unet)
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        with lora_disabled(unet) if npo else nullcontext():
            eps_pos = unet(x, t, encoder_hidden_states=positive).sample  # base / aligned model, prompt
        eps_neg = unet(x, t, encoder_hidden_states=negative).sample  # NPO model, negative prompt
        eps = eps_neg + guidance_scale * (eps_pos - eps_neg)
        latents = scheduler.step(eps, t, latents, **step_kwargs).prev_sample
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1)
