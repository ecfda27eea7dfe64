"""``mm-align quickstart --world speech``: generate → DPO (LoRA) → bench on the speech world, in minutes on a CPU.

Every stage is the command a user runs, on a shipped base restorer of the speech world:

1. ``generate``: ``samples_per_input`` restorations of each degraded TRAIN utterance sampled from the base
   itself, scored by the metric suite (PESQ-WB, ESTOI, SI-SDR, DNSMOS OVRL against the clean reference), and
   a pair kept only when its winner beats its loser on EVERY metric (GenSR-Pref, ALGORITHMS.md §7);
2. ``train``: DPO with LoRA for the paradigm through the real loop (the shipped ``speech_<paradigm>_dpo``
   recipe: the Diffusion-DPO form for the flow model, summed token log-probs for the token models);
3. ``bench``: base vs aligned on the DEV split (same restoration seed per clip for both, every metric, paired
   bootstrap 95% intervals of each metric's mean difference), with the HTML report: audio players,
   spectrograms, tables and plots. The test split is left alone: it is read once, by
   ``benchmarks/speech.py``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from mm_align.config import option

__all__ = ["SpeechQuickstart", "run_speech_quickstart"]


@dataclass
class SpeechQuickstart:
    """The quickstart's knobs (the defaults are what ``mm-align quickstart --world speech`` runs)."""

    paradigm: str = option("masked", help="Which shipped base to align: masked (the fastest to sample on a CPU), "
                                          "flow or ar.")
    samples_per_input: int = option(4, help="Restorations sampled per degraded training utterance.")
    train_inputs: int | None = option(48, help="Use the first N training utterances (None: all 200).")
    dev_inputs: int | None = option(16, help="Bench on the first N dev utterances (None: all 50).")
    steps: int = option(60, help="DPO optimizer steps.")
    batch_size: int = option(8, help="Pairs per optimizer step.")
    sampler_steps: int = option(8, help="Flow ODE steps / masked decoding steps, for generation and the bench.")
    seed: int = option(0, help="Seed of sampling and training.")
    num_workers: int | None = option(None, help="Metric worker processes (None: one per core).")


def run_speech_quickstart(output_dir: Path, steps: int | None = None, cfg: SpeechQuickstart | None = None,
                          log=print) -> Path:
    """Run the three stages into ``output_dir``; returns the path of the bench's HTML report.

    ``steps`` overrides ``cfg.steps`` (``mm-align quickstart --world speech --steps N``).
    """
    from mm_align.audio.bench import bench_speech
    from mm_align.audio.generate import format_summary, generate_speech_pairs
    from mm_align.audio.toyworld.world_models import restorer_dir

    from mm_align.orchestration import load_run_config, run_training

    cfg = cfg or SpeechQuickstart()
    if steps is not None:
        cfg = dataclasses.replace(cfg, steps=steps)
    if cfg.paradigm not in ("flow", "masked", "ar"):
        raise ValueError(f"SpeechQuickstart.paradigm must be flow, masked or ar, got {cfg.paradigm!r}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    base = str(restorer_dir(cfg.paradigm))
    timings: dict[str, float] = {}

    started = time.perf_counter()
    log(f"[1/3] generate: {cfg.samples_per_input} restorations per training utterance from the {cfg.paradigm} "
        "base, unanimous pairs")
    gen = generate_speech_pairs(base, "world:train", output_dir / "generate", n=cfg.samples_per_input,
                                seed=cfg.seed, steps=cfg.sampler_steps, num_workers=cfg.num_workers,
                                max_inputs=cfg.train_inputs)
    timings["generate_s"] = time.perf_counter() - started
    log(format_summary(gen.summary))

    started = time.perf_counter()
    log(f"[2/3] train: DPO with LoRA on the {cfg.paradigm} base, {cfg.steps} steps")
    run_dir = output_dir / "dpo"
    run_training(load_run_config(f"speech_{cfg.paradigm}_dpo", [
        f"model.pretrained={base}", f"data.train={gen.pairs_path}", f"train.output_dir={run_dir}",
        f"train.max_steps={cfg.steps}", f"train.seed={cfg.seed}", f"train.checkpointing_steps={cfg.steps}",
        f"train.batch_size={cfg.batch_size}",
        "train.overwrite_output_dir=true",  # its own sub-directory: a second quickstart retrains from scratch
    ]), log=log)
    timings["train_s"] = time.perf_counter() - started

    started = time.perf_counter()
    log("[3/3] bench: base vs DPO on the dev split, same seeds, every metric")
    results = bench_speech({"base": base, "dpo": str(run_dir / "final")}, "world:dev", output_dir / "bench",
                           seed=cfg.seed, steps=cfg.sampler_steps, max_inputs=cfg.dev_inputs,
                           num_workers=cfg.num_workers)
    timings["bench_s"] = time.perf_counter() - started
    summary = {"paradigm": cfg.paradigm, "timings": timings, "pairs": gen.summary.get("pairs"),
               "split": "dev",
               "vs_base": {m: e["vs_baseline"] for m, e in results["models"]["dpo"]["metrics"].items()}}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return output_dir / "bench" / "report.html"
