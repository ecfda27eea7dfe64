"""NPO guidance: with a negative model identical to the base it is plain CFG (diffusers' own
pipeline, same seed, ≤ 1e-5); with an NPO LoRA it changes the image; two UNet calls per step."""

from __future__ import annotations

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
