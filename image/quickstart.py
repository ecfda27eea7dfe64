"""``mm-align quickstart`` on the shapes world: generate → train Diffusion-DPO (LoRA) → bench → report.

Every stage is the command a user runs, on the shipped shapes-world model:

1. ``generate``: ``samples_per_prompt`` images for each TRAINING prompt, scored by the world's learned
   scorer (the shipped tiny open_clip through the CLIP-score evaluator), best-vs-worst pairs kept when
   the scorer's margin exceeds ``margin`` (the scorer is noisy: its confident pairs agree with the oracle
   far more often), written as Pick-a-Pic parquet — the oracle never labels training data;
2. ``train``: Diffusion-DPO with LoRA through the real loop (``shapes_diffusion_dpo`` recipe);
3. ``bench``: base vs aligned on the HELD-OUT prompts with the same seeds, scored by the oracle (the
   ground truth: attributes right per image, and its continuous score) and the learned scorer; JSON,
   Markdown and an HTML report with grids and the curves.

The defaults keep the whole run within minutes on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from mm_align.config import option

__all__ = ["LEARNED_SCORER", "ShapesQuickstart", "run_shapes_quickstart", "shapes_scorer_spec"]

LEARNED_SCORER = "learned_clip"  # the evaluator name of the world's learned scorer


@dataclass
class ShapesQuickstart:
    """The quickstart's knobs (the defaults are what ``mm-align quickstart`` runs)."""

    samples_per_prompt: int = option(8, help="Images per training prompt for the preference pairs.")
    margin: float = option(0.14, help="A pair is kept only when the learned scorer prefers its winner by more "
                                      "than this (best-vs-worst).")
    train_prompts: int | None = option(None, help="Use only the first N training prompts (None: all 200).")
    heldout_prompts: int | None = option(None, help="Bench on the first N held-out prompts (None: all 200).")
    steps: int = option(300, help="Diffusion-DPO optimizer steps.")
    batch_size: int = option(16, help="Pairs per optimizer step.")
    sampler_steps: int = option(20, help="DDIM steps for generation and the bench.")
    guidance_scale: float = option(5.0, help="Classifier-free guidance weight.")
    seed: int = option(0, help="Seed of sampling and training.")


def shapes_scorer_spec() -> str:
    """The ``--evaluator`` spec of the shapes world's learned scorer (the shipped open_clip model)."""
    from mm_align.image.toyworld.shapes import shapes_clip_dir

    return f"clip_score:model=local-dir:{shapes_clip_dir()},name={LEARNED_SCORER},device=cpu"


def run_shapes_quickstart(output_dir: Path, steps: int | None = None, cfg: ShapesQuickstart | None = None,
                          log=print) -> Path:
    """Run the three stages into ``output_dir``; returns the path of the bench's HTML report.

    ``steps`` overrides ``cfg.steps`` (the Diffusion-DPO steps; ``mm-align quickstart --steps``).
    """
    from mm_align.image.bench import Variant, bench, results_markdown
    from mm_align.image.generate import build_scorers, generate, read_prompts
    from mm_align.image.sampling import SamplerConfig
    from mm_align.image.toyworld.shapes import shapes_sd_dir

    from mm_align.orchestration import load_run_config, run_training

    cfg = cfg or ShapesQuickstart()
    if steps is not None:
        cfg = dataclasses.replace(cfg, steps=steps)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = str(shapes_sd_dir())
    sampler = SamplerConfig(steps=cfg.sampler_steps, guidance_scale=cfg.guidance_scale, batch_size=64, device="cpu")
    timings: dict[str, float] = {}

    started = time.perf_counter()
    log("[1/3] generate: sampling the training prompts and pairing them by the learned scorer")
    train_prompts = read_prompts("shapes:train")[: cfg.train_prompts]
    gen = generate(model, train_prompts, output_dir / "generate", build_scorers([shapes_scorer_spec()]),
                   cfg.samples_per_prompt, cfg.seed, sampler=sampler, margins={LEARNED_SCORER: cfg.margin})
    timings["generate_s"] = time.perf_counter() - started
    log(f"      {gen.samples} images, {gen.pairs} pairs kept, discarded {gen.discarded}")

    started = time.perf_counter()
    log(f"[2/3] train: Diffusion-DPO with LoRA, {cfg.steps} steps")
    run_dir = output_dir / "dpo"
    run_training(load_run_config("shapes_diffusion_dpo", [
        f"model.pretrained={model}", f"data.train={output_dir / 'generate' / 'pairs.parquet'}",
        f"train.output_dir={run_dir}", f"train.max_steps={cfg.steps}", f"train.seed={cfg.seed}",
        f"model.precompute_dir={output_dir / 'latent_cache'}", f"train.batch_size={cfg.batch_size}",
        "train.overwrite_output_dir=true",  # its own sub-directory: a second quickstart retrains from scratch
    ]), log=log)
    timings["train_s"] = time.perf_counter() - started

    started = time.perf_counter()
    log("[3/3] bench: base vs Diffusion-DPO on the held-out prompts, same seeds")
    heldout = read_prompts("shapes:heldout")[: cfg.heldout_prompts]
    variants = [Variant("base", "base"), Variant("diffusion_dpo", "lora", str(run_dir / "final"))]
    scorers = build_scorers(["shapes_oracle_attributes", "shapes_oracle", shapes_scorer_spec()])
    results = bench(model, heldout, variants, scorers, output_dir / "bench", sampler, seed=cfg.seed,
                    runs={"diffusion_dpo": str(run_dir)})
    timings["bench_s"] = time.perf_counter() - started
    summary = {"timings": timings, "pairs": gen.pairs, "discarded": gen.discarded, "variants": results["variants"]}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(results_markdown(results))
    return output_dir / "bench" / "report.html"
