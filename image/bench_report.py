"""The HTML page of ``mm-align bench image``: a page to share, in one self-contained file.

From top to bottom: the settings as a table (model, prompts, baseline, seed, sampler), a win-rate
chart (each variant against the baseline, per evaluator, with its 95% Wilson interval and the 0.5
line), the result tables (one per evaluator: mean, win rate and decisive win rate with intervals,
W/L/T; an interval wholly above or below 0.5 is marked), the shapes oracle's accuracies, a compact
image grid (one card per prompt holding every variant's image at the same seed, several cards per
row; click an image to enlarge it, click again to close) and the training curves of the runs,
one chart per metric with every run on it.

Click-to-enlarge is CSS only (a hidden checkbox per image), so the page holds no script, and each
image is stored once, as a data URI.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from mm_align.image.image_io import png_bytes
from PIL import Image

from mm_align.atomic import atomic_write_text
from mm_align.report import BENCH_PAGE_CSS

__all__ = ["write_bench_report", "sampler_text", "win_rate_chart"]

_CSS = BENCH_PAGE_CSS + """
.settings th{width:11em}.tables{display:flex;flex-wrap:wrap;gap:0 2em}
.chart img{max-width:100%;height:auto}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(var(--card),1fr));gap:10px}
.card{border:1px solid #e3e3e6;border-radius:6px;padding:6px;background:#fafafa}
.card p{margin:0 0 4px;font-size:.85em;font-weight:600}
.row{display:flex;gap:4px}.cell{text-align:center;font-size:.7em;color:#555}
.cell label{cursor:zoom-in;display:block}
.cell img{width:var(--thumb);height:var(--thumb);image-rendering:pixelated;border:1px solid #ccc;display:block}
.cell input{display:none}
.cell input:checked+label{position:fixed;inset:0;z-index:10;background:rgba(0,0,0,.8);display:flex;
align-items:center;justify-content:center;cursor:zoom-out}
.cell input:checked+label img{width:min(80vh,80vw);height:min(80vh,80vw)}
.legend{font-size:.85em;color:#555}.curves{display:flex;flex-wrap:wrap;gap:1em}.curves img{max-width:640px}
"""


def sampler_text(sampler: dict[str, Any]) -> str:
    """The sampler settings as one readable line, e.g. ``"20 DDIM steps, guidance 5.0"``."""
    parts = [f"{sampler.get('steps', '?')} {sampler.get('scheduler', 'DDIM')} steps",
             f"guidance {sampler.get('guidance_scale', '?')}"]
    if sampler.get("negative_prompt"):
        parts.append(f"negative prompt “{sampler['negative_prompt']}”")
    if sampler.get("resolution"):
        parts.append(f"{sampler['resolution']} px")
    if sampler.get("dtype") and sampler["dtype"] != "float32":
        parts.append(sampler["dtype"])
    return ", ".join(parts)


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def win_rate_chart(results: dict) -> str | None:
    """Win rate over the baseline with its 95% interval, per variant (rows) and evaluator (panels), as a PNG URI.

    ``None`` when no variant has a win rate (only the baseline was drawn).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    evaluators = results["evaluators"]
    names = [n for n, v in results["variants"].items()
             if any("vs_baseline" in s for s in v["scores"].values())]
    if not names:
        return None
    fig = Figure(figsize=(max(4.2 * len(evaluators), 6.0), 0.45 * len(names) + 1.3), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(evaluators), sharey=True, squeeze=False)[0]
    ys = list(range(len(names)))[::-1]
    for ax, ev in zip(axes, evaluators):
        for y, name in zip(ys, names):
            vs = results["variants"][name]["scores"][ev]["vs_baseline"]
            low, high = vs["ci"]
            colour = "#2e7d32" if low > 0.5 else "#c62828" if high < 0.5 else "#555555"
            xerr = [[max(0.0, vs["rate"] - low)], [max(0.0, high - vs["rate"])]]
            ax.errorbar(vs["rate"], y, xerr=xerr, fmt="o", color=colour, capsize=3, markersize=5)
            ax.annotate(f"{vs['rate']:.2f}", (high, y), xytext=(4, -3), textcoords="offset points", fontsize=8)
        ax.axvline(0.5, color="#999", linestyle="--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_title(ev, fontsize=10)
        ax.set_xlabel(f"win rate vs {results['baseline']}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys, names)
    fig.subplots_adjust(left=0.16 if len(evaluators) > 1 else 0.25, right=0.97, bottom=0.8 / fig.get_figheight(),
                        top=1 - 0.35 / fig.get_figheight(), wspace=0.12)
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return _png_uri(buf.getvalue())


def _ci(pair: list[float], digits: int = 3) -> str:
    return f"[{pair[0]:.{digits}f}, {pair[1]:.{digits}f}]"


def _evaluator_table(results: dict, ev: str) -> str:
    esc = html.escape
    rows = []
    for name, v in results["variants"].items():
        s = v["scores"][ev]
        vs = s.get("vs_baseline")
        if vs:
            mark = "up" if vs["ci"][0] > 0.5 else "down" if vs["ci"][1] < 0.5 else ""
            win = f'<td class="n {mark}">{vs["rate"]:.3f} {_ci(vs["ci"])}</td>'
            decisive = f'<td class="n">{vs["decisive_rate"]:.3f} {_ci(vs["decisive_ci"])}</td>'
            wlt = f'<td class="n">{vs["wins"]}/{vs["losses"]}/{vs["ties"]}</td>'
        else:
            win = decisive = wlt = '<td class="n">baseline</td>'
        rows.append(f'<tr><th>{esc(name)}</th><td class="n">{s["mean"]:.4f} {_ci(s["mean_ci"], 4)}</td>'
                    f"{win}{decisive}{wlt}</tr>")
    return (f"<div><h3>{esc(ev)}</h3><table><tr><th>variant</th><th>mean [95% CI]</th>"
            "<th>win rate [95% CI]</th><th>decisive win rate [95% CI]</th><th>wins/losses/ties</th></tr>"
            + "".join(rows) + "</table></div>")


def _oracle_table(results: dict) -> str:
    rows = [f'<tr><th>{html.escape(n)}</th><td class="n">{v["oracle_accuracy"]:.3f}</td>'
            f'<td class="n">{v["oracle_colour_accuracy"]:.3f}</td><td class="n">{v["oracle_shape_accuracy"]:.3f}</td>'
            f'<td class="n">{v["oracle_background_accuracy"]:.3f}</td></tr>'
            for n, v in results["variants"].items() if "oracle_accuracy" in v]
    if not rows:
        return ""
    return ("<h2>Shapes oracle: accuracy</h2><p class=legend>The share of images whose colour, shape and background "
            "all match the prompt, then each attribute alone.</p><table><tr><th>variant</th><th>all three</th>"
            "<th>colour</th><th>shape</th><th>background</th></tr>" + "".join(rows) + "</table>")


def _grid(prompts: list[str], images: dict[str, list[Image.Image]], scores: dict[str, dict[str, Any]],
          limit: int) -> str:
    esc = html.escape
    names = list(images)
    side = max(im.width for ims in images.values() for im in ims[:1]) if names else 64
    scale = max(1, round(256 / max(side, 1)))  # stored large enough to enlarge; shown as a thumbnail
    thumb = 72
    cards = []
    for i, prompt in enumerate(prompts[:limit]):
        cells = []
        for j, n in enumerate(names):
            image = images[n][i]
            uri = _png_uri(png_bytes(image.resize((image.width * scale, image.height * scale), Image.NEAREST)))
            tip = "; ".join(f"{k} {v[i]:.3f}" for k, v in scores[n].items())
            key = f"z{i}_{j}"
            cells.append(f'<div class="cell"><input type="checkbox" id="{key}"><label for="{key}" '
                         f'title="{esc(n)}: {esc(tip)}"><img src="{uri}" alt="{esc(n)}: {esc(prompt)}"></label>'
                         f"{esc(n)}</div>")
        cards.append(f'<div class="card"><p>{esc(prompt)}</p><div class="row">{"".join(cells)}</div></div>')
    card = len(names) * (thumb + 4) + 14
    shown = min(limit, len(prompts))
    return (f"<h2>Images: {shown} of {len(prompts)} prompts, the same seed per prompt</h2>"
            "<p class=legend>Click an image to enlarge it; hover for its scores.</p>"
            f'<div class="grid" style="--card:{card}px;--thumb:{thumb}px">' + "".join(cards) + "</div>")


def _curves(runs: dict[str, str]) -> str:
    from mm_align.metrics_log import read_metrics
    from mm_align.report import plot_series

    esc = html.escape
    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    missing = []
    for name, run in runs.items():
        metrics = Path(run) / "metrics.jsonl"
        if not metrics.is_file():
            missing.append(f"<p>{esc(name)}: no metrics at {esc(str(metrics))}</p>")
            continue
        for i, r in enumerate(read_metrics(metrics)):
            for key in ("loss", "rewards/accuracies", "rewards/margins"):
                v = r.get(key)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    series.setdefault(key, {}).setdefault(name, []).append((r.get("step", i), float(v)))
    if not series and not missing:
        return ""
    figures = [f'<img src="{plot_series(lines, key, smooth=5)}" alt="{esc(key)} of every run">'
               for key, lines in series.items()]
    return ("<h2>Training curves</h2><p class=legend>Every run on one chart per metric; a 5-step moving "
            "average.</p>" + "".join(missing) + '<div class="curves">' + "".join(figures) + "</div>")


def write_bench_report(path: Path, results: dict, prompts: list[str], images: dict[str, list[Image.Image]],
                       scores: dict[str, dict[str, Any]], runs: dict[str, str], grid_prompts: int) -> None:
    """Write the benchmark's HTML page (module docstring) atomically to ``path``."""
    esc = html.escape
    settings = [
        ("model", results["model"]), ("prompts", f"{results['prompts']} held-out prompts"),
        ("baseline", results["baseline"]), ("variants", ", ".join(results["variants"])),
        ("evaluators", ", ".join(results["evaluators"])), ("sampler", sampler_text(results["sampler"])),
        ("seed", f"{results['seed']} (one seed per prompt, the same for every variant)"),
    ]
    parts = [f"<h1>Image benchmark: {len(results['variants'])} variants on {results['prompts']} prompts</h1>",
             "<p class=sub>Win rate = wins / N, ties count for neither; intervals are 95% Wilson intervals. "
             "Green: the interval lies above 0.5; red: below.</p>",
             '<table class="settings">' + "".join(f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>"
                                                 for k, v in settings) + "</table>"]
    chart = win_rate_chart(results)
    if chart:
        parts.append(f'<h2>Win rate against {esc(results["baseline"])}</h2><div class="chart">'
                     f'<img src="{chart}" alt="win rate with 95% intervals per variant and evaluator"></div>')
    parts.append("<h2>Results per evaluator</h2><div class=tables>"
                 + "".join(_evaluator_table(results, ev) for ev in results["evaluators"]) + "</div>")
    parts.append(_oracle_table(results))
    parts.append(_grid(prompts, images, scores, grid_prompts))
    parts.append(_curves(runs))
    page = ('<!doctype html><html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">'
            f"<title>mm-align image benchmark</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(p for p in parts if p) + "\n</body></html>\n")
    atomic_write_text(path, page)
