"""The speech-world benchmark: GenSR-Pref multi-metric DPO per restoration paradigm, and the single-metric ablation.

    python benchmarks/run.py speech                 # the final run: test split, results/speech.{json,md} + screenshot
    python benchmarks/speech.py --split dev         # pilots and tuning: runs/bench_speech/dev/results.{json,md}

For each shipped base of the speech world (``speech_flow``, ``speech_masked``, ``speech_ar``; deliberately
imperfect, trained by ``mm_align.audio.toyworld.train_speech_restorers`` on the train split):

1. ``mm-align generate speech`` samples :data:`SAMPLES` restorations of each of the first :data:`TRAIN_INPUTS`
   degraded TRAIN utterances from the base itself, scores them with :data:`PAIR_METRICS`, and keeps a pair only
   when its winner beats its loser on EVERY one (multi-metric, ALGORITHMS.md §7); from the SAME samples, the
   ablation's pairs are the best vs the worst by :data:`SINGLE_METRIC` alone;
2. ``mm-align train``: DPO with LoRA on each pair set (the shipped ``speech_<paradigm>_dpo`` recipe, with the
   settings in :data:`DPO`): the Diffusion-DPO form for the flow model, summed token log-probs for the token
   models;
3. ``mm-align bench speech`` on the split (``test`` for the final run, read by nothing else): base, multi-metric
   DPO and single-metric DPO restore every clip with the SAME seed; every metric of :data:`BENCH_METRICS`
   is averaged over clips, and each model's mean difference to the base gets a paired bootstrap 95% interval.

Checks (``checks`` in the JSON): for each paradigm, multi-metric DPO improves every bench metric with its
interval above zero; single-metric DPO improves its own metric while at least one other gets worse (the
reward hacking the unanimous rule exists to prevent). Every stage is seeded and runs on the CPU: a second run
gives the same JSON apart from ``timing``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PARADIGMS = ("flow", "masked", "ar")
SAMPLES = 4  # restorations per training input
TRAIN_INPUTS = 120  # of the 200 training utterances
PAIR_METRICS = ("pesq_wb", "estoi", "si_sdr", "dnsmos_ovrl")
SINGLE_METRIC = "dnsmos_ovrl"
SEED = 0
SAMPLER_STEPS = 8
# paradigm -> overrides of its shipped recipe (speech_<paradigm>_dpo.yaml)
DPO: dict[str, dict[str, Any]] = {
    "flow": {"train.beta": 500, "train.learning_rate": 1e-4, "train.batch_size": 4, "train.max_steps": 120},
    "masked": {"train.beta": 0.1, "train.learning_rate": 1e-3, "train.max_steps": 120},
    "ar": {"train.beta": 0.1, "train.learning_rate": 1e-3, "train.max_steps": 120},
}


def bench_metrics() -> list[str]:
    """Every metric of the bench: quality, intelligibility, fidelity, perceived quality, timbre and content."""
    from mm_align.audio.toyworld.asr_weights import speech_asr_dir

    asr = speech_asr_dir()
    return ["pesq_wb", "estoi", "si_sdr", "lsd", "dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808",
            "speaker_similarity", f"wer:asr={asr}", f"cer:asr={asr}"]


def _train(paradigm: str, pairs: Path, out: Path) -> Path:
    """DPO on ``pairs``; skipped when ``out`` already holds the model trained from the same pairs and settings.

    Training does not depend on the bench split, so the dev pilots and the test run share it (like the samples):
    the stamp holds the pairs file's hash and every setting, and a model is reused only when all of them match.
    """
    import hashlib

    from mm_align.audio.toyworld.world_models import restorer_dir

    from mm_align.atomic import atomic_write_json
    from mm_align.orchestration import load_run_config, run_training

    stamp = {"pairs_sha256": hashlib.sha256(pairs.read_bytes()).hexdigest(), "base": str(restorer_dir(paradigm)),
             "recipe": f"speech_{paradigm}_dpo", "seed": SEED, "dpo": DPO[paradigm]}
    stamp_path = out / "trained_from.json"
    if (out / "final").is_dir() and stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return out / "final"
    overrides = [f"model.pretrained={restorer_dir(paradigm)}", f"data.train={pairs}", f"train.output_dir={out}",
                 f"train.seed={SEED}", "train.overwrite_output_dir=true", "train.report_to=[none]"]
    overrides += [f"{k}={v}" for k, v in DPO[paradigm].items()]
    overrides.append(f"train.checkpointing_steps={DPO[paradigm]['train.max_steps']}")
    run_training(load_run_config(f"speech_{paradigm}_dpo", overrides), log=lambda *a, **k: None)
    atomic_write_json(stamp_path, stamp)
    return out / "final"


def run_paradigm(paradigm: str, split: str, work: Path, train_inputs: int = TRAIN_INPUTS,
                 bench_inputs: int | None = None) -> dict[str, Any]:
    """Generate → DPO (multi-metric and single-metric pairs) → bench, for one paradigm."""
    from mm_align.audio.bench import bench_speech
    from mm_align.audio.generate import generate_speech_pairs
    from mm_align.audio.toyworld.world_models import restorer_dir

    base = str(restorer_dir(paradigm))
    root = work / split / paradigm
    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    gen_dir = work / paradigm / "generate"  # train-split samples: shared by the dev pilots and the test run
    common = dict(n=SAMPLES, metrics=list(PAIR_METRICS), seed=SEED, steps=SAMPLER_STEPS, max_inputs=train_inputs,
                  progress=False)
    multi = generate_speech_pairs(base, "world:train", gen_dir, **common)
    shutil.copyfile(multi.pairs_path, gen_dir / "pairs_multi.jsonl")
    single = generate_speech_pairs(base, "world:train", gen_dir, single_metric=SINGLE_METRIC, **common)  # same samples
    shutil.copyfile(single.pairs_path, gen_dir / "pairs_single.jsonl")
    timing["generate_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    models = {"base": base,  # trained once per paradigm: shared by the dev pilots and the test run
              "multi_metric_dpo": str(_train(paradigm, gen_dir / "pairs_multi.jsonl", work / paradigm / "dpo_multi")),
              "single_metric_dpo": str(_train(paradigm, gen_dir / "pairs_single.jsonl",
                                              work / paradigm / "dpo_single"))}
    timing["train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    results = bench_speech(models, f"world:{split}", root / "bench", metrics=bench_metrics(), seed=SEED,
                           steps=SAMPLER_STEPS, max_inputs=bench_inputs, progress=False)
    timing["bench_s"] = time.perf_counter() - t0
    return {"pairs": {"multi_metric": multi.summary["pairs"], "single_metric": single.summary["pairs"],
                      "inputs": multi.summary["inputs"], "discarded_multi": multi.summary.get("discarded")},
            "bench": _strip(results), "timing": timing}


def _strip(results: dict[str, Any]) -> dict[str, Any]:
    """The bench's results without per-clip lists, versions and timings (they stay in its own results.json)."""
    def means(metrics: dict[str, Any]) -> dict[str, Any]:
        return {m: {k: v for k, v in e.items() if k != "per_clip"} for m, e in metrics.items()}

    return {"inputs": results["inputs"], "metrics": results["metrics"], "order": results["order"],
            "degraded": means(results["degraded"]["metrics"]),
            "models": {n: {"paradigm": e.get("paradigm"), "metrics": means(e["metrics"])}
                       for n, e in results["models"].items()}}


