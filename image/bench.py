"""``mm-align bench image``: base vs aligned variants on held-out prompts, the same seeds for all.

    mm-align bench image --model shapes --prompts shapes:heldout --out DIR \\
        --variant dpo=lora:RUN/final --variant npo_guidance=npo:RUN/final [--baseline base] \\
        --evaluator clip_score:model=... [--evaluator shapes_oracle] [--run dpo=RUN_DIR ...]

Every variant draws one image per prompt with the SAME seed per prompt (:func:`image_seed`), so a
difference is the variant's doing. A variant is ``base``, ``lora:DIR`` (an aligned LoRA fused into
the model), ``lora_cond:DIR`` (the LoRA on CFG's conditional branch only, the unconditional branch the
base: how a TDPO LoRA is sampled) or ``npo:DIR`` (negative-preference guidance with DIR's LoRA as the
negative branch); the last two cost two UNet calls per step, like plain CFG, which ``base`` uses.
Reported per variant and evaluator: the
mean score with a 95% interval, and the win rate over the baseline (``wins / N``, ties for neither)
and the decisive win rate ``wins / (wins + losses)``, each with a 95% Wilson interval; with the
shapes oracle, accuracy (all three attributes right) and per-attribute accuracy. Writes
``results.json``, ``results.md`` and a self-contained ``report.html`` (tables, side-by-side image
grids, and the training curves of ``--run`` directories).
"""

from __future__ import annotations

import argparse
import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mm_align.image.evaluators import build_scorers
from mm_align.image.generate import image_seed, read_prompts
from mm_align.image.image_io import png_bytes
from mm_align.image.sampling import SamplerConfig, add_sampler_args, sampler_from_args
from mm_align.image.toyworld.shapes import resolve_model
from PIL import Image

from mm_align.atomic import atomic_write_json, atomic_write_text
from mm_align.help_format import HelpFormatter
from mm_align.stats import mean_interval, win_rate

__all__ = ["bench_main", "bench", "Variant", "parse_variant"]


@dataclass
class Variant:
    name: str
    kind: str  # base | lora (fused) | lora_cond (conditional branch only) | npo
    path: str | None = None


def parse_variant(text: str) -> Variant:
    """``name=lora:DIR``, ``name=lora_cond:DIR`` (the LoRA on CFG's conditional branch only, as TDPO's
    is meant to be sampled), ``name=npo:DIR`` or ``base``."""
    if text == "base":
        return Variant("base", "base")
    name, eq, rest = text.partition("=")
    kind, colon, path = rest.partition(":")
    if not eq or not colon or kind not in ("lora", "lora_cond", "npo") or not path:
        raise ValueError(f"--variant {text!r}: expected base, NAME=lora:DIR, NAME=lora_cond:DIR or NAME=npo:DIR")
    if not Path(path).exists():
        raise FileNotFoundError(f"--variant {name}: {path} does not exist")
    return Variant(name, kind, path)


def _draw(model: str, variant: Variant, prompts: list[str], seeds: list[int], sampler: Any) -> list[Image.Image]:
    from mm_align.image.sampling import load_pipeline, sample_images

    pipe = load_pipeline(model, lora=variant.path if variant.kind == "lora" else None,
                         npo_lora=variant.path if variant.kind == "npo" else None, cfg=sampler,
                         cond_lora=variant.path if variant.kind == "lora_cond" else None)
    return sample_images(pipe, prompts, seeds, sampler)


