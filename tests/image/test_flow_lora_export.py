"""The flow adapter's saved LoRA in plain diffusers: ``pipe.load_lora_weights(dir)`` on an SD3- or FLUX-type
pipeline gives the trained transformer's output (at its trained alpha / r scale), the base stays the base, and
``save_merged`` writes a pipeline whose fused transformer is the same function."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from mm_align.image.flow_adapter import FlowMatchingAdapter, FlowModelConfig
from PIL import Image
from safetensors.torch import load_file

from mm_align.data import PreferencePair
from mm_align.lora import LoraSettings, lora_disabled
from mm_align.run_config import TrainConfig
from mm_align.trainer import train

from .tiny_flow_pipelines import save_tiny_flux, save_tiny_sd3


@pytest.fixture(scope="module", params=["sd3", "flux"])
def trained(request, tmp_path_factory):
    """A tiny model of each family, trained 3 Flow-DPO steps with LoRA r 4, alpha 8 (scale 2), merged too."""
    root = tmp_path_factory.mktemp(f"export_{request.param}")
    model_dir = (save_tiny_sd3 if request.param == "sd3" else save_tiny_flux)(root / "model")
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"{i}.png")
    pairs = [PreferencePair(f"a red circle {i}", str(root / f"{i}.png"), str(root / f"{(i + 1) % 4}.png"), id=str(i))
             for i in range(4)]
    adapter = FlowMatchingAdapter(FlowModelConfig(pretrained=str(model_dir), resolution=16, max_sequence_length=8,
                                                  save_merged=True))
    cfg = TrainConfig(output_dir=str(root / "run"), loss=["diffusion_dpo"], beta=500.0, learning_rate=0.05,
                      lr_scheduler="constant", max_steps=3, batch_size=2, report_to=["none"], weight_decay=0.0,
                      lora=LoraSettings(r=4, alpha=8.0))
    result = train(adapter, pairs, cfg)
    return adapter, model_dir, result.final_dir


def _inputs(adapter: FlowMatchingAdapter) -> dict[str, torch.Tensor]:
    """Random transformer inputs of the family's shapes (2 samples, 8×8 latents, 8 T5 tokens)."""
    torch.manual_seed(3)
    cfg = adapter.model.config
    if adapter.family == "sd3":
        return {"hidden_states": torch.randn(2, 16, 8, 8), "timestep": torch.tensor([100.0, 700.0]),
                "encoder_hidden_states": torch.randn(2, 24, cfg.joint_attention_dim),
                "pooled_projections": torch.randn(2, cfg.pooled_projection_dim)}
    from diffusers import FluxPipeline

    return {"hidden_states": torch.randn(2, 16, 64), "timestep": torch.tensor([0.1, 0.7]),
            "guidance": torch.tensor([3.5, 3.5]), "encoder_hidden_states": torch.randn(2, 8, cfg.joint_attention_dim),
            "pooled_projections": torch.randn(2, cfg.pooled_projection_dim), "txt_ids": torch.zeros(8, 3),
            "img_ids": FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)}


def _run(transformer: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs, return_dict=False)[0]


def test_plain_diffusers_load_lora_weights_gives_the_trained_output(trained):
    adapter, model_dir, final = trained
    state = load_file(str(Path(final) / "pytorch_lora_weights.safetensors"))
    assert state and all(k.startswith("transformer.") for k in state)
    assert any(".add_k_proj.lora_A" in k for k in state) and any(".to_out.0.lora_B" in k for k in state)
    inputs = _inputs(adapter)
    ours = _run(adapter.model, inputs)
    with lora_disabled(adapter.model):
        ours_base = _run(adapter.model, inputs)
    pipe = DiffusionPipeline.from_pretrained(str(model_dir))  # plain diffusers, its own loader
    pipe.load_lora_weights(str(final))
    theirs = _run(pipe.transformer, inputs)
    pipe.transformer.disable_lora()
    base = _run(pipe.transformer, inputs)
    gap = (ours - theirs).abs().max().item()
    assert gap <= 1e-4
    assert (ours_base - base).abs().max().item() <= 1e-5  # the same base weights underneath
    assert (ours - base).abs().max().item() > 100 * max(gap, 1e-6)  # the LoRA really changed the output


def test_merged_pipeline_is_the_lora_fused(trained):
    adapter, _, final = trained
    merged = Path(final) / "merged"
    assert (merged / "model_index.json").is_file() and not (Path(final) / ".merged.tmp").exists()
    pipe = DiffusionPipeline.from_pretrained(str(merged))
    assert not any("lora" in k for k in pipe.transformer.state_dict())  # plain weights, no adapter layers
    inputs = _inputs(adapter)
    assert (_run(pipe.transformer, inputs) - _run(adapter.model, inputs)).abs().max().item() <= 1e-4


def test_full_finetune_saves_the_transformer(tmp_path, trained):
    adapter, _, _ = trained
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    plain = type(adapter.model).from_config(adapter.model.config)  # a fully tuned transformer: no adapter layers
    adapter.save(plain, str(tmp_path / "full"), lora=False)
    cls = SD3Transformer2DModel if adapter.family == "sd3" else FluxTransformer2DModel
    back = cls.from_pretrained(str(tmp_path / "full" / "transformer"))
    inputs = _inputs(adapter)
    assert torch.equal(_run(back, inputs), _run(plain, inputs))
    with pytest.raises(ValueError, match="holds no peft adapter"):
        adapter.save(plain, str(tmp_path / "x"), lora=True)
