"""The shipped shapes-world weights and the shapes quickstart (a shrunken run of every stage)."""

from __future__ import annotations

import html
import json
import math
import random

import numpy as np
import pandas as pd
import pytest
import yaml
from mm_align.image.evaluators import build_evaluator, parse_evaluator_arg
from mm_align.image.quickstart import ShapesQuickstart, run_shapes_quickstart, shapes_scorer_spec
from mm_align.image.toyworld.shapes import (
    WEIGHTS_DIR,
    render,
    shapes_clip_dir,
    shapes_sd_dir,
    split_specs,
)
from mm_align.image.toyworld.train_shapes_clip import hard_negative
from safetensors import safe_open
from safetensors.torch import load_file


def test_shipped_weights_fit_the_budget_and_are_safetensors():
    files = [f for f in WEIGHTS_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 30 * 2**20
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(f.suffix == ".safetensors" for f in weights)
    for f in weights:  # real safetensors files (a header that parses, tensors inside), not LFS pointers
        with safe_open(str(f), framework="pt") as st:
            assert len(st.keys()) > 0, f
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (shapes_sd_dir() / part).is_dir()
    for part in ("unet", "vae", "text_encoder"):
        assert (shapes_sd_dir() / part / "config.json").is_file()
    assert json.loads((shapes_sd_dir() / "model_index.json").read_text())["_class_name"]
    assert (shapes_clip_dir() / "open_clip_config.json").is_file()


def test_learned_scorer_binds_attributes_on_heldout_renders():
    """The shipped scorer prefers the true caption over a one-attribute change on prompts it never saw.

    Measured: 42 of 48 (0.875), mean score margin 0.27."""
    scorer = build_evaluator({k: v for k, v in parse_evaluator_arg(shapes_scorer_spec()).items()})
    rng = random.Random(0)
    specs = split_specs("heldout")[:48]
    images = [render(s, 32, seed=i) for i, s in enumerate(specs)]
    negatives = [hard_negative(s, rng).prompt for s in specs]
    assert all(n != s.prompt for n, s in zip(negatives, specs))
    true = scorer.score(images, [s.prompt for s in specs])
    false = scorer.score(images, negatives)
    assert np.mean(true > false) >= 0.8
    assert np.mean(true - false) >= 0.15


def _inside(value: float, interval: list[float]) -> bool:
    return interval[0] - 1e-12 <= value <= interval[1] + 1e-12


def test_shapes_quickstart_runs_every_stage(tmp_path):
    """generate → train → bench on 6 training and 4 held-out prompts: each stage's output holds what the
    stage reported, the trained LoRA is non-zero and changes the bench's images, and the bench's numbers
    are consistent (means of their per-prompt scores, intervals containing their point estimates)."""
    cfg = ShapesQuickstart(samples_per_prompt=2, train_prompts=6, heldout_prompts=4, steps=3, sampler_steps=3,
                           batch_size=2, margin=0.0)
    logs: list[str] = []
    report = run_shapes_quickstart(tmp_path, cfg=cfg, log=lambda *a: logs.append(" ".join(map(str, a))))
    assert report == tmp_path / "bench" / "report.html" and report.is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["timings"]) == {"generate_s", "train_s", "bench_s"}

    # [1/3] generate: 6 prompts × 2 samples; one best-vs-worst pair per prompt (margin 0, no ties)
    train_prompts = [s.prompt for s in split_specs("train")[:6]]
    samples = [json.loads(x) for x in (tmp_path / "generate" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 12 and sorted({s["prompt"] for s in samples}) == sorted(train_prompts)
    pairs = pd.read_parquet(tmp_path / "generate" / "pairs.parquet")
    assert any(f"12 images, {len(pairs)} pairs kept" in line for line in logs), logs
    assert summary["pairs"] == len(pairs) == json.loads((tmp_path / "generate" / "summary.json").read_text())["pairs"]
    assert len(pairs) == 6 and sorted(pairs["caption"]) == sorted(train_prompts)
    assert summary["discarded"] == {} and all(pairs["label_0"] + pairs["label_1"] == 1.0)
    by_prompt = {}
    for s in samples:
        by_prompt.setdefault(s["prompt"], []).append(s["scores"]["learned_clip"])
    assert all(len(set(v)) == 2 for v in by_prompt.values())  # no tied pair was possible

    # [2/3] train: 3 Diffusion-DPO steps on those pairs, a non-zero LoRA in diffusers' format
    run = tmp_path / "dpo"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["max_steps"] == 3 and resolved["train"]["batch_size"] == 2
    assert resolved["train"]["loss"] == ["diffusion_dpo"] and resolved["model"]["pretrained"] == str(shapes_sd_dir())
    assert resolved["data"]["train"] == str(tmp_path / "generate" / "pairs.parquet")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3 and math.isfinite(rows[-1]["loss"])
    assert rows[-1]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # 3 warm-up steps: tiny lr
    lora = load_file(str(run / "final" / "pytorch_lora_weights.safetensors"))
    up = {k: v for k, v in lora.items() if "lora.up" in k or "lora_B" in k}
    assert lora and all(k.startswith("unet.") for k in lora) and len(up) == len(lora) // 2
    assert all(v.abs().max() > 0 for v in up.values())  # every B/up matrix moved off its zero init

    # [3/3] bench: both variants on the 4 held-out prompts, the same seeds
    heldout = [s.prompt for s in split_specs("heldout")[:4]]
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert summary["variants"] == results["variants"] and results["prompts"] == 4
    assert set(results["variants"]) == {"base", "diffusion_dpo"}
    assert results["evaluators"] == ["shapes_oracle_attributes", "shapes_oracle", "learned_clip"]
    assert results["variants"]["diffusion_dpo"]["path"] == str(run / "final")
    for name, v in results["variants"].items():
        assert set(v["scores"]) == set(results["evaluators"])
        for ev, s in v["scores"].items():
            assert len(s["per_prompt"]) == 4
            assert s["mean"] == pytest.approx(np.mean(s["per_prompt"]))
            assert _inside(s["mean"], s["mean_ci"]), (name, ev)
            assert ("vs_baseline" in s) == (name != "base")
        attrs = v["scores"]["shapes_oracle_attributes"]["per_prompt"]
        assert all(a in (0, 1, 2, 3) for a in attrs)
        assert v["oracle_accuracy"] == np.mean([a == 3 for a in attrs])  # all three attributes right
        per_attr = [v[f"oracle_{a}_accuracy"] for a in ("colour", "shape", "background")]
        assert sum(per_attr) == pytest.approx(np.mean(attrs))
    dpo = results["variants"]["diffusion_dpo"]["scores"]
    for s in dpo.values():
        w = s["vs_baseline"]
        assert w["wins"] + w["losses"] + w["ties"] == w["n"] == 4
        assert w["rate"] == w["wins"] / 4 and _inside(w["rate"], w["ci"])
        assert _inside(w["decisive_rate"], w["decisive_ci"])
    base_clip = results["variants"]["base"]["scores"]["learned_clip"]["per_prompt"]
    assert dpo["learned_clip"]["per_prompt"] != base_clip  # the bench loaded the LoRA: other images, other scores
    page = report.read_text()
    assert "diffusion_dpo" in page and all(html.escape(p) in page for p in heldout)
    assert page.count('<img src="data:image/png') >= 4 * 2 + 1  # the 4 × 2 grid and the training curves
