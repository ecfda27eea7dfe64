"""The HTML page of ``mm-align bench speech``: one self-contained file to open from disk or share.

From top to bottom: the settings (inputs, models and paradigms, baseline, seed, steps), a chart of every model's
mean difference from the baseline per metric with its 95% paired-bootstrap interval (inline SVG: one small panel
per metric, a dot at the mean difference and whiskers to the interval ends, oriented so that RIGHT IS BETTER for
every metric, green when the interval lies above 0, red below), the summary table (per metric: the degraded
input's mean, each model's mean, and each model's difference from the baseline with its interval, coloured the
same way), then ``examples`` clips: for each, an audio player and a spectrogram for the degraded input, every
model and the clean reference.

The spectrograms are log-magnitude STFTs (:func:`spectrogram_png`: Hann window of 32 ms, hop 8 ms, 80 dB of
range under the loudest bin of the clip's players, so the players of one clip share one colour scale and a
noise floor is comparable), rendered with numpy and PIL and embedded as PNG data URIs. The audio is linked as
files relative to the page (``audio/<row>/<id>.wav`` next to it, so the page works when opened from disk with
its folder), or embedded as ``data:audio/wav`` URIs with ``embed_audio=True`` (one file to mail; larger). No
script, no external URL; every string from the run is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mm_align.audio.io import load_audio
from PIL import Image

from mm_align.atomic import atomic_write_text
from mm_align.report import BENCH_PAGE_CSS

__all__ = ["ExamplePlayer", "ExampleClip", "METRIC_LABELS", "metric_label", "spectrogram_db", "spectrogram_png",
           "difference_chart_svg", "write_speech_report"]

METRIC_LABELS = {
    "pesq_wb": "PESQ-WB", "pesq_nb": "PESQ-NB", "estoi": "ESTOI", "stoi": "STOI", "si_sdr": "SI-SDR (dB)",
    "lsd": "LSD", "dnsmos_sig": "DNSMOS SIG", "dnsmos_bak": "DNSMOS BAK", "dnsmos_ovrl": "DNSMOS OVRL",
    "dnsmos_p808": "DNSMOS P.808", "speaker_similarity": "speaker similarity", "wer": "WER", "cer": "CER",
}

_IMPROVED, _WORSE, _NEUTRAL = "#2e7d32", "#c62828", "#616161"

_CSS = BENCH_PAGE_CSS + """.settings th{width:9em}
.charts{display:flex;flex-wrap:wrap;gap:8px}.charts svg{border:1px solid #eee;background:#fff}
.legend{font-size:.85em;color:#555}
.clip{border:1px solid #e3e3e6;border-radius:6px;padding:8px 10px;margin:0 0 12px;background:#fafafa}
.clip h3{font-size:1em;margin:0 0 6px}.clip .text{font-weight:400;color:#555}
.players{display:flex;flex-wrap:wrap;gap:10px}.player{font-size:.8em;color:#333}
.player img{display:block;border:1px solid #ccc;margin:2px 0}.player audio{display:block;width:100%}
.player .s{color:#666}
"""


@dataclass
class ExamplePlayer:
    """One player of an example clip.

    Args:
        label: the row it shows (``"degraded"``, a model's name, ``"clean"``).
        path: the audio file.
        scores: metric -> this clip's score, shown under the player (empty for the clean reference).
    """

    label: str
    path: Path
    scores: dict[str, float]


@dataclass
class ExampleClip:
    """An example clip of the page: its id, transcript and players (degraded, each model, clean)."""

    id: str
    text: str | None
    players: list[ExamplePlayer]


def metric_label(name: str) -> str:
    """A display name of a metric (``"pesq_wb"`` -> ``"PESQ-WB"``); an unknown name is shown as it is."""
    return METRIC_LABELS.get(name, name)


# ---- spectrograms -----------------------------------------------------------------------------------------


def spectrogram_db(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """The log-magnitude STFT ``20·log10(|STFT(x)| + 1e-8)`` in dB, ``(freq, frames)``, low frequencies first.

    Hann window of 32 ms (512 samples at 16 kHz), hop 8 ms, centred frames.
    """
    n_fft = max(64, 1 << round(math.log2(0.032 * sample_rate)))
    hop = n_fft // 4
    x = torch.as_tensor(np.asarray(wave, dtype=np.float32))
    if x.numel() < n_fft // 2 + 1:  # reflect padding needs more samples than half a window
        x = torch.nn.functional.pad(x, (0, n_fft // 2 + 1 - x.numel()))
    spec = torch.stft(x, n_fft, hop, window=torch.hann_window(n_fft), center=True, return_complex=True)
    return (20.0 * torch.log10(spec.abs() + 1e-8)).numpy()  # (n_fft // 2 + 1, frames)


def _colour_table() -> np.ndarray:
    """magma as a (256, 3) uint8 table (matplotlib's colormap data only: no figure is drawn)."""
    from matplotlib import colormaps

    return (colormaps["magma"](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


def spectrogram_png(db: np.ndarray, top_db: float, range_db: float = 80.0, height: int = 128,
                    px_per_second: float = 120.0, seconds: float | None = None, max_width: int = 480) -> bytes:
    """Render a dB spectrogram (:func:`spectrogram_db`) as a PNG: magma colours over ``[top_db − range_db, top_db]``.

    Args:
        db: ``(freq, frames)`` in dB, low frequencies first (drawn at the bottom).
        top_db: the level drawn brightest (the loudest bin of every spectrogram to be compared).
        range_db: the dB range below ``top_db`` that is shown; quieter bins are black.
        height: the image height in pixels.
        px_per_second: the image width per second of audio (``seconds``), capped at ``max_width``.
        seconds: the audio's duration; ``None``: one pixel per frame.
        max_width: the widest image.

    Returns:
        The PNG file's bytes.
    """
    level = np.clip((db - (top_db - range_db)) / range_db, 0.0, 1.0)
    index = np.round(level[::-1] * 255.0).astype(np.uint8)  # (freq, frames), high frequencies on top
    width = db.shape[1] if seconds is None else int(round(seconds * px_per_second))
    size = (max(16, min(max_width, width)), height)
    # resized as levels (magma is monotonic in the level), then coloured through a palette: 1 byte a pixel
    levels = Image.fromarray(index, mode="L").resize(size, Image.BILINEAR)
    image = Image.frombytes("P", size, levels.tobytes())
    image.putpalette(_colour_table().flatten().tolist())
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _data_uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


# ---- the difference chart ---------------------------------------------------------------------------------


def _mark(vs: dict[str, Any]) -> str:
    return "up" if vs.get("improved") else "down" if vs.get("worse") else ""


def _fmt(v: float, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if math.isfinite(v) else "n/a"


def _nice_limit(x: float) -> float:
    """The smallest 1, 2 or 5 × 10^k at or above ``x`` (a round axis end)."""
    if x <= 0 or not math.isfinite(x):
        return 1.0
    base = 10.0 ** math.floor(math.log10(x))
    return next(m * base for m in (1.0, 2.0, 5.0, 10.0) if m * base >= x * (1 - 1e-12))


def _panel_svg(metric: str, direction: str, items: list[tuple[str, dict[str, Any]]], baseline: str) -> str:
    """One metric's panel: a row per model, the mean difference from the baseline and its interval."""
    esc = html.escape
    label_w, plot_w, right, row_h, top, bottom = 96, 200, 28, 22, 34, 30
    width = label_w + plot_w + right
    height = top + row_h * len(items) + bottom
    extent = max([abs(v) for _, vs in items for v in (*vs["ci"], vs["mean_diff"]) if math.isfinite(v)] or [0.0])
    lim = _nice_limit(extent * 1.05) if extent > 0 else 1.0

    def x_of(v: float) -> float:
        return label_w + (min(max(v, -lim), lim) + lim) / (2 * lim) * plot_w

    arrow = "higher" if direction == "higher" else "lower"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="system-ui,sans-serif" font-size="11" role="img">',
             f"<title>{esc(metric)}: mean difference from {esc(baseline)} with its 95% interval</title>",
             f'<text x="{label_w}" y="14" font-weight="600" font-size="12">{esc(metric_label(metric))}</text>',
             f'<text x="{label_w}" y="27" fill="#666" font-size="10">{esc(arrow)} is better; right = better '
             f"than {esc(baseline)}</text>"]
    y0, y1 = top - 4, top + row_h * len(items)
    for tick in (-lim, 0.0, lim):
        x = x_of(tick)
        colour, dash = ("#999", ' stroke-dasharray="3,3"') if tick == 0.0 else ("#e0e0e0", "")
        parts.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y1}" stroke="{colour}"{dash}/>')
        tick_label = "0" if tick == 0.0 else f"{tick:+.3g}"
        parts.append(f'<text x="{x:.1f}" y="{y1 + 13}" text-anchor="middle" fill="#555">{tick_label}</text>')
    for i, (name, vs) in enumerate(items):
        y = top + row_h * i + row_h / 2
        colour = _IMPROVED if vs.get("improved") else _WORSE if vs.get("worse") else _NEUTRAL
        low, high = (x_of(v) for v in vs["ci"])
        mid = x_of(vs["mean_diff"])
        parts.append(f'<text x="{label_w - 6}" y="{y + 4:.1f}" text-anchor="end">{esc(name)}</text>')
        parts.append(f'<line x1="{low:.1f}" y1="{y:.1f}" x2="{high:.1f}" y2="{y:.1f}" stroke="{colour}" '
                     'stroke-width="2"/>')
        for x in (low, high):
            parts.append(f'<line x1="{x:.1f}" y1="{y - 5:.1f}" x2="{x:.1f}" y2="{y + 5:.1f}" stroke="{colour}" '
                         'stroke-width="2"/>')
        ci = f"[{_fmt(vs['ci'][0])}, {_fmt(vs['ci'][1])}]"
        parts.append(f'<circle cx="{mid:.1f}" cy="{y:.1f}" r="4" fill="{colour}"><title>{esc(name)} − '
                     f"{esc(baseline)}: {_fmt(vs['mean_diff'])} {ci}</title></circle>")
    parts.append(f'<text x="{label_w + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle" fill="#555" '
                 f'font-size="10">difference from {esc(baseline)} (oriented)</text></svg>')
    return "".join(parts)


def difference_chart_svg(results: dict[str, Any]) -> str | None:
    """Every model's oriented mean difference from the baseline with its 95% interval, one SVG panel per metric.

    The differences are those of ``results["models"][name]["metrics"][metric]["vs_baseline"]`` (positive:
    better than the baseline, for every metric). ``None`` when only the baseline was benchmarked.
    """
    names = [n for n in results["order"] if n != results["baseline"]]
    if not names:
        return None
    panels = []
    for metric in results["metrics"]:
        items = [(n, results["models"][n]["metrics"][metric]["vs_baseline"]) for n in names]
        panels.append(_panel_svg(metric, results["directions"][metric], items, results["baseline"]))
    return '<div class="charts">' + "".join(panels) + "</div>"


# ---- the page ---------------------------------------------------------------------------------------------


def _summary_table(results: dict[str, Any]) -> str:
    esc = html.escape
    order, baseline = results["order"], results["baseline"]
    others = [n for n in order if n != baseline]
    head = ["<th>metric</th><th>better</th><th>degraded</th>"]
    head += [f"<th>{esc(n)}{' (baseline)' if n == baseline else ''}</th>" for n in order]
    head += [f"<th>{esc(n)} − {esc(baseline)} [95% CI]</th>" for n in others]
    rows = []
    for m in results["metrics"]:
        cells = [f"<th>{esc(metric_label(m))}</th><td>{'higher' if results['directions'][m] == 'higher' else 'lower'}"
                 f'</td><td class="n">{_fmt(results["degraded"]["metrics"][m]["mean"])}</td>']
        cells += [f'<td class="n">{_fmt(results["models"][n]["metrics"][m]["mean"])}</td>' for n in order]
        for n in others:
            vs = results["models"][n]["metrics"][m]["vs_baseline"]
            cells.append(f'<td class="n {_mark(vs)}">{_fmt(vs["mean_diff"])} '
                         f"[{_fmt(vs['ci'][0])}, {_fmt(vs['ci'][1])}]</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<table><tr>" + "".join(head) + "</tr>" + "".join(rows) + "</table>"


def _settings(results: dict[str, Any]) -> str:
    esc = html.escape
    inputs = results["inputs"]
    models = "; ".join(f"{n}: {results['models'][n]['paradigm']} restorer {results['models'][n]['dir']}"
                       for n in results["order"])
    rows = [
        ("inputs", f"{inputs['source']}: {inputs['clips']} clips"
                   + (f" (the reader skipped {sum(inputs['skipped_by_reader'].values())})"
                      if inputs["skipped_by_reader"] else "")),
        ("models", models), ("baseline", results["baseline"]),
        ("metrics", ", ".join(metric_label(m) for m in results["metrics"])),
        ("restoration", f"seed {results['seed']} (one seed per clip, the same for every model), "
                        f"{results['steps']} steps"),
    ]
    rows += [("left out", "; ".join(f"{m}: {why}" for m, why in results["left_out"].items()))] \
        if results["left_out"] else []
    timing = results.get("timing", {})
    if timing:
        rows.append(("time", f"{timing.get('total_seconds', 0.0):.1f} s"))
    return '<table class="settings">' + "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>"
                                                for k, v in rows) + "</table>"


def _audio_src(path: Path, page_dir: Path, embed: bool) -> str:
    if embed:
        return _data_uri("audio/wav", path.read_bytes())
    return Path(os.path.relpath(path.resolve(), page_dir.resolve())).as_posix()


def _examples(examples: Sequence[ExampleClip], page_dir: Path, embed: bool, total: int) -> str:
    esc = html.escape
    if not examples:
        return ""
    cards = []
    for clip in examples:
        waves = []
        for p in clip.players:
            wave, sr = load_audio(p.path)
            waves.append((wave.numpy(), sr))
        specs = [spectrogram_db(w, sr) for w, sr in waves]
        top = max(float(s.max()) for s in specs)  # one colour scale for the clip's players
        cells = []
        for p, (w, sr), db in zip(clip.players, waves, specs):
            png = _data_uri("image/png", spectrogram_png(db, top, seconds=len(w) / sr))
            scores = ", ".join(f"{metric_label(k)} {_fmt(v)}" for k, v in p.scores.items())
            cells.append(f'<div class="player"><b>{esc(p.label)}</b><img src="{png}" alt="log-magnitude '
                         f'spectrogram of {esc(p.label)}, {esc(clip.id)}"><audio controls preload="none" '
                         f'src="{esc(_audio_src(p.path, page_dir, embed))}"></audio>'
                         + (f'<span class="s">{esc(scores)}</span>' if scores else "") + "</div>")
        text = f' <span class="text">“{esc(clip.text)}”</span>' if clip.text else ""
        cards.append(f'<div class="clip"><h3>{esc(clip.id)}{text}</h3><div class="players">{"".join(cells)}'
                     "</div></div>")
    return (f"<h2>Examples: {len(examples)} of {total} clips</h2><p class=legend>Degraded input, every model "
            "(the same seed) and the clean reference. Spectrograms: log-magnitude STFT, 32 ms Hann window, "
            "80 dB range under the clip's loudest bin (one colour scale per clip).</p>" + "".join(cards))


def write_speech_report(path: str | Path, results: dict[str, Any], examples: Sequence[ExampleClip] = (),
                        embed_audio: bool = False) -> Path:
    """Write the speech benchmark's page (module docstring) atomically to ``path``.

    Args:
        path: the HTML file; linked audio is referenced relative to its folder.
        results: the benchmark's results (:func:`mm_align.audio.bench.bench_speech`, the ``results.json`` schema).
        examples: the clips shown with players and spectrograms.
        embed_audio: embed the audio as ``data:audio/wav`` URIs instead of linking the files.

    Returns:
        The written file.
    """
    esc = html.escape
    out = Path(path)
    n_clips, n_models = results["inputs"]["clips"], len(results["order"])
    level = int(round(100 * results["bootstrap"]["level"]))
    parts = [f"<h1>Speech benchmark: {n_models} model{'s' if n_models != 1 else ''} on {n_clips} clips</h1>",
             f"<p class=sub>Differences are model − {esc(results['baseline'])} on the same clips and seeds, "
             "oriented so that positive is better for every metric; intervals are "
             f"{level}% percentile bootstrap intervals of the paired mean difference "
             f"({results['bootstrap']['n_boot']} resamples; Efron &amp; Tibshirani 1993). Green: the interval lies "
             "above 0 (improved); red: below (worse).</p>", _settings(results)]
    chart = difference_chart_svg(results)
    if chart:
        parts.append(f"<h2>Difference from {esc(results['baseline'])}</h2>{chart}")
    parts.append("<h2>Results per metric (means over the clips)</h2>" + _summary_table(results))
    parts.append(_examples(examples, out.parent, embed_audio, n_clips))
    page = ('<!doctype html><html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">'
            f"<title>mm-align speech benchmark</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(p for p in parts if p) + "\n</body></html>\n")
    atomic_write_text(out, page)
    return out
