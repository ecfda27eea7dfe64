"""Self-NPO on tiny SD1.5/SDXL-type pipelines: the guided DDIM rollout matches diffusers' DDIM, the
pseudo-Huber value is hand-checked, the EMA teacher follows its formula, resume is exact, and the
shipped recipe runs through `mm-align train`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mm_align.image.self_npo import SelfNPOAdapter, SelfNPOConfig, pseudo_huber
from PIL import Image

from mm_align.cli import main
from mm_align.data import UnpairedSample
from mm_align.lora import LoraSettings, add_lora
from mm_align.run_config import TrainConfig
from mm_align.trainer import train

from .tiny_pipeline import save_tiny_sd15, save_tiny_sdxl


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def model_dir(request, tmp_path_factory) -> Path:
    save = save_tiny_sd15 if request.param == "sd15" else save_tiny_sdxl
    return save(tmp_path_factory.mktemp(f"tiny_{request.param}"))


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[UnpairedSample]:
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(2)
    out = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / f"{i}.png")
        out.append(UnpairedSample(f"a red square {i}", str(d / f"{i}.png"), True, id=str(i)))
    return out


def _adapter(model_dir: Path, **kw) -> SelfNPOAdapter:
    return SelfNPOAdapter(SelfNPOConfig(pretrained=str(model_dir), resolution=16, **kw))


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = dict(output_dir=str(tmp_path / "run"), loss=["sft"], learning_rate=1e-3, lr_scheduler="constant",
                max_steps=4, batch_size=2, log_every=1, report_to=["none"], checkpointing_steps=2,
                checkpoints_total_limit=None)
    return TrainConfig(**{**base, **kw})


def test_pseudo_huber_hand_value():
    a, b = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.03)
    expected = math.sqrt(0.03**2 + 1e-6) - 1e-3  # = 0.0306226...
    torch.testing.assert_close(pseudo_huber(a, b, 1e-3), torch.full((2,), expected))
    assert pseudo_huber(a, a, 1e-3).abs().max() == 0  # zero at equality
    far = pseudo_huber(a, torch.full_like(a, 10.0), 1e-3)  # linear, not quadratic, far away
    torch.testing.assert_close(far, torch.full((2,), math.sqrt(100 + 1e-6) - 1e-3))


def test_teacher_rollout_matches_diffusers_ddim(model_dir):
    """With w = 1 (plain conditional) the rollout is diffusers' DDIM (η = 0) from the same start."""
    from diffusers import DDIMScheduler

    adapter = _adapter(model_dir, guidance_scale=1.0, rollout_steps=3, sampler_steps=10)
    unet = adapter.model.eval()
    g = torch.Generator().manual_seed(0)
    b = 2
    x = torch.randn(b, 4, 2, 2, generator=g)
    ids = adapter.tokenizer(["a cat", "a dog"], padding="max_length", max_length=16, return_tensors="pt").input_ids
    ids2 = None
    if adapter.is_sdxl:
        ids2 = adapter.tokenizer_2(["a cat", "a dog"], padding="max_length", max_length=16,
                                   return_tensors="pt").input_ids
    enc = adapter.encode_text(ids, ids2)
    time_ids = torch.tensor([[16, 16, 0, 0, 16, 16]] * b, dtype=torch.float32)
    start = torch.tensor([4, 4])
    x0 = adapter.teacher_rollout(unet, x, start, enc["_text"], enc["_text"], enc.get("_pooled"), enc.get("_pooled"),
                                 time_ids if adapter.is_sdxl else None)
    ddim = DDIMScheduler.from_config(adapter.scheduler.config)
    ddim.set_timesteps(10)
    y = x.clone()
    kw = {}
    if adapter.is_sdxl:
        kw["added_cond_kwargs"] = {"text_embeds": enc["_pooled"], "time_ids": time_ids}
    with torch.no_grad():
        for t in ddim.timesteps[4:7]:
            out = unet(y, t, encoder_hidden_states=enc["_text"], **kw).sample
            step = ddim.step(out, t, y, eta=0.0)
            y, ref_x0 = step.prev_sample, step.pred_original_sample
    torch.testing.assert_close(x0, ref_x0, atol=1e-5, rtol=1e-5)


def test_negative_guidance_changes_the_target(model_dir, records):
    pos, neg = _adapter(model_dir, guidance_scale=1.0), _adapter(model_dir)
    assert neg.guidance == (-5.0 if neg.is_sdxl else -1.0)  # the paper's defaults
    for a in (pos, neg):
        add_lora(a.model, LoraSettings(r=4), a.lora_target_modules)
    s_pos = pos.scores(pos.collate(records[:2], [1, 2]), pos.model)
    s_neg = neg.scores(neg.collate(records[:2], [1, 2]), neg.model)
    assert torch.isfinite(s_neg.chosen).all() and not torch.allclose(s_pos.chosen, s_neg.chosen)


