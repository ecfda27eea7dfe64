"""``mm-align bench vlm``: VLMs side by side on local copies of MMMU, BLINK, Mantis-Eval, MuirBench, NLVR2 and POPE.

    mm-align bench vlm --model base=DIR --model aligned=DIR [--model ...] \\
        --bench pope=coco_pope_random.json,images=val2014 --bench mmmu=MMMU_DIR[,split=validation] ... --out DIR \\
        [--max-items N] [--baseline NAME] [--max-new-tokens 16] [--batch-size 8] [--device cpu] [--dtype float32]

Each ``--model NAME=DIR`` is an image-text-to-text model directory (``save_pretrained`` of model and processor,
loaded by :func:`mm_align.vlm.vlm_loading.load_vlm`) or a peft LoRA directory over one (``adapter_config.json``
naming its base: the base is loaded and the adapter applied with ``PeftModel.from_pretrained``; the processor
saved beside the adapter is used when there is one, :func:`load_bench_model`). Each ``--bench NAME=PATH`` is a
benchmark copy read by :mod:`mm_align.vlm.bench_formats`; ``NAME`` is a format (``mmmu``, ``blink``, ``mantis``,
``muirbench``, ``nlvr2``, ``pope``) or starts with one (``pope_adversarial``), and ``,key=value`` options follow
the path: ``split=`` for the parquet sets, ``images=`` for NLVR2 and POPE.

Every model answers every item greedily (:func:`mm_align.vlm.vlm_generation.greedy_generate`: the model's chat
template, no sampling), so a rerun gives the same answers. The prompt is the item's question with its images in
place, then its options one a line (``A. text``), then one instruction per kind (:data:`INSTRUCTIONS`, the LLaVA
evaluation wording; NLVR2: ``Answer true or false.``). The answer is read by the documented rules of
:mod:`mm_align.vlm.answer_extraction`; a response no rule reads is **unparsed**: counted wrong and reported.

Reported per model and benchmark: accuracy (and per subset: MMMU subject, BLINK subtask, MuirBench task, POPE
split, Mantis-Eval category), the number unparsed, and for POPE also precision, recall and F1 of "yes" and the
yes-ratio (:func:`pope_metrics`). For every model other than the baseline (default: the first ``--model``), the
paired difference in accuracy from the baseline on each benchmark, with a percentile bootstrap 95% interval over
the items (:func:`mm_align.stats.paired_bootstrap`, Efron & Tibshirani 1993), flagged ``improved`` when the interval
lies above 0 and ``worse`` when below.

Output under ``--out``: ``results.json`` (written atomically; settings, the benchmarks read, per model and
benchmark the metrics and every item's response, parsed answer and correctness; everything but the ``timing`` key
is the same when the same command is run again), ``results.md`` (the tables) and ``report.html`` (a self-contained
page: settings, a chart of the differences from the baseline with their intervals, the tables, and example items
with their images and every model's answer).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import math
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm_align.vlm.answer_extraction import Extraction, extract_answer, is_correct, option_letters
from mm_align.vlm.bench_formats import BenchItem, BenchSet, format_of, read_benchmark
from mm_align.vlm.vlm_generation import greedy_generate
from mm_align.vlm.vlm_loading import VLMLoadError, load_vlm
from mm_align.vlm.vlm_records import load_image, prompt_messages
from tqdm.auto import tqdm

from mm_align.atomic import atomic_write_json, atomic_write_text
from mm_align.config import library_versions, option, replace_checked
from mm_align.help_format import HelpFormatter
from mm_align.report import BENCH_PAGE_CSS
from mm_align.stats import paired_comparison

logger = logging.getLogger(__name__)

__all__ = ["VLMBenchConfig", "BenchModel", "BenchSpec", "INSTRUCTIONS", "parse_model", "parse_bench", "item_text",
           "item_messages", "load_bench_model", "pope_metrics", "bench_vlm", "results_markdown", "write_vlm_report",
           "bench_main"]

# The answer-format instruction that ends each prompt, per question kind (LLaVA-1.5's evaluation prompts).
INSTRUCTIONS = {
    "multiple_choice": "Answer with the option's letter from the given choices directly.",
    "yes_no": "Answer the question using a single word or phrase.",
    "open": "Answer the question using a single word or phrase.",
}
_FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class VLMBenchConfig:
    """The settings of ``mm-align bench vlm`` (the models, benchmarks and output are arguments)."""

    baseline: str | None = option(None, help="The model the others are compared with; default the first model.")
    max_items: int | None = option(None, help="Use only the first N items of each benchmark; default all.")
    max_new_tokens: int = option(16, help="The longest answer, in tokens (greedy decoding).")
    batch_size: int = option(8, help="Prompts per generate call.")
    device: str = option("cpu", help="Where the models run.")
    dtype: str | None = option(None, help="The models' dtype (float32, bfloat16, float16); default float32.")
    n_boot: int = option(10000, help="Bootstrap resamples of each paired accuracy difference.")
    level: float = option(0.95, help="Coverage of the bootstrap intervals.")
    seed: int = option(0, help="The bootstrap's resampling seed.")
    examples: int = option(4, help="Items per benchmark shown in report.html with their images and answers.")
    progress: bool = option(True, help="A tqdm bar over generation.")

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size", "n_boot"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_items is not None and self.max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {self.max_items}")
        if self.examples < 0:
            raise ValueError(f"examples must be >= 0, got {self.examples}")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {self.level}")


@dataclass
class BenchModel:
    """A model of the benchmark: its row name and its directory (a model, or a LoRA over one)."""

    name: str
    dir: Path


@dataclass
class BenchSpec:
    """A benchmark copy: its name, format, path and reader options (``split``, ``images``)."""

    name: str
    format: str
    path: Path
    options: dict[str, str] = field(default_factory=dict)


def _check_name(name: str, what: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"{what} name {name!r}: use letters, digits, '.', '_' and '-'")


def parse_model(text: str) -> BenchModel:
    """``NAME=DIR`` -> :class:`BenchModel`.

    Raises:
        ValueError: not ``NAME=DIR`` or a bad name. FileNotFoundError: ``DIR`` is not a directory.
    """
    name, eq, path = text.partition("=")
    name = name.strip()
    if not eq or not name or not path:
        raise ValueError(f"--model {text!r} is not NAME=DIR (e.g. base=runs/base)")
    _check_name(name, "--model")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"--model {name}: {path}: no such directory")
    return BenchModel(name, Path(path))


def parse_bench(text: str) -> BenchSpec:
    """``NAME=PATH[,key=value...]`` -> :class:`BenchSpec` (``NAME`` is or starts with a format; module docstring).

    Raises:
        ValueError: not ``NAME=PATH``, an unknown format, or an option that is not ``key=value``.
        FileNotFoundError: ``PATH`` does not exist.
    """
    name, eq, rest = text.partition("=")
    name = name.strip()
    if not eq or not name or not rest:
        raise ValueError(f"--bench {text!r} is not NAME=PATH[,key=value...] (e.g. pope=coco_pope_random.json,"
                         "images=val2014)")
    _check_name(name, "--bench")
    path, *opts = rest.split(",")
    options: dict[str, str] = {}
    for o in opts:
        key, eq, value = o.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ValueError(f"--bench {name}: option {o!r} is not key=value")
        options[key.strip()] = value.strip()
    if not Path(path).exists():
        raise FileNotFoundError(f"--bench {name}: {path}: no such file or directory")
    return BenchSpec(name, format_of(name), Path(path), options)


# ---- prompts -----------------------------------------------------------------------------------------------
def item_text(item: BenchItem) -> str:
    """The prompt text of an item: the question (with its ``<image>`` marks), the options one a line
    (``A. text``), the instruction (the item's own, else :data:`INSTRUCTIONS` of its kind)."""
    lines = [item.question.strip()]
    if item.options:
        lines += [f"{letter}. {text.strip()}" for letter, text in zip(option_letters(len(item.options)), item.options)]
    lines.append(item.instruction or INSTRUCTIONS[item.kind])
    return "\n".join(lines)


def item_messages(item: BenchItem) -> list[dict[str, Any]]:
    """The item's prompt as one user message, an image part per ``<image>`` mark."""
    return prompt_messages(item_text(item), item.origin)


# ---- models ------------------------------------------------------------------------------------------------
def load_bench_model(path: str | Path, dtype: str | None = None, device: str | None = None
                     ) -> tuple[Any, Any, dict[str, Any]]:
    """``(model, processor, info)`` of a model directory or of a peft LoRA directory over one.

    A directory with ``adapter_config.json`` and no ``config.json`` is a LoRA: its base
    (``base_model_name_or_path``; a relative one is tried against the adapter's folder too) is loaded by
    :func:`~mm_align.vlm.vlm_loading.load_vlm` and the adapter applied by ``PeftModel.from_pretrained``; the
    processor is the one saved beside the adapter when there is one, else the base's. (``load_vlm`` loads models
    only; this is the bench's LoRA path.)

    Returns:
        The model in eval mode, its processor, and ``{"kind": "model" | "lora", "base": base path or None}``.

    Raises:
        VLMLoadError: no loadable model, an adapter without a base, or a base that cannot be found / loaded.
    """
    p = Path(path)
    if (p / "adapter_config.json").is_file() and not (p / "config.json").is_file():
        try:
            base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, json.JSONDecodeError) as e:
            raise VLMLoadError(f"{p / 'adapter_config.json'}: unreadable ({e})") from e
        if not base:
            raise VLMLoadError(f"{p}: adapter_config.json names no base_model_name_or_path")
        if not Path(base).is_absolute() and not Path(base).exists() and (p / base).exists():
            base = str(p / base)
        model, processor = load_vlm(base, dtype=dtype, device=device)
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(p)).eval()
        if any((p / f).is_file() for f in ("processor_config.json", "preprocessor_config.json")):
            from transformers import AutoProcessor

            processor = AutoProcessor.from_pretrained(str(p))
        return model, processor, {"kind": "lora", "base": str(Path(base).resolve()) if Path(base).exists() else base}
    model, processor = load_vlm(p, dtype=dtype, device=device)
    return model, processor, {"kind": "model", "base": None}


