"""The flow-matching adapter on tiny SD3-type and FLUX-type pipelines saved to disk: every diffusion loss trains
through the real loop on velocity errors, chosen/rejected/reference share (σ, ε), the text conditioning is the
pipelines' own, precomputed latents give the live numbers, and the CLI trains from a config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mm_align.image import flow_adapter as flow_adapter_mod
from mm_align.image.flow_adapter import FlowMatchingAdapter, FlowModelConfig, FluxAdapter, SD3Adapter
from PIL import Image

import mm_align.trainer as trainer_mod
from mm_align.cli import main
from mm_align.data import PreferencePair, UnpairedSample
from mm_align.reference_cache import sample_seed
from mm_align.run_config import TrainConfig
from mm_align.trainer import epoch_batches, train

from .tiny_flow_pipelines import save_tiny_flux, save_tiny_sd3
from .tiny_pipeline import save_tiny_sd15

LN2 = math.log(2)
SEQ = 8  # T5 tokens per prompt in these tests (the pipelines' defaults are 256 / 512)


@pytest.fixture(scope="module", params=["sd3", "flux"])
def model_dir(request, tmp_path_factory) -> Path:
    save = save_tiny_sd3 if request.param == "sd3" else save_tiny_flux
    return save(tmp_path_factory.mktemp(f"tiny_{request.param}") / "model")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return d


def _pairs(image_dir: Path, **meta) -> list[PreferencePair]:
    return [PreferencePair(f"a red circle {i}", str(image_dir / f"{i}.png"), str(image_dir / f"{(i + 1) % 8}.png"),
                           id=str(i), meta={k: v(i) for k, v in meta.items()}) for i in range(8)]


def _text_pairs(image_dir: Path) -> list[PreferencePair]:
    colours = ["red", "green", "blue", "yellow"]
    return [PreferencePair(f"a {colours[i % 4]} circle", str(image_dir / f"{i}.png"), str(image_dir / f"{i}.png"),
                           id=str(i), meta={"rejected_prompt": f"a {colours[(i + 1) % 4]} circle"}) for i in range(8)]


def _adapter(model_dir: Path, **kw) -> FlowMatchingAdapter:
    return FlowMatchingAdapter(FlowModelConfig(**{"pretrained": str(model_dir), "resolution": 16,
                                                  "max_sequence_length": SEQ, **kw}))


def _cfg(tmp_path: Path, loss: str, **kw) -> TrainConfig:
    base = dict(output_dir=str(tmp_path / loss), loss=[loss], learning_rate=1e-3, lr_scheduler="constant",
                max_steps=3, batch_size=2, log_every=1, report_to=["none"], cache_dir=str(tmp_path / "c"),
                weight_decay=0.0, beta=500.0)
    return TrainConfig(**{**base, **kw})


def _metrics(result) -> list[dict]:
    return [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]


def _records(loss: str, image_dir: Path) -> list:
    if loss == "diffusion_kto":
        return [UnpairedSample(p.prompt, p.chosen, i % 2 == 0, id=p.id) for i, p in enumerate(_pairs(image_dir))]
    if loss == "smpo":
        return _pairs(image_dir, reward_chosen=lambda i: 2.0 + i, reward_rejected=lambda i: 1.0 + i / 2)
    if loss == "tdpo":
        return _text_pairs(image_dir)
    return _pairs(image_dir)


@pytest.mark.parametrize("loss", ["diffusion_dpo", "npo", "smpo", "tdpo", "mapo", "diffusion_kto"])
def test_each_loss_trains_lora_only(tmp_path, model_dir, image_dir, loss, monkeypatch):
    """Every LoRA tensor moves, every base weight stays bitwise; step 1 is the hand value at policy = reference:
    ln 2 (Flow-DPO, NPO, SmPO, TDPO), λ/2 = 0.5 (KTO); MaPO's err_w at step 1 is the base's velocity error."""
    adapter = _adapter(model_dir)
    base = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    records = _records(loss, image_dir)
    cfg = _cfg(tmp_path, "diffusion_dpo" if loss == "tdpo" else loss)
    init: dict[str, torch.Tensor] = {}
    real_add_lora = trainer_mod.add_lora

    def add_lora(model, *a, **k):
        out = real_add_lora(model, *a, **k)
        init.update({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
        return out

    monkeypatch.setattr(trainer_mod, "add_lora", add_lora)
    if loss == "mapo":  # the base's scores on the trainer's first batch (LoRA B = 0: the step-1 policy)
        adapter.prepare(records)
        idx = epoch_batches(len(records), 0, cfg.seed, cfg.batch_size, 1, 0)[0]
        batch = adapter.collate([records[i] for i in idx], [sample_seed(cfg.seed, i, 0) for i in idx])
        with torch.no_grad():
            step1 = adapter.scores(batch, adapter.model)
    result = train(adapter, records, cfg)
    state = adapter.model.state_dict()
    lora = {k: v for k, v in state.items() if "lora_" in k}
    assert lora and init.keys() == lora.keys()
    assert any(".add_q_proj." in k for k in lora) and any(".to_q." in k for k in lora)  # joint attention too
    # SD3's last joint block is context_pre_only: its context-stream output is dropped, so the context QUERY
    # (add_q_proj) reaches no output and gets no gradient (its keys and values still feed the image tokens)
    last = f"transformer_blocks.{adapter.model.config.num_layers - 1}.attn.add_q_proj."
    dead = {k for k in lora if adapter.family == "sd3" and k.startswith(last)}
    assert len(dead) == (2 if adapter.family == "sd3" else 0)
    for k, v in lora.items():
        assert torch.equal(v, init[k]) if k in dead else not torch.equal(v, init[k]), k
    for k, v in base.items():
        key = k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state.get(key, state.get(k)), v), k
    lines = _metrics(result)
    assert [x["step"] for x in lines] == [1, 2, 3] and all(math.isfinite(x["loss"]) for x in lines)
    first, last = lines[0], lines[-1]
    if loss in ("diffusion_dpo", "npo", "smpo", "tdpo"):
        assert first["loss"] == pytest.approx(LN2, abs=1e-6)
        assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
        assert first["err/ref_chosen"] == pytest.approx(first["err/policy_chosen"], rel=1e-6)
        assert last["err/policy_chosen"] != last["err/ref_chosen"] and last["rewards/margins"] != 0.0
    elif loss == "mapo":
        assert first["err/policy_chosen"] == pytest.approx(float(step1.chosen.mean()), rel=1e-5)
        assert first["err/policy_rejected"] == pytest.approx(float(step1.rejected.mean()), rel=1e-5)
    else:
        assert first["loss"] == pytest.approx(0.5, abs=1e-6) and first["kl"] == pytest.approx(0.0, abs=1e-7)


def test_chosen_rejected_and_reference_share_sigma_and_noise(tmp_path, model_dir, image_dir, monkeypatch):
    adapter = _adapter(model_dir)
    calls = []
    real = flow_adapter_mod.noisy_latents

    def spy(x0, noise, sigma):
        calls.append((noise.clone(), sigma.clone(), torch.is_grad_enabled()))
        return real(x0, noise, sigma)

    monkeypatch.setattr(flow_adapter_mod, "noisy_latents", spy)
    train(adapter, _pairs(image_dir), _cfg(tmp_path, "diffusion_dpo", max_steps=1))
    (ref_noise, ref_sigma, ref_grad), (noise, sigma, grad) = calls
    assert grad and not ref_grad  # the no-grad reference pass first, then the policy
    assert noise.shape[0] == sigma.shape[0] == 4  # [2 chosen ; 2 rejected]
    assert torch.equal(noise[:2], noise[2:]) and torch.equal(sigma[:2], sigma[2:])
    assert torch.equal(noise, ref_noise) and torch.equal(sigma, ref_sigma)
    assert not torch.equal(noise[0], noise[1]) and sigma[0] != sigma[1]
    assert ((0 < sigma) & (sigma < 1)).all()


def test_transformer_sees_the_flow_input_and_timestep(model_dir, image_dir):
    """x_t = (1 − σ)x_0 + σε goes in (FLUX: 2×2-packed), timestep = σ·1000 (SD3) or σ (FLUX, ×1000 inside),
    FLUX's guidance embedding gets model.guidance; the score is the mean squared velocity error."""
    adapter = _adapter(model_dir)
    batch = adapter.collate(_pairs(image_dir)[:2], [5, 6])
    adapter._encode(batch)
    seen = {}
    original = adapter.model.forward

    def spy(**kw):
        seen.update(kw)
        out = original(**kw)
        seen["out"] = out[0].detach().clone()
        return out

    adapter.model.forward = spy
    scores = adapter.scores(batch, adapter.model)
    x0, eps, sigma = batch["_latents"], batch["noise"].repeat(2, 1, 1, 1), batch["sigmas"].repeat(2)
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * eps
    if adapter.family == "sd3":
        assert torch.allclose(seen["hidden_states"], x_t) and torch.allclose(seen["timestep"], sigma * 1000)
        pred = seen["out"]
    else:
        from diffusers import FluxPipeline

        assert seen["hidden_states"].shape == (4, 16, 64)  # 8×8×16 latents packed into 4×4 tokens of 2·2·16
        assert torch.allclose(seen["hidden_states"], FluxPipeline._pack_latents(x_t, 4, 16, 8, 8))
        assert torch.allclose(seen["timestep"], sigma) and seen["guidance"].tolist() == [3.5] * 4
        assert seen["img_ids"].shape == (16, 3) and seen["txt_ids"].shape == (SEQ, 3)
        pred = FluxPipeline._unpack_latents(seen["out"], 16, 16, 2)
    err = ((pred - (eps - x0)) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(torch.cat([scores.chosen, scores.rejected]), err, rtol=1e-5)
    shift = adapter.vae.config.shift_factor
    assert shift and adapter.vae.config.scaling_factor != 1.0  # the families' VAE factors are applied
    mean, std = adapter.encode_images(batch["pixels"])
    assert torch.allclose(x0, (mean + std * batch["vae_noise"] - shift) * adapter.vae.config.scaling_factor)


def test_text_conditioning_is_the_pipelines_own(model_dir):
    from diffusers import DiffusionPipeline

    adapter = _adapter(model_dir)
    prompts = ["a red circle", "a blue square on a green background"]
    ours = adapter.encode_prompts(prompts, "cpu")
    pipe = DiffusionPipeline.from_pretrained(str(model_dir))
    with torch.no_grad():
        if adapter.family == "sd3":
            text, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                    max_sequence_length=SEQ)
        else:
            text, pooled, _ = pipe.encode_prompt(prompts, None, max_sequence_length=SEQ)
    assert ours["_text"].shape == text.shape and ours["_pooled"].shape == pooled.shape
    assert torch.equal(ours["_text"], text) and torch.equal(ours["_pooled"], pooled)


