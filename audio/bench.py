"""``mm-align bench speech``: speech restorers side by side on one set, the same seed per clip for all.

    mm-align bench speech --model base=DIR --model aligned=DIR [--model ...] --inputs SET|world:SPLIT --out DIR \\
        [--metric M ...] [--seed 0] [--steps 8] [--max-inputs N] [--num-workers K] [--baseline NAME] [--examples 4]

Each ``--model NAME=DIR`` is a flow, masked or AR restorer directory, or a LoRA directory over one
(:func:`mm_align.audio.generate.load_restorer_any`). Every model restores every degraded input with the SAME seed
per clip (:func:`mm_align.audio.generate.sample_seed` ``(seed, id, 0)``), so a difference between two models on a
clip is the models' doing, and the per-clip differences are paired. The degraded input itself is scored too, as
the row ``degraded`` (the "before restoration" line).

Every output is scored by the metric suite (:mod:`mm_align.audio.metric_suite`) with ``on_bad="raise"``: in an
evaluation a silent, clipped, too short or mismatched clip is an error naming the file, never a clip quietly left
out of a mean. The metrics default to every one the set supports: PESQ-WB, ESTOI, SI-SDR, LSD and speaker
similarity when every clip has a clean reference, the four DNSMOS outputs always, and WER / CER when every clip
has a transcript and an ASR model is known (``--asr DIR``; for ``world:SPLIT`` the speech world's shipped
recogniser, :func:`mm_align.audio.toyworld.asr_weights.speech_asr_dir`). A default metric the set cannot give is
listed under ``left_out`` with the reason.

Per model and metric: the mean and the per-clip scores, and, for every model other than the baseline (default:
the first ``--model``), the paired percentile bootstrap of its difference from the baseline
(:func:`mm_align.stats.paired_bootstrap`, Efron & Tibshirani 1993; oriented so that positive is better, whatever
the metric's direction), flagged ``improved`` when the 95% interval lies above 0 and ``worse`` when below; each
model's difference from the degraded input is given the same way (``vs_degraded``).

Output under ``--out``:

- ``audio/<model>/<id>.wav``: every restoration (``<id>`` with unsafe characters replaced and a crc32 suffix
  when any was); ``audio/degraded/`` and ``audio/clean/``: copies of the example clips' input and reference;
- ``results.json`` (written atomically): settings, inputs, models, per-row per-metric scores (per-clip scores
  rounded to 9 significant digits) and the bootstrap comparisons; everything but the ``timing`` key is the same
  when the same command is run again;
- ``results.md``: the summary as a Markdown table; ``report.html``: the page of
  :mod:`mm_align.audio.bench_report` (chart, table, players and spectrograms of ``--examples`` clips).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm_align.audio.bench_report import ExampleClip, ExamplePlayer, metric_label, write_speech_report
from mm_align.audio.datasets import SpeechClip as InputClip
from mm_align.audio.datasets import check_set_supports, read_speech_set
from mm_align.audio.generate import load_restorer_any, sample_seed
from mm_align.audio.io import AudioError, load_audio, save_audio
from mm_align.audio.metric_suite import MetricSuite, SpeechClip
from mm_align.audio.metrics import SpeechMetric, build_metrics
from tqdm.auto import tqdm

from mm_align.atomic import atomic_write_json, atomic_write_text
from mm_align.config import library_versions, option, replace_checked
from mm_align.help_format import HelpFormatter
from mm_align.stats import paired_comparison

logger = logging.getLogger(__name__)

__all__ = ["SpeechBenchConfig", "BenchModel", "parse_model", "default_metrics", "bench_speech", "results_markdown",
           "bench_main", "INTRUSIVE_METRICS", "BLIND_METRICS", "SPEAKER_METRICS", "CONTENT_METRICS", "RESERVED_NAMES",
           "SIGNIFICANT_DIGITS"]

# The default metrics, in the order they are reported.
INTRUSIVE_METRICS = ("pesq_wb", "estoi", "si_sdr", "lsd")  # need the clean reference
BLIND_METRICS = ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808")  # need nothing
SPEAKER_METRICS = ("speaker_similarity",)  # needs the clean reference
CONTENT_METRICS = ("wer", "cer")  # need the transcript and an ASR model
RESERVED_NAMES = ("degraded", "clean")  # rows and audio folders of their own
SIGNIFICANT_DIGITS = 9  # per-clip scores are stored rounded to this many significant digits (see _score)
_FORMAT_VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class SpeechBenchConfig:
    """The settings of ``mm-align bench speech`` (the models, inputs, output and metrics are arguments)."""

    seed: int = option(0, help="Base restoration seed: clip ID is restored with crc32('SEED:ID:0') by every model.")
    steps: int = option(8, help="Sampling steps (flow ODE steps, masked decoding steps; the AR model ignores it).")
    baseline: str | None = option(None, help="The model the others are compared with; default the first model.")
    examples: int = option(4, help="Clips shown in report.html with players and spectrograms (the first N).")
    max_inputs: int | None = option(None, help="Use only the first N inputs; default all.")
    num_workers: int | None = option(None, help="Metric worker processes; default min(cores, clips); 0: in process.")
    device: str = option("cpu", help="Where the models run.")
    chunk_seconds: float | None = option(8.0, help="Restore longer inputs chunk by chunk; None or 0: whole.")
    temperature: float = option(1.0, help="Token models' sampling temperature.")
    asr: str | None = option(None, help="A local CTC ASR directory for the default WER / CER; world:SPLIT inputs "
                                        "default to the speech world's recogniser.")
    n_boot: int = option(10000, help="Bootstrap resamples of each paired mean difference.")
    level: float = option(0.95, help="Coverage of the bootstrap intervals.")
    embed_audio: bool = option(False, help="Embed the example audio in report.html instead of linking the files.")
    progress: bool = option(True, help="tqdm bars over restoration and scoring.")

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.examples < 0:
            raise ValueError(f"examples must be >= 0, got {self.examples}")
        if self.max_inputs is not None and self.max_inputs < 1:
            raise ValueError(f"max_inputs must be >= 1, got {self.max_inputs}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.n_boot < 1:
            raise ValueError(f"n_boot must be >= 1, got {self.n_boot}")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {self.level}")


@dataclass
class BenchModel:
    """A model of the benchmark: its row name (also its folder under ``audio/``) and its directory."""

    name: str
    dir: Path


def parse_model(text: str) -> BenchModel:
    """``NAME=DIR`` -> :class:`BenchModel`.

    Raises:
        ValueError: not ``NAME=DIR``, or a name that is reserved or not a plain folder name.
        FileNotFoundError: ``DIR`` is not a directory.
    """
    name, eq, path = text.partition("=")
    name = name.strip()
    if not eq or not name or not path:
        raise ValueError(f"--model {text!r} is not NAME=DIR (e.g. base=runs/base)")
    _check_name(name)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"--model {name}: {path}: no such directory")
    return BenchModel(name, Path(path))


def _check_name(name: str) -> None:
    if name in RESERVED_NAMES:
        raise ValueError(f"--model name {name!r} is reserved (the rows {', '.join(RESERVED_NAMES)}); pick another")
    if not _NAME.match(name):
        raise ValueError(f"--model name {name!r}: use letters, digits, '.', '_' and '-' (it names a folder)")


def _stem(clip_id: str) -> str:
    """A file stem for a clip id: unsafe characters replaced, with a crc32 suffix when anything was."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", clip_id).strip(".") or "_"
    return name if name == clip_id else f"{name}-{zlib.crc32(clip_id.encode()):08x}"


