"""The shapes-VLM-world benchmark: MIA-DPO vs the base, with random rejections and single-image DPO beside it.

    python benchmarks/run.py vlm_shapes             # the final run: test split, results/vlm_shapes.{json,md}
    python benchmarks/vlm_shapes.py --split dev     # pilots and tuning: runs/bench_vlm_shapes/dev/results.{json,md}

On the shipped base of the shapes VLM world (``shapes-vlm``, a tiny LLaVA trained by
``mm_align.vlm.toyworld.train_shapes_vlm`` on single-image TRAIN questions):

1. ``mm-align generate vlm`` on :data:`TRAIN_SCENES` TRAIN scenes (5 questions each, the ground truth the only
   label): each question augmented into :data:`N_PER_ITEM` multi-image prompts (sequence, grid, pic-in-pic with
   distractor scenes), the base's greedy answers with their attention on the target; the pairs of

   - **MIA-DPO**: the attention rule (a wrong answer with too little attention on the target is rejected);
   - **random rejections** (the ablation): a seeded random subset of the wrong answers, as many per format as the
     attention rule keeps (``--rejection random --random-pairs matched``, from the same generations), so the two
     differ only in WHICH pairs they hold;
   - **single-image DPO**: the base's wrong greedy answers to the single-image questions themselves (no
     augmentation), chosen = the ground truth;

2. ``mm-align train``: DPO (sigmoid) with LoRA on each pair set, the same settings (:data:`DPO`);
3. ``mm-align bench vlm`` on the split (``test`` for the final run, read by nothing else): the single-image
   benchmark and one multi-image benchmark per format, multiple choice; every model's accuracy difference to the
   base gets a paired bootstrap 95% interval; "multi-image" pools the three formats' items.

Checks (``checks`` in the JSON): MIA-DPO raises multi-image accuracy over the base with the interval above zero,
while its single-image accuracy drops by no more than one point. Every stage is seeded and runs on the CPU: a
second run gives the same JSON apart from ``timing``.
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
TRAIN_SCENES = 240  # TRAIN scenes whose 5 questions are augmented
N_PER_ITEM = 3  # multi-image prompts per question (one per format)
BENCH_SCENES = 100  # scenes of the single-image benchmark (5 questions each)
BENCH_MULTI_ITEMS = 150  # items of each multi-image benchmark
SEED = 0
DPO: dict[str, Any] = {"steps": 150, "batch_size": 8, "learning_rate": 1e-3, "beta": 0.1, "lora_r": 16}
MODELS = ("base", "mia_dpo", "mia_dpo_random", "single_image_dpo")
N_BOOT = 10000


def _single_image_pairs(base: str, source: Path, out: Path) -> Path:
    """The base's wrong greedy answers to the single-image questions of ``source`` as DPO pairs (chosen = the ground
    truth), in TRL's vision format; reused when ``out`` holds them for the same source."""
    import hashlib

    import torch
    from mm_align.vlm.bench import load_bench_model
    from mm_align.vlm.format_writers import write_trl_vision
    from mm_align.vlm.generate import read_single_image_source
    from mm_align.vlm.mia_dpo import same_answer
    from mm_align.vlm.vlm_generation import greedy_generate
    from mm_align.vlm.vlm_records import prompt_messages

    from mm_align.atomic import atomic_write_json
    from mm_align.data import PreferencePair

    stamp = {"source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(), "base": base}
    if (out / "train.jsonl").is_file() and (out / "stamp.json").is_file() \
            and json.loads((out / "stamp.json").read_text()) == stamp:
        return out / "train.jsonl"
    items = read_single_image_source(source)
    model, processor, _ = load_bench_model(base)
    images = [it.load() for it in items]
    prompts = [(prompt_messages("<image>\n" + it.question), [im]) for it, im in zip(items, images)]
    with torch.no_grad():
        gens = greedy_generate(model, processor, prompts, max_new_tokens=8, batch_size=16)
    pairs = [PreferencePair(prompt="<image>\n" + it.question, chosen=it.answer, rejected=g.text, id=it.id,
                            meta={"images": [im]})
             for it, im, g in zip(items, images, gens) if g.text.strip() and not same_answer(g.text, it.answer)]
    path = write_trl_vision(pairs, out, "train")
    atomic_write_json(out / "stamp.json", stamp)
    return path


def _train(base: str, pairs: Path, out: Path) -> Path:
    """DPO with LoRA on ``pairs``; skipped when ``out`` holds the model trained from the same pairs and settings."""
    import hashlib

    from mm_align.vlm.quickstart import mia_dpo_overrides

    from mm_align.atomic import atomic_write_json
    from mm_align.orchestration import load_run_config, run_training

    stamp = {"pairs_sha256": hashlib.sha256(pairs.read_bytes()).hexdigest(), "base": base, "seed": SEED, "dpo": DPO}
    if (out / "final").is_dir() and (out / "trained_from.json").is_file() \
            and json.loads((out / "trained_from.json").read_text()) == stamp:
        return out / "final"
    run_training(load_run_config("vlm_dpo", mia_dpo_overrides(base, pairs, out, seed=SEED, **DPO)),
                 log=lambda *a, **k: None)
    atomic_write_json(out / "trained_from.json", stamp)
    return out / "final"


def _pooled(results: dict[str, Any], names: list[str], model: str) -> dict[str, Any]:
    """Accuracy over the items of several benchmarks and its paired bootstrap interval against the base."""
    from mm_align.stats import paired_comparison

    def correct(m: str) -> list[float]:
        return [float(c) for n in names for c in results["models"][m]["benchmarks"][n]["per_item"]["correct"]]

    base, mine = correct("base"), correct(model)
    entry: dict[str, Any] = {"accuracy": sum(mine) / len(mine), "n": len(mine)}
    if model != "base":
        cmp = paired_comparison(mine, base, n_boot=N_BOOT, seed=SEED)
        entry["vs_baseline"] = {"mean_diff": cmp["mean_diff"], "ci": cmp["ci"]}
    return entry


def run(quick: bool = False, work: Path | None = None, results_dir: Path | None = None, split: str = "test"
        ) -> dict[str, Any]:
    """The benchmark; ``benchmarks/run.py vlm_shapes`` writes the returned payload to ``results/vlm_shapes.*``.

    ``quick``: a smoke run on the dev split (24 train scenes, 40 steps, small benches); never the committed figures.
    """
    import torch
    from mm_align.vlm.bench import bench_vlm
    from mm_align.vlm.generate import generate_vlm_pairs
    from mm_align.vlm.toyworld import shapes_vlm as world

    global DPO
    torch.set_num_threads(2)
    train_scenes, bench_scenes, bench_multi = TRAIN_SCENES, BENCH_SCENES, BENCH_MULTI_ITEMS
    if quick:
        split, train_scenes, bench_scenes, bench_multi = "dev", 24, 12, 20
        DPO = {**DPO, "steps": 40}
    work = work or (HERE.parent / "runs" / ("bench_vlm_shapes_quick" if quick else "bench_vlm_shapes"))
    base = str(world.shapes_vlm_dir())
    timing: dict[str, float] = {}
    started = t0 = time.perf_counter()

    # 1. pairs (split-independent: train scenes only; shared by the dev pilots and the test run)
    source = world.write_source(work / "source", "train", train_scenes)
    common = dict(n_per_item=N_PER_ITEM, seed=SEED, max_new_tokens=8, progress=False)
    attention = generate_vlm_pairs(base, source, work / "generate_attention", **common)
    rand_dir = work / "generate_random"
    rand_dir.mkdir(parents=True, exist_ok=True)
    for name in ("generation.json", "generations.jsonl"):  # the same generations: only the selection differs
        shutil.copyfile(work / "generate_attention" / name, rand_dir / name)
    randomised = generate_vlm_pairs(base, source, rand_dir, rejection="random", random_pairs="matched", **common)
    single_pairs = _single_image_pairs(base, source, work / "generate_single")
    timing["generate_s"] = time.perf_counter() - t0

    # 2. DPO
    t0 = time.perf_counter()
    models = {"base": base,
              "mia_dpo": str(_train(base, attention.pairs_path, work / "mia_dpo")),
              "mia_dpo_random": str(_train(base, randomised.pairs_path, work / "mia_dpo_random")),
              "single_image_dpo": str(_train(base, single_pairs, work / "single_image_dpo"))}
    timing["train_s"] = time.perf_counter() - t0

    # 3. bench on the split
    t0 = time.perf_counter()
    data = work / split / "data"
    benches = {"mantis_shapes_single": f"{world.write_single_benchmark(data / 'single', (split,), bench_scenes)},"
                                       f"split={split}"}
    multi = world.write_multi_benchmarks(data / "multi", (split,), bench_multi)
    benches.update({f"mantis_shapes_{fmt}": f"{p},split={split}" for fmt, p in multi.items()})
    results = bench_vlm(models, benches, work / split / "bench", progress=False, n_boot=N_BOOT, seed=SEED)
    timing["bench_s"] = time.perf_counter() - t0

    per_bench = {name.removeprefix("mantis_shapes_"): {
        m: {k: v for k, v in e["benchmarks"][name].items() if k in ("accuracy", "n", "unparsed", "vs_baseline",
                                                                    "subsets")}
        for m, e in results["models"].items()} for name in benches}
    multi_names = [f"mantis_shapes_{fmt}" for fmt in multi]
    pooled = {m: _pooled(results, multi_names, m) for m in MODELS}
    single = per_bench["single"]
    mia = pooled["mia_dpo"]["vs_baseline"]
    single_drop = single["base"]["accuracy"] - single["mia_dpo"]["accuracy"]
    payload: dict[str, Any] = {
        "benchmark": "vlm_shapes", "split": split,
        "settings": {"train_scenes": train_scenes, "n_per_item": N_PER_ITEM, "bench_scenes": bench_scenes,
                     "bench_multi_items": bench_multi, "seed": SEED, "dpo": DPO, "n_boot": N_BOOT},
        "pairs": {"mia_dpo": attention.summary["pairs"], "mia_dpo_random": randomised.summary["pairs"],
                  "single_image_dpo": sum(1 for _ in open(single_pairs, encoding="utf-8")),
                  "generation": {k: attention.summary[k] for k in ("samples", "discarded") if k in attention.summary}},
        "benchmarks": per_bench, "multi_image": pooled,
        "checks": {"mia_multi_ci_above_zero": mia["ci"][0] > 0, "mia_multi_diff": mia["mean_diff"],
                   "mia_single_drop_points": 100 * single_drop, "mia_single_drop_within_1pt": single_drop <= 0.01},
        "timing": {"total_s": time.perf_counter() - started, **timing}}
    payload["markdown"] = markdown(payload)
    return payload


def markdown(p: dict[str, Any]) -> str:
    s = p["settings"]
    lines = [f"# Shapes VLM world: MIA-DPO ({p['split']} split)", "",
             f"Pairs from {s['train_scenes']} train scenes × 5 questions, {s['n_per_item']} multi-image prompts each "
             f"(MIA-DPO {p['pairs']['mia_dpo']} pairs; random rejections, matched per format, "
             f"{p['pairs']['mia_dpo_random']}; single-image DPO {p['pairs']['single_image_dpo']}). DPO: sigmoid, "
             f"β {s['dpo']['beta']}, LoRA r {s['dpo']['lora_r']}, lr {s['dpo']['learning_rate']}, "
             f"{s['dpo']['steps']} steps of {s['dpo']['batch_size']}. Bench: multiple choice on the "
             f"{p['split']} split; Δ = model − base in accuracy points, 95% paired bootstrap intervals.", "",
             "| benchmark | n | base | " + " | ".join(f"{m} (Δ [95% CI])" for m in MODELS[1:]) + " |",
             "|---|---|---|" + "---|" * (len(MODELS) - 1)]

    def cell(e: dict[str, Any]) -> str:
        v = e.get("vs_baseline")
        if not v:
            return f"{100 * e['accuracy']:.1f}"
        mark = " ✓" if v["ci"][0] > 0 else (" ✗" if v["ci"][1] < 0 else "")
        return (f"{100 * e['accuracy']:.1f} ({100 * v['mean_diff']:+.1f} [{100 * v['ci'][0]:+.1f}, "
                f"{100 * v['ci'][1]:+.1f}]{mark})")

    rows = [(name, e) for name, e in p["benchmarks"].items()] + [("multi-image (pooled)", p["multi_image"])]
    for name, e in rows:
        lines.append(f"| {name} | {e['base']['n']} | " + " | ".join(cell(e[m]) for m in MODELS) + " |")
    c = p["checks"]
    lines += ["", f"- MIA-DPO raises multi-image accuracy with the CI above 0: **{c['mia_multi_ci_above_zero']}** "
                  f"({100 * c['mia_multi_diff']:+.1f} points)",
              f"- MIA-DPO's single-image drop ≤ 1 point: **{c['mia_single_drop_within_1pt']}** "
              f"({c['mia_single_drop_points']:+.1f} points)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Pilots: ``--split dev`` writes ``runs/bench_vlm_shapes/dev/results.{json,md}`` (the final run is run.py's)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("dev",), default="dev", help="pilots use dev; the test run is run.py's")
    ap.add_argument("--work", type=Path, default=HERE.parent / "runs" / "bench_vlm_shapes")
    args = ap.parse_args(argv)
    payload = run(work=args.work, split=args.split)
    md = payload.pop("markdown")
    out = args.work / args.split
    (out / "results.json").write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
