"""One self-contained HTML page per run: training curves (matplotlib PNGs inline), a summary
table, the resolved config, and the panels a modality adds (image grids, score tables)."""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mm_align.metrics_log import read_metrics

__all__ = ["ReportSection", "plot_curves", "write_report", "PANELS"]

# title -> keys (a trailing "/" means every key with that prefix)
PANELS: list[tuple[str, list[str]]] = [
    ("Loss", ["loss", "loss/", "eval/loss"]),
    ("Preference accuracy", ["rewards/accuracies", "implicit_acc", "eval/rewards/accuracies", "eval/implicit_acc"]),
    ("Reward margins", ["rewards/margins", "rewards/chosen", "rewards/rejected", "eval/rewards/margins"]),
    ("Learning rate", ["lr"]),
    ("Denoising errors", ["err/"]),
    ("Log-probs", ["logps/"]),
    ("Gradient norm", ["grad_norm"]),
]
_SKIP = {"step", "time", "epoch", "skipped_steps", "steps_per_second"}


@dataclass
class ReportSection:
    title: str
    html: str  # a trusted fragment from a modality


def plot_curves(records: list[dict], keys: Sequence[str], title: str, smooth: int = 1) -> str:
    """The curves of ``keys`` against ``step`` as a PNG data URI."""
    from matplotlib.figure import Figure  # no pyplot: no global state

    fig = Figure(figsize=(6.4, 3.4), dpi=100)
    ax = fig.add_subplot()
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if not pts:
            continue
        xs, ys = zip(*pts)
        if smooth > 1:
            ys = [sum(ys[max(0, i - smooth + 1) : i + 1]) / len(ys[max(0, i - smooth + 1) : i + 1])
                  for i in range(len(ys))]
        ax.plot(xs, ys, label=key, marker="." if len(xs) < 30 else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _keys(all_keys: list[str], patterns: list[str]) -> list[str]:
    out = []
    for p in patterns:
        out += [k for k in all_keys if (k.startswith(p) if p.endswith("/") else k == p) and k not in out]
    return out


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plots img{max-width:580px;border:1px solid #eee}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f5f5f5}pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.85em}"""


def write_report(
    run_dir: str | Path,
    sections: Sequence[ReportSection] = (),
    output: str | Path | None = None,
    title: str | None = None,
) -> Path:
    """Render ``run_dir/metrics.jsonl`` (+ config, versions, ``sections``) into one HTML file."""
    run = Path(run_dir)
    metrics_file = run / "metrics.jsonl"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file} not found: is {run} a training run directory?")
    records = read_metrics(metrics_file)
    esc = html.escape
    all_keys: list[str] = []
    for r in records:
        all_keys += [k for k, v in r.items() if k not in _SKIP and isinstance(v, (int, float)) and k not in all_keys]
    parts = [f"<h1>{esc(title or f'mm-align run: {run.name}')}</h1>"]
    if not records:
        parts.append("<p>No metrics logged.</p>")
    else:
        used: list[str] = []
        imgs = []
        for panel, patterns in PANELS:
            keys = _keys(all_keys, patterns)
            if keys:
                used += keys
                imgs.append(f'<img alt="{esc(panel)}" src="{plot_curves(records, keys, panel)}">')
        rest = [k for k in all_keys if k not in used]
        if rest:
            imgs.append(f'<img alt="Other" src="{plot_curves(records, rest, "Other")}">')
        parts.append('<h2>Training curves</h2><div class="plots">' + "".join(imgs) + "</div>")
        rows = []
        for k in all_keys:
            vals = [r[k] for r in records if isinstance(r.get(k), (int, float))]
            rows.append(f"<tr><th>{esc(k)}</th><td>{vals[0]:.5g}</td><td>{vals[-1]:.5g}</td></tr>")
        parts.append(f"<h2>Summary (steps {records[0].get('step')}–{records[-1].get('step')})</h2>"
                     "<table><tr><th>metric</th><th>first</th><th>last</th></tr>" + "".join(rows) + "</table>")
    for s in sections:
        parts.append(f"<h2>{esc(s.title)}</h2>{s.html}")
    if (run / "config.yaml").is_file():
        parts.append(f"<h2>Resolved config</h2><pre>{esc((run / 'config.yaml').read_text())}</pre>")
    if (run / "versions.json").is_file():
        versions = json.loads((run / "versions.json").read_text())
        parts.append("<h2>Versions</h2><pre>" + esc(json.dumps(versions, indent=2)) + "</pre>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title or run.name)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
    out = Path(output) if output else run / "report.html"
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
