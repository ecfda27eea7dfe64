"""One self-contained HTML page per run.

The page holds the training curves (matplotlib PNGs inlined as data URIs), a summary table of the
first and last value of every metric, the resolved config and library versions, then the panels a
modality adds (image grids, score tables) as :class:`ReportSection`. Everything is inline: CSS in a
``<style>`` element, images as data URIs, no scripts and no external URLs, so the file can be
mailed or archived on its own. Every string that comes from the run (metric names, config text,
versions) is HTML-escaped; only :attr:`ReportSection.html` is trusted as given.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm_align.atomic import atomic_write_text
from mm_align.metrics_log import read_metrics

logger = logging.getLogger(__name__)

__all__ = ["ReportSection", "plot_curves", "plot_series", "write_report", "PANELS", "BENCH_PAGE_CSS"]

# (title, keys); a key ending in "/" means every key with that prefix. A metric is drawn in the
# first panel that claims it; the numeric keys no panel claims go to "Other".
PANELS: list[tuple[str, list[str]]] = [
    ("Loss", ["loss", "loss/", "eval/loss"]),
    (
        "Preference accuracy",
        ["rewards/accuracies", "implicit_acc", "eval/rewards/accuracies", "eval/implicit_acc", "eval/accuracy"],
    ),
    ("Reward margins", ["rewards/margins", "rewards/chosen", "rewards/rejected", "eval/rewards/margins"]),
    ("Learning rate", ["lr"]),
    ("Denoising errors", ["err/"]),
    ("Log-probs", ["logps/"]),
    ("Gradient norm", ["grad_norm"]),
]
_SKIP = frozenset({"step", "time"})
# run bookkeeping the trainer logs: listed in the summary table, not plotted
_NOT_PLOTTED = frozenset({"epoch", "skipped_steps", "steps_per_second"})


@dataclass
class ReportSection:
    """
    A panel that a modality adds to the report.

    Args:
        title (`str`):
            The section heading (escaped).
        html (`str`):
            A trusted HTML fragment, inserted as is (image grids as data URIs, score tables). It
            must not reference external URLs, so the page stays self-contained.
    """

    title: str
    html: str


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_curves(records: list[dict], keys: Sequence[str], title: str | None, smooth: int = 1) -> str:
    """
    Plot the curves of `keys` against `step` and return the figure as a PNG data URI.

    Records without a numeric value for a key (absent, or `null` for a non-finite value) are
    skipped for that key. Drawn by [`plot_series`].

    Args:
        records (`list[dict]`):
            Records as read by [`read_metrics`]; the x value is `record["step"]` (the record's
            index when absent).
        keys (`Sequence[str]`):
            The metrics to draw, one line each.
        title (`str` or `None`):
            The plot title; `None` for none (when the page captions the figure itself).
        smooth (`int`, *optional*, defaults to `1`):
            Trailing moving-average window, in records; `1` draws the raw values.

    Returns:
        `str`: `"data:image/png;base64,..."`.
    """
    series = {key: [(r.get("step", i), r[key]) for i, r in enumerate(records) if _is_num(r.get(key))] for key in keys}
    return plot_series(series, title, smooth)


def plot_series(series: dict[str, list[tuple[float, float]]], title: str | None, smooth: int = 1) -> str:
    """
    Plot named `(step, value)` series on one chart and return it as a PNG data URI.

    Uses matplotlib's object-oriented API with the Agg canvas (no `pyplot`, so no global figure
    state and no change to the process's backend); the figure is released when this returns.
    An empty series is left out; a chart with none says "no data".

    Args:
        series (`dict[str, list[tuple[float, float]]]`):
            Legend label -> points in step order (one metric of several runs, or several metrics of one run).
        title (`str` or `None`):
            The plot title, or `None`.
        smooth (`int`, *optional*, defaults to `1`):
            Trailing moving-average window, in points; `1` draws the raw values.

    Returns:
        `str`: `"data:image/png;base64,..."`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    smooth = max(1, int(smooth))
    fig = Figure(figsize=(6.4, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = 0
    for label, pts in series.items():
        if not pts:
            continue
        xs, ys = zip(*pts)
        if smooth > 1:
            ys = tuple(
                sum(ys[max(0, i - smooth + 1) : i + 1]) / (i + 1 - max(0, i - smooth + 1)) for i in range(len(ys))
            )
        ax.plot(xs, ys, label=label, marker="." if len(xs) < 30 else None)
        drawn += 1
    if title:
        ax.set_title(title)
    ax.set_xlabel("step")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))  # short tick labels fit the fixed margins
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    # fixed margins: tight_layout costs a draw
    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.14, top=0.9 if title else 0.97)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _matching(all_keys: Sequence[str], patterns: Sequence[str], taken: set[str]) -> list[str]:
    out: list[str] = []
    for p in patterns:
        for k in all_keys:
            if k in taken or k in out:
                continue
            if k.startswith(p) if p.endswith("/") else k == p:
                out.append(k)
    return out


def _fmt(v: float | int) -> str:
    return str(v) if isinstance(v, int) else f"{v:.5g}"