def _rel(path: Path, out_dir: Path) -> str:
    """``path`` relative to ``out_dir`` when it lies inside it, absolute otherwise."""
    p = Path(path).resolve()
    try:
        return p.relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        return str(p)


def _read_inputs(inputs: str | Path | Sequence[InputClip], out_dir: Path, max_inputs: int | None
                 ) -> tuple[list[InputClip], dict[str, Any]]:
    """The inputs (as ``mm-align generate speech`` reads them) and their description for ``results.json``."""
    if isinstance(inputs, (str, Path)):
        source = str(inputs)
        manifest = source
        if source.startswith("world:"):
            from mm_align.audio.toyworld.speech_world import write_degraded_split

            # the world's inputs are fixed (degradation seed 0), whatever the restoration seed
            manifest = str(write_degraded_split(source.split(":", 1)[1], out_dir / "inputs", 0, max_inputs))
        read = read_speech_set(manifest)
        clips, skipped = read.clips[:max_inputs], read.skipped_by_reason()
        manifest = _rel(Path(manifest), out_dir)
    else:
        clips = list(inputs)[:max_inputs]
        source, manifest, skipped = "clips", None, {}
        ids = [c.id for c in clips]
        if len(set(ids)) != len(ids):
            raise ValueError(f"input ids must be unique; repeated: {sorted({i for i in ids if ids.count(i) > 1})}")
    if not clips:
        raise ValueError(f"no degraded inputs to restore in {source}")
    stems = [_stem(c.id) for c in clips]
    if len(set(stems)) != len(stems):  # ids differing in case only, on a case-folding file system, or a crc clash
        raise ValueError("two input ids map to the same file name: "
                         f"{sorted({c.id for c, s in zip(clips, stems) if stems.count(s) > 1})}")
    description = {"source": source, "manifest": manifest, "clips": len(clips), "ids": [c.id for c in clips],
                   "has_clean": all(c.clean for c in clips), "has_text": all(c.text for c in clips),
                   "skipped_by_reader": skipped}
    return clips, description