def checks(paradigm_results: dict[str, Any]) -> dict[str, Any]:
    """The acceptance checks per paradigm (see the module docstring)."""
    out: dict[str, Any] = {}
    for paradigm, res in paradigm_results.items():
        models = res["bench"]["models"]
        multi = {m: e["vs_baseline"] for m, e in models["multi_metric_dpo"]["metrics"].items()}
        single = {m: e["vs_baseline"] for m, e in models["single_metric_dpo"]["metrics"].items()}
        not_improved = [m for m, c in multi.items() if not c["ci"][0] > 0]
        own = single[SINGLE_METRIC]
        worse = [m for m, c in single.items() if m != SINGLE_METRIC and c["mean_diff"] < 0]
        out[paradigm] = {
            "multi_improves_every_metric": not not_improved,
            "multi_not_improved": not_improved,
            "single_improves_own_metric": own["ci"][0] > 0,
            "single_own_metric_diff": own["mean_diff"],
            "single_worsens_another": bool(worse),
            "single_worse_metrics": worse,
        }
    return out


def _mean(models: dict[str, Any], name: str, metric: str) -> str:
    return f"{models[name]['metrics'][metric]['mean']:.3f}"


def _delta(models: dict[str, Any], name: str, metric: str) -> str:
    c = models[name]["metrics"][metric]["vs_baseline"]
    mark = " ✓" if c["ci"][0] > 0 else (" ✗" if c["ci"][1] < 0 else "")
    return f"{c['mean_diff']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]{mark}"