# The base style of every modality's bench page (headings, tables, improved / worse cells); each adds its own.
BENCH_PAGE_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px 32px;color:#1d1d1f;line-height:1.4}
h1{font-size:1.7em;margin:0 0 .2em}h2{font-size:1.25em;margin:1.6em 0 .5em;border-bottom:1px solid #ddd;
padding-bottom:.2em}.sub{color:#666;margin:0 0 1em}
table{border-collapse:collapse;font-size:.9em;margin:.3em 0 1em}td,th{border:1px solid #ddd;padding:.3em .7em}
th{background:#f5f5f7;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
td.up{background:#e3f4e1}td.down{background:#fbe4e1}
"""

_CSS = """body{font-family:system-ui,sans-serif;margin:2em 2.5em;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plots figure{margin:0}
.plots img{width:100%;max-width:640px;border:1px solid #eee}
.plots figcaption{font-weight:600;font-size:.95em;margin:.2em 0 .6em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f5f5f5}th.k{text-align:left}pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.85em}"""


def write_report(
    run_dir: str | Path,
    sections: Sequence[ReportSection] = (),
    output: str | Path | None = None,
    title: str | None = None,
) -> Path:
    """
    Render a run directory into one self-contained HTML page.

    Reads `run_dir/metrics.jsonl` and draws a plot per panel of [`PANELS`] (Loss, Preference
    accuracy, Reward margins, Learning rate, Denoising errors, Log-probs, Gradient norm) whose keys
    are present, and "Other" for the remaining numeric keys (all but `step` and `time`); then a
    table of the first and last value of each key; the resolved config (`run_dir/config.yaml`) and
    versions (`run_dir/versions.json`) when present; then `sections`, in order. An empty metrics
    file still gives a page, which says "no metrics logged".

    Args:
        run_dir (`str` or `Path`):
            The training run's output directory.
        sections (`Sequence[ReportSection]`, *optional*):
            Panels a modality adds, placed after the config.
        output (`str` or `Path`, *optional*):
            Where to write; defaults to `run_dir/report.html`. Written atomically.
        title (`str`, *optional*):
            The page title; defaults to `"mm-align run: <run_dir name>"`.

    Returns:
        `Path`: the written HTML file.

    Raises:
        `FileNotFoundError`: when `run_dir/metrics.jsonl` does not exist.
    """
    run = Path(run_dir)
    metrics_file = run / "metrics.jsonl"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file} not found: is {run} a training run directory?")
    records = read_metrics(metrics_file)
    esc = html.escape
    page_title = title or f"mm-align run: {run.resolve().name}"

    all_keys: dict[str, None] = {}  # ordered set, in first-seen order
    for r in records:
        for k, v in r.items():
            if k not in _SKIP and _is_num(v):
                all_keys.setdefault(k, None)
    keys = list(all_keys)

    parts = [f"<h1>{esc(page_title)}</h1>"]
    parts.append("<h2>Training curves</h2>")
    if not keys:
        what = "no metrics logged" if not records else "no numeric metrics logged"
        parts.append(f"<p>Nothing to plot: {what} in {esc(metrics_file.name)}.</p>")
    else:
        taken: set[str] = set()
        figures = []
        panels = [*PANELS, ("Other", [])]
        for panel, patterns in panels:
            plottable = [k for k in keys if k not in _NOT_PLOTTED]
            if patterns:
                panel_keys = _matching(plottable, patterns, taken)
            else:
                panel_keys = [k for k in plottable if k not in taken]
            if not panel_keys:
                continue
            taken.update(panel_keys)
            uri = plot_curves(records, panel_keys, None)  # the figcaption names the panel
            figures.append(
                f'<figure><img alt="{esc(panel)}: {esc(", ".join(panel_keys))}" src="{uri}">'
                f"<figcaption>{esc(panel)}</figcaption></figure>"
            )
        parts.append('<div class="plots">' + "".join(figures) + "</div>")

        steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
        span = f" (steps {steps[0]}–{steps[-1]}, {len(records)} records)" if steps else ""
        rows = []
        for k in keys:
            vals = [r[k] for r in records if _is_num(r.get(k))]
            rows.append(f'<tr><th class="k">{esc(k)}</th><td>{_fmt(vals[0])}</td><td>{_fmt(vals[-1])}</td></tr>')
        parts.append(
            f"<h2>Summary{esc(span)}</h2>"
            '<table><tr><th class="k">metric</th><th>first</th><th>last</th></tr>' + "".join(rows) + "</table>"
        )

    config_file = run / "config.yaml"
    if config_file.is_file():
        text = config_file.read_text(encoding="utf-8", errors="replace")
        parts.append(f"<h2>Resolved config</h2><pre>{esc(text)}</pre>")
    versions_file = run / "versions.json"
    if versions_file.is_file():
        text = versions_file.read_text(encoding="utf-8", errors="replace")
        try:
            text = json.dumps(json.loads(text), indent=2)
        except json.JSONDecodeError:
            logger.warning(f"{versions_file} is not valid JSON; shown as is")
        parts.append(f"<h2>Versions</h2><pre>{esc(text)}</pre>")

    for s in sections:
        parts.append(f"<section><h2>{esc(s.title)}</h2>{s.html}</section>")

    page = (
        '<!doctype html>\n<html><head><meta charset="utf-8">'
        f"<title>{esc(page_title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )
    out = Path(output) if output is not None else run / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    return out
