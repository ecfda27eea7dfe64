"""The shipped shapes-world weights and the shapes quickstart (a shrunken run of every stage)."""

from __future__ import annotations

import json
import random

import numpy as np
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


def test_shipped_weights_fit_the_budget_and_are_safetensors():
    files = [f for f in WEIGHTS_DIR.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 30 * 2**20
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(f.suffix == ".safetensors" for f in weights)
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (shapes_sd_dir() / part).is_dir()
    assert (shapes_clip_dir() / "open_clip_config.json").is_file()


def test_learned_scorer_binds_attributes_on_heldout_renders():
    """The shipped scorer prefers the true caption over a one-attribute change on prompts it never saw."""
    scorer = build_evaluator({k: v for k, v in parse_evaluator_arg(shapes_scorer_spec()).items()})
    rng = random.Random(0)
    specs = split_specs("heldout")[:48]
    images = [render(s, 32, seed=i) for i, s in enumerate(specs)]
    negatives = [hard_negative(s, rng).prompt for s in specs]
    true = scorer.score(images, [s.prompt for s in specs])
    false = scorer.score(images, negatives)
    assert np.mean(true > false) >= 0.8


def test_shapes_quickstart_runs_every_stage(tmp_path):
    cfg = ShapesQuickstart(samples_per_prompt=2, train_prompts=6, heldout_prompts=4, steps=3, sampler_steps=3,
                           batch_size=2, margin=0.0)
    report = run_shapes_quickstart(tmp_path, cfg=cfg, log=lambda *_: None)
    assert report == tmp_path / "bench" / "report.html" and report.is_file()
    assert (tmp_path / "generate" / "pairs.parquet").is_file()
    assert (tmp_path / "dpo" / "final" / "pytorch_lora_weights.safetensors").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["variants"]) == {"base", "diffusion_dpo"}
    dpo = summary["variants"]["diffusion_dpo"]
    assert 0.0 <= dpo["oracle_accuracy"] <= 1.0 and "vs_baseline" in dpo["scores"]["shapes_oracle"]
    assert "learned_clip" in dpo["scores"]
    page = report.read_text()
    assert "diffusion_dpo" in page and "<img" in page
