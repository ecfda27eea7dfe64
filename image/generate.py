"""``mm-align generate image``: sample N images per prompt, score them, build preference pairs.

    mm-align generate image --model DIR --prompts FILE|shapes:train --out DIR \\
        --evaluator clip_score:model=...,pretrained=... [--evaluator ...] [--samples-per-prompt 4] \\
        [--margin clip_score=0.01] [--strategy best_vs_worst|all_pairs] [--lora DIR] [--steps 25] ...

Each image has its own seed, derived from (``--seed``, the prompt text, the sample number), so a
prompt's images do not depend on the batch, the prompt's position or an earlier interrupted run.
Resumable: every finished prompt's samples and scores are appended to ``samples.jsonl`` (images
written first), and a rerun skips prompts already there. Pairs are built by the core pair builder
(:func:`mm_align.data.pairs.build_pairs`: a pair only when the winner beats the loser on EVERY
evaluator by more than its margin) and written as a Pick-a-Pic-schema parquet (``pairs.parquet``,
``label_0 = 1``: ``jpg_0`` is the chosen image) and a browsable folder (``pairs/<id>/{prompt.txt,
chosen.png, rejected.png}`` + ``index.html``); ``summary.json`` counts pairs kept and discarded.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm_align.image.evaluators import build_scorers, parse_evaluator_arg
from mm_align.image.image_io import png_bytes
from mm_align.image.sampling import SamplerConfig, add_sampler_args, sampler_from_args
from mm_align.image.toyworld.shapes import resolve_model
from PIL import Image
from tqdm.auto import tqdm

from mm_align.atomic import atomic_write_json, atomic_write_text
from mm_align.data.pairs import Candidate, MetricRule, build_pairs
from mm_align.help_format import HelpFormatter

# build_scorers and parse_evaluator_arg live in mm_align.image.evaluators; importable from here as before
__all__ = ["generate_main", "generate", "read_prompts", "image_seed", "build_scorers", "parse_evaluator_arg",
           "GenerateResult"]


def image_seed(seed: int, prompt: str, k: int) -> int:
    """The seed of sample ``k`` of ``prompt``: a hash, so it is independent of order and batching."""
    digest = hashlib.blake2b(f"{seed}\x00{prompt}\x00{k}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def read_prompts(source: str) -> list[str]:
    """Prompts from ``shapes:train`` / ``shapes:heldout``, a .txt file (one per line) or a jsonl (``prompt``)."""
    if source.startswith("shapes:"):
        from mm_align.image.toyworld.shapes import split_specs

        return [s.prompt for s in split_specs(source.split(":", 1)[1])]
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {source} does not exist (or use shapes:train / shapes:heldout)")
    prompts: list[str] = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: malformed json: {exc}") from exc
            if not isinstance(row, dict) or not str(row.get("prompt", "")).strip():
                raise ValueError(f"{path}:{i}: no 'prompt'")
            prompts.append(str(row["prompt"]).strip())
        else:
            prompts.append(line.strip())
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return list(dict.fromkeys(prompts))  # duplicates would share seeds: keep the first


@dataclass
class GenerateResult:
    samples: int
    new_prompts: int
    skipped_prompts: int
    pairs: int
    discarded: dict[str, int]
    out: Path


def _done(samples_path: Path, n: int) -> dict[str, list[dict]]:
    """Rows of prompts already finished; a partial last line (an interrupted write) is ignored."""
    rows: dict[str, list[dict]] = {}
    if not samples_path.is_file():
        return rows
    for line in samples_path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows.setdefault(row["prompt"], []).append(row)
    return {p: r for p, r in rows.items() if len(r) >= n}


def generate(model: str, prompts: list[str], out: Path, evaluators: list[Any], samples_per_prompt: int = 4,
             seed: int = 0, lora: str | None = None, sampler: Any = None, margins: dict[str, float] | None = None,
             strategy: str = "best_vs_worst", prompts_per_chunk: int = 16) -> GenerateResult:
    """Sample, score, pair and write (see the module docstring); returns the counts."""
    from mm_align.image.sampling import load_pipeline, sample_images  # looked up per call (tests replace them)

    if samples_per_prompt < 2:
        raise ValueError("--samples-per-prompt must be at least 2 to build pairs")
    unknown = set(margins or {}) - {e.name for e in evaluators}
    if unknown:
        raise ValueError(f"--margin for {sorted(unknown)}: no such evaluator (have {[e.name for e in evaluators]})")
    sampler = sampler or SamplerConfig()
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)
    samples_path = out / "samples.jsonl"
    done = _done(samples_path, samples_per_prompt)
    todo = [p for p in prompts if p not in done]
    index = {p: i for i, p in enumerate(prompts)}
    if todo:
        pipe = load_pipeline(model, lora=lora, cfg=sampler)
        bar = tqdm(total=len(todo) * samples_per_prompt, desc="generate", dynamic_ncols=True)
        for start in range(0, len(todo), prompts_per_chunk):
            chunk = todo[start : start + prompts_per_chunk]
            flat = [(p, k) for p in chunk for k in range(samples_per_prompt)]
            images = sample_images(pipe, [p for p, _ in flat], [image_seed(seed, p, k) for p, k in flat], sampler,
                                   progress=bar.update)
            scores = {e.name: e.score(images, [p for p, _ in flat]) for e in evaluators}
            lines = []
            for j, ((p, k), image) in enumerate(zip(flat, images)):
                name = f"samples/{index[p]:05d}_{k}.png"
                image.save(out / name)
                lines.append(json.dumps({"prompt": p, "sample": k, "seed": image_seed(seed, p, k), "file": name,
                                         "scores": {n: float(v[j]) for n, v in scores.items()}}))
            with open(samples_path, "a+b") as f:  # one append per chunk, after its images exist
                f.seek(0, os.SEEK_END)
                if f.tell():  # an interrupted earlier write may have left a partial line: end it
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
                f.write(("\n".join(lines) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
        bar.close()
    done = _done(samples_path, samples_per_prompt)
    candidates = [Candidate(p, row, row["scores"]) for p in prompts if p in done for row in done[p]]
    rules = [MetricRule(e.name, e.higher_is_better, (margins or {}).get(e.name, 0.0)) for e in evaluators]
    result = build_pairs(candidates, rules, strategy)  # type: ignore[arg-type]
    _write_pairs(out, result, model)
    summary = {
        "prompts": len(prompts), "samples_per_prompt": samples_per_prompt, "new_prompts": len(todo),
        "skipped_prompts (already done)": len(prompts) - len(todo), "pairs": len(result.pairs),
        "discarded": result.discarded, "evaluators": [e.name for e in evaluators],
        "margins": {r.name: r.margin for r in rules}, "strategy": strategy, "seed": seed, "model": model,
        "lora": lora,
    }
    atomic_write_json(out / "summary.json", summary)
    return GenerateResult(len(candidates), len(todo), len(prompts) - len(todo), len(result.pairs),
                          result.discarded, out)


def _write_pairs(out: Path, result: Any, model: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {k: [] for k in ("caption", "jpg_0", "jpg_1", "label_0", "label_1", "model_0", "model_1", "ranking_id")}
    cards = []
    pairs_dir = out / "pairs"
    pairs_dir.mkdir(exist_ok=True)
    for i, pair in enumerate(result.pairs):
        chosen, rejected = pair.chosen.sample, pair.rejected.sample
        pid = f"{i:05d}"
        d = pairs_dir / pid
        d.mkdir(exist_ok=True)
        (d / "prompt.txt").write_text(pair.group + "\n")
        for side, row in (("chosen", chosen), ("rejected", rejected)):
            Image.open(out / row["file"]).save(d / f"{side}.png")
        for col, row in (("jpg_0", chosen), ("jpg_1", rejected)):
            with Image.open(out / row["file"]) as image:
                rows[col].append(png_bytes(image))
        rows["caption"].append(pair.group)
        rows["label_0"].append(1.0)
        rows["label_1"].append(0.0)
        rows["model_0"].append(model)
        rows["model_1"].append(model)
        rows["ranking_id"].append(i)
        gaps = ", ".join(f"{k} +{v:.4g}" for k, v in pair.gaps.items())
        cards.append(f'<div class="pair"><p>{html.escape(pair.group)}</p><img src="pairs/{pid}/chosen.png">'
                     f'<img src="pairs/{pid}/rejected.png"><p class="gap">{html.escape(gaps)}</p></div>')
    table = pa.table(rows, schema=pa.schema([
        ("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64()),
        ("label_1", pa.float64()), ("model_0", pa.string()), ("model_1", pa.string()), ("ranking_id", pa.int64()),
    ]))
    tmp = out / ".pairs.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, out / "pairs.parquet")
    page = ("<!doctype html><meta charset=utf-8><title>preference pairs</title><style>body{font-family:sans-serif}"
            ".pair{display:inline-block;margin:6px;padding:4px;border:1px solid #ccc;width:150px;font-size:11px}"
            ".pair img{width:64px;image-rendering:pixelated;margin:2px}.gap{color:#555}</style>"
            f"<h1>{len(result.pairs)} pairs (chosen left, rejected right)</h1>" + "".join(cards))
    atomic_write_text(out / "index.html", page)


def generate_main(argv: list[str]) -> int:
    """The ``mm-align generate image`` command line."""
    p = argparse.ArgumentParser(prog="mm-align generate image", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="diffusers model directory or hub id ('shapes' = the shipped one)")
    p.add_argument("--lora", default=None, help="a LoRA directory (diffusers format) fused into the model")
    p.add_argument("--prompts", required=True, help="shapes:train, shapes:heldout, a .txt or a .jsonl file")
    p.add_argument("--out", required=True, help="output directory: pairs.parquet (Pick-a-Pic), the images, index.html")
    p.add_argument("--evaluator", action="append", required=True, help="type:key=value,... (repeatable)")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="images drawn per prompt (default: 4)")
    p.add_argument("--margin", action="append", default=[], help="evaluator=margin (a winner must beat by more)")
    p.add_argument("--strategy", choices=("best_vs_worst", "all_pairs"), default="best_vs_worst",
                   help="best_vs_worst: at most one pair per prompt; all_pairs: every pair past the margins")
    p.add_argument("--seed", type=int, default=0,
                   help="base seed; each image's seed derives from it, the prompt and the sample number")
    p.add_argument("--max-prompts", type=int, default=None, help="use only the first N prompts (default: all)")
    add_sampler_args(p)
    args = p.parse_args(argv)
    margins = {}
    for m in args.margin:
        name, eq, value = m.partition("=")
        if not eq:
            raise ValueError(f"--margin {m!r} is not evaluator=value")
        margins[name] = float(value)
    model = resolve_model(args.model)
    prompts = read_prompts(args.prompts)[: args.max_prompts]
    sampler = sampler_from_args(args)
    result = generate(model, prompts, Path(args.out), build_scorers(args.evaluator), args.samples_per_prompt,
                      args.seed, args.lora, sampler, margins, args.strategy)
    print(f"{result.new_prompts} prompts sampled, {result.skipped_prompts} already done; "
          f"kept {result.pairs} pairs, discarded {sum(result.discarded.values())} "
          f"({', '.join(f'{k}: {v}' for k, v in result.discarded.items()) or 'none'})")
    print(f"pairs: {result.out / 'pairs.parquet'}  browse: {result.out / 'index.html'}")
    return 0
