"""The benchmark page (issue 11, item 9): readable settings, a win-rate chart with intervals, per-evaluator tables,
a compact click-to-enlarge grid, one chart per metric across runs; no literal Markdown, no Python reprs."""

from __future__ import annotations

import json
import re

from mm_align.image.bench_report import sampler_text, write_bench_report
from mm_align.image.toyworld.shapes import render, split_specs

from mm_align.stats import mean_interval, win_rate


def _results(names, evaluators, scores, n):
    out = {"model": "/models/shapes-sd", "prompts": n, "seed": 0, "baseline": "base", "evaluators": evaluators,
           "sampler": {"scheduler": "DDIM", "steps": 20, "guidance_scale": 5.0, "negative_prompt": "",
                       "resolution": None, "dtype": "float32"}, "variants": {}}
    for name in names:
        entry = {"kind": "lora", "path": None, "scores": {}}
        for ev in evaluators:
            s = scores[name][ev]
            mean, low, high = mean_interval(s)
            item = {"mean": mean, "mean_ci": [low, high], "per_prompt": s}
            if name != "base":
                item["vs_baseline"] = win_rate(s, scores["base"][ev], True).to_dict()
            entry["scores"][ev] = item
        out["variants"][name] = entry
    return out


def test_bench_page(tmp_path):
    specs = split_specs("heldout")[:30]
    prompts = [s.prompt for s in specs]
    names = ["base", "dpo", "mapo"]
    images = {n: [render(s, 32, i + k) for i, s in enumerate(specs)] for k, n in enumerate(names)}
    scores = {n: {"oracle": [float((i * (k + 1)) % 7) for i in range(30)],
                  "clip": [0.5 + 0.01 * ((i + k) % 5) for i in range(30)]} for k, n in enumerate(names)}
    results = _results(names, ["oracle", "clip"], scores, 30)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.7 - 0.01 * s}) + "\n"
                                               for s in range(1, 9)))
    page_file = tmp_path / "report.html"
    write_bench_report(page_file, results, prompts, images, scores, {"dpo": str(run), "mapo": str(run)}, 24)
    page = page_file.read_text()
    assert "`" not in page and "{'" not in page  # no literal Markdown, no Python dict
    assert "20 DDIM steps, guidance 5.0" in page and sampler_text(results["sampler"]) in page
    assert 'alt="win rate with 95% intervals per variant and evaluator"' in page
    assert page.count("<h3>") == 2  # one table per evaluator
    assert page.count('class="card"') == 24  # grid_prompts cards
    assert "Images: 24 of 30 prompts" in page
    # each image is stored once, enlarged in place by a CSS-only toggle (no script, no duplicate data URI)
    assert page.count('type="checkbox"') == 24 * 3
    assert page.count("data:image/png;base64,") == 24 * 3 + 1 + 1  # grid + win-rate chart + one loss chart
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "max-width:1200px" not in page and not re.search(r"body\{[^}]*max-width", page)  # full width
    assert page.count("<figcaption>") == 0  # chart titles are not repeated as captions


def test_sampler_text_is_readable():
    text = sampler_text({"steps": 8, "guidance_scale": 3.0, "negative_prompt": "blurry", "resolution": 64,
                         "dtype": "bfloat16"})
    assert text == "8 DDIM steps, guidance 3.0, negative prompt “blurry”, 64 px, bfloat16"