def default_metrics(clips: Sequence[InputClip], asr: str | Path | None) -> tuple[list[str], dict[str, str]]:
    """The metric specs a set supports (module docstring) and, for each default metric left out, why.

    Args:
        clips: the inputs.
        asr: the CTC ASR directory for WER / CER (None: no content metrics).

    Returns:
        ``(specs, left_out)``: specs for :func:`mm_align.audio.metrics.build_metrics`, and metric -> reason.
    """
    specs: list[str] = []
    left_out: dict[str, str] = {}
    no_clean = [c.id for c in clips if not c.clean]
    for m in INTRUSIVE_METRICS:
        if no_clean:
            left_out[m] = f"{len(no_clean)} of {len(clips)} clips have no clean reference (e.g. {no_clean[0]!r})"
        else:
            specs.append(m)
    specs += BLIND_METRICS
    for m in SPEAKER_METRICS:
        if no_clean:
            left_out[m] = left_out[INTRUSIVE_METRICS[0]]
        else:
            specs.append(m)
    no_text = [c.id for c in clips if not (c.text and c.text.strip())]
    for m in CONTENT_METRICS:
        if no_text:
            left_out[m] = f"{len(no_text)} of {len(clips)} clips have no transcript (e.g. {no_text[0]!r})"
        elif asr is None:
            left_out[m] = "no ASR model: give --asr DIR (a local CTC model directory)"
        else:
            specs.append(f"{m}:asr={Path(asr).resolve()}")
    return specs, left_out


def _config(config: SpeechBenchConfig | None, overrides: dict[str, Any]) -> SpeechBenchConfig:
    return replace_checked(config or SpeechBenchConfig(), overrides, "bench speech option")


def _models(models: Mapping[str, str | Path] | Sequence[BenchModel]) -> list[BenchModel]:
    items = [BenchModel(n, Path(d)) for n, d in models.items()] if isinstance(models, Mapping) else list(models)
    if not items:
        raise ValueError("bench speech needs at least one --model NAME=DIR")
    names = [m.name for m in items]
    if len(set(names)) != len(names):
        raise ValueError(f"two --model entries share a name: {names}")
    for m in items:
        _check_name(m.name)
        if not m.dir.is_dir():
            raise FileNotFoundError(f"--model {m.name}: {m.dir}: no such directory")
    return items


def _score(suite: MetricSuite, clips: list[SpeechClip], names: list[str]) -> dict[str, list[float]]:
    """Score ``clips`` (the suite raises on a bad one, naming its file); metric -> scores in clip order, rounded to
    :data:`SIGNIFICANT_DIGITS` significant digits (pystoi's ESTOI of the same audio differs in its last bits,
    ~1e-16, from call to call; rounded, a rerun gives the same ``results.json``)."""
    result = suite.evaluate(clips)
    assert result.names == [c.name for c in clips]  # on_bad="raise": every clip kept, in order
    return {m: [float(f"{float(v):.{SIGNIFICANT_DIGITS}g}") for v in result.scores[m]] for m in names}


def _entry(scores: list[float], direction: str) -> dict[str, Any]:
    return {"mean": sum(scores) / len(scores), "per_clip": scores, "direction": direction}


def _compare(a: list[float], b: list[float], higher: bool, cfg: SpeechBenchConfig) -> dict[str, Any]:
    return paired_comparison(a, b, higher_is_better=higher, n_boot=cfg.n_boot, seed=cfg.seed, level=cfg.level)


