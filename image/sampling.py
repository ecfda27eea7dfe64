"""Sampling text-to-image pipelines for preference data and benchmarks: batched, seeded per image.

Every image has its own seed (a ``torch.Generator`` per image), so an image depends only on its
prompt, its seed and the weights — not on the batch it was drawn in — and a base and an aligned
model sampled with the same seeds differ only by what alignment changed. Samplers: DDIM (η = 0) by
default; classifier-free guidance, or negative-preference guidance when an NPO LoRA is given
(:func:`mm_align.image.npo_guidance.npo_guided_sample`: with no NPO LoRA it IS plain CFG). Rectified-flow
pipelines (SD3-, FLUX-type: a ``transformer``, no ``unet``) keep their own scheduler and are sampled by
:mod:`mm_align.image.flow_sampling`.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mm_align.config import option

__all__ = [
    "SamplerConfig", "add_sampler_args", "load_pipeline", "resolve_device", "sample_images", "sampler_from_args",
]


@dataclass
class SamplerConfig:
    """How images are drawn."""

    steps: int = option(25, help="Sampler steps (DDIM).")
    guidance_scale: float = option(7.5, help="Classifier-free guidance weight w.")
    negative_prompt: str = option("", help="The prompt of the negative (unconditional) branch.")
    batch_size: int = option(16, help="Images per UNet batch.")
    resolution: int | None = option(None, help="Image side in pixels; None = the model's own.")
    device: str = option("auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    dtype: str = option("float32", help="float32, float16 or bfloat16 for the whole pipeline.")


# SamplerConfig field -> (argparse type, choices); the flag is the field name with dashes (--guidance-scale)
_SAMPLER_FLAGS: dict[str, tuple[type, tuple[str, ...] | None]] = {
    "steps": (int, None),
    "guidance_scale": (float, None),
    "negative_prompt": (str, None),
    "batch_size": (int, None),
    "resolution": (int, None),
    "device": (str, None),
    "dtype": (str, ("float32", "float16", "bfloat16")),
}


def add_sampler_args(parser: argparse.ArgumentParser) -> None:
    """Add the sampler flags (``--steps``, ``--guidance-scale``, ``--batch-size``, ``--device``, ...) to ``parser``.

    One flag per :class:`SamplerConfig` field, with its default and help; read them back with
    :func:`sampler_from_args`. Used by ``mm-align generate image`` and ``mm-align bench image``.
    """
    group = parser.add_argument_group("sampler", "how images are drawn")
    for f in dataclasses.fields(SamplerConfig):
        kind, choices = _SAMPLER_FLAGS[f.name]
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, choices=choices,
                           default=f.default, help=f"{f.metadata['help']} (default: {f.default})")


def sampler_from_args(args: argparse.Namespace) -> SamplerConfig:
    """The :class:`SamplerConfig` of flags added by :func:`add_sampler_args`."""
    return SamplerConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SamplerConfig)})


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _load_lora(pipe: Any, path: str, adapter_name: str) -> None:
    """Load a diffusers-format LoRA; one that holds UNet weights only (ours) goes into the UNet alone.

    The pipeline-level ``load_lora_weights`` also tries each text encoder and warns that no keys matched
    when there are none for it, which is every LoRA this suite trains.
    """
    from mm_align.image.flow_sampling import is_flow_pipeline
    from safetensors import safe_open

    denoiser = "transformer" if is_flow_pipeline(pipe) else "unet"
    weights = Path(path) / "pytorch_lora_weights.safetensors" if Path(path).is_dir() else Path(path)
    unet_only = False
    if weights.suffix == ".safetensors" and weights.is_file():
        with safe_open(str(weights), framework="pt") as fh:
            unet_only = all(k.startswith(f"{denoiser}.") for k in fh.keys())
    if unet_only:
        getattr(pipe, denoiser).load_lora_adapter(str(weights.parent), weight_name=weights.name, prefix=denoiser,
                                                  adapter_name=adapter_name)
    else:
        pipe.load_lora_weights(path, adapter_name=adapter_name)


def load_pipeline(pretrained: str, lora: str | None = None, npo_lora: str | None = None,
                  cfg: SamplerConfig | None = None, cond_lora: str | None = None) -> Any:
    """A diffusers pipeline from a directory or hub id, with a DDIM scheduler and optional LoRA.

    ``lora`` (an aligned model's LoRA) is FUSED into the UNet; ``npo_lora`` is loaded as a LoRA
    adapter that the negative-guidance sampler enables for the negative branch only; ``cond_lora`` (an
    aligned LoRA, e.g. TDPO's) is loaded as an adapter enabled for the CONDITIONAL branch only. The
    directories hold diffusers-format LoRA files (what ``mm-align train`` writes to ``final/``).
    """
    if npo_lora and cond_lora:
        raise ValueError("npo_lora and cond_lora both use the guided sampler's LoRA slot: give one")
    from diffusers import DDIMScheduler, DiffusionPipeline

    cfg = cfg or SamplerConfig()
    from mm_align.image.loading import quiet_loading

    with quiet_loading():
        # components saved as absent ([null, null] in model_index.json, e.g. SD3 without T5) must be passed as
        # None, or diffusers refuses to rebuild the pipeline
        absent = {k: None for k, v in DiffusionPipeline.load_config(pretrained).items()
                  if isinstance(v, (list, tuple)) and len(v) == 2 and v[0] is None and v[1] is None}
        pipe = DiffusionPipeline.from_pretrained(pretrained, dtype=getattr(torch, cfg.dtype), **absent)
        from mm_align.image.flow_sampling import check_flow_lora_slots, is_flow_pipeline

        if is_flow_pipeline(pipe):  # SD3/FLUX: their own flow-matching Euler scheduler
            check_flow_lora_slots(pipe, npo_lora, cond_lora)
        else:
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        if lora:
            _load_lora(pipe, lora, "aligned")
            pipe.fuse_lora(adapter_names=["aligned"])
            pipe.unload_lora_weights()
        if npo_lora:
            _load_lora(pipe, npo_lora, "npo")
        if cond_lora:
            _load_lora(pipe, cond_lora, "cond")
    pipe.mm_align_lora_branch = "positive" if cond_lora else "negative"  # read by sample_images
    pipe.to(resolve_device(cfg.device))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_images(pipe: Any, prompts: Sequence[str], seeds: Sequence[int], cfg: SamplerConfig | None = None,
                  progress: Callable[[int], Any] | None = None) -> list[Image.Image]:
    """One image per (prompt, seed), drawn in batches of ``cfg.batch_size``; PIL RGB images.

    With an NPO LoRA loaded (``load_pipeline(npo_lora=...)``) the negative-preference guidance sampler
    is used, with a conditional-branch LoRA (``cond_lora``) the same sampler with the LoRA on the
    conditional branch; otherwise the pipeline's own CFG call.
    """
    from mm_align.image.npo_guidance import npo_guided_sample

    from mm_align.lora import has_lora

    cfg = cfg or SamplerConfig()
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    from mm_align.image.flow_sampling import is_flow_pipeline, sample_flow_images

    if is_flow_pipeline(pipe):
        return sample_flow_images(pipe, prompts, seeds, cfg, progress)
    side = cfg.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    guided = has_lora(pipe.unet)  # an NPO or conditional-branch LoRA: the two-branch sampler
    out: list[Image.Image] = []
    for start in range(0, len(prompts), cfg.batch_size):
        batch = list(prompts[start : start + cfg.batch_size])
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[start : start + cfg.batch_size]]
        if guided:
            images = npo_guided_sample(pipe, batch, cfg.negative_prompt, cfg.steps, cfg.guidance_scale, gens,
                                       side, side, getattr(pipe, "mm_align_lora_branch", "negative"))
        else:
            images = pipe(batch, negative_prompt=[cfg.negative_prompt] * len(batch), num_inference_steps=cfg.steps,
                          guidance_scale=cfg.guidance_scale, generator=gens, height=side, width=side, eta=0.0,
                          output_type="pt").images
        arrays = (images.float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
        out.extend(Image.fromarray(a) for a in arrays)
        if progress is not None:
            progress(len(batch))
    return out
