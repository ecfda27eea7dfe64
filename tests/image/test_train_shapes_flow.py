"""The flow shapes model's training script (``train_shapes_flow``) at a few steps: deterministic, the shipped
VAE and tokenizer reused, training prompts only, the flow form of :mod:`mm_align.image.flow_matching`, and
the saved pipeline loads in plain diffusers, samples through mm-align and trains through the SD3 adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mm_align.image.toyworld import shapes_flow
from mm_align.image.toyworld import train_shapes_flow as script
from mm_align.image.toyworld.shapes import shapes_sd_dir, split_specs
from safetensors.torch import load_file

STEPS, BATCH = 2, 4


def _tiny(**kw) -> script.ShapesFlowConfig:
    return script.ShapesFlowConfig(**{"steps": STEPS, "batch": BATCH, "eval_prompts": 0, **kw})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """The same tiny run twice: once through the command line, once through ``train`` (with a small evaluation)."""
    root = tmp_path_factory.mktemp("shapes_flow")
    a = root / "a"
    assert script.main(["--out", str(a), "--steps", str(STEPS), "--batch", str(BATCH), "--eval-prompts", "0",
                        "--threads", "1"]) == 0
    b = root / "b"
    script.train(b, _tiny(eval_prompts=2, eval_steps=2), log=lambda _: None)
    return a, b


def test_two_runs_write_identical_weights(runs):
    a, b = runs
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert {f.parts[0] for f in files} == {"transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"}
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.safetensors"))
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    summary = json.loads((a / "training_summary.json").read_text())
    assert summary["config"]["steps"] == STEPS and summary["megabytes"] <= 20
    assert summary["command"].startswith("python -m mm_align.image.toyworld.train_shapes_flow --out")
    assert math.isfinite(summary["final_loss"]) and "oracle" not in summary  # --eval-prompts 0


def test_a_snapshot_equals_the_shorter_run(runs, tmp_path):
    a, _ = runs
    script.train(tmp_path / "long", _tiny(steps=STEPS + 1, snapshot_every=STEPS), log=lambda _: None)
    snapshot = tmp_path / f"long-step{STEPS}"
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert files == sorted(p.relative_to(snapshot) for p in snapshot.rglob("*.safetensors"))
    assert all((a / f).read_bytes() == (snapshot / f).read_bytes() for f in files)
    transformer = Path("transformer") / "diffusion_pytorch_model.safetensors"
    assert (tmp_path / "long" / transformer).read_bytes() != (a / transformer).read_bytes()


def test_the_shipped_vae_and_tokenizer_are_reused_with_sd3_factors(runs):
    """The VAE's weights are the shapes-sd VAE's, bitwise; its factors are recalibrated (shift_factor numeric:
    SD3 decodes latents / scaling + shift); the CLIP tokenizer is the shipped one."""
    from transformers import AutoTokenizer

    a, _ = runs
    ours = load_file(str(a / "vae" / "diffusion_pytorch_model.safetensors"))
    shipped = load_file(str(shapes_sd_dir() / "vae" / "diffusion_pytorch_model.safetensors"))
    assert ours.keys() == shipped.keys() and all(torch.equal(ours[k], shipped[k]) for k in ours)
    config = json.loads((a / "vae" / "config.json").read_text())
    summary = json.loads((a / "training_summary.json").read_text())
    assert isinstance(config["shift_factor"], float) and config["shift_factor"] == summary["vae"]["shift_factor"]
    assert config["scaling_factor"] == summary["vae"]["scaling_factor"] > 0
    prompt = split_specs("train")[0].prompt
    for sub in ("tokenizer", "tokenizer_2"):
        tok = AutoTokenizer.from_pretrained(str(a / sub))
        assert tok(prompt).input_ids == AutoTokenizer.from_pretrained(str(shapes_sd_dir() / "tokenizer"))(
            prompt).input_ids
    assert json.loads((a / "scheduler" / "scheduler_config.json").read_text())["shift"] == 1.0


def test_trains_on_training_prompts_only_with_the_shared_flow_functions(tmp_path, monkeypatch):
    """Every render of a training run is of a TRAIN prompt; x_t and the loss come from flow_matching's functions."""
    train_prompts = {s.prompt for s in split_specs("train")}
    rendered, calls = [], {"noisy_latents": 0, "flow_error": 0, "draw_flow_sample": 0}
    real_render = script.render

    def spy_render(spec, size, seed):
        rendered.append(spec.prompt)
        return real_render(spec, size, seed)

    def counting(name):
        real = getattr(script, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(script, "render", spy_render)
    for name in calls:
        monkeypatch.setattr(script, name, counting(name))
    script.train(tmp_path / "m", _tiny(vae_calibration_images=8), log=lambda _: None)
    assert len(rendered) == 8 + STEPS * BATCH and set(rendered) <= train_prompts
    assert calls == {"noisy_latents": STEPS, "flow_error": STEPS, "draw_flow_sample": STEPS * BATCH}


def test_plain_diffusers_loads_it_and_conditions_as_training_did(runs):
    from diffusers import StableDiffusion3Pipeline

    a, _ = runs
    pipe = StableDiffusion3Pipeline.from_pretrained(str(a))  # no text_encoder_3=None needed: it ships a T5
    assert pipe.transformer.config.in_channels == pipe.vae.config.latent_channels == 4
    prompts = [split_specs("train")[0].prompt, ""]
    models = {"tokenizer": pipe.tokenizer, "tokenizer_3": pipe.tokenizer_3, "text_encoder": pipe.text_encoder,
              "text_encoder_2": pipe.text_encoder_2, "text_encoder_3": pipe.text_encoder_3}
    with torch.no_grad():
        text, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
        ours_text, ours_pooled = script.encode_prompt(models, script.tokenize(models, prompts))
    assert text.shape == (2, 16 + script.T5_TOKENS, 64)
    assert torch.allclose(ours_text, text, atol=1e-6) and torch.allclose(ours_pooled, pooled, atol=1e-6)


def test_samples_through_mm_align_seeded_per_image(runs):
    from mm_align.image.sampling import SamplerConfig, load_pipeline, sample_images

    a, b = runs
    cfg = SamplerConfig(steps=2, guidance_scale=5.0, batch_size=2, device="cpu")
    pipe = load_pipeline(str(a), cfg=cfg)
    prompt = split_specs("heldout")[0].prompt
    images = sample_images(pipe, [prompt, prompt, prompt], [1, 2, 1], cfg)
    assert [im.size for im in images] == [(32, 32)] * 3
    assert images[0].tobytes() == images[2].tobytes() != images[1].tobytes()
    oracle = json.loads((b / "training_summary.json").read_text())["oracle"]
    for split in ("heldout", "train", "vae_roundtrip_heldout"):
        assert oracle[split]["prompts"] == 2 and 0 <= oracle[split]["oracle_accuracy"] <= 1, split


def test_dpo_trains_through_the_sd3_adapter(runs, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from mm_align.image.flow_adapter import FlowModelConfig, SD3Adapter
    from mm_align.image.toyworld.shapes import ShapeSpec, render

    from mm_align.data import PreferencePair
    from mm_align.run_config import TrainConfig
    from mm_align.trainer import train

    a, _ = runs
    pairs = []
    for i, s in enumerate(split_specs("train")[:4]):
        wrong = ShapeSpec("green" if s.colour != "green" else "red", s.shape, s.background)
        chosen, rejected = tmp_path / f"{i}c.png", tmp_path / f"{i}r.png"
        render(s, 32, i).save(chosen)
        render(wrong, 32, i).save(rejected)
        pairs.append(PreferencePair(s.prompt, str(chosen), str(rejected), id=str(i)))
    adapter = SD3Adapter(FlowModelConfig(pretrained=str(a), resolution=32))
    base = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), loss=["diffusion_dpo"], learning_rate=1e-3,
                      lr_scheduler="constant", max_steps=2, batch_size=2, log_every=1, report_to=["none"],
                      cache_dir=str(tmp_path / "cache"), beta=100.0)
    result = train(adapter, pairs, cfg)
    lines = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and math.isfinite(lines[-1]["loss"])
    assert lines[-1]["rewards/margins"] != 0.0  # the LoRA moved the policy off the reference
    state = adapter.model.state_dict()
    for k, v in base.items():  # the base transformer is untouched
        key = k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state.get(key, state.get(k)), v), k
    pipe = StableDiffusion3Pipeline.from_pretrained(str(a))
    pipe.load_lora_weights(str(result.output_dir / "final"))  # plain diffusers reads the LoRA
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())


def test_shapes_flow_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(shapes_flow, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="python -m mm_align.image.toyworld.train_shapes_flow"):
        shapes_flow.shapes_flow_dir()
    assert shapes_flow.resolve_flow_model("some/hub-id") == "some/hub-id"
    (tmp_path / "shapes-flow").mkdir()
    (tmp_path / "shapes-flow" / "model_index.json").write_text("{}")
    assert shapes_flow.shapes_flow_dir() == tmp_path / "shapes-flow"
    assert shapes_flow.resolve_flow_model("shapes-flow") == str(tmp_path / "shapes-flow")
