"""The saved LoRA is the trained LoRA outside mm-align: a LoRA with ``alpha != r`` loads at its scale
``alpha / r`` into plain diffusers (a subprocess that never imports mm_align) and into our own
``load_pipeline``; ``save_merged`` resolves the ``shapes`` alias and checks the base before writing anything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mm_align.image.diffusion_adapter import DiffusionModelConfig, StableDiffusionAdapter
from mm_align.image.sampling import SamplerConfig, load_pipeline
from safetensors.torch import load_file, save_file

from mm_align.lora import LoraSettings, add_lora

from .tiny_pipeline import save_tiny_sd15, save_tiny_sdxl

R, ALPHA = 4, 8  # scale alpha / r = 2

# Plain diffusers, in a fresh interpreter: load the base pipeline, load each LoRA directory, run the UNet on the
# saved inputs; print the LoRA scales it built and whether anything imported mm_align.
PLAIN_DIFFUSERS = r"""
import json, sys
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

model_dir, inputs, jobs = sys.argv[1], load_file(sys.argv[2]), json.loads(sys.argv[3])
kw = {"encoder_hidden_states": inputs["text"]}
if "text_embeds" in inputs:
    kw["added_cond_kwargs"] = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
report = {}
for lora_dir, out in jobs:
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.load_lora_weights(lora_dir)
    scales = {float(v) for m in pipe.unet.modules() if isinstance(getattr(m, "scaling", None), dict)
              for v in m.scaling.values()}
    with torch.no_grad():
        save_file({"sample": pipe.unet(inputs["sample"], inputs["t"], **kw).sample.contiguous()}, out)
    report[lora_dir] = sorted(scales)
report["mm_align_imported"] = any(m == "mm_align" or m.startswith("mm_align.") for m in sys.modules)
print(json.dumps(report))
"""


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def model_dir(request, tmp_path_factory) -> Path:
    save = save_tiny_sd15 if request.param == "sd15" else save_tiny_sdxl
    return save(tmp_path_factory.mktemp(f"tiny_{request.param}"))


def _lora_adapter(pretrained: str, **config) -> StableDiffusionAdapter:
    """An adapter whose UNet holds an r=4, alpha=8 LoRA with nonzero B (so the scale shows in the output)."""
    adapter = StableDiffusionAdapter(DiffusionModelConfig(pretrained=pretrained, resolution=16, **config))
    add_lora(adapter.model, LoraSettings(r=R, alpha=ALPHA), adapter.lora_target_modules)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in adapter.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    adapter.model.eval()
    return adapter


def _inputs(adapter: StableDiffusionAdapter) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    cfg = adapter.model.config
    x = {"sample": torch.randn(2, cfg.in_channels, 4, 4, generator=g), "t": torch.tensor([10, 500]),
         "text": torch.randn(2, 16, cfg.cross_attention_dim, generator=g)}
    if adapter.is_sdxl:
        x["text_embeds"] = torch.randn(2, 32, generator=g)
        x["time_ids"] = torch.rand(2, 6, generator=g) * 64
    return x


@torch.no_grad()
def _unet(unet: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    kw = {"encoder_hidden_states": x["text"]}
    if "text_embeds" in x:
        kw["added_cond_kwargs"] = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
    return unet(x["sample"], x["t"], **kw).sample


def _lora_scales(unet: torch.nn.Module, adapter_name: str) -> set[float]:
    return {float(m.scaling[adapter_name]) for m in unet.modules()
            if isinstance(getattr(m, "scaling", None), dict) and adapter_name in m.scaling}


def test_lora_with_alpha_loads_at_its_scale_in_plain_diffusers_and_load_pipeline(tmp_path, model_dir):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    adapter = _lora_adapter(str(model_dir))
    x = _inputs(adapter)
    ours = _unet(adapter.model, x)
    adapter.save(adapter.model, str(tmp_path / "final"), lora=True)
    # the same weights saved as before the fix (no adapter metadata): diffusers has to assume alpha = r
    legacy = tmp_path / "legacy"
    pipeline = StableDiffusionXLPipeline if adapter.is_sdxl else StableDiffusionPipeline
    pipeline.save_lora_weights(legacy, unet_lora_layers=convert_state_dict_to_diffusers(
        get_peft_model_state_dict(adapter.model)), safe_serialization=True)

    save_file(x, str(tmp_path / "inputs.safetensors"))
    jobs = [[str(tmp_path / "final"), str(tmp_path / "final.out")], [str(legacy), str(tmp_path / "legacy.out")]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, str(model_dir), str(tmp_path / "inputs.safetensors"),
                           json.dumps(jobs)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["mm_align_imported"] is False
    assert report[str(tmp_path / "final")] == [ALPHA / R]  # the trained scale
    assert report[str(legacy)] == [1.0]  # what a LoRA without the metadata loads at
    theirs = load_file(str(tmp_path / "final.out"))["sample"]
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    wrong = load_file(str(tmp_path / "legacy.out"))["sample"]
    assert (wrong - ours).abs().max() > 1e-3  # so the scale is visible in the output

    # our own loader: fused (lora=) and as a branch adapter (cond_lora=), both at the trained scale
    fused = load_pipeline(str(model_dir), lora=str(tmp_path / "final"), cfg=SamplerConfig(device="cpu"))
    torch.testing.assert_close(_unet(fused.unet, x), ours, atol=1e-5, rtol=0)
    branch = load_pipeline(str(model_dir), cond_lora=str(tmp_path / "final"), cfg=SamplerConfig(device="cpu"))
    assert _lora_scales(branch.unet, "cond") == {ALPHA / R}
    torch.testing.assert_close(_unet(branch.unet, x), ours, atol=1e-5, rtol=0)


def test_save_merged_resolves_the_shapes_alias(tmp_path):
    from diffusers import DiffusionPipeline

    adapter = _lora_adapter("shapes", save_merged=True)
    x = _inputs(adapter)
    ours = _unet(adapter.model, x)
    adapter.save(adapter.model, str(tmp_path / "final"), lora=True)
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").is_file()
    merged = DiffusionPipeline.from_pretrained(str(tmp_path / "final" / "merged"))
    assert not _lora_scales(merged.unet, "default_0")  # fused: plain UNet weights, no LoRA layers
    torch.testing.assert_close(_unet(merged.unet, x), ours, atol=1e-5, rtol=0)


def test_save_merged_checks_the_base_before_writing_anything(tmp_path):
    adapter = _lora_adapter(str(save_tiny_sd15(tmp_path / "tiny")))
    adapter.config.save_merged = True
    adapter.config.pretrained = str(tmp_path / "no_such_model")
    with pytest.raises((OSError, ValueError)):
        adapter.save(adapter.model, str(tmp_path / "final"), lora=True)
    assert not (tmp_path / "final").exists()


def test_saving_a_lora_of_a_model_without_one_names_the_problem(tmp_path):
    adapter = StableDiffusionAdapter(DiffusionModelConfig(pretrained=str(save_tiny_sd15(tmp_path / "tiny")),
                                                          resolution=16))
    with pytest.raises(ValueError, match="holds no peft adapter 'default'"):
        adapter.save(adapter.model, str(tmp_path / "final"), lora=True)
    assert not (tmp_path / "final").exists()
