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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mm_align.image.bench_report import sampler_text, write_bench_report
from mm_align.image.evaluators import build_scorers
from mm_align.image.generate import image_seed, read_prompts
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


def _draw(model: str, variant: Variant, prompts: list[str], seeds: list[int], sampler: Any,
          progress: Any = None) -> tuple[list[Image.Image], str]:
    """The variant's images, and the name of the scheduler that drew them (as the report states it)."""
    from mm_align.image.flow_sampling import is_flow_pipeline
    from mm_align.image.sampling import load_pipeline, sample_images

    pipe = load_pipeline(model, lora=variant.path if variant.kind == "lora" else None,
                         npo_lora=variant.path if variant.kind == "npo" else None, cfg=sampler,
                         cond_lora=variant.path if variant.kind == "lora_cond" else None)
    scheduler = "flow-matching Euler" if is_flow_pipeline(pipe) else "DDIM"
    return sample_images(pipe, prompts, seeds, sampler, progress=progress), scheduler


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
    from tqdm.auto import tqdm

    bar = tqdm(total=len(variants) * len(prompts), desc="bench", unit="image", dynamic_ncols=True)
    for v in variants:
        bar.set_postfix(variant=v.name)
        images[v.name], scheduler = _draw(model, v, prompts, seeds, sampler, progress=bar.update)
        scores[v.name] = {e.name: np.asarray(e.score(images[v.name], prompts), dtype=np.float64) for e in evaluators}
        for e in evaluators:
            if hasattr(e, "details"):
                oracle[v.name] = e.details(images[v.name], prompts)
    bar.close()
    results: dict[str, Any] = {
        "model": model, "prompts": len(prompts), "seed": seed, "baseline": baseline,
        "sampler": {"scheduler": scheduler, "steps": sampler.steps, "guidance_scale": sampler.guidance_scale,
                    "negative_prompt": sampler.negative_prompt, "resolution": sampler.resolution,
                    "dtype": sampler.dtype},
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
    write_bench_report(out / "report.html", results, prompts, images, scores, runs or {}, grid_prompts)
    return results


def results_markdown(results: dict) -> str:
    """The results as Markdown tables (one row per variant and evaluator)."""
    lines = [f"# Image benchmark: {results['prompts']} prompts, baseline `{results['baseline']}`", "",
             f"Model `{results['model']}`, seed {results['seed']}, sampler: {sampler_text(results['sampler'])}.", "",
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