def bench(model: str, prompts: list[str], variants: list[Variant], evaluators: list[Any], out: Path,
          sampler: Any = None, seed: int = 0, baseline: str = "base", runs: dict[str, str] | None = None,
          grid_prompts: int = 24) -> dict:
    """Sample every variant on ``prompts``, score, compare with ``baseline``; write JSON, Markdown, HTML."""
    sampler = sampler or SamplerConfig()
    if baseline not in {v.name for v in variants}:
        raise ValueError(f"--baseline {baseline!r} is not one of the variants {[v.name for v in variants]}")
    out.mkdir(parents=True, exist_ok=True)
    seeds = [image_seed(seed, p, 0) for p in prompts]
    images: dict[str, list[Image.Image]] = {}
    scores: dict[str, dict[str, np.ndarray]] = {}
    oracle: dict[str, list[Any]] = {}
    for v in variants:
        images[v.name] = _draw(model, v, prompts, seeds, sampler)
        scores[v.name] = {e.name: np.asarray(e.score(images[v.name], prompts), dtype=np.float64) for e in evaluators}
        for e in evaluators:
            if hasattr(e, "details"):
                oracle[v.name] = e.details(images[v.name], prompts)
    results: dict[str, Any] = {
        "model": model, "prompts": len(prompts), "seed": seed, "baseline": baseline,
        "sampler": {"steps": sampler.steps, "guidance_scale": sampler.guidance_scale},
        "evaluators": [e.name for e in evaluators], "variants": {},
    }
    for v in variants:
        entry: dict[str, Any] = {"kind": v.kind, "path": v.path, "scores": {}}
        for e in evaluators:
            s = scores[v.name][e.name]
            mean, low, high = mean_interval(s.tolist())
            item: dict[str, Any] = {"mean": mean, "mean_ci": [low, high], "per_prompt": s.tolist()}
            if v.name != baseline:
                item["vs_baseline"] = win_rate(s, scores[baseline][e.name], e.higher_is_better).to_dict()
            entry["scores"][e.name] = item
        if v.name in oracle:
            details = oracle[v.name]
            entry["oracle_accuracy"] = float(np.mean([d.all_correct for d in details]))
            for attr in ("colour", "shape", "background"):
                entry[f"oracle_{attr}_accuracy"] = float(np.mean([d.correct[attr] for d in details]))
        results["variants"][v.name] = entry
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", results_markdown(results))
    _write_html(out / "report.html", results, prompts, images, scores, runs or {}, grid_prompts)
    return results


def results_markdown(results: dict) -> str:
    """The results as Markdown tables (one row per variant and evaluator)."""
    lines = [f"# Image benchmark: {results['prompts']} prompts, baseline `{results['baseline']}`", "",
             f"Model `{results['model']}`, seed {results['seed']}, sampler {results['sampler']}.", "",
             "| variant | evaluator | mean [95% CI] | win rate vs baseline [95% CI] | decisive win rate [95% CI] "
             "| W/L/T |", "|---|---|---|---|---|---|"]
    for name, v in results["variants"].items():
        for ev, s in v["scores"].items():
            vs = s.get("vs_baseline")
            wr = f"{vs['rate']:.3f} [{vs['ci'][0]:.3f}, {vs['ci'][1]:.3f}]" if vs else "—"
            dr = f"{vs['decisive_rate']:.3f} [{vs['decisive_ci'][0]:.3f}, {vs['decisive_ci'][1]:.3f}]" if vs else "—"
            wlt = f"{vs['wins']}/{vs['losses']}/{vs['ties']}" if vs else "—"
            lines.append(f"| {name} | {ev} | {s['mean']:.4f} [{s['mean_ci'][0]:.4f}, {s['mean_ci'][1]:.4f}] "
                         f"| {wr} | {dr} | {wlt} |")
    if any("oracle_accuracy" in v for v in results["variants"].values()):
        lines += ["", "| variant | oracle accuracy | colour | shape | background |", "|---|---|---|---|---|"]
        for name, v in results["variants"].items():
            if "oracle_accuracy" in v:
                lines.append(f"| {name} | {v['oracle_accuracy']:.3f} | {v['oracle_colour_accuracy']:.3f} "
                             f"| {v['oracle_shape_accuracy']:.3f} | {v['oracle_background_accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def _uri(image: Image.Image, scale: int = 3) -> str:
    data = png_bytes(image.resize((image.width * scale, image.height * scale), Image.NEAREST))
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _write_html(path: Path, results: dict, prompts: list[str], images: dict, scores: dict, runs: dict[str, str],
                grid_prompts: int) -> None:
    from mm_align.metrics_log import read_metrics
    from mm_align.report import plot_curves

    esc = html.escape
    names = list(images)
    parts = [f"<h1>Image benchmark: {results['prompts']} held-out prompts</h1>",
             "<h2>Results</h2>", _md_table_html(results_markdown(results))]
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    rows = []
    for i, prompt in enumerate(prompts[:grid_prompts]):
        cells = []
        for n in names:
            label = " ".join(f"{k}={v[i]:.3f}" for k, v in scores[n].items())
            cells.append(f'<td><img src="{_uri(images[n][i])}" alt="{esc(n)}"><br><small>{esc(label)}</small></td>')
        rows.append(f"<tr><th>{esc(prompt)}</th>{''.join(cells)}</tr>")
    parts.append(f"<h2>Side by side (same seed per prompt)</h2><table class=grid><tr><th>prompt</th>{head}</tr>"
                 + "".join(rows) + "</table>")
    if runs:
        parts.append("<h2>Training curves</h2>")
        for name, run in runs.items():
            metrics = Path(run) / "metrics.jsonl"
            if not metrics.is_file():
                parts.append(f"<p>{esc(name)}: no metrics at {esc(str(metrics))}</p>")
                continue
            records = read_metrics(metrics)
            keys = [k for k in ("loss", "rewards/accuracies", "rewards/margins") if any(k in r for r in records)]
            if keys:
                parts.append(f'<figure><img src="{plot_curves(records, keys, name)}" alt="{esc(name)} curves">'
                             f"<figcaption>{esc(name)}</figcaption></figure>")
    css = ("body{font-family:sans-serif;margin:20px}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
           "padding:3px;font-size:12px;text-align:center}img{image-rendering:pixelated}figure{display:inline-block}")
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>mm-align image benchmark</title><style>{css}"
            "</style></head><body>" + "\n".join(parts) + "</body></html>\n")
    atomic_write_text(path, page)