def test_trains_updates_the_ema_teacher_and_resumes_exactly(tmp_path, model_dir, records):
    decay = 0.9
    adapter = _adapter(model_dir, ema_decay=decay, rollout_steps=2)
    result = train(adapter, records, _cfg(tmp_path / "straight"))
    lines = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and all(math.isfinite(x["loss"]) and x["loss"] > 0 for x in lines)
    state = {n: p.detach().clone() for n, p in adapter.model.named_parameters() if p.requires_grad}
    assert any("lora_B" in n and v.abs().sum() > 0 for n, v in state.items())
    ema = adapter.state_dict()
    assert {n for n in ema if not n.startswith("ema.")} == set(state)  # the shadow weights, plus EMAModel's counters
    assert ema["ema.optimization_step"].item() == 4 and ema["ema.decay"].item() == decay
    # the teacher lags the student: between its initial weights (LoRA B = 0) and the student's
    moved = [n for n in state if "lora_B" in n]
    assert all(0 < ema[n].abs().sum() < state[n].abs().sum() for n in moved)
    saved = (result.output_dir / "checkpoint-4" / "adapter_state.safetensors")
    assert saved.is_file()

    # 2 steps, stop, resume for 2 more: the same student and teacher
    first = _adapter(model_dir, ema_decay=decay, rollout_steps=2)
    train(first, records, _cfg(tmp_path / "resumed", max_steps=2))
    second = _adapter(model_dir, ema_decay=decay, rollout_steps=2)
    train(second, records, _cfg(tmp_path / "resumed", resume_from="latest"))
    for n, v in second.model.named_parameters():
        if v.requires_grad:
            torch.testing.assert_close(v.detach(), state[n], atol=1e-6, rtol=0)
    for n, v in second.state_dict().items():
        torch.testing.assert_close(v, ema[n], atol=1e-6, rtol=0)


def test_one_ema_step_follows_the_formula(model_dir):
    adapter = _adapter(model_dir, ema_decay=0.75)
    add_lora(adapter.model, LoraSettings(r=4), adapter.lora_target_modules)
    adapter._ensure_ema(adapter.model)
    before = {k: v.clone() for k, v in adapter.state_dict().items() if not k.startswith("ema.")}
    with torch.no_grad():
        for p in adapter.model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    adapter.after_optimizer_step(adapter.model)
    params = dict(adapter.model.named_parameters())
    after = {k: v for k, v in adapter.state_dict().items() if not k.startswith("ema.")}
    assert set(after) == set(before)
    for n, v in after.items():
        torch.testing.assert_close(v, 0.75 * before[n] + 0.25 * params[n].detach())


def test_the_teacher_is_diffusers_ema_model_at_a_constant_rate_and_its_state_round_trips(model_dir):
    from diffusers.training_utils import EMAModel

    adapter = _adapter(model_dir, ema_decay=0.5)
    add_lora(adapter.model, LoraSettings(r=4), adapter.lora_target_modules)
    assert isinstance(adapter._ensure_ema(adapter.model), EMAModel)
    params = {n: p for n, p in adapter.model.named_parameters() if p.requires_grad}
    expected = {n: p.detach().clone() for n, p in params.items()}
    for step in range(3):  # the rate is 0.5 from the first step (no EMAModel warm-up, no first-step copy)
        with torch.no_grad():
            for p in params.values():
                p.add_(1.0 + step)
        adapter.after_optimizer_step(adapter.model)
        expected = {n: 0.5 * expected[n] + 0.5 * params[n].detach() for n in params}
    state = adapter.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # safetensors-ready
    assert state["ema.optimization_step"].item() == 3 and state["ema.decay"].item() == 0.5
    for n in params:
        torch.testing.assert_close(state[n], expected[n])

    # a fresh adapter restores it (applied once the model is known) and takes the same next step
    other = _adapter(model_dir, ema_decay=0.5)
    add_lora(other.model, LoraSettings(r=4), other.lora_target_modules)
    other.model.load_state_dict(adapter.model.state_dict())
    other.load_state_dict(state)
    assert other.state_dict().keys() == state.keys()
    for a in (adapter, other):
        a.after_optimizer_step(a.model)
    for k, v in adapter.state_dict().items():
        torch.testing.assert_close(other.state_dict()[k], v, atol=0, rtol=0)

    wrong = _adapter(model_dir, ema_decay=0.9)
    add_lora(wrong.model, LoraSettings(r=4), wrong.lora_target_modules)
    wrong.load_state_dict(state)
    with pytest.raises(ValueError, match="ema_decay 0.5, this run 0.9"):
        wrong.after_optimizer_step(wrong.model)


def test_shipped_recipe_runs_through_the_cli(tmp_path, model_dir, records):
    rows = [{"caption": r.prompt, "image": r.completion} for r in records]
    data = tmp_path / "captions.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = "sdxl_self_npo" if (model_dir / "text_encoder_2").is_dir() else "sd15_self_npo"
    code = main(["train", "--config", recipe, f"model.pretrained={model_dir}", "model.resolution=16",
                 "model.gradient_checkpointing=false", f"data.train={data}", f"train.output_dir={tmp_path / 'out'}",
                 "train.max_steps=2", "train.batch_size=2", "train.mixed_precision=no", "train.report_to=[none]"])
    assert code == 0
    assert (tmp_path / "out" / "final" / "pytorch_lora_weights.safetensors").is_file()
