"""Sampling SD3- and FLUX-type pipelines: negative-preference guidance with no NPO LoRA is diffusers' own
StableDiffusion3Pipeline output (same seeds, ≤ 1e-5); the NPO LoRA runs on the negative branch only and a
conditional-branch LoRA on the conditional one; images are seeded per image through load_pipeline and
sample_images, which generate and bench use; FLUX-type pipelines refuse the two-branch LoRA slots."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from mm_align.image.flow_adapter import FlowMatchingAdapter, FlowModelConfig
from mm_align.image.flow_sampling import flow_guided_sample
from mm_align.image.sampling import SamplerConfig, load_pipeline, sample_images

from mm_align.lora import LoraSettings, add_lora

from .tiny_flow_pipelines import save_tiny_flux, save_tiny_sd3

FAST = SamplerConfig(steps=3, guidance_scale=4.0, batch_size=4, resolution=16)
PROMPTS = ["a red circle", "a blue square on a green background"]


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("sample_sd3") / "model")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("sample_flux") / "model")


def _random_lora(model_dir, out, seed: int = 0):
    """A diffusers-format LoRA with non-zero weights, written by the flow adapter's save()."""
    adapter = FlowMatchingAdapter(FlowModelConfig(pretrained=str(model_dir), resolution=16))
    add_lora(adapter.model, LoraSettings(r=4), adapter.lora_target_modules)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    adapter.save(adapter.model, str(out), lora=True)
    return out


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _pipe(model_dir):
    pipe = StableDiffusion3Pipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("dynamic_shift", [False, True])
def test_guided_sampler_without_npo_lora_is_diffusers_sd3_pipeline(sd3, dynamic_shift):
    pipe = _pipe(sd3)
    if dynamic_shift:  # SD3 with resolution-dependent shifting: the same mu as the pipeline
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=True)
    ours = flow_guided_sample(pipe, PROMPTS, "blurry", num_inference_steps=4, guidance_scale=5.0,
                              generator=_gens([3, 4]), height=16, width=16)
    theirs = pipe(PROMPTS, negative_prompt=["blurry"] * 2, num_inference_steps=4, guidance_scale=5.0,
                  generator=_gens([3, 4]), height=16, width=16, output_type="pt").images
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    assert (ours - theirs).abs().max().item() <= 1e-5
    other = pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, generator=_gens([5, 6]), height=16, width=16,
                 output_type="pt").images
    assert (other - theirs).abs().max().item() > 1e-2  # the comparison can fail: other seeds, other images


