"""Sampling rectified-flow pipelines (SD3-type and FLUX-type), seeded per image; negative-preference guidance.

:func:`mm_align.image.sampling.load_pipeline` and :func:`~mm_align.image.sampling.sample_images` hand a
flow pipeline (one with a ``transformer`` and no ``unet``) to this module, so ``mm-align generate image``
and ``mm-align bench image`` take SD3 and FLUX models unchanged. The pipeline keeps its own
``FlowMatchEulerDiscreteScheduler`` (the UNet path swaps in DDIM; a flow model has no DDIM form).
Every image has its own ``torch.Generator``, as on the UNet path.

SD3-type (classifier-free guidance, w = ``guidance_scale``): with no LoRA slot in use, the pipeline's own
call; with an NPO LoRA (``npo_lora``) or a conditional-branch LoRA (``cond_lora``), :func:`flow_guided_sample`,
Diffusion-NPO's negative-preference guidance (Wang et al. 2025, ALGORITHMS.md §2) in velocity form:

    v̂ = v_neg(x_t, c_neg) + w · (v_pos(x_t, c) − v_neg(x_t, c_neg))

``v_pos`` the base (or aligned) transformer, ``v_neg`` the same transformer with the NPO LoRA enabled; the
Euler steps, the timesteps (and SD3's dynamic shift when the scheduler uses one), the latents drawn from
the generators and the decoding are those of ``StableDiffusion3Pipeline.__call__``, so with no LoRA it
reproduces the pipeline's output (a test checks ≤ 1e-5). Two transformer calls per step, as CFG.

FLUX-type guidance-distilled models (FLUX.1-dev: ``guidance_embeds``) have no negative branch: CFG was
distilled into ONE conditional forward that takes the guidance value as an input (``guidance_scale`` here
is that value). Negative-preference guidance, which replaces the negative branch of CFG, therefore does
not apply to them as they are sampled, and neither does a conditional-branch LoRA; :func:`check_flow_lora_slots`
refuses both with that reason. An NPO- or DPO-trained FLUX LoRA is used fused (``lora``), like any aligned
LoRA. (FLUX's optional "true CFG", ``true_cfg_scale`` > 1, would give a negative branch again at twice the
cost; it is not wired here.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from PIL import Image

from mm_align.lora import has_lora, lora_disabled

__all__ = ["is_flow_pipeline", "pipeline_family", "check_flow_lora_slots", "flow_guided_sample",
           "sample_flow_images", "default_side"]


def is_flow_pipeline(pipe: Any) -> bool:
    """True for a diffusers pipeline whose denoiser is a transformer (SD3-, FLUX-type), not a UNet."""
    return getattr(pipe, "transformer", None) is not None and getattr(pipe, "unet", None) is None


def pipeline_family(pipe: Any) -> str:
    """``"sd3"`` or ``"flux"`` from the pipeline's transformer class.

    Raises:
        ValueError: the transformer is of another kind (named in the message).
    """
    name = type(pipe.transformer).__name__
    if name == "SD3Transformer2DModel":
        return "sd3"
    if name == "FluxTransformer2DModel":
        return "flux"
    raise ValueError(f"{type(pipe).__name__}: transformer {name} is neither SD3- nor FLUX-type; mm-align samples "
                     "SD1.5/SDXL UNets and SD3/FLUX transformers")


def check_flow_lora_slots(pipe: Any, npo_lora: str | None, cond_lora: str | None) -> None:
    """Refuse the guided sampler's LoRA slots on a FLUX-type pipeline: it has no CFG negative branch.

    Raises:
        ValueError: ``npo_lora`` or ``cond_lora`` is given for a FLUX-type pipeline.
    """
    if (npo_lora or cond_lora) and pipeline_family(pipe) == "flux":
        what = "negative-preference guidance (npo)" if npo_lora else "a conditional-branch LoRA (lora_cond)"
        raise ValueError(
            f"{what} needs classifier-free guidance's two branches; a FLUX-type pipeline is guidance-distilled "
            "(one conditional forward, the guidance value as an input), so there is no negative branch to "
            "replace: use the LoRA fused (lora:DIR) instead"
        )


def default_side(pipe: Any) -> int:
    """The pipeline's own image side in pixels (SD3: ``sample_size × vae_scale_factor``; FLUX: its default)."""
    if pipeline_family(pipe) == "sd3":
        return pipe.transformer.config.sample_size * pipe.vae_scale_factor
    return pipe.default_sample_size * pipe.vae_scale_factor