def test_sd3_without_t5_conditions_on_zeros(tmp_path):
    from diffusers import DiffusionPipeline

    model_dir = save_tiny_sd3(tmp_path / "no_t5", with_t5=False)
    adapter = _adapter(model_dir)
    assert adapter.text_encoder_3 is None and "input_ids_3" not in adapter.tokenize(["a"])
    ours = adapter.encode_prompts(["a red circle"], "cpu")
    pipe = DiffusionPipeline.from_pretrained(str(model_dir), text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        text, _, pooled, _ = pipe.encode_prompt("a red circle", None, None, do_classifier_free_guidance=False,
                                                max_sequence_length=SEQ)
    assert torch.equal(ours["_text"], text) and torch.equal(ours["_pooled"], pooled)
    assert (ours["_text"][:, 16:] == 0).all()  # the T5 block is zeros


def test_tdpo_shares_image_latent_sigma_and_noise_but_not_the_caption(model_dir, image_dir):
    adapter = _adapter(model_dir)
    batch = adapter.collate(_text_pairs(image_dir)[:3], [11, 12, 13])
    assert batch["input_ids"].shape[0] == 6 and not torch.equal(batch["input_ids"][:3], batch["input_ids"][3:])
    adapter._encode(batch)
    assert torch.equal(batch["_latents"][:3], batch["_latents"][3:]) and batch["_text"].shape[0] == 6
    scores = adapter.scores(batch, adapter.model)
    assert not torch.allclose(scores.chosen, scores.rejected)  # only the caption differs


def test_precomputed_latents_give_the_live_scores(tmp_path, model_dir, image_dir):
    records = _pairs(image_dir)[:4]
    live = _adapter(model_dir)
    cached = _adapter(model_dir, precompute=True, precompute_dir=str(tmp_path / "lat"))
    cached.prepare(records)
    assert cached.latent_cache is not None
    a, b = live.collate(records, [1, 2, 3, 4]), cached.collate(records, [1, 2, 3, 4])
    assert "pixels" not in b and "_pooled" in b and "time_ids" not in b
    with torch.no_grad():
        sa, sb = live.scores(a, live.model), cached.scores(b, cached.model)
    assert torch.allclose(sa.chosen, sb.chosen, rtol=1e-5) and torch.allclose(sa.rejected, sb.rejected, rtol=1e-5)


def test_guidance_value_and_family_errors(tmp_path, model_dir, image_dir):
    if "sd3" in str(model_dir):
        with pytest.raises(ValueError, match="no guidance embedding"):
            _adapter(model_dir, guidance=4.0)
        with pytest.raises(ValueError, match="SD3-type pipeline but the adapter is 'flux': use adapter 'sd3'"):
            FluxAdapter(FlowModelConfig(pretrained=str(model_dir), resolution=16))
        return
    with pytest.raises(ValueError, match="FLUX-type pipeline but the adapter is 'sd3': use adapter 'flux'"):
        SD3Adapter(FlowModelConfig(pretrained=str(model_dir), resolution=16))
    batch = _adapter(model_dir).collate(_pairs(image_dir)[:2], [1, 2])
    with torch.no_grad():
        default = _adapter(model_dir).scores(dict(batch), _adapter(model_dir).model)
        strong_adapter = _adapter(model_dir, guidance=7.0)
        strong = strong_adapter.scores(dict(batch), strong_adapter.model)
    assert strong_adapter.guidance == 7.0 and not torch.allclose(default.chosen, strong.chosen)
    # the reference-cache key follows every scoring setting: guidance and the σ density
    from mm_align.image.flow_matching import FlowMatchingConfig

    base_key = _adapter(model_dir).fingerprint()
    assert base_key == _adapter(model_dir).fingerprint() != strong_adapter.fingerprint()
    assert _adapter(model_dir, flow=FlowMatchingConfig(logit_mean=0.5)).fingerprint() != base_key


def test_a_unet_pipeline_is_refused_naming_the_file(tmp_path):
    sd15 = save_tiny_sd15(tmp_path / "sd15")
    with pytest.raises(ValueError, match=r"model_index.json: transformer is absent .*adapter 'sd'"):
        _adapter(sd15)


def test_mm_align_train_cli_with_the_registered_name(tmp_path, model_dir, image_dir, capsys):
    family = "sd3" if "sd3" in str(model_dir) else "flux"
    rows = [{"prompt": p.prompt, "chosen": Path(p.chosen).name, "rejected": Path(p.rejected).name}
            for p in _pairs(image_dir)]
    data = image_dir / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"adapter": family, "model": {"pretrained": str(model_dir), "resolution": 16, "max_sequence_length": SEQ,
                                        "flow": {"weighting_scheme": "mode"}, "gradient_checkpointing": True},
           "data": {"train": str(data)},
           "train": {"output_dir": str(tmp_path / "run"), "loss": ["diffusion_dpo"], "max_steps": 2, "batch_size": 2,
                     "beta": 500, "report_to": ["none"], "log_every": 1}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(tmp_path / "cfg.yaml")]) == 0
    run = tmp_path / "run"
    assert "trained 2 steps" in capsys.readouterr().out
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["adapter"] == family and resolved["model"]["flow"]["weighting_scheme"] == "mode"
    assert _metrics(type("R", (), {"output_dir": run})())[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()


# recipe -> (adapter, loss, β, pretrained); β as documented in each file (flow β is not the UNet's 5000)
FLOW_RECIPES = {
    "sd3_diffusion_dpo": ("sd3", "diffusion_dpo", 100, "stabilityai/stable-diffusion-3.5-medium"),
    "sd3_tdpo": ("sd3", "diffusion_dpo", 100, "stabilityai/stable-diffusion-3.5-medium"),
    "sd3_mapo": ("sd3", "mapo", 0.1, "stabilityai/stable-diffusion-3.5-medium"),
    "flux_diffusion_dpo": ("flux", "diffusion_dpo", 2000, "black-forest-labs/FLUX.1-dev"),
}


def test_shipped_flow_recipes_validate():
    """Every shipped sd3_/flux_ recipe parses into a RunConfig whose model section the flow config accepts."""
    from mm_align.config import from_dict, load_config
    from mm_align.losses import get_loss
    from mm_align.recipes import ADAPTERS, load_object, shipped_configs
    from mm_align.run_config import RunConfig

    recipes = {k: v for k, v in shipped_configs().items() if k.startswith(("sd3_", "flux_"))}
    assert set(FLOW_RECIPES) <= set(recipes)
    for name, path in recipes.items():
        cfg = load_config(RunConfig, path)
        assert get_loss(cfg.train.loss[0]) and load_object(ADAPTERS[cfg.adapter]).Config is FlowModelConfig
        model = from_dict(FlowModelConfig, cfg.model, path="model")
        if name in FLOW_RECIPES:
            adapter, loss, beta, pretrained = FLOW_RECIPES[name]
            assert (cfg.adapter, cfg.train.loss, cfg.train.beta, model.pretrained) == (adapter, [loss], beta,
                                                                                      pretrained), name
        assert model.resolution == 1024 and model.flow.weighting_scheme == "logit_normal", name