# ---- metrics -----------------------------------------------------------------------------------------------
def pope_metrics(parsed: Sequence[str | None], golds: Sequence[str]) -> dict[str, Any]:
    """POPE's metrics with "yes" as the positive class (Li et al. 2023, "Evaluating Object Hallucination in Large
    Vision-Language Models").

    ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``, ``f1 = 2PR / (P + R)``, ``yes_ratio`` = the share
    of all answers that are "yes" (the model's, as in the POPE paper; not the gold answers'), ``accuracy`` = the
    share answered right. An unparsed answer (None) is wrong and is no "yes": on a "yes" item it is a false
    negative; on a "no" item it counts in neither FP nor TN. A ratio whose denominator is 0 is 0.

    Args:
        parsed: the canonical answers (``"yes"``, ``"no"`` or None), one per item.
        golds: the gold answers (``"yes"`` / ``"no"``).
    """
    if len(parsed) != len(golds) or not golds:
        raise ValueError(f"pope_metrics needs as many answers as gold answers (>= 1): {len(parsed)} vs {len(golds)}")
    tp = sum(1 for p, g in zip(parsed, golds) if p == "yes" and g == "yes")
    fp = sum(1 for p, g in zip(parsed, golds) if p == "yes" and g == "no")
    fn = sum(1 for p, g in zip(parsed, golds) if p != "yes" and g == "yes")
    tn = sum(1 for p, g in zip(parsed, golds) if p == "no" and g == "no")
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(golds)
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(1 for p in parsed if p == "yes") / n, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "unparsed": sum(1 for p in parsed if p is None), "n": n}


