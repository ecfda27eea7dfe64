"""`mm-align generate image` on a tiny SD1.5-type pipeline: per-image seeds, scored pairs written as
Pick-a-Pic parquet + a browsable folder, resumable, bad arguments named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mm_align.image import generate as gen
from mm_align.image.pickapic import read_pickapic
from mm_align.image.sampling import SamplerConfig, load_pipeline, sample_images
from mm_align.image.toyworld.shapes import ShapesOracle, split_specs

from mm_align.cli import main

from .tiny_pipeline import save_tiny_sd15


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_sd15(tmp_path_factory.mktemp("tiny"))


FAST = SamplerConfig(steps=3, guidance_scale=3.0, batch_size=4, resolution=16)


def test_an_image_depends_on_its_seed_not_its_batch(model_dir):
    pipe = load_pipeline(str(model_dir), cfg=FAST)
    prompts = ["a red circle", "a blue square", "a green cross"]
    seeds = [gen.image_seed(0, p, 0) for p in prompts]
    together = sample_images(pipe, prompts, seeds, FAST)
    alone = sample_images(pipe, prompts[1:2], seeds[1:2], FAST)
    assert np.array_equal(np.asarray(together[1]), np.asarray(alone[0]))
    assert not np.array_equal(np.asarray(together[0]), np.asarray(together[1]))
    assert gen.image_seed(0, "x", 1) == gen.image_seed(0, "x", 1) != gen.image_seed(0, "x", 2)


def test_generate_scores_pairs_writes_and_resumes(tmp_path, model_dir, monkeypatch):
    prompts = [s.prompt for s in split_specs("train")[:3]]
    out = tmp_path / "gen"
    result = gen.generate(str(model_dir), prompts, out, [ShapesOracle()], samples_per_prompt=3, sampler=FAST)
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and all((out / r["file"]).is_file() for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] + sum(summary["discarded"].values()) == 3  # one outcome per prompt
    pairs = read_pickapic(out / "pairs.parquet")
    assert len(pairs.records) == result.pairs and not pairs.skipped
    by_file = {r["file"]: r for r in rows}
    for i, pair in enumerate(pairs.records):
        folder = out / "pairs" / f"{i:05d}"
        assert (folder / "prompt.txt").read_text().strip() == pair.prompt
        assert (folder / "chosen.png").is_file() and (folder / "rejected.png").is_file()
    scores = {}
    for r in rows:
        scores.setdefault(r["prompt"], []).append(r["scores"]["shapes_oracle"])
    for pair in pairs.records:  # best vs worst of each prompt
        assert max(scores[pair.prompt]) > min(scores[pair.prompt])
    assert "pairs" in (out / "index.html").read_text()
    del by_file

    # a rerun skips every finished prompt: the pipeline is never loaded
    monkeypatch.setattr("mm_align.image.sampling.load_pipeline", lambda *a, **k: pytest.fail("reloaded"))
    again = gen.generate(str(model_dir), prompts, out, [ShapesOracle()], samples_per_prompt=3, sampler=FAST)
    assert again.new_prompts == 0 and again.skipped_prompts == 3 and again.pairs == result.pairs
    monkeypatch.undo()

    # an interrupted write (a partial last line) loses only that chunk, which is sampled again identically
    lines = (out / "samples.jsonl").read_text().splitlines()
    (out / "samples.jsonl").write_text("\n".join(lines[:6]) + "\n" + lines[6][:20])
    third = gen.generate(str(model_dir), prompts, out, [ShapesOracle()], samples_per_prompt=3, sampler=FAST)
    assert third.new_prompts == 1 and third.pairs == result.pairs
    rows3 = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()[:6] +
             (out / "samples.jsonl").read_text().splitlines()[-3:]]
    assert sorted(r["scores"]["shapes_oracle"] for r in rows3) == sorted(r["scores"]["shapes_oracle"] for r in rows)


def test_cli_and_bad_arguments(tmp_path, model_dir, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle on a white background\n\na blue square on a black background\n")
    code = main(["generate", "image", "--model", str(model_dir), "--prompts", str(prompts), "--out",
                 str(tmp_path / "o"), "--evaluator", "shapes_oracle", "--samples-per-prompt", "2", "--steps", "2",
                 "--batch-size", "4", "--guidance-scale", "2"])
    assert code == 0
    assert "prompts sampled" in capsys.readouterr().out
    assert main(["generate", "image", "--model", str(model_dir), "--prompts", str(tmp_path / "none.txt"), "--out",
                 str(tmp_path / "o2"), "--evaluator", "shapes_oracle"]) == 2
    assert "none.txt does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no such evaluator"):
        gen.generate(str(model_dir), ["a"], tmp_path / "o3", [ShapesOracle()], margins={"clip": 0.1}, sampler=FAST)
    assert gen.parse_evaluator_arg("clip_score:model=ViT-B-32,batch_size=8") == {
        "type": "clip_score", "model": "ViT-B-32", "batch_size": 8}
