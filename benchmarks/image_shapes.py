"""The shapes-world image benchmark: does each method move the ground truth, not just the learned judge?

    python benchmarks/run.py image_shapes            # writes results/image_shapes.{json,md} + screenshot

On the shipped shapes-world model (deliberately imperfect), with preference data labelled ONLY by the
world's learned scorer (the shipped tiny open_clip; the oracle never touches training data):

1. ``mm-align generate image`` draws ``SAMPLES`` images per TRAINING prompt; best-vs-worst pairs by
   the learned scorer (Pick-a-Pic parquet); the same samples give KTO's unpaired data (each prompt's
   best desirable, its worst undesirable) and TDPO's captioned images (each prompt's best sample under
   its prompt; the mismatched caption comes from the rule-based perturber — no image pairs at all);
2. ``mm-align train``: Diffusion-DPO, MaPO, Diffusion-KTO, Diffusion-NPO (swapped labels) and TDPO,
   LoRA, from the ``shapes_diffusion_dpo`` recipe with each method's loss and β;
3. ``mm-align bench image`` on the 200 HELD-OUT prompts, one seed per prompt shared by every variant:
   each LoRA vs the base, and negative-preference guidance with the NPO LoRA vs plain CFG. Per variant:
   the oracle's win rate over the base with its Wilson 95% interval, oracle colour/shape/background
   accuracy, and the learned scorer's own win rate beside it (reward hacking would show as a learned
   gain without an oracle gain).

Every stage is seeded and runs on the CPU, so a second run reproduces the figures. The HTML report is
opened in headless Chromium and its screenshot saved beside the results.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SAMPLES = 8  # images per training prompt
SAMPLER = {"steps": 20, "guidance_scale": 5.0}
# method -> (loss, β, learning rate, steps, data: "pairs" | "kto" | "captions"); shared: LoRA r 8, batch 16
METHODS: dict[str, tuple[str, float, float, int, str]] = {
    "diffusion_dpo": ("diffusion_dpo", 2000.0, 2e-4, 300, "pairs"),
    "mapo": ("mapo", 0.1, 2e-4, 300, "pairs"),
    "diffusion_kto": ("diffusion_kto", 1000.0, 2e-4, 300, "kto"),
    "npo": ("npo", 2000.0, 2e-4, 300, "pairs"),
    "tdpo": ("diffusion_dpo", 2000.0, 2e-4, 300, "captions"),
}


def _samples(generate_dir: Path) -> dict[str, list[dict[str, Any]]]:
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for line in (generate_dir / "samples.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            by_prompt.setdefault(row["prompt"], []).append(row)
    return by_prompt


def write_unpaired_and_captions(generate_dir: Path, scorer: str) -> tuple[Path, Path]:
    """KTO rows (each prompt's best desirable, worst undesirable) and TDPO captions (each prompt's best)."""
    kto, captions = [], []
    for prompt, rows in _samples(generate_dir).items():
        ranked = sorted(rows, key=lambda r: r["scores"][scorer])
        if ranked[-1]["scores"][scorer] == ranked[0]["scores"][scorer]:
            continue  # no preference: no data, as for pairs
        kto.append({"prompt": prompt, "completion": ranked[-1]["file"], "label": True})
        kto.append({"prompt": prompt, "completion": ranked[0]["file"], "label": False})
        captions.append({"caption": prompt, "image": ranked[-1]["file"]})
    kto_path, cap_path = generate_dir / "kto.jsonl", generate_dir / "captions.jsonl"
    kto_path.write_text("".join(json.dumps(r) + "\n" for r in kto))
    cap_path.write_text("".join(json.dumps(r) + "\n" for r in captions))
    return kto_path, cap_path


def train_method(name: str, model: str, data: dict[str, Path], out: Path, seed: int = 0) -> Path:
    """One method through ``mm-align train`` (the shapes recipe with this method's overrides)."""
    from mm_align.cli import cmd_train

    loss, beta, lr, steps, source = METHODS[name]
    overrides = [f"model.pretrained={model}", f"data.train={data[source]}", f"train.output_dir={out}",
                 f"train.loss=[{loss}]", f"train.beta={beta}", f"train.learning_rate={lr}", f"train.max_steps={steps}",
                 f"train.seed={seed}", f"train.checkpointing_steps={steps}",
                 f"model.precompute_dir={out.parent / 'latent_cache'}"]
    if source == "kto":
        overrides.append("data.format=auto")
    if source == "captions":
        overrides += ["data.format=captions", "data.options={perturber: rule, seed: 0}"]
    if (out / "final").is_dir():
        return out
    if cmd_train("shapes_diffusion_dpo", overrides):
        raise RuntimeError(f"training {name} failed")
    return out


def screenshot(page: Path, png: Path, width: int = 1400, height: int = 2400) -> bool:
    """Headless Chromium screenshot of an HTML page; False (and a note) when no Chromium is installed."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("no chromium on PATH: screenshot skipped (apt install chromium)")
        return False
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={width},{height}", f"--screenshot={png}", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    return png.is_file() and png.stat().st_size > 0


def run(quick: bool = False, work: Path | None = None, results_dir: Path | None = None) -> dict[str, Any]:
    from mm_align.image.bench import Variant, bench
    from mm_align.image.generate import build_scorers, generate, read_prompts
    from mm_align.image.quickstart import shapes_scorer_spec
    from mm_align.image.sampling import SamplerConfig
    from mm_align.image.toyworld.shapes import shapes_sd_dir

    work = work or (HERE.parent / "runs" / ("bench_image_shapes_quick" if quick else "bench_image_shapes"))
    results_dir = results_dir or HERE / "results"
    model = str(shapes_sd_dir())
    sampler = SamplerConfig(steps=SAMPLER["steps"], guidance_scale=SAMPLER["guidance_scale"], batch_size=64,
                            device="cpu")
    timings: dict[str, float] = {}
    learned = build_scorers([shapes_scorer_spec()])
    t0 = time.perf_counter()
    train_prompts = read_prompts("shapes:train")[: 16 if quick else None]
    gen = generate(model, train_prompts, work / "generate", learned, 2 if quick else SAMPLES, 0, sampler=sampler)
    kto, captions = write_unpaired_and_captions(work / "generate", learned[0].name)
    timings["generate_s"] = time.perf_counter() - t0
    data = {"pairs": work / "generate" / "pairs.parquet", "kto": kto, "captions": captions}
    runs = {}
    for name in METHODS:
        t0 = time.perf_counter()
        runs[name] = str(train_method(name, model, data, work / name))
        timings[f"train_{name}_s"] = time.perf_counter() - t0
    variants = [Variant("base", "base")] + [Variant(n, "lora", f"{runs[n]}/final") for n in METHODS if n != "npo"]
    variants.append(Variant("npo_guidance", "npo", f"{runs['npo']}/final"))
    heldout = read_prompts("shapes:heldout")[: 8 if quick else None]
    t0 = time.perf_counter()
    results = bench(model, heldout, variants, build_scorers(["shapes_oracle", shapes_scorer_spec()]), work / "bench",
                    sampler, seed=0, runs={n: runs[n] for n in METHODS})
    timings["bench_s"] = time.perf_counter() - t0
    shot = results_dir / ("image_shapes_quick_report.png" if quick else "image_shapes_report.png")
    results_dir.mkdir(parents=True, exist_ok=True)
    shot_ok = screenshot(work / "bench" / "report.html", shot)
    if not quick:
        shutil.copy(work / "bench" / "report.html", results_dir / "image_shapes_report.html")
    payload = summarise(results, gen, timings, quick)
    payload["screenshot"] = str(shot.relative_to(HERE)) if shot_ok else None
    return payload


def summarise(results: dict[str, Any], gen: Any, timings: dict[str, float], quick: bool) -> dict[str, Any]:
    """The acceptance view: per variant, oracle and learned-scorer win rates over the base, accuracies."""
    rows, checks = {}, {}
    base = results["variants"]["base"]
    for name, v in results["variants"].items():
        entry = {k: v.get(k) for k in ("oracle_accuracy", "oracle_colour_accuracy", "oracle_shape_accuracy",
                                       "oracle_background_accuracy")}
        entry["oracle_mean"] = v["scores"]["shapes_oracle"]["mean"]
        entry["learned_mean"] = v["scores"]["learned_clip"]["mean"]
        if name != "base":
            entry["oracle_vs_base"] = v["scores"]["shapes_oracle"]["vs_baseline"]
            entry["learned_vs_base"] = v["scores"]["learned_clip"]["vs_baseline"]
        rows[name] = entry
    for name in ("diffusion_dpo", "mapo", "diffusion_kto", "npo_guidance"):
        low = rows[name]["oracle_vs_base"]["ci"][0]
        checks[f"{name}: oracle win-rate CI low > 0.5"] = {"value": low, "pass": low > 0.5}
    for attr in ("colour", "shape"):
        d = rows["tdpo"][f"oracle_{attr}_accuracy"] - base[f"oracle_{attr}_accuracy"]
        checks[f"tdpo: oracle {attr} accuracy gain > 0"] = {"value": d, "pass": d > 0}
    lines = [
        f"Shapes world, {results['prompts']} held-out prompts (one seed each, shared by all variants); preference "
        f"data from {gen.pairs} learned-scorer pairs (discarded: {gen.discarded}); DDIM {results['sampler']['steps']} "
        f"steps, CFG {results['sampler']['guidance_scale']}. Win rate = wins / (wins + losses + ties) over the "
        "base; decisive = wins / (wins + losses); 95% Wilson intervals.", "",
        "| variant | oracle acc (all three) | colour | shape | background | oracle win rate vs base [95% CI] | "
        "decisive | learned-scorer win rate [95% CI] |", "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        ow, lw = r.get("oracle_vs_base"), r.get("learned_vs_base")
        cells = [f"{r[f'oracle_{k}']:.3f}" for k in ("accuracy", "colour_accuracy", "shape_accuracy",
                                                       "background_accuracy")]
        if ow:
            cells += [f"{ow['rate']:.3f} [{ow['ci'][0]:.3f}, {ow['ci'][1]:.3f}]",
                      f"{ow['decisive_rate']:.3f} ({ow['wins']}–{ow['losses']}, {ow['ties']} ties)",
                      f"{lw['rate']:.3f} [{lw['ci'][0]:.3f}, {lw['ci'][1]:.3f}]"]
        else:
            cells += ["—", "—", "—"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| check | value | |", "|---|---|---|"]
    lines += [f"| {k} | {c['value']:.3f} | {'PASS' if c['pass'] else 'FAIL'} |" for k, c in checks.items()]
    lines += ["", "Times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    return {"quick": quick, "variants": rows, "checks": checks, "timings_s": timings, "pairs": gen.pairs,
            "discarded": gen.discarded, "methods": {k: dict(zip(("loss", "beta", "learning_rate", "steps", "data"), v))
                                                    for k, v in METHODS.items()},
            "samples_per_prompt": SAMPLES, "sampler": SAMPLER, "markdown": "\n".join(lines)}