@torch.no_grad()
def flow_guided_sample(
    pipe: Any,
    prompt: str | list[str],
    negative_prompt: str | list[str] = "",
    num_inference_steps: int = 28,
    guidance_scale: float = 7.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    height: int | None = None,
    width: int | None = None,
    lora_branch: str = "negative",
) -> torch.Tensor:
    """Sample SD3-type images with negative-preference guidance; images in [0, 1], ``(B, 3, H, W)``.

    Diffusion-NPO (Wang et al. 2025) in velocity form, ``v̂ = v_neg + w·(v_pos − v_neg)``, with the Euler
    sampler, timesteps, latents and decoding of ``StableDiffusion3Pipeline.__call__``. ``pipe.transformer``
    may carry a LoRA loaded with ``load_lora_weights``; ``lora_branch="negative"`` runs it on the negative
    branch only (NPO), ``"positive"`` on the conditional branch only (an aligned, e.g. TDPO, LoRA). With no
    LoRA both branches are the base and the result is the pipeline's own CFG output.

    Raises:
        ValueError: ``lora_branch`` is not negative/positive, or ``pipe`` is not SD3-type.
    """
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
        calculate_shift,
        retrieve_timesteps,
    )

    if lora_branch not in ("negative", "positive"):
        raise ValueError(f"lora_branch must be negative or positive, got {lora_branch!r}")
    if pipeline_family(pipe) != "sd3":
        raise ValueError("flow_guided_sample runs SD3-type pipelines (CFG); FLUX-type ones are guidance-distilled")
    transformer, scheduler, device = pipe.transformer, pipe.scheduler, pipe._execution_device
    height = height or default_side(pipe)
    width = width or default_side(pipe)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    positive, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=True,
        negative_prompt=negatives,
    )  # (B, L, D) twice, (B, P) twice
    latents = pipe.prepare_latents(len(prompts), transformer.config.in_channels, height, width, positive.dtype,
                                   device, generator)  # (B, C, h, w), one generator per image
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting", None):  # as the pipeline: shift by the image's token count
        patch = transformer.config.patch_size
        seq_len = (latents.shape[2] // patch) * (latents.shape[3] // patch)
        c = scheduler.config
        kwargs["mu"] = calculate_shift(seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                       c.get("base_shift", 0.5), c.get("max_shift", 1.16))
    timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, device, **kwargs)
    lora = has_lora(transformer)
    base_positive = lora and lora_branch == "negative"
    base_negative = lora and lora_branch == "positive"
    for t in timesteps:
        timestep = t.expand(latents.shape[0])
        with lora_disabled(transformer) if base_positive else nullcontext():
            v_pos = transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=positive,
                                pooled_projections=pooled, return_dict=False)[0]  # base (NPO) / aligned, prompt
        with lora_disabled(transformer) if base_negative else nullcontext():
            v_neg = transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=negative,
                                pooled_projections=negative_pooled, return_dict=False)[0]  # NPO (or base), c_neg
        v = v_neg + guidance_scale * (v_pos - v_neg)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    image = pipe.vae.decode(latents, return_dict=False)[0]
    return (image / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def sample_flow_images(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], cfg: Any,
                       progress: Callable[[int], Any] | None = None) -> list[Image.Image]:
    """One image per (prompt, seed) from an SD3- or FLUX-type pipeline, in batches of ``cfg.batch_size``.

    ``cfg`` is a :class:`~mm_align.image.sampling.SamplerConfig`: ``steps``, ``guidance_scale`` (SD3: CFG's w;
    FLUX: the distilled guidance value), ``negative_prompt`` (SD3 only), ``resolution``.
    """
    family = pipeline_family(pipe)
    side = cfg.resolution or default_side(pipe)
    guided = family == "sd3" and has_lora(pipe.transformer)  # an NPO or conditional-branch LoRA
    out: list[Image.Image] = []
    for start in range(0, len(prompts), cfg.batch_size):
        batch = list(prompts[start : start + cfg.batch_size])
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[start : start + cfg.batch_size]]
        if guided:
            images = flow_guided_sample(pipe, batch, cfg.negative_prompt, cfg.steps, cfg.guidance_scale, gens,
                                        side, side, getattr(pipe, "mm_align_lora_branch", "negative"))
        elif family == "sd3":
            images = pipe(batch, negative_prompt=[cfg.negative_prompt] * len(batch), num_inference_steps=cfg.steps,
                          guidance_scale=cfg.guidance_scale, generator=gens, height=side, width=side,
                          output_type="pt").images
        else:
            images = pipe(batch, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance_scale, generator=gens,
                          height=side, width=side, output_type="pt").images
        arrays = (images.float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
        out.extend(Image.fromarray(a) for a in arrays)
        if progress is not None:
            progress(len(batch))
    return out