def _accuracy_entry(correct: list[int], items: list[BenchItem]) -> dict[str, Any]:
    entry: dict[str, Any] = {"accuracy": sum(correct) / len(correct), "correct": sum(correct), "n": len(correct)}
    subsets: dict[str, list[int]] = {}
    for c, item in zip(correct, items):
        if item.subset is not None:
            subsets.setdefault(str(item.subset), []).append(c)
    if subsets:
        entry["subsets"] = {s: {"accuracy": sum(v) / len(v), "correct": sum(v), "n": len(v)}
                            for s, v in sorted(subsets.items())}
    return entry


def _compare(a: list[int], b: list[int], cfg: VLMBenchConfig) -> dict[str, Any]:
    return paired_comparison(a, b, higher_is_better=True, n_boot=cfg.n_boot, seed=cfg.seed, level=cfg.level)


# ---- the run -----------------------------------------------------------------------------------------------
def _config(config: VLMBenchConfig | None, overrides: dict[str, Any]) -> VLMBenchConfig:
    return replace_checked(config or VLMBenchConfig(), overrides, "bench vlm option")


def _models(models: Mapping[str, str | Path] | Sequence[BenchModel]) -> list[BenchModel]:
    items = [BenchModel(n, Path(d)) for n, d in models.items()] if isinstance(models, Mapping) else list(models)
    if not items:
        raise ValueError("bench vlm needs at least one --model NAME=DIR")
    names = [m.name for m in items]
    if len(set(names)) != len(names):
        raise ValueError(f"two --model entries share a name: {names}")
    for m in items:
        _check_name(m.name, "--model")
        if not m.dir.is_dir():
            raise FileNotFoundError(f"--model {m.name}: {m.dir}: no such directory")
    return items


