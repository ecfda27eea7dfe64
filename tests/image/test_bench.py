"""`mm-align bench image` on a tiny pipeline with a real trained LoRA: same seeds for every variant,
win rates that add up, oracle accuracies, and a self-contained HTML report with grids and curves."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mm_align.image.bench import bench, parse_variant
from mm_align.image.diffusion_adapter import DiffusionModelConfig, StableDiffusionAdapter
from mm_align.image.generate import image_seed
from mm_align.image.sampling import SamplerConfig, load_pipeline, sample_images
from mm_align.image.toyworld.shapes import ShapesOracle, render, split_specs

from mm_align.cli import main
from mm_align.data import PreferencePair
from mm_align.run_config import TrainConfig
from mm_align.trainer import train

from .tiny_pipeline import save_tiny_sd15

FAST = SamplerConfig(steps=3, guidance_scale=3.0, batch_size=8, resolution=16)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    model = save_tiny_sd15(root / "model")
    specs = split_specs("train")[:4]
    for i, s in enumerate(specs):
        render(s, 16, i).save(root / f"w{i}.png")
        render(split_specs("train")[10 + i], 16, i).save(root / f"l{i}.png")
    pairs = [PreferencePair(s.prompt, str(root / f"w{i}.png"), str(root / f"l{i}.png"), id=str(i))
             for i, s in enumerate(specs)]
    adapter = StableDiffusionAdapter(DiffusionModelConfig(pretrained=str(model), resolution=16))
    result = train(adapter, pairs, TrainConfig(output_dir=str(root / "run"), loss=["diffusion_dpo"], max_steps=3,
                                               batch_size=2, learning_rate=0.05, beta=50.0, lr_scheduler="constant",
                                               log_every=1, report_to=["none"]))
    return model, result.output_dir


def test_bench_compares_variants_on_the_same_seeds(tmp_path, setup, capfd):
    model, run = setup
    capfd.readouterr()
    prompts = [s.prompt for s in split_specs("heldout")[:5]]
    variants = [parse_variant("base"), parse_variant(f"dpo=lora:{run / 'final'}"),
                parse_variant(f"npo_guidance=npo:{run / 'final'}")]
    results = bench(str(model), prompts, variants, [ShapesOracle()], tmp_path / "b", FAST, runs={"dpo": str(run)})
    err = capfd.readouterr().err
    assert "bench: 100%" in err and "15/15" in err  # one bar for the stage: 3 variants × 5 prompts
    assert set(results["variants"]) == {"base", "dpo", "npo_guidance"}
    for name in ("dpo", "npo_guidance"):
        vs = results["variants"][name]["scores"]["shapes_oracle"]["vs_baseline"]
        assert vs["wins"] + vs["losses"] + vs["ties"] == vs["n"] == 5
        assert 0 <= vs["ci"][0] <= vs["rate"] <= vs["ci"][1] <= 1
    base = results["variants"]["base"]
    assert "vs_baseline" not in base["scores"]["shapes_oracle"] and 0 <= base["oracle_accuracy"] <= 1
    # the base images are exactly what the sampler gives for the per-prompt seeds
    pipe = load_pipeline(str(model), cfg=FAST)
    again = sample_images(pipe, prompts, [image_seed(0, p, 0) for p in prompts], FAST)
    oracle = ShapesOracle().score(again, prompts)
    assert oracle.mean() == pytest.approx(base["scores"]["shapes_oracle"]["mean"])
    page = (tmp_path / "b" / "report.html").read_text()
    assert page.count("data:image/png;base64") >= 3 * 5 + 1  # the grid and the training curves
    assert "npo_guidance" in page and "http" not in page.replace("https://", "")  # self-contained
    md = (tmp_path / "b" / "results.md").read_text()
    assert "oracle accuracy" in md and json.loads((tmp_path / "b" / "results.json").read_text())["prompts"] == 5


def test_a_variant_against_itself_ties_everywhere(tmp_path, setup):
    model, _ = setup
    prompts = [s.prompt for s in split_specs("heldout")[:3]]
    from mm_align.image.bench import Variant

    results = bench(str(model), prompts, [Variant("base", "base"), Variant("same", "base")], [ShapesOracle()],
                    tmp_path / "b", FAST)
    vs = results["variants"]["same"]["scores"]["shapes_oracle"]["vs_baseline"]
    assert vs["ties"] == 3 and vs["decisive_rate"] == 0.5
    assert np.isclose(results["variants"]["same"]["scores"]["shapes_oracle"]["mean"],
                      results["variants"]["base"]["scores"]["shapes_oracle"]["mean"])


def test_bad_variants_are_named(tmp_path, setup, capsys):
    with pytest.raises(ValueError, match="expected base, NAME=lora:DIR"):
        parse_variant("dpo=somewhere")
    model, _ = setup
    code = main(["bench", "image", "--model", str(model), "--variant", f"x=lora:{tmp_path / 'nope'}",
                 "--evaluator", "shapes_oracle", "--out", str(tmp_path / "o")])
    assert code == 2 and "nope does not exist" in capsys.readouterr().err