def _md_table_html(markdown: str) -> str:
    out, in_table = [], False
    for line in markdown.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            out.append(("<table>" if not in_table else "") + "<tr>" + "".join(f"<td>{c}</td>" for c in cells)
                       + "</tr>")
            in_table = True
        elif not line.startswith("|---"):
            if in_table:
                out.append("</table>")
                in_table = False
            if line.strip():
                out.append(f"<p>{html.escape(line.lstrip('# '))}</p>")
    if in_table:
        out.append("</table>")
    return "".join(out)


def bench_main(argv: list[str]) -> int:
    """The ``mm-align bench image`` command line."""
    p = argparse.ArgumentParser(prog="mm-align bench image", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="diffusers model directory or hub id ('shapes' = the shipped one)")
    p.add_argument("--prompts", default="shapes:heldout",
                   help="shapes:heldout (default), shapes:train, a .txt (one prompt a line) or a .jsonl file")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=lora:DIR, NAME=lora_cond:DIR (conditional branch only) or NAME=npo:DIR (repeatable)")
    p.add_argument("--baseline", default="base", help="the variant the others' win rates are against (default: base)")
    p.add_argument("--evaluator", action="append", required=True, help="type:key=value,... (repeatable)")
    p.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR: training curves for the report")
    p.add_argument("--out", required=True, help="output directory: results.json, results.md, report.html")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise, the same for every variant")
    p.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts (default: all)")
    add_sampler_args(p)
    args = p.parse_args(argv)
    variants = [Variant("base", "base")] + [parse_variant(v) for v in args.variant if v != "base"]
    runs = dict(r.split("=", 1) for r in args.run)
    sampler = sampler_from_args(args)
    prompts = read_prompts(args.prompts)[: args.max_prompts]
    results = bench(resolve_model(args.model), prompts, variants, build_scorers(args.evaluator), Path(args.out),
                    sampler, args.seed, args.baseline, runs)
    print(results_markdown(results))
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0
