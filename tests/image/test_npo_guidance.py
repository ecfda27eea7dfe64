"""NPO guidance: with a negative model identical to the base it is plain CFG (diffusers' own
pipeline, same seed, ≤ 1e-5); with an NPO LoRA it changes the image; two UNet calls per step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from mm_align.image.diffusion_adapter import DiffusionModelConfig, StableDiffusionAdapter
from mm_align.image.npo_guidance import npo_guided_sample

from mm_align.run_config import TrainConfig
from mm_align.trainer import train

from .test_sd_adapter import _pairs, image_dir  # noqa: F401 (fixture)
from .tiny_pipeline import save_tiny_sd15


def _pipe(model_dir):
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_identical_negative_model_reproduces_plain_cfg(tmp_path):
    model_dir = save_tiny_sd15(tmp_path / "m")
    pipe = _pipe(model_dir)
    ours = npo_guided_sample(pipe, "a red circle", num_inference_steps=4, guidance_scale=7.5,
                             generator=torch.Generator().manual_seed(3))
    cfg = pipe("a red circle", num_inference_steps=4, guidance_scale=7.5, output_type="pt",
               generator=torch.Generator().manual_seed(3)).images
    assert ours.shape == cfg.shape
    assert (ours - cfg).abs().max().item() <= 1e-5


def test_npo_lora_is_the_negative_branch_at_two_unet_calls_per_step(tmp_path, image_dir):  # noqa: F811
    model_dir = save_tiny_sd15(tmp_path / "m")
    adapter = StableDiffusionAdapter(DiffusionModelConfig(pretrained=str(model_dir), resolution=16))
    result = train(adapter, _pairs(image_dir), TrainConfig(
        output_dir=str(tmp_path / "npo"), loss=["npo"], learning_rate=1e-2, lr_scheduler="constant", max_steps=3,
        batch_size=2, report_to=["none"]))
    pipe = _pipe(model_dir)
    plain = npo_guided_sample(pipe, "a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(3))
    pipe.load_lora_weights(str(result.final_dir))
    calls = []
    pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    guided = npo_guided_sample(pipe, "a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(3))
    assert len(calls) == 2 * 3
    assert (guided - plain).abs().max().item() > 1e-6


def test_conditional_branch_lora_is_the_fused_model_on_the_prompt_and_the_base_on_the_negative(
        tmp_path, image_dir):  # noqa: F811
    """``lora_cond`` (how a TDPO LoRA is sampled): ε̂ = ε_base(∅) + w·(ε_aligned(c) − ε_base(∅)), checked
    against a hand-written loop over two UNets (the LoRA fused into one, the other the base)."""
    from mm_align.image.sampling import SamplerConfig, load_pipeline, sample_images

    model_dir = save_tiny_sd15(tmp_path / "m")
    adapter = StableDiffusionAdapter(DiffusionModelConfig(pretrained=str(model_dir), resolution=16))
    lora = train(adapter, _pairs(image_dir), TrainConfig(
        output_dir=str(tmp_path / "dpo"), loss=["diffusion_dpo"], learning_rate=1e-2, lr_scheduler="constant",
        max_steps=3, batch_size=2, report_to=["none"])).final_dir
    cfg = SamplerConfig(steps=3, guidance_scale=5.0, batch_size=2, device="cpu")
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    cond = load_pipeline(str(model_dir), cfg=cfg, cond_lora=str(lora))
    fused = load_pipeline(str(model_dir), lora=str(lora), cfg=cfg)
    base = load_pipeline(str(model_dir), cfg=cfg)

    def pixels(images):
        return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32).reshape(-1, 3)) for im in images])

    got = pixels(sample_images(cond, prompts, seeds, cfg))
    with torch.no_grad():  # the expected rule, by hand
        positive, _ = fused.encode_prompt(prompts, "cpu", 1, False)
        negative, _ = base.encode_prompt([""] * 2, "cpu", 1, False)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        latents = base.prepare_latents(2, 4, 16, 16, positive.dtype, "cpu", gens)
        base.scheduler.set_timesteps(3)
        for t in base.scheduler.timesteps:
            x = base.scheduler.scale_model_input(latents, t)
            e_pos = fused.unet(x, t, encoder_hidden_states=positive).sample
            e_neg = base.unet(x, t, encoder_hidden_states=negative).sample
            latents = base.scheduler.step(e_neg + 5.0 * (e_pos - e_neg), t, latents, eta=0.0).prev_sample
        image = (base.vae.decode(latents / base.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        want = (image.permute(0, 2, 3, 1).reshape(2, -1, 3) * 255).round()
    assert (got - want).abs().max().item() <= 1.0  # uint8 rounding
    assert (got - pixels(sample_images(fused, prompts, seeds, cfg))).abs().max().item() > 1.0
    assert (got - pixels(sample_images(base, prompts, seeds, cfg))).abs().max().item() > 1.0
    with pytest.raises(ValueError, match="one"):
        load_pipeline(str(model_dir), npo_lora=str(lora), cond_lora=str(lora), cfg=cfg)
