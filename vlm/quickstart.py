"""``mm-align quickstart --world vlm``: generate → MIA-DPO (LoRA) → bench on the shapes VLM world, minutes on a CPU.

Every stage is the command a user runs, on the shipped base of the shapes VLM world (a tiny LLaVA,
:mod:`mm_align.vlm.toyworld.train_shapes_vlm`):

1. ``generate vlm``: single-image TRAIN questions (:func:`~mm_align.vlm.toyworld.shapes_vlm.write_source`) are
   augmented into sequence, grid and pic-in-pic prompts with distractor scenes; the base answers each greedily
   while its attention on the target is read, and a wrong answer with too little attention on the target becomes
   the rejected answer of a pair whose chosen answer is the ground truth (MIA-DPO, ALGORITHMS.md §5);
2. ``train``: DPO (sigmoid) with LoRA on those pairs through the real loop (the shipped ``vlm_dpo`` recipe with
   the small model's settings);
3. ``bench vlm``: base vs MIA-DPO on the DEV split's single-image and multi-image benchmarks (multiple choice,
   paired bootstrap 95% intervals of each accuracy difference), with the HTML report. The test split is left
   alone: it is read once, by ``benchmarks/vlm_shapes.py``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from mm_align.config import option

__all__ = ["VLMQuickstart", "run_vlm_quickstart", "mia_dpo_overrides"]


@dataclass
class VLMQuickstart:
    """The quickstart's knobs (the defaults are what ``mm-align quickstart --world vlm`` runs)."""

    train_scenes: int = option(80, help="TRAIN scenes whose questions (5 a scene) are augmented.")
    n_per_item: int = option(3, help="Augmented multi-image prompts per question (one per format).")
    dev_scenes: int = option(30, help="DEV scenes of the single-image benchmark (5 questions a scene).")
    dev_multi_items: int = option(60, help="DEV items of each multi-image benchmark (sequence, grid, pic-in-pic).")
    steps: int = option(80, help="DPO optimizer steps.")
    batch_size: int = option(8, help="Pairs per optimizer step.")
    learning_rate: float = option(1e-3, help="LoRA learning rate.")
    beta: float = option(0.1, help="DPO β.")
    lora_r: int = option(16, help="LoRA rank (alpha = 2 r).")
    seed: int = option(0, help="Seed of augmentation and training.")


def mia_dpo_overrides(base: str | Path, pairs: str | Path, out: str | Path, steps: int, batch_size: int,
                      learning_rate: float, beta: float, lora_r: int, seed: int) -> list[str]:
    """The ``vlm_dpo`` recipe's overrides for the shapes world's tiny model (float32 on a CPU, LoRA on the language
    model, the vision tower frozen), shared by the quickstart and ``benchmarks/vlm_shapes.py``."""
    return [f"model.pretrained={base}", "model.dtype=float32", "model.max_length=1024", f"data.train={pairs}",
            "data.format=trl_vision", f"train.output_dir={out}", f"train.max_steps={steps}",
            f"train.batch_size={batch_size}", "train.gradient_accumulation_steps=1",
            f"train.learning_rate={learning_rate}", f"train.beta={beta}", f"train.seed={seed}",
            f"train.warmup_steps={max(1, steps // 10)}", f"train.checkpointing_steps={steps}",
            f"train.lora.r={lora_r}", f"train.lora.alpha={2 * lora_r}", "train.overwrite_output_dir=true",
            "train.report_to=[none]"]


def run_vlm_quickstart(output_dir: Path, steps: int | None = None, cfg: VLMQuickstart | None = None,
                       log=print) -> Path:
    """Run the three stages into ``output_dir``; returns the path of the bench's HTML report.

    ``steps`` overrides ``cfg.steps`` (``mm-align quickstart --world vlm --steps N``).
    """
    from mm_align.vlm.bench import bench_vlm
    from mm_align.vlm.generate import format_summary, generate_vlm_pairs
    from mm_align.vlm.toyworld import shapes_vlm as world

    from mm_align.orchestration import load_run_config, run_training

    cfg = cfg or VLMQuickstart()
    if steps is not None:
        cfg = dataclasses.replace(cfg, steps=steps)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    base = str(world.shapes_vlm_dir())
    timings: dict[str, float] = {}

    started = time.perf_counter()
    log(f"[1/3] generate: MIA-DPO pairs from {cfg.train_scenes} train scenes × 5 questions, "
        f"{cfg.n_per_item} multi-image prompts each, rejected = the base's own wrong, inattentive answers")
    source = world.write_source(output_dir / "source", "train", cfg.train_scenes)
    gen = generate_vlm_pairs(base, source, output_dir / "generate", n_per_item=cfg.n_per_item, seed=cfg.seed,
                             max_new_tokens=8, progress=False)
    timings["generate_s"] = time.perf_counter() - started
    log(format_summary(gen.summary))
    if not gen.summary.get("pairs"):
        raise RuntimeError(f"generate vlm kept no pairs ({gen.summary_path}): nothing to train on")

    started = time.perf_counter()
    log(f"[2/3] train: MIA-DPO (sigmoid, β {cfg.beta}) with LoRA, {cfg.steps} steps")
    run_dir = output_dir / "mia_dpo"
    run_training(load_run_config("vlm_dpo", mia_dpo_overrides(
        base, gen.pairs_path, run_dir, cfg.steps, cfg.batch_size, cfg.learning_rate, cfg.beta, cfg.lora_r,
        cfg.seed)), log=log)
    timings["train_s"] = time.perf_counter() - started

    started = time.perf_counter()
    log("[3/3] bench: base vs MIA-DPO on the dev split's single-image and multi-image benchmarks")
    single = world.write_single_benchmark(output_dir / "data" / "single", ("dev",), cfg.dev_scenes)
    benches = {"mantis_shapes_single": f"{single},split=dev"}
    multi = world.write_multi_benchmarks(output_dir / "data" / "multi", ("dev",), cfg.dev_multi_items)
    benches.update({f"mantis_shapes_{fmt}": f"{p},split=dev" for fmt, p in multi.items()})
    results = bench_vlm({"base": base, "mia_dpo": str(run_dir / "final")}, benches, output_dir / "bench",
                        progress=False)
    timings["bench_s"] = time.perf_counter() - started
    summary = {"timings": timings, "pairs": gen.summary.get("pairs"), "split": "dev",
               "accuracy": {name: {m: e["benchmarks"][name]["accuracy"] for m, e in results["models"].items()}
                            for name in benches}}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return output_dir / "bench" / "report.html"