def _benches(benchmarks: Mapping[str, str | Path] | Sequence[BenchSpec]) -> list[BenchSpec]:
    if isinstance(benchmarks, Mapping):
        specs = [parse_bench(f"{n}={p}") for n, p in benchmarks.items()]
    else:
        specs = list(benchmarks)
    if not specs:
        raise ValueError("bench vlm needs at least one --bench NAME=PATH")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"two --bench entries share a name: {names}")
    return specs


def _bench_info(spec: BenchSpec, bench: BenchSet) -> dict[str, Any]:
    kinds: dict[str, int] = {}
    for item in bench.items:
        kinds[item.kind] = kinds.get(item.kind, 0) + 1
    return {"format": spec.format, "source": str(Path(bench.source).resolve()), "split": bench.split,
            "options": {k: (str(Path(v).resolve()) if k == "images" else v) for k, v in spec.options.items()},
            "items": len(bench.items), "ids": [i.id for i in bench.items], "kinds": kinds,
            "skipped_by_reader": bench.skipped}


def bench_vlm(
    models: Mapping[str, str | Path] | Sequence[BenchModel],
    benchmarks: Mapping[str, str | Path] | Sequence[BenchSpec],
    out_dir: str | Path,
    config: VLMBenchConfig | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Answer every benchmark item with every model, score, compare with the baseline; write the outputs.

    See the module docstring for the method and the files written.

    Args:
        models: name -> model or LoRA directory (in report order), or :class:`BenchModel` s.
        benchmarks: name -> path (``"PATH,key=value"`` options allowed, as on the command line), or
            :class:`BenchSpec` s.
        out_dir: where ``results.json``, ``results.md`` and ``report.html`` go.
        config: a :class:`VLMBenchConfig`; keyword arguments override its fields.

    Returns:
        The results (the content of ``results.json``).

    Raises:
        DataError: a bad benchmark row (naming the file and the row) or an unreadable image.
        VLMLoadError: a model directory that does not load.
        ValueError: a bad name, baseline or option. FileNotFoundError: a missing model or benchmark path.
    """
    cfg = _config(config, overrides)
    started = time.perf_counter()
    bench_models = _models(models)
    specs = _benches(benchmarks)
    order = [m.name for m in bench_models]
    baseline = cfg.baseline or order[0]
    if baseline not in order:
        raise ValueError(f"--baseline {baseline!r} is not one of the models ({', '.join(order)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # every benchmark first: a bad row fails before any model runs
    t0 = time.perf_counter()
    sets = {s.name: read_benchmark(s.format, s.path, cfg.max_items, **s.options) for s in specs}
    prompts = {name: [(item_messages(i), i.images) for i in bench.items] for name, bench in sets.items()}
    timing: dict[str, Any] = {"read_seconds": time.perf_counter() - t0, "generate_seconds": {}}

    model_info: dict[str, dict[str, Any]] = {}
    total = sum(len(b.items) for b in sets.values()) * len(bench_models)
    bar = tqdm(total=total, desc="bench vlm", unit="item", disable=not cfg.progress, dynamic_ncols=True)
    try:
        for bm in bench_models:
            t0 = time.perf_counter()
            bar.set_postfix(model=bm.name)
            model, processor, info = load_bench_model(bm.dir, cfg.dtype, cfg.device)
            entries: dict[str, Any] = {}
            for name, bench in sets.items():
                gens = greedy_generate(model, processor, prompts[name], cfg.max_new_tokens, cfg.batch_size,
                                       origins=[i.origin for i in bench.items], progress=bar.update)
                extractions: list[Extraction] = [extract_answer(g.text, i.kind, i.options)
                                                 for g, i in zip(gens, bench.items)]
                correct = [int(is_correct(e, i.answer, i.kind)) for e, i in zip(extractions, bench.items)]
                entry = _accuracy_entry(correct, bench.items)
                entry["unparsed"] = sum(1 for e in extractions if not e.parsed)
                if sets[name].format == "pope":
                    entry["pope"] = pope_metrics([e.answer for e in extractions],
                                                 [str(i.answer).strip().lower() for i in bench.items])
                entry["per_item"] = {"response": [g.text for g in gens], "parsed": [e.answer for e in extractions],
                                     "rule": [e.rule for e in extractions], "correct": correct}
                entries[name] = entry
            model_info[bm.name] = {"dir": str(bm.dir.resolve()), **info, "benchmarks": entries,
                                   "average_accuracy": sum(e["accuracy"] for e in entries.values()) / len(entries)}
            timing["generate_seconds"][bm.name] = time.perf_counter() - t0
            del model
    finally:
        bar.close()
    for name in order:
        if name == baseline:
            continue
        for bname, entry in model_info[name]["benchmarks"].items():
            entry["vs_baseline"] = _compare(entry["per_item"]["correct"],
                                            model_info[baseline]["benchmarks"][bname]["per_item"]["correct"], cfg)

    results: dict[str, Any] = {
        "command": "bench vlm", "version": _FORMAT_VERSION, "baseline": baseline, "order": order,
        "benchmarks": {s.name: _bench_info(s, sets[s.name]) for s in specs},
        "generation": {"decoding": "greedy", "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size,
                       "device": cfg.device, "dtype": cfg.dtype or "float32", "max_items": cfg.max_items},
        "instructions": INSTRUCTIONS,
        "extraction": "mm_align.vlm.answer_extraction: multiple choice = option letter ((B), Answer: B, B., lone "
                      "letter) or the text of exactly one option; yes/no = the first yes/no/true/false word; open = "
                      "normalised text; anything else unparsed (wrong)",
        "bootstrap": {"method": "percentile bootstrap of the paired mean difference (Efron & Tibshirani 1993)",
                      "n_boot": cfg.n_boot, "level": cfg.level, "seed": cfg.seed},
        "models": model_info, "versions": library_versions(),
    }
    timing["total_seconds"] = time.perf_counter() - started
    results["timing"] = timing
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", results_markdown(results))
    write_vlm_report(out / "report.html", results, sets, cfg.examples)
    return results


# ---- Markdown ----------------------------------------------------------------------------------------------
def _ci(vs: dict[str, Any]) -> str:
    mark = " ▲" if vs["improved"] else " ▼" if vs["worse"] else ""
    return f"{vs['mean_diff']:+.4f} [{vs['ci'][0]:+.4f}, {vs['ci'][1]:+.4f}]{mark}"


def results_markdown(results: dict[str, Any]) -> str:
    """The results as Markdown tables: accuracy per benchmark (and subset) per model with each model's difference
    from the baseline and its interval (▲ improved, ▼ worse); unparsed answers; POPE's metrics."""
    order, baseline = results["order"], results["baseline"]
    others = [n for n in order if n != baseline]
    models = results["models"]
    level = int(round(100 * results["bootstrap"]["level"]))
    gen = results["generation"]
    lines = [f"# VLM benchmark: {len(order)} model(s) on {len(results['benchmarks'])} benchmark(s)", "",
             f"Baseline `{baseline}`; {gen['decoding']} decoding, at most {gen['max_new_tokens']} new tokens. "
             f"Accuracy differences with {level}% paired bootstrap intervals over the items "
             f"({results['bootstrap']['n_boot']} resamples); ▲ improved, ▼ worse. Unparsed answers count as wrong.",
             "", "| model | kind | directory |", "|---|---|---|"]
    for n in order:
        m = models[n]
        kind = f"LoRA over `{m['base']}`" if m["kind"] == "lora" else "model"
        lines.append(f"| {n} | {kind} | `{m['dir']}` |")
    lines += ["", "| benchmark | items | " + " | ".join(order)
              + "".join(f" | {n} − {baseline} [{level}% CI]" for n in others) + " |",
              "|---|---:|" + "---:|" * (len(order) + len(others))]
    for b, info in results["benchmarks"].items():
        row = [f"**{b}** ({info['format']})", str(info["items"])]
        row += [f"{models[n]['benchmarks'][b]['accuracy']:.4f}" for n in order]
        row += [_ci(models[n]["benchmarks"][b]["vs_baseline"]) for n in others]
        lines.append("| " + " | ".join(row) + " |")
        for s, sub in models[order[0]]["benchmarks"][b].get("subsets", {}).items():
            row = [f"↳ {s}", str(sub["n"])]
            row += [f"{models[n]['benchmarks'][b]['subsets'][s]['accuracy']:.4f}" for n in order]
            row += [""] * len(others)
            lines.append("| " + " | ".join(row) + " |")
    lines.append("| average (of benchmarks) | | " + " | ".join(f"{models[n]['average_accuracy']:.4f}" for n in order)
                 + " |" * (len(others) + 1))
    lines += ["", "| benchmark | " + " | ".join(f"{n} unparsed" for n in order) + " |",
              "|---|" + "---:|" * len(order)]
    for b, info in results["benchmarks"].items():
        lines.append(f"| {b} | " + " | ".join(f"{models[n]['benchmarks'][b]['unparsed']} / {info['items']}"
                                              for n in order) + " |")
    pope = [b for b, info in results["benchmarks"].items() if info["format"] == "pope"]
    if pope:
        lines += ["", "| POPE | model | accuracy | precision | recall | F1 | yes-ratio |", "|---|---|---:|---:|---:|"
                  "---:|---:|"]
        for b in pope:
            for n in order:
                p = models[n]["benchmarks"][b]["pope"]
                lines.append(f"| {b} | {n} | {p['accuracy']:.4f} | {p['precision']:.4f} | {p['recall']:.4f} | "
                             f"{p['f1']:.4f} | {p['yes_ratio']:.4f} |")
    skipped = {b: info["skipped_by_reader"] for b, info in results["benchmarks"].items() if info["skipped_by_reader"]}
    if skipped:
        lines += ["", "Skipped by the readers: " + "; ".join(
            f"{b}: " + ", ".join(f"{c} ({why})" for why, c in s.items()) for b, s in skipped.items()) + "."]
    return "\n".join(lines) + "\n"


# ---- the HTML page -----------------------------------------------------------------------------------------
_IMPROVED, _WORSE, _NEUTRAL = "#2e7d32", "#c62828", "#616161"
_CSS = BENCH_PAGE_CSS + """.settings th{width:10em}.chart svg{border:1px solid #eee;background:#fff}
.item{border:1px solid #e3e3e6;border-radius:6px;padding:8px 10px;margin:0 0 10px;background:#fafafa}
.item img{height:72px;border:1px solid #ccc;margin:2px 4px 2px 0;image-rendering:pixelated}
.item pre{white-space:pre-wrap;font-size:.85em;margin:4px 0}.ok{color:#2e7d32}.bad{color:#c62828}
"""


def _difference_chart(results: dict[str, Any]) -> str:
    """An inline SVG: per benchmark, each non-baseline model's accuracy difference from the baseline as a dot with
    whiskers to its interval ends (green above 0, red below)."""
    esc = html.escape
    baseline = results["baseline"]
    others = [n for n in results["order"] if n != baseline]
    rows = [(b, n, results["models"][n]["benchmarks"][b]["vs_baseline"]) for b in results["benchmarks"]
            for n in others]
    if not rows:
        return "<p class='sub'>One model: no differences to draw.</p>"
    label_w, plot_w, right, row_h, top, bottom = 220, 320, 24, 20, 28, 28
    width, height = label_w + plot_w + right, top + row_h * len(rows) + bottom
    extent = max([abs(v) for _, _, vs in rows for v in (*vs["ci"], vs["mean_diff"])] + [0.01])
    lim = min(1.0, next(m * 10.0 ** math.floor(math.log10(extent)) for m in (1, 2, 5, 10)
                        if m * 10.0 ** math.floor(math.log10(extent)) >= extent))

    def x_of(v: float) -> float:
        return label_w + (min(max(v, -lim), lim) + lim) / (2 * lim) * plot_w

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11" '
             f'font-family="system-ui,sans-serif" role="img"><title>accuracy minus {esc(baseline)}</title>',
             f'<text x="{label_w}" y="16" fill="#555">accuracy − {esc(baseline)} (right = better)</text>']
    y1 = top + row_h * len(rows)
    for tick in (-lim, 0.0, lim):
        x = x_of(tick)
        dash = ' stroke-dasharray="3,3"' if tick == 0 else ""
        parts.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{y1}" stroke="#bbb"{dash}/>')
        parts.append(f'<text x="{x:.1f}" y="{y1 + 14}" text-anchor="middle" fill="#555">{tick:+.3g}</text>')
    for k, (b, n, vs) in enumerate(rows):
        y = top + row_h * k + row_h / 2
        colour = _IMPROVED if vs["improved"] else _WORSE if vs["worse"] else _NEUTRAL
        lo, hi, mid = x_of(vs["ci"][0]), x_of(vs["ci"][1]), x_of(vs["mean_diff"])
        parts.append(f'<text x="{label_w - 6}" y="{y + 4:.1f}" text-anchor="end">{esc(b)} · {esc(n)}</text>')
        parts.append(f'<line x1="{lo:.1f}" y1="{y:.1f}" x2="{hi:.1f}" y2="{y:.1f}" stroke="{colour}" '
                     'stroke-width="2"/>')
        parts.append(f'<circle cx="{mid:.1f}" cy="{y:.1f}" r="4" fill="{colour}"/>')
    parts.append("</svg>")
    return "".join(parts)


