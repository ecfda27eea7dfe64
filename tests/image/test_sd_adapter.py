"""The SD1.5-type adapter on a tiny pipeline saved to disk: every loss trains through the real loop,
chosen/rejected/reference share noise and timestep, the saved LoRA loads into plain diffusers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mm_align.image.diffusion_adapter import DiffusionModelConfig, StableDiffusionAdapter
from PIL import Image

from mm_align.cli import main
from mm_align.data import PreferencePair, UnpairedSample
from mm_align.run_config import TrainConfig
from mm_align.trainer import train

from .tiny_pipeline import save_tiny_sd15, save_tiny_sdxl


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def model_dir(request, tmp_path_factory) -> Path:
    save = save_tiny_sd15 if request.param == "sd15" else save_tiny_sdxl
    return save(tmp_path_factory.mktemp(f"tiny_{request.param}"))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return d


def _pairs(image_dir: Path) -> list[PreferencePair]:
    return [PreferencePair(f"a red circle {i}", str(image_dir / f"{i}.png"), str(image_dir / f"{(i + 1) % 8}.png"),
                           id=str(i)) for i in range(8)]


def _adapter(model_dir: Path) -> StableDiffusionAdapter:
    return StableDiffusionAdapter(DiffusionModelConfig(pretrained=str(model_dir), resolution=16))


def _cfg(tmp_path: Path, loss: str, **kw) -> TrainConfig:
    base = dict(output_dir=str(tmp_path / loss), loss=[loss], learning_rate=1e-3, lr_scheduler="constant",
                max_steps=3, batch_size=2, log_every=1, report_to=["none"], cache_dir=str(tmp_path / "c"))
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("loss", ["diffusion_dpo", "npo", "mapo", "diffusion_kto"])
def test_each_loss_trains_lora_only(tmp_path, model_dir, image_dir, loss):
    adapter = _adapter(model_dir)
    base = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    if loss == "diffusion_kto":
        records = [UnpairedSample(p.prompt, p.chosen, i % 2 == 0, id=p.id) for i, p in enumerate(_pairs(image_dir))]
    else:
        records = _pairs(image_dir)
    result = train(adapter, records, _cfg(tmp_path, loss))
    state = adapter.model.state_dict()
    lora = {k: v for k, v in state.items() if "lora_" in k}
    assert lora
    for k, v in lora.items():  # every LoRA parameter changed (B from zero, A from its init)
        assert "lora_B" not in k or v.abs().sum() > 0, k
    for k, v in base.items():  # base weights unchanged
        key = k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state.get(key, state.get(k)), v), k
    lines = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x["loss"]) for x in lines)
    if loss in ("diffusion_dpo", "npo"):
        assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at step 0
        assert lines[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_chosen_rejected_and_reference_share_noise_and_timestep(tmp_path, model_dir, image_dir, monkeypatch):
    adapter = _adapter(model_dir)
    calls = []
    real = adapter.scheduler.add_noise

    def spy(latents, noise, t):
        calls.append((noise.clone(), t.clone(), torch.is_grad_enabled()))
        return real(latents, noise, t)

    monkeypatch.setattr(adapter.scheduler, "add_noise", spy)
    train(adapter, _pairs(image_dir), _cfg(tmp_path, "diffusion_dpo", max_steps=1))
    (ref_noise, ref_t, ref_grad), (policy_noise, policy_t, grad) = calls
    assert grad and not ref_grad  # the no-grad reference pass (first: its activations freed), then the policy
    b = policy_t.shape[0] // 2
    assert torch.equal(policy_noise[:b], policy_noise[b:]) and torch.equal(policy_t[:b], policy_t[b:])
    assert torch.equal(policy_noise, ref_noise) and torch.equal(policy_t, ref_t)
    assert not torch.equal(policy_noise[0], policy_noise[1])  # different pairs get different draws


def test_saved_lora_loads_into_plain_diffusers(tmp_path, model_dir, image_dir):
    from diffusers import DiffusionPipeline

    adapter = _adapter(model_dir)
    result = train(adapter, _pairs(image_dir), _cfg(tmp_path, "diffusion_dpo"))
    pipe = DiffusionPipeline.from_pretrained(str(model_dir))  # plain diffusers, its own loader
    pipe.load_lora_weights(str(result.final_dir))
    torch.manual_seed(1)
    x, t = torch.randn(2, 4, 2, 2), torch.tensor([10, 500])
    dim = adapter.model.config.cross_attention_dim
    kw = {"encoder_hidden_states": torch.randn(2, 16, dim)}
    if adapter.is_sdxl:
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32), "time_ids": torch.rand(2, 6) * 64}
    with torch.no_grad():
        ours = adapter.model(x, t, **kw).sample
        theirs = pipe.unet(x, t, **kw).sample
        pipe.unet.disable_lora()
        base = pipe.unet(x, t, **kw).sample
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours - base).abs().max().item() > 1e-6  # the LoRA really changed the output


def test_mm_align_train_cli_loads_the_model_dir(tmp_path, model_dir, image_dir):
    rows = [{"prompt": p.prompt, "chosen": Path(p.chosen).name, "rejected": Path(p.rejected).name}
            for p in _pairs(image_dir)]
    data = image_dir / "pairs.jsonl"  # relative image paths resolve against the data file
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"adapter": "sd", "model": {"pretrained": str(model_dir), "resolution": 16},
           "data": {"train": str(data)},
           "train": {"output_dir": str(tmp_path / "run"), "loss": ["diffusion_dpo"], "max_steps": 2, "batch_size": 2,
                     "report_to": ["none"], "log_every": 1}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(tmp_path / "cfg.yaml")]) == 0
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_image_to_tensor_crop_and_sdxl_time_ids():
    """20×24 (h×w) image at 16 px: shorter side 20 → 16, so 24 → 19; centre crop left = (19 − 16) // 2 = 1.
    SDXL add_time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) = (20, 24, 0, 1, 16, 16)."""
    from mm_align.image.image_io import image_to_tensor

    pixels, ids = image_to_tensor(Image.new("RGB", (24, 20), (255, 0, 0)), 16)
    assert pixels.shape == (3, 16, 16) and ids == (20, 24, 0, 1, 16, 16)
    assert pixels[0].min().item() == pytest.approx(1.0) and pixels[1].max().item() == pytest.approx(-1.0)


def test_shipped_image_recipes_validate():
    """Every shipped image recipe parses into a RunConfig with its paper's loss and β."""
    from mm_align.config import from_dict, load_config
    from mm_align.losses import get_loss
    from mm_align.recipes import ADAPTERS, load_object, shipped_configs
    from mm_align.run_config import RunConfig

    recipes = {k: v for k, v in shipped_configs().items() if k.startswith(("sd15_", "sdxl_"))}
    expected = {"sd15_diffusion_dpo", "sdxl_diffusion_dpo", "sd15_mapo", "sd15_npo", "sdxl_npo", "sd15_kto",
                "sd15_tdpo", "sdxl_tdpo", "sd15_self_npo", "sdxl_self_npo"}
    assert expected <= set(recipes)
    for path in recipes.values():
        cfg = load_config(RunConfig, path)
        assert cfg.adapter in ("sd", "sd_self_npo") and get_loss(cfg.train.loss[0])
        config_class = load_object(ADAPTERS[cfg.adapter]).Config
        from_dict(config_class, cfg.model, path="model")  # every model key is one the adapter knows
    assert load_config(RunConfig, recipes["sdxl_npo"]).train.beta == 2000
    assert load_config(RunConfig, recipes["sd15_npo"]).train.learning_rate == 5e-6