def test_npo_lora_is_the_negative_branch_and_cond_lora_the_conditional_one(sd3, tmp_path):
    """At w = 1, v̂ = v_neg + 1·(v_pos − v_neg) = v_pos: with the LoRA on the negative branch the image is the
    base model's conditional sample; on the conditional branch it is the LoRA model's. At w = 4 the NPO
    negative branch changes the image, two transformer calls per step."""
    lora = _random_lora(sd3, tmp_path / "lora")
    base = _pipe(sd3)
    with_lora = _pipe(sd3)
    with_lora.load_lora_weights(str(lora))
    kw = dict(num_inference_steps=3, height=16, width=16)
    base_w1 = base(PROMPTS, guidance_scale=1.0, generator=_gens([1, 2]), output_type="pt", **kw).images
    lora_w1 = with_lora(PROMPTS, guidance_scale=1.0, generator=_gens([1, 2]), output_type="pt", **kw).images
    assert (base_w1 - lora_w1).abs().max().item() > 1e-2  # the LoRA matters
    npo_w1 = flow_guided_sample(with_lora, PROMPTS, "", guidance_scale=1.0, generator=_gens([1, 2]), **kw)
    cond_w1 = flow_guided_sample(with_lora, PROMPTS, "", guidance_scale=1.0, generator=_gens([1, 2]),
                                 lora_branch="positive", **kw)
    assert (npo_w1 - base_w1).abs().max().item() <= 1e-5
    assert (cond_w1 - lora_w1).abs().max().item() <= 1e-5
    calls = []
    original = with_lora.transformer.forward
    with_lora.transformer.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    npo = flow_guided_sample(with_lora, PROMPTS, "", guidance_scale=4.0, generator=_gens([1, 2]), **kw)
    plain = base(PROMPTS, guidance_scale=4.0, generator=_gens([1, 2]), output_type="pt", **kw).images
    assert len(calls) == 2 * 3 and (npo - plain).abs().max().item() > 1e-2
    with pytest.raises(ValueError, match="lora_branch"):
        flow_guided_sample(with_lora, PROMPTS, lora_branch="both")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_load_pipeline_and_sample_images_seed_per_image(family, sd3, flux):
    """The path of generate and bench: the flow scheduler kept, one image per (prompt, seed) whatever the batch."""
    model = sd3 if family == "sd3" else flux
    pipe = load_pipeline(str(model), cfg=FAST)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    images = sample_images(pipe, PROMPTS + ["a green star"], [7, 8, 9], FAST)
    alone = sample_images(pipe, ["a blue square on a green background"], [8], SamplerConfig(**{**vars(FAST),
                                                                                              "batch_size": 1}))
    assert [im.size for im in images] == [(16, 16)] * 3
    assert np.array_equal(np.asarray(images[1]), np.asarray(alone[0]))
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))
    if family == "sd3":  # the pipeline's own CFG call with the sampler's settings
        ref = pipe(PROMPTS, negative_prompt=["", ""], num_inference_steps=3, guidance_scale=4.0,
                   generator=_gens([7, 8]), height=16, width=16, output_type="pt").images
        arr = (ref.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
        assert np.array_equal(arr[0], np.asarray(images[0]))


def test_bench_variants_on_an_sd3_model(sd3, tmp_path):
    """lora (fused), npo (negative branch) and lora_cond (conditional branch) variants load and sample."""
    from mm_align.image.bench import Variant, _draw

    lora = _random_lora(sd3, tmp_path / "lora", seed=1)
    seeds = [11, 12]
    drawn = {kind: _draw(str(sd3), Variant(kind, kind, None if kind == "base" else str(lora)), PROMPTS, seeds, FAST)
             for kind in ("base", "lora", "npo", "lora_cond")}
    assert {scheduler for _, scheduler in drawn.values()} == {"flow-matching Euler"}  # what results.json states
    out = {kind: images for kind, (images, _) in drawn.items()}
    arrays = {k: np.stack([np.asarray(im) for im in v]) for k, v in out.items()}
    for kind in ("lora", "npo", "lora_cond"):
        assert not np.array_equal(arrays[kind], arrays["base"]), kind
    assert not np.array_equal(arrays["npo"], arrays["lora_cond"])


def test_flux_refuses_the_two_branch_lora_slots(flux, tmp_path):
    lora = _random_lora(flux, tmp_path / "lora")
    with pytest.raises(ValueError, match="guidance-distilled .* no negative branch"):
        load_pipeline(str(flux), npo_lora=str(lora), cfg=FAST)
    with pytest.raises(ValueError, match="conditional-branch LoRA"):
        load_pipeline(str(flux), cond_lora=str(lora), cfg=FAST)
    fused = sample_images(load_pipeline(str(flux), lora=str(lora), cfg=FAST), PROMPTS, [1, 2], FAST)
    base = sample_images(load_pipeline(str(flux), cfg=FAST), PROMPTS, [1, 2], FAST)
    assert not np.array_equal(np.asarray(fused[0]), np.asarray(base[0]))  # a FLUX LoRA is used fused


def test_generate_image_takes_an_sd3_model(sd3, tmp_path):
    """mm-align generate image's code path, unchanged: sampled, scored by the shapes oracle, paired, written."""
    from mm_align.image.generate import generate
    from mm_align.image.toyworld.shapes import ShapesOracle, split_specs

    prompts = [s.prompt for s in split_specs("train")[:2]]
    result = generate(str(sd3), prompts, tmp_path / "gen", [ShapesOracle()], samples_per_prompt=2, sampler=FAST)
    assert result.samples == 4 and (tmp_path / "gen" / "pairs.parquet").is_file()
    assert len(list((tmp_path / "gen" / "samples").glob("*.png"))) == 4


def test_an_sd3_saved_without_t5_loads_and_samples(tmp_path):
    """model_index.json holds [null, null] for text_encoder_3 / tokenizer_3: load_pipeline passes them as None."""
    pipe = load_pipeline(str(save_tiny_sd3(tmp_path / "no_t5", with_t5=False)), cfg=FAST)
    assert pipe.text_encoder_3 is None
    assert len(sample_images(pipe, PROMPTS[:1], [3], FAST)) == 1
