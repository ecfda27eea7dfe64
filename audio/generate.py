"""``mm-align generate speech``: GenSR-Pref preference pairs from a speech restorer's own samples.

    mm-align generate speech --model DIR --inputs SET|world:train --out DIR [-n 4] \\
        [--metric pesq_wb --metric estoi ...] [--margin pesq_wb=0.1] [--single-metric pesq_wb] [--seed 0]

GenSR-Pref (ALGORITHMS.md §7): for each degraded input ``x``, N restorations ``y_1..y_N`` are drawn FROM
THE MODEL ITSELF (the clean target is never a candidate: a ground-truth winner made models collapse), each
scored by a complementary metric suite (:mod:`mm_align.audio.metric_suite`: intrusive metrics against the
clean reference when the set has one, non-intrusive ones without, WER against the transcript), and a pair
``(y_w, y_l)`` is kept only when ``y_w`` beats ``y_l`` on EVERY metric ``m`` by more than its margin::

    keep (w, l)  ⇔  ∀m: s_m · (score_m(y_w) − score_m(y_l)) > margin_m,    s_m = +1 (higher is better) or −1

No weighted sum: a single-metric pair improves its own metric and degrades the others (reward hacking);
``single_metric=`` builds exactly those best-vs-worst pairs by one metric, for the ablation. The rule is the
core builder's (:func:`mm_align.data.pairs.build_pairs`); this module samples, scores, writes and counts.

Pairs per input: ``strategy="best_vs_worst"`` (the default) keeps AT MOST ONE pair per input: among the
unanimous pairs, the one with the largest gap on the first metric. One pair per input keeps every utterance
equally weighted in the DPO data (``all_pairs`` would give an input up to N(N−1)/2 correlated pairs sharing
samples) and takes the clearest preference the input has; ``all_pairs`` is there when data is scarce.

Seeds: sample ``k`` of input ``id`` uses ``crc32(f"{seed}:{id}:{k}")`` (:func:`sample_seed`), so a sample
does not depend on the input's position, the batch or an interrupted earlier run.

Output under ``out_dir``:

- ``samples/<id>/<k>.wav``: the restorations, at the model's output rate;
- ``samples/<id>/scores.json``: that input's samples, seeds and scores (or why a sample was not scored),
  written atomically after its wav files; a rerun skips inputs whose file matches the run's settings
  (model, N, seed, steps, metrics) and redoes the others, so an input interrupted mid-way is redone;
- ``pairs.jsonl``: the speech pair manifest (FORMATS_AND_EVALUATORS.md) ``{"id", "degraded", "chosen",
  "rejected", "clean"?, "text"?, "scores": {metric: [w, l]}}``, rebuilt from every input's scores each run
  (so a rerun writes the same file); files inside ``out_dir`` are relative to it, others absolute;
- ``summary.json``: inputs, candidates, pairs kept and every input discarded by reason (see
  :data:`REASON_LABELS`), candidates skipped as bad audio by reason (silent, clipped, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from mm_align.audio.datasets import SpeechClip as InputClip
from mm_align.audio.datasets import check_set_supports, read_speech_set
from mm_align.audio.io import AudioError, load_audio, save_audio
from mm_align.audio.metric_suite import MetricSuite, SuiteConfig
from mm_align.audio.metric_suite import SpeechClip as ScoredClip
from mm_align.audio.metrics import SpeechMetric, build_metrics
from mm_align.audio.restore import paradigm_of
from tqdm.auto import tqdm

from mm_align.atomic import atomic_write_json, atomic_write_text
from mm_align.data.pairs import BuiltPair, Candidate, MetricRule, build_pairs
from mm_align.help_format import HelpFormatter

logger = logging.getLogger(__name__)

__all__ = [
    "SpeechSampler", "load_restorer_any", "sample_seed", "DEFAULT_METRICS", "DEFAULT_BLIND_METRICS",
    "REASON_LABELS", "InputOutcome", "pair_rules", "decide_pairs", "pairs_from_candidates",
    "SpeechGenerateResult", "generate_speech_pairs", "format_summary", "generate_main",
]

# Metrics that need no network (DNSMOS's ONNX files ship in the speechmos wheel): quality, intelligibility,
# fidelity and perceived quality. Blind sets (no clean reference) get the non-intrusive DNSMOS outputs.
DEFAULT_METRICS = ("pesq_wb", "estoi", "si_sdr", "dnsmos_ovrl")
DEFAULT_BLIND_METRICS = ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl")

# Why an input gave no pair (the core builder's reasons, plus the ones this module adds).
REASON_LABELS = {
    "not_unanimous": "no unanimous winner (the metrics disagree on every pair)",
    "below_margin": "within margin (a unanimous winner, but not by more than every margin)",
    "tie": "tie on some metric",
    "single_candidate": "fewer than 2 scored candidates (the others were bad audio)",
    "non_finite_score": "non-finite score",
    "missing_metric": "missing metric",
    "bad_input": "the degraded input could not be read",
}
_FORMAT_VERSION = 1
_GROUP_REASONS = ("not_unanimous", "below_margin", "tie", "single_candidate")


def sample_seed(seed: int, clip_id: str, k: int) -> int:
    """The seed of restoration ``k`` of input ``clip_id``: ``crc32(f"{seed}:{clip_id}:{k}")`` (31 bits)."""
    return zlib.crc32(f"{seed}:{clip_id}:{k}".encode()) & 0x7FFFFFFF


# ---- the sampler ------------------------------------------------------------------------------------------


@dataclass
class SpeechSampler:
    """A restorer of any paradigm as ``sampler(wave, sr, seed) -> (T',) wave`` at :attr:`sample_rate`.

    Args:
        paradigm: ``"flow"``, ``"masked"`` or ``"ar"``.
        sample_rate: the rate of the restorations it returns.
        fn: ``fn(wave, sr, seed)``, the paradigm's ``restore`` with the model and settings bound.
    """

    paradigm: str
    sample_rate: int
    fn: Callable[[torch.Tensor, int, int], torch.Tensor]

    def __call__(self, wave: torch.Tensor, sr: int, seed: int) -> torch.Tensor:
        return self.fn(wave, sr, seed).float().flatten().cpu()


def load_restorer_any(model_dir: str | Path, steps: int = 8, device: str = "cpu", chunk_seconds: float | None = 8.0,
                      temperature: float = 1.0) -> SpeechSampler:
    """Load a flow, masked or AR restorer directory (or a LoRA directory over one) as a :class:`SpeechSampler`.

    The paradigm comes from :func:`mm_align.audio.restore.paradigm_of`. Flow models sample their initial
    noise from the seed (:func:`mm_align.audio.flow_enhancer.restore`); token models decode with sampling ON
    (``greedy=False`` at ``temperature``: greedy decoding would give the same restoration for every seed).

    Args:
        model_dir: the model directory.
        steps: ODE steps (flow) or decoding steps (masked; the AR model ignores it).
        device: where the model runs.
        chunk_seconds: restore longer inputs chunk by chunk (None or 0: whole).
        temperature: token sampling temperature (token models only).

    Raises:
        FileNotFoundError: not a model directory.
    """
    from mm_align.audio.toyworld.world_models import resolve_restorer

    path = Path(resolve_restorer(str(model_dir)))  # "speech_flow" etc.: the speech world's shipped bases
    if not path.is_dir():
        raise FileNotFoundError(f"--model {model_dir}: no such directory")
    paradigm = paradigm_of(path)
    chunk = chunk_seconds or None
    if paradigm == "flow":
        from mm_align.audio import flow_enhancer

        model = flow_enhancer.load_speech_model(path).to(device).eval()

        def flow_fn(wave: torch.Tensor, sr: int, seed: int) -> torch.Tensor:
            return flow_enhancer.restore(model, wave, sr, steps=steps, seed=seed, chunk_seconds=chunk)

        return SpeechSampler("flow", int(getattr(model, "sample_rate", 16000)), flow_fn)
    from mm_align.audio import token_models

    restorer, codec = token_models.load_restorer(path, device)

    def token_fn(wave: torch.Tensor, sr: int, seed: int) -> torch.Tensor:
        return token_models.restore(restorer, codec, wave, sr, steps=steps, seed=seed, chunk_seconds=chunk,
                                    greedy=False, temperature=temperature)

    return SpeechSampler(paradigm, int(codec.sample_rate), token_fn)


# ---- the rule ---------------------------------------------------------------------------------------------


@dataclass
class InputOutcome:
    """What one degraded input gave.

    Args:
        id: the input's id.
        candidates: restorations drawn.
        scores: per candidate, its metric scores, or None when it was not scored (see ``skipped``).
        skipped: candidate index -> the suite's bad-audio reason (``"silent: ..."``).
        pairs: kept pairs; ``pair.chosen.sample`` / ``pair.rejected.sample`` are candidate indices.
        discarded: the core builder's discard counts for this input.
        reason: None when a pair was kept, else why not (a key of :data:`REASON_LABELS`).
    """

    id: str
    candidates: int
    scores: list[dict[str, float] | None]
    skipped: dict[int, str] = field(default_factory=dict)
    pairs: list[BuiltPair] = field(default_factory=list)
    discarded: dict[str, int] = field(default_factory=dict)
    reason: str | None = None


def pair_rules(metrics: Sequence[SpeechMetric], margins: dict[str, float] | None = None,
               single_metric: str | None = None) -> list[MetricRule]:
    """The rules a pair must satisfy: every metric with its direction and margin, or ``single_metric`` alone.

    Raises:
        ValueError: a margin or ``single_metric`` names no metric of the suite.
    """
    names = [m.name for m in metrics]
    margins = dict(margins or {})
    unknown = sorted(set(margins) - set(names))
    if unknown:
        raise ValueError(f"margin for {', '.join(unknown)}: not a scored metric (scored: {', '.join(names)})")
    if single_metric is not None and single_metric not in names:
        raise ValueError(f"single metric {single_metric!r} is not a scored metric (scored: {', '.join(names)})")
    chosen = [m for m in metrics if single_metric is None or m.name == single_metric]
    return [MetricRule(m.name, bool(m.higher_is_better), float(margins.get(m.name, 0.0))) for m in chosen]


def decide_pairs(clip_id: str, scores: Sequence[dict[str, float] | None], rules: list[MetricRule],
                 strategy: Literal["best_vs_worst", "all_pairs"] = "best_vs_worst",
                 skipped: dict[int, str] | None = None) -> InputOutcome:
    """Pairs of one input's scored candidates by the core builder (unanimous over ``rules``).

    Args:
        clip_id: the input (the builder's group).
        scores: per candidate its scores, None for one that was not scored.
        rules: from :func:`pair_rules`.
        strategy: the core builder's strategy (module docstring: at most one pair per input by default).
        skipped: why the unscored candidates were not scored.
    """
    cands = [Candidate(clip_id, k, s) for k, s in enumerate(scores) if s is not None]
    result = build_pairs(cands, rules, strategy)
    out = InputOutcome(clip_id, len(scores), list(scores), dict(skipped or {}), result.pairs, dict(result.discarded))
    if not result.pairs:  # best_vs_worst counts an unpaired group once; all_pairs per pair: the most frequent
        group_reasons = Counter({r: k for r, k in result.discarded.items() if r in _GROUP_REASONS})
        out.reason = group_reasons.most_common(1)[0][0] if group_reasons else "single_candidate"
    return out


def pairs_from_candidates(waves: Sequence[torch.Tensor], sample_rate: int, metrics: Sequence[str | SpeechMetric],
                          reference: torch.Tensor | None = None, text: str | None = None,
                          margins: dict[str, float] | None = None, single_metric: str | None = None,
                          strategy: Literal["best_vs_worst", "all_pairs"] = "best_vs_worst",
                          clip_id: str = "clip", num_workers: int | None = 0) -> InputOutcome:
    """Score candidate waveforms of ONE input with the metric suite and pair them (no model involved).

    Bad audio is skipped by the suite (``on_bad="skip"``) and listed in :attr:`InputOutcome.skipped`.

    Args:
        waves: the candidates, each ``(T,)`` at ``sample_rate``.
        sample_rate: their rate (and the reference's).
        metrics: metric specs or objects (:func:`mm_align.audio.metrics.build_metrics`).
        reference: the clean reference, for intrusive metrics.
        text: the transcript, for WER / CER.
        margins, single_metric, strategy: see :func:`generate_speech_pairs`.
        clip_id: the input's id.
        num_workers: the suite's worker processes (0: in this process).
    """
    built = build_metrics(list(metrics))
    rules = pair_rules(built, margins, single_metric)
    suite = MetricSuite(built, on_bad="skip", num_workers=num_workers, progress=False)
    clips = [ScoredClip(str(k), w, sample_rate, reference, text=text) for k, w in enumerate(waves)]
    scores, skipped = _score(suite, clips, [(0, k) for k in range(len(waves))], [len(waves)])
    return decide_pairs(clip_id, scores[0], rules, strategy, skipped[0])


def _score(suite: MetricSuite, clips: list[ScoredClip], keys: list[tuple[int, int]], sizes: list[int]
           ) -> tuple[list[list[dict[str, float] | None]], list[dict[int, str]]]:
    """Score clips keyed (input index, candidate index) of inputs with ``sizes`` candidates each; per input: the
    scores of each candidate (None: not scored) and the suite's skip reasons."""
    res = suite.evaluate(clips) if clips else None
    by_name = {c.name: key for c, key in zip(clips, keys)}
    scores: list[list[dict[str, float] | None]] = [[None] * size for size in sizes]
    skipped: list[dict[int, str]] = [{} for _ in sizes]
    if res is None:
        return scores, skipped
    for j, name in enumerate(res.names):
        i, k = by_name[name]
        scores[i][k] = {m: float(v[j]) for m, v in res.scores.items()}
    for s in res.skipped:
        i, k = by_name[s.name]
        skipped[i][k] = s.reason
    return scores, skipped


# ---- the command ------------------------------------------------------------------------------------------


@dataclass
class SpeechGenerateResult:
    """What :func:`generate_speech_pairs` did: the counts of ``summary.json`` and the files it wrote."""

    summary: dict[str, Any]
    outcomes: list[InputOutcome]
    pairs_path: Path
    summary_path: Path


def _safe(clip_id: str) -> str:
    """A directory name for an id: unsafe characters replaced, with a crc32 suffix when anything was."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", clip_id).strip(".") or "_"
    return name if name == clip_id else f"{name}-{zlib.crc32(clip_id.encode()):08x}"


def _rel(path: Path, out_dir: Path) -> str:
    """``path`` relative to ``out_dir`` when it lies inside it, absolute otherwise."""
    p = path.resolve()
    try:
        return p.relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        return str(p)


def _read_inputs(inputs: str | Path | Sequence[InputClip], out_dir: Path,
                 max_inputs: int | None) -> tuple[list[InputClip], dict[str, int]]:
    """The degraded inputs and the reader's skips by reason (``world:SPLIT`` writes the speech world's)."""
    if isinstance(inputs, (str, Path)):
        source = str(inputs)
        if source.startswith("world:"):
            from mm_align.audio.toyworld.speech_world import write_degraded_split

            # the world's inputs are fixed (degradation seed 0), whatever the sampling seed
            source = str(write_degraded_split(source.split(":", 1)[1], out_dir / "inputs", 0, max_inputs))
        read = read_speech_set(source)
        return read.clips[:max_inputs], read.skipped_by_reason()
    clips = list(inputs)[:max_inputs]
    ids = [c.id for c in clips]
    if len(set(ids)) != len(ids):
        raise ValueError(f"input ids must be unique; repeated: {sorted({i for i in ids if ids.count(i) > 1})}")
    return clips, {}


def _check_inputs(clips: list[InputClip], metrics: list[SpeechMetric]) -> None:
    if not clips:
        raise ValueError("no degraded inputs to restore")
    check_set_supports(clips, metrics)


def _load_state(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """An input's saved samples and scores when they were made with these settings and their files exist."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        return None
    if any(c.get("file") and not (path.parent / c["file"]).is_file() for c in state.get("candidates", [])):
        return None
    return state


def generate_speech_pairs(
    model_dir: str | Path,
    inputs: str | Path | Sequence[InputClip],
    out_dir: str | Path,
    n: int = 4,
    metrics: Sequence[str | SpeechMetric] | None = None,
    margins: dict[str, float] | None = None,
    single_metric: str | None = None,
    strategy: Literal["best_vs_worst", "all_pairs"] = "best_vs_worst",
    seed: int = 0,
    steps: int = 8,
    num_workers: int | None = None,
    max_inputs: int | None = None,
    device: str = "cpu",
    chunk_seconds: float | None = 8.0,
    temperature: float = 1.0,
    inputs_per_batch: int = 8,
    suite_config: SuiteConfig | None = None,
    progress: bool = True,
) -> SpeechGenerateResult:
    """Sample N restorations per degraded input, score them, keep GenSR-Pref unanimous pairs (module docstring).

    Args:
        model_dir: a flow, masked or AR restorer directory (:func:`load_restorer_any`).
        inputs: a restoration set (VoiceBank / DNS directory or jsonl manifest, :func:`read_speech_set`),
            ``"world:train"`` / ``"world:dev"`` (the speech world's degraded split, written under
            ``out_dir/inputs``, degradation seed 0, so they do not change with ``seed``), or a list of
            :class:`mm_align.audio.datasets.SpeechClip`.
        out_dir: where samples, ``pairs.jsonl`` and ``summary.json`` go.
        n: restorations per input (>= 2).
        metrics: metric specs; default :data:`DEFAULT_METRICS`, or :data:`DEFAULT_BLIND_METRICS` when some
            input has no clean reference.
        margins: metric -> margin; a winner must beat the loser by MORE than it on that metric.
        single_metric: pair best vs worst by this metric alone (the ablation); every metric is still scored
            and written in ``scores``.
        strategy: ``best_vs_worst`` (at most one pair per input) or ``all_pairs``.
        seed: base seed of :func:`sample_seed`.
        steps: the model's sampling steps.
        num_workers: metric suite worker processes (None: min(cores, clips); 0: in this process).
        max_inputs: use only the first N inputs.
        device: where the model runs.
        chunk_seconds: restore longer inputs chunk by chunk (None: whole).
        temperature: token models' sampling temperature.
        inputs_per_batch: inputs restored before one suite call scores all their candidates (and their
            ``scores.json`` are written): larger batches keep the suite's workers busier, smaller lose less
            work to an interruption.
        suite_config: the bad-audio thresholds of the metric suite (its ``on_bad`` is always ``"skip"``: a bad
            restoration simply forms no pair, and is counted by reason).
        progress: one tqdm bar over the inputs.

    Raises:
        ValueError: n < 2, no inputs, a margin or single metric naming no metric, a metric needing what an
            input lacks; DataError / FileNotFoundError: unreadable inputs or model.
    """
    if n < 2:
        raise ValueError(f"n must be at least 2 to build pairs, got {n}")
    if inputs_per_batch < 1:
        raise ValueError(f"inputs_per_batch must be >= 1, got {inputs_per_batch}")
    out = Path(out_dir)
    from mm_align.audio.toyworld.world_models import resolve_restorer

    model_path = Path(resolve_restorer(str(model_dir)))
    if not model_path.is_dir():
        raise FileNotFoundError(f"--model {model_dir}: no such directory")
    clips, unreadable = _read_inputs(inputs, out, max_inputs)
    if metrics is None:
        metrics = DEFAULT_METRICS if clips and all(c.clean for c in clips) else DEFAULT_BLIND_METRICS
    built = build_metrics(list(metrics))
    names = [m.name for m in built]
    rules = pair_rules(built, margins, single_metric)
    _check_inputs(clips, built)
    overrides: dict[str, Any] = {"on_bad": "skip", "progress": False}
    if num_workers is not None:
        overrides["num_workers"] = num_workers
    suite = MetricSuite(built, suite_config, **overrides)
    fingerprint = {"version": _FORMAT_VERSION, "model": str(model_path.resolve()), "n": n, "seed": seed,
                   "steps": steps, "metrics": names, "chunk_seconds": chunk_seconds, "temperature": temperature,
                   "checks": {k: v for k, v in asdict(suite.config).items()
                              if k not in ("num_workers", "start_method", "progress")}}
    (out / "samples").mkdir(parents=True, exist_ok=True)
    dirs = {c.id: out / "samples" / _safe(c.id) for c in clips}
    states: dict[str, dict[str, Any]] = {}
    for c in clips:
        state = _load_state(dirs[c.id] / "scores.json", {**fingerprint, "degraded": str(c.degraded)})
        if state is not None:
            states[c.id] = state
    todo = [c for c in clips if c.id not in states]
    sampler: SpeechSampler | None = None
    bar = tqdm(total=len(todo), desc="generate speech", unit="input", disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, len(todo), inputs_per_batch):
            batch = todo[start: start + inputs_per_batch]
            if sampler is None:
                sampler = load_restorer_any(model_path, steps, device, chunk_seconds, temperature)
            for c, state in zip(batch, _restore_and_score(sampler, suite, batch, dirs, n, seed)):
                state["fingerprint"] = {**fingerprint, "degraded": str(c.degraded)}
                atomic_write_json(dirs[c.id] / "scores.json", state)
                states[c.id] = state
            bar.update(len(batch))
    finally:
        bar.close()

    outcomes, rows = [], []
    for c in clips:
        state = states[c.id]
        cands = state["candidates"]
        if state.get("error"):
            outcome = InputOutcome(c.id, 0, [], reason="bad_input")
        else:
            skipped = {i: cd["skipped"] for i, cd in enumerate(cands) if cd.get("skipped")}
            outcome = decide_pairs(c.id, [cd.get("scores") for cd in cands], rules, strategy, skipped)
        outcomes.append(outcome)
        for pair in outcome.pairs:
            w, l = cands[pair.chosen.sample], cands[pair.rejected.sample]
            row: dict[str, Any] = {
                "id": c.id if strategy == "best_vs_worst" else f"{c.id}:{pair.chosen.sample}>{pair.rejected.sample}",
                "degraded": _rel(Path(c.degraded), out),
                "chosen": _rel(dirs[c.id] / w["file"], out),
                "rejected": _rel(dirs[c.id] / l["file"], out),
            }
            if c.clean:
                row["clean"] = _rel(Path(c.clean), out)
            if c.text:
                row["text"] = c.text
            row["scores"] = {m: [w["scores"][m], l["scores"][m]] for m in names}
            rows.append(row)
    pairs_path = out / "pairs.jsonl"
    atomic_write_text(pairs_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    summary = _summary(outcomes, clips, todo, unreadable, names, rules, single_metric, strategy, n, seed, steps,
                       model_path, len(rows))
    summary_path = out / "summary.json"
    atomic_write_json(summary_path, summary)
    return SpeechGenerateResult(summary, outcomes, pairs_path, summary_path)


def _restore_and_score(sampler: SpeechSampler, suite: MetricSuite, batch: list[InputClip], dirs: dict[str, Path],
                       n: int, seed: int) -> list[dict[str, Any]]:
    """Restore every input of ``batch`` N times (wav files written), then score all candidates in one suite call."""
    states: list[dict[str, Any]] = []
    clips: list[ScoredClip] = []
    keys: list[tuple[int, int]] = []
    for i, c in enumerate(batch):
        d = dirs[c.id]
        d.mkdir(parents=True, exist_ok=True)
        (d / "scores.json").unlink(missing_ok=True)  # redone from here: never a stale record over new files
        for old in d.glob("*.wav"):
            if not (old.stem.isdigit() and int(old.stem) < n):
                old.unlink()  # a sample of an earlier run with a larger N
        try:
            wave, sr = load_audio(c.degraded)
        except AudioError as err:
            states.append({"id": c.id, "error": str(err), "candidates": []})
            continue
        cands = []
        for k in range(n):
            s = sample_seed(seed, c.id, k)
            restored = sampler(wave, sr, s)
            cand: dict[str, Any] = {"k": k, "seed": s, "file": None, "scores": None, "skipped": None}
            try:
                save_audio(d / f"{k}.wav", restored, sampler.sample_rate)
            except AudioError:  # NaN / inf samples: nothing to write or score
                cand["skipped"] = "non-finite: the restoration has NaN/inf samples"
            else:
                cand["file"] = f"{k}.wav"
                clips.append(ScoredClip(f"{i}/{k}", d / f"{k}.wav", reference=c.clean, text=c.text))
                keys.append((i, k))
            cands.append(cand)
        states.append({"id": c.id, "candidates": cands})
    scores, skipped = _score(suite, clips, keys, [len(s["candidates"]) for s in states])
    for i, state in enumerate(states):
        for k, cand in enumerate(state["candidates"]):
            if scores[i][k] is not None:
                cand["scores"] = scores[i][k]
            elif k in skipped[i]:
                cand["skipped"] = skipped[i][k]
    return states


def _summary(outcomes: list[InputOutcome], clips: list[InputClip], todo: list[InputClip], unreadable: dict[str, int],
             names: list[str], rules: list[MetricRule], single_metric: str | None, strategy: str, n: int, seed: int,
             steps: int, model: Path, n_pairs: int) -> dict[str, Any]:
    discarded = Counter(o.reason for o in outcomes if o.reason is not None)
    examples: dict[str, list[str]] = {}
    for o in outcomes:
        if o.reason is not None and len(examples.setdefault(o.reason, [])) < 5:
            examples[o.reason].append(o.id)
    bad_audio = Counter(r.split(":", 1)[0].strip() for o in outcomes for r in o.skipped.values())
    pair_discards: Counter[str] = Counter()
    for o in outcomes:
        pair_discards.update(o.discarded)
    candidates = sum(o.candidates for o in outcomes)
    return {
        "model": str(model), "rule": "single_metric" if single_metric else "unanimous", "metrics": names,
        "pair_metrics": [r.name for r in rules], "margins": {r.name: r.margin for r in rules},
        "single_metric": single_metric, "strategy": strategy, "n": n, "seed": seed, "steps": steps,
        "inputs": len(clips), "new_inputs": len(todo), "resumed_inputs": len(clips) - len(todo),
        "inputs_unreadable_by_reader": unreadable,
        "candidates": candidates, "candidates_scored": sum(sum(s is not None for s in o.scores) for o in outcomes),
        "candidates_bad_audio": dict(bad_audio),
        "pairs": n_pairs, "inputs_paired": sum(o.reason is None for o in outcomes),
        "inputs_discarded": dict(discarded), "discard_examples": examples,
        "pair_discards": dict(pair_discards),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a small table: inputs, candidates, pairs kept and every discard by reason."""
    rows: list[tuple[str, int, str]] = [
        ("inputs", summary["inputs"], f"{summary['new_inputs']} new, {summary['resumed_inputs']} already done"),
        ("candidates", summary["candidates"], f"{summary['n']} per input, never the clean target"),
        ("  scored", summary["candidates_scored"], ""),
    ]
    rows += [(f"  bad audio, skipped: {r}", k, "") for r, k in summary["candidates_bad_audio"].items()]
    rule = (f"single metric {summary['single_metric']}" if summary["single_metric"]
            else "unanimous over " + ", ".join(summary["pair_metrics"]))
    rows.append(("pairs kept", summary["pairs"], rule))
    rows.append(("inputs paired", summary["inputs_paired"], ""))
    for reason, k in summary["inputs_discarded"].items():
        examples = ", ".join(summary["discard_examples"].get(reason, []))
        rows.append((f"inputs discarded: {reason}", k, f"{REASON_LABELS.get(reason, reason)}; e.g. {examples}"))
    rows += [(f"inputs the reader skipped: {r}", k, "") for r, k in summary["inputs_unreadable_by_reader"].items()]
    width = max(len(label) for label, _, _ in rows)
    return "\n".join(f"{label:<{width}}  {value:>6}" + (f"  ({note})" if note else "") for label, value, note in rows)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def _margins(items: list[str]) -> dict[str, float]:
    margins: dict[str, float] = {}
    for item in items:
        name, eq, value = item.partition("=")
        try:
            margins[name.strip()] = float(value)
        except ValueError:
            eq = ""
        if not eq or not name.strip():
            raise ValueError(f"--margin {item!r} is not METRIC=VALUE (e.g. pesq_wb=0.1)")
    return margins


def generate_main(argv: list[str]) -> int:
    """The ``mm-align generate speech`` command line (module docstring); returns the exit status."""
    p = _Parser(prog="mm-align generate speech", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--model", default=None, help="a flow, masked or ar restorer directory (or a LoRA directory)")
    p.add_argument("--inputs", default=None, help="degraded inputs: a VoiceBank-DEMAND or DNS directory, a jsonl "
                                                  "restoration manifest, or world:train / world:dev")
    p.add_argument("--out", default=None, help="output directory: samples/, pairs.jsonl, summary.json")
    p.add_argument("-n", type=int, default=4, help="restorations sampled per input (default: 4)")
    p.add_argument("--metric", action="append", default=None,
                   help="a metric spec, e.g. pesq_wb or wer:asr=DIR (repeatable; default: "
                        f"{' '.join(DEFAULT_METRICS)}, or {' '.join(DEFAULT_BLIND_METRICS)} without clean files)")
    p.add_argument("--margin", action="append", default=[],
                   help="METRIC=VALUE: the winner must beat the loser by more than VALUE on METRIC (repeatable)")
    p.add_argument("--single-metric", default=None, metavar="METRIC",
                   help="ablation: best-vs-worst pairs by this one metric instead of the unanimous rule")
    p.add_argument("--strategy", choices=("best_vs_worst", "all_pairs"), default="best_vs_worst",
                   help="best_vs_worst: at most one pair per input (default); all_pairs: every unanimous pair")
    p.add_argument("--seed", type=int, default=0, help="base seed; sample k of input ID uses crc32('SEED:ID:k')")
    p.add_argument("--steps", type=int, default=8, help="sampling steps (flow ODE steps, masked decoding steps)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="metric worker processes (default: min(cores, clips); 0: in this process)")
    p.add_argument("--max-inputs", type=int, default=None, help="use only the first N inputs (default: all)")
    p.add_argument("--device", default="cpu", help="where the model runs (default: cpu)")
    p.add_argument("--chunk-seconds", type=float, default=8.0,
                   help="restore longer inputs chunk by chunk (0: whole; default: 8)")
    try:
        args = p.parse_args(list(argv))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    for opt in ("model", "inputs", "out"):
        if getattr(args, opt) is None:
            print(f"error: mm-align generate speech needs --{opt}", file=sys.stderr)
            return 2
    try:
        result = generate_speech_pairs(
            args.model, args.inputs, args.out, n=args.n, metrics=args.metric, margins=_margins(args.margin),
            single_metric=args.single_metric, strategy=args.strategy, seed=args.seed, steps=args.steps,
            num_workers=args.num_workers, max_inputs=args.max_inputs, device=args.device,
            chunk_seconds=args.chunk_seconds or None)
    except (ValueError, FileNotFoundError, AudioError, OSError) as err:  # DataError and ConfigError are ValueErrors
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    print(format_summary(result.summary))
    print(f"pairs: {result.pairs_path}  summary: {result.summary_path}")
    return 0
