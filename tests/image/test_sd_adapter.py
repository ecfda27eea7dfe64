"""The SD1.5-type adapter on a tiny pipeline saved to disk: every loss trains through the real loop,
chosen/rejected/reference share noise and timestep, the saved LoRA loads into plain diffusers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from mm_align.image.diffusion_adapter import DiffusionModelConfig, StableDiffusionAdapter
from PIL import Image
from safetensors.torch import load_file

import mm_align.trainer as trainer_mod
from mm_align.cli import main
from mm_align.data import PreferencePair, UnpairedSample
from mm_align.lora import lora_disabled
from mm_align.reference_cache import sample_seed
from mm_align.run_config import TrainConfig
from mm_align.trainer import epoch_batches, train

from .tiny_pipeline import save_tiny_sd15, save_tiny_sdxl

LN2 = math.log(2)


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
                max_steps=3, batch_size=2, log_every=1, report_to=["none"], cache_dir=str(tmp_path / "c"),
                weight_decay=0.0)  # no decay: a LoRA A that moved was moved by its gradient
    return TrainConfig(**{**base, **kw})


def _first_batch_scores(adapter: StableDiffusionAdapter, records: list, cfg: TrainConfig):
    """The base model's scores on the trainer's first batch (its indices and per-sample seeds): the policy
    of step 1, since LoRA starts at B = 0."""
    idx = epoch_batches(len(records), 0, cfg.seed, cfg.batch_size, 1, 0)[0]
    batch = adapter.collate([records[i] for i in idx], [sample_seed(cfg.seed, i, 0) for i in idx])
    with torch.no_grad():
        return adapter.scores(batch, adapter.model)


def _mapo_by_hand(pw: torch.Tensor, pl: torch.Tensor, beta: float = 0.1, s: float = 0.5, T: int = 1000) -> float:
    """MaPO: f(z) = z / (e^z − 1), m = f(s·err_w) − f(s·err_l), loss = mean(err_w − β·logσ(T·m))."""
    pw, pl = pw.double(), pl.double()

    def f(z):
        return z / torch.expm1(z)

    m = f(s * pw) - f(s * pl)
    return float((pw - beta * F.logsigmoid(T * m)).mean())


@pytest.mark.parametrize("loss", ["diffusion_dpo", "npo", "mapo", "diffusion_kto"])
def test_each_loss_trains_lora_only(tmp_path, model_dir, image_dir, loss, monkeypatch):
    """Every LoRA tensor (A and B) moves, every base weight stays bitwise; step 1 is the hand-computed
    value at policy = reference: ln 2 (DPO, NPO), λ/2 = 0.5 (KTO), MaPO's formula on the base errors."""
    adapter = _adapter(model_dir)
    base = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    if loss == "diffusion_kto":
        records = [UnpairedSample(p.prompt, p.chosen, i % 2 == 0, id=p.id) for i, p in enumerate(_pairs(image_dir))]
    else:
        records = _pairs(image_dir)
    cfg = _cfg(tmp_path, loss)
    step1 = _first_batch_scores(adapter, records, cfg)
    init: dict[str, torch.Tensor] = {}
    real_add_lora = trainer_mod.add_lora

    def add_lora(model, *a, **k):  # the LoRA init, to tell what training changed
        out = real_add_lora(model, *a, **k)
        init.update({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
        return out

    monkeypatch.setattr(trainer_mod, "add_lora", add_lora)
    result = train(adapter, records, cfg)
    state = adapter.model.state_dict()
    lora = {k: v for k, v in state.items() if "lora_" in k}
    assert lora and init.keys() == lora.keys()
    assert any("lora_A" in k for k in lora) and any("lora_B" in k for k in lora)
    for k, v in lora.items():  # every LoRA parameter changed (B from zero, A from its init)
        assert not torch.equal(v, init[k]), k
        assert "lora_B" not in k or (init[k] == 0).all(), k
    for k, v in base.items():  # base weights unchanged
        key = k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(state.get(key, state.get(k)), v), k
    lines = [json.loads(x) for x in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and all(math.isfinite(x["loss"]) for x in lines)
    first = lines[0]
    if loss in ("diffusion_dpo", "npo"):
        assert first["loss"] == pytest.approx(LN2, abs=1e-6)  # policy = reference at step 0
        assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
        assert first["implicit_acc"] == 0.5  # every d = 0 is a tie, counted ½
        # the trainer's step-1 batch is the one recomputed here (same pairs, same noise and t)
        w, l = (step1.chosen, step1.rejected) if loss == "diffusion_dpo" else (step1.rejected, step1.chosen)
        assert first["err/policy_chosen"] == pytest.approx(float(w.mean()), rel=1e-5)
        assert first["err/policy_rejected"] == pytest.approx(float(l.mean()), rel=1e-5)
        assert first["err/ref_chosen"] == pytest.approx(first["err/policy_chosen"], rel=1e-6)
        last = lines[-1]  # after 2 updates the policy is no longer the reference
        assert last["err/policy_chosen"] != last["err/ref_chosen"] and last["rewards/margins"] != 0.0
    elif loss == "mapo":
        assert first["loss"] == pytest.approx(_mapo_by_hand(step1.chosen, step1.rejected), rel=1e-5)
        assert first["err/policy_chosen"] == pytest.approx(float(step1.chosen.mean()), rel=1e-5)
    else:  # diffusion_kto: z = 0 for every sample, so each loss is 1 − σ(0) = ½; z_ref = 0
        assert first["loss"] == pytest.approx(0.5, abs=1e-6) and first["kl"] == pytest.approx(0.0, abs=1e-7)
        assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
        assert lines[-1]["rewards/chosen"] != 0.0 or lines[-1]["rewards/rejected"] != 0.0


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
    assert b == 2 and policy_noise.shape[0] == 2 * b  # [2 chosen ; 2 rejected]
    assert torch.equal(policy_noise[:b], policy_noise[b:]) and torch.equal(policy_t[:b], policy_t[b:])
    assert torch.equal(policy_noise, ref_noise) and torch.equal(policy_t, ref_t)
    assert not torch.equal(policy_noise[0], policy_noise[1])  # different pairs get different draws
    assert ((0 <= policy_t) & (policy_t < adapter.scheduler.config.num_train_timesteps)).all()


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
        with lora_disabled(adapter.model):
            ours_base = adapter.model(x, t, **kw).sample
        theirs = pipe.unet(x, t, **kw).sample
        pipe.unet.disable_lora()
        base = pipe.unet(x, t, **kw).sample
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert (ours_base - base).abs().max().item() <= 1e-5  # the same base weights underneath
    # the LoRA really changed the output, by far more than the load error above
    assert (ours - base).abs().max().item() > 100 * max((ours - theirs).abs().max().item(), 1e-6)


def test_mm_align_train_cli_loads_the_model_dir(tmp_path, model_dir, image_dir, capsys):
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
    run = tmp_path / "run"
    assert f"trained 2 steps (0 skipped) on 1 process(es); output: {run}" in capsys.readouterr().out
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["adapter"] == "sd" and resolved["model"]["pretrained"] == str(model_dir)
    assert resolved["model"]["resolution"] == 16
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]
    assert lines[0]["loss"] == pytest.approx(LN2, abs=1e-6)  # β = 5000 default, policy = reference
    lora = load_file(str(run / "final" / "pytorch_lora_weights.safetensors"))
    up = [v for k, v in lora.items() if "lora.up" in k or "lora_B" in k]
    assert lora and all(k.startswith("unet.") for k in lora) and up and all(v.abs().max() > 0 for v in up)


def test_image_to_tensor_crop_and_sdxl_time_ids():
    """20×24 (h×w) image at 16 px: shorter side 20 → 16, so 24 → 19; centre crop left = (19 − 16) // 2 = 1.
    SDXL add_time_ids = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) = (20, 24, 0, 1, 16, 16)."""
    from mm_align.image.image_io import image_to_tensor

    pixels, ids = image_to_tensor(Image.new("RGB", (24, 20), (255, 0, 0)), 16)
    assert pixels.shape == (3, 16, 16) and ids == (20, 24, 0, 1, 16, 16)
    assert pixels[0].min().item() == pytest.approx(1.0) and pixels[1].max().item() == pytest.approx(-1.0)


# recipe -> (adapter, loss, β): the papers' values. Diffusion-DPO (Wallace et al. 2023) β 5000 on SD1.5 and SDXL,
# TDPO reuses it; Diffusion-NPO (Wang et al. 2025) β 500 on SD1.5, 2000 on SDXL; Diffusion-KTO (Li et al. 2024)
# β 1000; MaPO (Hong et al. 2024) β_m 0.1; Self-NPO trains its own distance through the sft slot, β unused.
RECIPES = {
    "sd15_diffusion_dpo": ("sd", "diffusion_dpo", 5000), "sdxl_diffusion_dpo": ("sd", "diffusion_dpo", 5000),
    "sd15_tdpo": ("sd", "diffusion_dpo", 5000), "sdxl_tdpo": ("sd", "diffusion_dpo", 5000),
    "sd15_npo": ("sd", "npo", 500), "sdxl_npo": ("sd", "npo", 2000),
    "sd15_kto": ("sd", "diffusion_kto", 1000), "sdxl_kto": ("sd", "diffusion_kto", 1000),
    "sd15_mapo": ("sd", "mapo", 0.1), "sdxl_mapo": ("sd", "mapo", 0.1),
    "sd15_self_npo": ("sd_self_npo", "sft", None), "sdxl_self_npo": ("sd_self_npo", "sft", None),
}


def test_shipped_image_recipes_validate():
    """Every shipped image recipe parses into a RunConfig with its paper's loss and β, on its backbone."""
    from mm_align.config import from_dict, load_config
    from mm_align.losses import get_loss
    from mm_align.recipes import ADAPTERS, load_object, shipped_configs
    from mm_align.run_config import RunConfig

    recipes = {k: v for k, v in shipped_configs().items() if k.startswith(("sd15_", "sdxl_"))}
    assert set(RECIPES) <= set(recipes)
    for name, path in recipes.items():
        cfg = load_config(RunConfig, path)
        assert cfg.adapter in ("sd", "sd_self_npo") and get_loss(cfg.train.loss[0])
        config_class = load_object(ADAPTERS[cfg.adapter]).Config
        model = from_dict(config_class, cfg.model, path="model")  # every model key is one the adapter knows
        if name in RECIPES:
            assert (cfg.adapter, cfg.train.loss, cfg.train.beta) == (RECIPES[name][0], [RECIPES[name][1]],
                                                                    RECIPES[name][2]), name
        xl = name.startswith("sdxl_")
        assert ("xl" in model.pretrained) == xl and model.resolution == (1024 if xl else 512), name
    assert load_config(RunConfig, recipes["sdxl_npo"]).train.beta == 2000
    assert load_config(RunConfig, recipes["sd15_npo"]).train.learning_rate == 5e-6