def _thumb(value: Any, origin: str | None) -> str:
    image = load_image(value, origin=origin)
    image.thumbnail((160, 160))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def write_vlm_report(path: str | Path, results: dict[str, Any], sets: Mapping[str, BenchSet], examples: int) -> None:
    """The self-contained HTML page of the run (module docstring); every string from the run is escaped."""
    esc = html.escape
    order, baseline, models = results["order"], results["baseline"], results["models"]
    others = [n for n in order if n != baseline]
    gen = results["generation"]
    settings = [("models", ", ".join(order)), ("baseline", baseline),
                ("decoding", f"{gen['decoding']}, at most {gen['max_new_tokens']} new tokens, "
                             f"batch {gen['batch_size']}"),
                ("bootstrap", f"{results['bootstrap']['n_boot']} resamples, level {results['bootstrap']['level']}"),
                ("answer extraction", results["extraction"])]
    body = [f"<h1>VLM benchmark</h1><p class='sub'>{len(order)} model(s) on {len(results['benchmarks'])} "
            "benchmark(s)</p>", "<table class='settings'>"]
    body += [f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>" for k, v in settings]
    body += ["</table>", "<h2>Differences from the baseline</h2>", f"<div class='chart'>{_difference_chart(results)}"
             "</div>", "<h2>Accuracy</h2><table><tr><th>benchmark</th><th>items</th>"]
    body += [f"<th>{esc(n)}</th>" for n in order] + [f"<th>{esc(n)} − {esc(baseline)}</th>" for n in others]
    body.append("</tr>")
    for b, info in results["benchmarks"].items():
        cells = [f"<td>{esc(b)} ({esc(info['format'])})</td><td class='n'>{info['items']}</td>"]
        cells += [f"<td class='n'>{models[n]['benchmarks'][b]['accuracy']:.4f}</td>" for n in order]
        for n in others:
            vs = models[n]["benchmarks"][b]["vs_baseline"]
            cls = "n up" if vs["improved"] else "n down" if vs["worse"] else "n"
            cells.append(f"<td class='{cls}'>{esc(_ci(vs))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
        for s, sub in models[order[0]]["benchmarks"][b].get("subsets", {}).items():
            cells = [f"<td>&nbsp;&nbsp;↳ {esc(s)}</td><td class='n'>{sub['n']}</td>"]
            cells += [f"<td class='n'>{models[n]['benchmarks'][b]['subsets'][s]['accuracy']:.4f}</td>" for n in order]
            body.append("<tr>" + "".join(cells) + "<td></td>" * len(others) + "</tr>")
    body.append("</table><h2>Unparsed answers</h2><table><tr><th>benchmark</th>"
                + "".join(f"<th>{esc(n)}</th>" for n in order) + "</tr>")
    for b, info in results["benchmarks"].items():
        body.append(f"<tr><td>{esc(b)}</td>" + "".join(
            f"<td class='n'>{models[n]['benchmarks'][b]['unparsed']} / {info['items']}</td>" for n in order) + "</tr>")
    body.append("</table>")
    pope = [b for b, info in results["benchmarks"].items() if info["format"] == "pope"]
    if pope:
        body.append("<h2>POPE</h2><table><tr><th>benchmark</th><th>model</th><th>accuracy</th><th>precision</th>"
                    "<th>recall</th><th>F1</th><th>yes-ratio</th></tr>")
        for b in pope:
            for n in order:
                p = models[n]["benchmarks"][b]["pope"]
                body.append(f"<tr><td>{esc(b)}</td><td>{esc(n)}</td>" + "".join(
                    f"<td class='n'>{p[k]:.4f}</td>" for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"))
                    + "</tr>")
        body.append("</table>")
    if examples:
        body.append("<h2>Examples</h2>")
        for b, bench in sets.items():
            for k, item in enumerate(bench.items[:examples]):
                imgs = "".join(f"<img src='{_thumb(v, item.origin)}' alt='image {j + 1}'>"
                               for j, v in enumerate(item.images))
                answers = "".join(
                    f"<div><b>{esc(n)}</b>: <span class='{'ok' if r['correct'][k] else 'bad'}'>"
                    f"{esc(r['response'][k]) or '(empty)'} → {esc(str(r['parsed'][k]))}</span></div>"
                    for n in order for r in [models[n]["benchmarks"][b]["per_item"]])
                gold = item.answer if isinstance(item.answer, str) else " | ".join(item.answer)
                body.append(f"<div class='item'><b>{esc(b)} · {esc(item.id)}</b><div>{imgs}</div>"
                            f"<pre>{esc(item_text(item))}</pre><div>gold: <b>{esc(gold)}</b></div>{answers}</div>")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>VLM benchmark</title>"
            f"<style>{_CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n")
    atomic_write_text(path, page)


# ---- command line ------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def bench_main(argv: list[str]) -> int:
    """The ``mm-align bench vlm`` command line (module docstring); returns the exit status."""
    p = _Parser(prog="mm-align bench vlm", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                   help="an image-text-to-text model directory (or a LoRA directory over one) under a row name "
                        "(repeatable; the first is the baseline unless --baseline)")
    p.add_argument("--bench", action="append", default=[], metavar="NAME=PATH[,key=value]",
                   help="a benchmark copy: NAME is (or starts with) mmmu, blink, mantis, muirbench, nlvr2 or pope; "
                        "options split=S (parquet sets) or images=DIR (nlvr2, pope) (repeatable)")
    p.add_argument("--out", default=None, help="output directory: results.json, results.md, report.html")
    p.add_argument("--max-items", type=int, default=None, help="use only the first N items of each benchmark")
    p.add_argument("--baseline", default=None, help="the model the others are compared with (default: the first)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="the longest answer in tokens (default: 16)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default: 8)")
    p.add_argument("--device", default="cpu", help="where the models run (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    p.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples (default: 10000)")
    p.add_argument("--examples", type=int, default=4, help="items per benchmark shown in report.html (default: 4)")
    try:
        args = p.parse_args(list(argv))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    missing = [f"--{o}" for o in ("model", "bench", "out") if not getattr(args, o)]
    if missing:
        print(f"error: mm-align bench vlm needs {' and '.join(missing)}", file=sys.stderr)
        return 2
    try:
        models = [parse_model(m) for m in args.model]
        benches = [parse_bench(b) for b in args.bench]
        cfg = VLMBenchConfig(baseline=args.baseline, max_items=args.max_items, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size, device=args.device, dtype=args.dtype, n_boot=args.n_boot,
                             examples=args.examples)
        results = bench_vlm(models, benches, args.out, cfg)
    except (ValueError, FileNotFoundError, OSError) as err:  # DataError and VLMLoadError are ValueErrors
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    print(results_markdown(results))
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0