def _clips(inputs: Any) -> Any:
    """The number of bench clips (the bench's ``inputs`` entry is a dict with ``clips``)."""
    return inputs.get("clips", inputs) if isinstance(inputs, dict) else inputs


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# Speech world: GenSR-Pref DPO per paradigm ({results['split']} split)", "",
             f"Pairs from {SAMPLES} samples of each of the first {TRAIN_INPUTS} train utterances; multi-metric = "
             f"unanimous over {', '.join(PAIR_METRICS)}; single-metric = best vs worst by {SINGLE_METRIC}. "
             f"Bench: {_clips(results['bench_inputs'])} {results['split']} clips, one restoration seed per clip "
             "shared by every model; Δ = model − base, oriented so that > 0 is better; 95% paired bootstrap "
             "intervals.",
             ""]
    for paradigm, res in results["paradigms"].items():
        models = res["bench"]["models"]
        lines += [f"## {paradigm}", "",
                  f"pairs: multi-metric {res['pairs']['multi_metric']}, single-metric {res['pairs']['single_metric']}"
                  f" (of {res['pairs']['inputs']} inputs)", "",
                  "| metric | base | multi-metric DPO | Δ [95% CI] | single-metric DPO | Δ [95% CI] |",
                  "|---|---|---|---|---|---|"]
        for m in res["bench"]["metrics"]:
            lines.append(f"| {m} | {_mean(models, 'base', m)} | {_mean(models, 'multi_metric_dpo', m)} | "
                         f"{_delta(models, 'multi_metric_dpo', m)} | {_mean(models, 'single_metric_dpo', m)} | "
                         f"{_delta(models, 'single_metric_dpo', m)} |")
        ck = results["checks"][paradigm]
        lines += ["", f"- multi-metric improves every metric (CI > 0): **{ck['multi_improves_every_metric']}**"
                      + (f" (not: {', '.join(ck['multi_not_improved'])})" if ck["multi_not_improved"] else ""),
                  f"- single-metric improves {SINGLE_METRIC} (CI > 0): **{ck['single_improves_own_metric']}**; "
                  f"worsens another: **{ck['single_worsens_another']}**"
                  + (f" ({', '.join(ck['single_worse_metrics'])})" if ck["single_worse_metrics"] else ""), ""]
    return "\n".join(lines) + "\n"


def run(quick: bool = False, work: Path | None = None, results_dir: Path | None = None, split: str = "test",
        paradigms: tuple[str, ...] = PARADIGMS, bench_inputs: int | None = None,
        train_inputs: int = TRAIN_INPUTS) -> dict[str, Any]:
    """The benchmark; ``benchmarks/run.py speech`` writes the returned payload to ``results/speech.{json,md}``.

    ``quick``: a smoke run on the dev split (16 train inputs, 8 dev clips); never the committed figures.
    """
    import torch

    torch.set_num_threads(2)
    if quick:
        split, train_inputs, bench_inputs = "dev", 16, 8
    work = work or (HERE.parent / "runs" / ("bench_speech_quick" if quick else "bench_speech"))
    started = time.perf_counter()
    per = {p: run_paradigm(p, split, work, train_inputs, bench_inputs) for p in paradigms}
    first = next(iter(per.values()))["bench"]
    results: dict[str, Any] = {
        "benchmark": "speech", "split": split, "bench_inputs": first["inputs"],
        "settings": {"samples": SAMPLES, "train_inputs": train_inputs, "pair_metrics": list(PAIR_METRICS),
                     "single_metric": SINGLE_METRIC, "seed": SEED, "sampler_steps": SAMPLER_STEPS, "dpo": DPO},
        "paradigms": {p: {k: v for k, v in r.items() if k != "timing"} for p, r in per.items()},
        "checks": checks(per),
        "timing": {"total_s": time.perf_counter() - started, **{p: r["timing"] for p, r in per.items()}}}
    results["markdown"] = markdown(results)
    report = work / split / paradigms[0] / "bench" / "report.html"
    if split == "test" and not quick and report.is_file():  # the final run: the report and its screenshot
        from image_shapes import screenshot

        results_dir = results_dir or HERE / "results"
        results_dir.mkdir(parents=True, exist_ok=True)
        screenshot(report, results_dir / "speech_report.png", height=4200)
    return results


def main(argv: list[str] | None = None) -> int:
    """Pilots: ``--split dev`` writes ``runs/bench_speech/dev/results.{json,md}`` (the final run is run.py's)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", choices=("dev",), default="dev", help="pilots use dev; the test run is run.py speech")
    p.add_argument("--paradigm", action="append", choices=PARADIGMS, default=None)
    p.add_argument("--bench-inputs", type=int, default=None)
    p.add_argument("--train-inputs", type=int, default=TRAIN_INPUTS)
    p.add_argument("--work", type=Path, default=HERE.parent / "runs" / "bench_speech")
    args = p.parse_args(argv)
    results = run(work=args.work, split=args.split, paradigms=tuple(args.paradigm or PARADIGMS),
                  bench_inputs=args.bench_inputs, train_inputs=args.train_inputs)
    md = results.pop("markdown")
    out = args.work / args.split
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