def bench_speech(
    models: Mapping[str, str | Path] | Sequence[BenchModel],
    inputs: str | Path | Sequence[InputClip],
    out_dir: str | Path,
    metrics: Sequence[str | SpeechMetric] | None = None,
    config: SpeechBenchConfig | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Restore every input with every model (the same seed per clip), score, compare with the baseline.

    See the module docstring for the method and the files written.

    Args:
        models: name -> model directory (in report order), or :class:`BenchModel` s.
        inputs: a restoration set (VoiceBank / DNS directory or jsonl manifest,
            :func:`mm_align.audio.datasets.read_speech_set`), ``"world:SPLIT"`` (the speech world's degraded split,
            written under ``out_dir/inputs`` with degradation seed 0), or :class:`mm_align.audio.datasets.SpeechClip`
            records.
        out_dir: where ``audio/``, ``results.json``, ``results.md`` and ``report.html`` go.
        metrics: metric specs (``"pesq_wb"``, ``"wer:asr=DIR"``) or objects; default :func:`default_metrics`.
        config: a :class:`SpeechBenchConfig`; keyword arguments override its fields.

    Returns:
        The results (the content of ``results.json``).

    Raises:
        AudioError: a degraded input, clean reference or restoration cannot be scored (the message names the file).
        ValueError: no inputs, a bad model name or baseline, a metric needing what an input lacks.
        FileNotFoundError: a model directory or the input set is missing.
    """
    cfg = _config(config, overrides)
    started = time.perf_counter()
    bench_models = _models(models)
    order = [m.name for m in bench_models]
    baseline = cfg.baseline or order[0]
    if baseline not in order:
        raise ValueError(f"--baseline {baseline!r} is not one of the models ({', '.join(order)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clips, inputs_info = _read_inputs(inputs, out, cfg.max_inputs)
    left_out: dict[str, str] = {}
    if metrics is None:
        asr = cfg.asr
        if asr is None and isinstance(inputs, (str, Path)) and str(inputs).startswith("world:"):
            from mm_align.audio.toyworld.asr_weights import speech_asr_dir

            asr = str(speech_asr_dir())
        metrics, left_out = default_metrics(clips, asr)
        for m, why in left_out.items():
            logger.warning("bench speech: %s left out: %s", m, why)
    built = build_metrics(list(metrics))
    names = [m.name for m in built]
    directions = {m.name: "higher" if m.higher_is_better else "lower" for m in built}
    check_set_supports(clips, built)
    suite_options: dict[str, Any] = {"on_bad": "raise", "progress": cfg.progress}
    if cfg.num_workers is not None:
        suite_options["num_workers"] = cfg.num_workers
    suite = MetricSuite(built, **suite_options)
    stems = [_stem(c.id) for c in clips]

    # the degraded inputs first: a bad input or reference fails before any model runs
    t0 = time.perf_counter()
    degraded = _score(suite, [SpeechClip(str(c.degraded), c.degraded, reference=c.clean, text=c.text)
                              for c in clips], names)
    timing: dict[str, Any] = {"score_degraded_seconds": time.perf_counter() - t0, "restore_seconds": {}}

    model_info: dict[str, dict[str, Any]] = {}
    to_score: list[SpeechClip] = []
    bar = tqdm(total=len(bench_models) * len(clips), desc="bench speech: restore", unit="clip",
               disable=not cfg.progress, dynamic_ncols=True)
    try:
        for model in bench_models:
            t0 = time.perf_counter()
            bar.set_postfix(model=model.name)
            sampler = load_restorer_any(model.dir, cfg.steps, cfg.device, cfg.chunk_seconds or None, cfg.temperature)
            folder = out / "audio" / model.name
            folder.mkdir(parents=True, exist_ok=True)
            expected = {f"{s}.wav" for s in stems}
            for old in folder.glob("*.wav"):
                if old.name not in expected:
                    old.unlink()  # a clip of an earlier run over other inputs
            for clip, stem in zip(clips, stems):
                wave, sr = load_audio(clip.degraded)
                restored = sampler(wave, sr, sample_seed(cfg.seed, clip.id, 0))
                path = folder / f"{stem}.wav"
                try:
                    save_audio(path, restored, sampler.sample_rate)
                except AudioError as err:
                    raise AudioError(f"model {model.name!r} on clip {clip.id!r} ({clip.degraded}): {err}") from None
                to_score.append(SpeechClip(str(path), path, reference=clip.clean, text=clip.text))
                bar.update()
            model_info[model.name] = {"dir": str(model.dir.resolve()), "paradigm": sampler.paradigm,
                                      "sample_rate": sampler.sample_rate, "audio": _rel(folder, out)}
            timing["restore_seconds"][model.name] = time.perf_counter() - t0
            del sampler
    finally:
        bar.close()
    t0 = time.perf_counter()
    flat = _score(suite, to_score, names)
    timing["score_models_seconds"] = time.perf_counter() - t0
    n = len(clips)
    per_model = {name: {m: flat[m][i * n:(i + 1) * n] for m in names} for i, name in enumerate(order)}

    for name in order:
        entries: dict[str, Any] = {}
        for m in names:
            higher = directions[m] == "higher"
            entry = _entry(per_model[name][m], directions[m])
            if name != baseline:
                entry["vs_baseline"] = _compare(per_model[name][m], per_model[baseline][m], higher, cfg)
            entry["vs_degraded"] = _compare(per_model[name][m], degraded[m], higher, cfg)
            entries[m] = entry
        model_info[name]["metrics"] = entries

    results: dict[str, Any] = {
        "command": "bench speech", "version": _FORMAT_VERSION, "inputs": inputs_info,
        "seed": cfg.seed, "steps": cfg.steps, "device": cfg.device, "chunk_seconds": cfg.chunk_seconds or None,
        "temperature": cfg.temperature, "baseline": baseline, "order": order,
        "metrics": names, "directions": directions, "left_out": left_out,
        "bootstrap": {"method": "percentile bootstrap of the paired mean difference (Efron & Tibshirani 1993)",
                      "n_boot": cfg.n_boot, "level": cfg.level, "seed": cfg.seed},
        "degraded": {"metrics": {m: _entry(degraded[m], directions[m]) for m in names}},
        "models": model_info, "versions": library_versions(),
    }
    examples = _examples(clips[: cfg.examples], stems, out, results)
    timing["total_seconds"] = time.perf_counter() - started
    results["timing"] = timing
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", results_markdown(results))
    write_speech_report(out / "report.html", results, examples, cfg.embed_audio)
    return results


def _examples(clips: list[InputClip], stems: list[str], out: Path, results: dict[str, Any]) -> list[ExampleClip]:
    """The report's example clips; their degraded input and clean reference are copied under ``audio/`` as wav."""
    examples = []
    for i, (clip, stem) in enumerate(zip(clips, stems)):
        players = []
        wave, sr = load_audio(clip.degraded)
        path = save_audio(out / "audio" / "degraded" / f"{stem}.wav", wave, sr)
        scores = {m: v["per_clip"][i] for m, v in results["degraded"]["metrics"].items()}
        players.append(ExamplePlayer("degraded", path, scores))
        for name in results["order"]:
            scores = {m: v["per_clip"][i] for m, v in results["models"][name]["metrics"].items()}
            players.append(ExamplePlayer(name, out / "audio" / name / f"{stem}.wav", scores))
        if clip.clean:
            wave, sr = load_audio(clip.clean)
            players.append(ExamplePlayer("clean", save_audio(out / "audio" / "clean" / f"{stem}.wav", wave, sr), {}))
        examples.append(ExampleClip(clip.id, clip.text, players))
    return examples


def _ci(vs: dict[str, Any]) -> str:
    mark = " ▲" if vs["improved"] else " ▼" if vs["worse"] else ""
    return f"{vs['mean_diff']:+.4f} [{vs['ci'][0]:+.4f}, {vs['ci'][1]:+.4f}]{mark}"


def results_markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown table: a row per metric; the degraded input's and each model's mean, and each
    model's difference from the baseline with its interval (▲ improved, ▼ worse)."""
    order, baseline = results["order"], results["baseline"]
    others = [n for n in order if n != baseline]
    level = int(round(100 * results["bootstrap"]["level"]))
    inputs = results["inputs"]
    lines = [f"# Speech benchmark: {len(order)} model(s) on {inputs['clips']} clips of {inputs['source']}", "",
             f"Baseline `{baseline}`; seed {results['seed']} (the same per clip for every model), "
             f"{results['steps']} steps. Differences are oriented (positive = better) with {level}% paired "
             f"bootstrap intervals ({results['bootstrap']['n_boot']} resamples); ▲ improved, ▼ worse.", "",
             "| model | paradigm | directory |", "|---|---|---|"]
    lines += [f"| {n} | {results['models'][n]['paradigm']} | `{results['models'][n]['dir']}` |" for n in order]
    lines += ["", "| metric | better | degraded | " + " | ".join(order)
              + "".join(f" | {n} − {baseline} [{level}% CI]" for n in others) + " |",
              "|---|---|---:|" + "---:|" * (len(order) + len(others))]
    for m in results["metrics"]:
        row = [metric_label(m), results["directions"][m], f"{results['degraded']['metrics'][m]['mean']:.4f}"]
        row += [f"{results['models'][n]['metrics'][m]['mean']:.4f}" for n in order]
        row += [_ci(results["models"][n]["metrics"][m]["vs_baseline"]) for n in others]
        lines.append("| " + " | ".join(row) + " |")
    if results["left_out"]:
        lines += ["", "Left out: " + "; ".join(f"{m} ({why})" for m, why in results["left_out"].items()) + "."]
    return "\n".join(lines) + "\n"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def bench_main(argv: list[str]) -> int:
    """The ``mm-align bench speech`` command line (module docstring); returns the exit status."""
    p = _Parser(prog="mm-align bench speech", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                   help="a flow, masked or ar restorer directory (or a LoRA directory) under a row name "
                        "(repeatable; the first is the baseline unless --baseline)")
    p.add_argument("--inputs", default=None, help="degraded inputs: a VoiceBank-DEMAND or DNS directory, a jsonl "
                                                  "restoration manifest, or world:dev / world:test")
    p.add_argument("--out", default=None, help="output directory: audio/, results.json, results.md, report.html")
    p.add_argument("--metric", action="append", default=None,
                   help="a metric spec, e.g. pesq_wb or wer:asr=DIR (repeatable; default: every metric the set "
                        "supports)")
    p.add_argument("--seed", type=int, default=0, help="base seed; clip ID is restored with crc32('SEED:ID:0')")
    p.add_argument("--steps", type=int, default=8, help="sampling steps (flow ODE steps, masked decoding steps)")
    p.add_argument("--max-inputs", type=int, default=None, help="use only the first N inputs (default: all)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="metric worker processes (default: min(cores, clips); 0: in this process)")
    p.add_argument("--baseline", default=None, help="the model the others are compared with (default: the first)")
    p.add_argument("--examples", type=int, default=4, help="clips shown with players and spectrograms (default: 4)")
    p.add_argument("--asr", default=None, help="a local CTC ASR directory for WER / CER (world inputs: the "
                                               "speech world's recogniser)")
    p.add_argument("--device", default="cpu", help="where the models run (default: cpu)")
    p.add_argument("--chunk-seconds", type=float, default=8.0,
                   help="restore longer inputs chunk by chunk (0: whole; default: 8)")
    p.add_argument("--temperature", type=float, default=1.0, help="token models' sampling temperature (default: 1)")
    p.add_argument("--n-boot", type=int, default=10000, help="bootstrap resamples (default: 10000)")
    p.add_argument("--embed-audio", action="store_true", help="embed the example audio in report.html")
    try:
        args = p.parse_args(list(argv))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    missing = [f"--{o}" for o in ("model", "inputs", "out") if not getattr(args, o)]
    if missing:
        print(f"error: mm-align bench speech needs {' and '.join(missing)}", file=sys.stderr)
        return 2
    try:
        models = [parse_model(m) for m in args.model]
        cfg = SpeechBenchConfig(seed=args.seed, steps=args.steps, baseline=args.baseline, examples=args.examples,
                                max_inputs=args.max_inputs, num_workers=args.num_workers, device=args.device,
                                chunk_seconds=args.chunk_seconds or None, temperature=args.temperature,
                                asr=args.asr, n_boot=args.n_boot, embed_audio=args.embed_audio)
        results = bench_speech(models, args.inputs, args.out, args.metric, cfg)
    except (ValueError, FileNotFoundError, AudioError, OSError) as err:  # DataError and ConfigError are ValueErrors
        print(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return 2
    print(results_markdown(results))
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0
