"""Tests of mm_align.report: one self-contained HTML page per run."""

from __future__ import annotations

import base64
import json
import math
import sys
from pathlib import Path

import pytest

from mm_align.report import ReportSection, plot_curves, write_report

_PNG_SRC = 'src="data:image/png;base64,'


def _fake_run(run: Path, steps: int = 20, extra: dict | None = None) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    with (run / "metrics.jsonl").open("w") as fh:
        for step in range(1, steps + 1):
            row = {
                "step": step,
                "time": 1000.0 + step,
                "loss": math.exp(-step / 10),
                "loss/sigmoid": 0.5 * math.exp(-step / 10),
                "lr": 1e-5 * min(1.0, step / 5),
                "rewards/chosen": 0.1 * step,
                "rewards/rejected": -0.1 * step,
                "rewards/margins": 0.2 * step,
                "rewards/accuracies": min(1.0, step / 10),
                "grad_norm": None if step == 3 else 1.0 / step,  # a non-finite value logged as null
                "epoch": step // 10,
                **(extra or {}),
            }
            fh.write(json.dumps(row) + "\n")
    return run


def test_write_report(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "run", extra={"<script>alert(1)</script>": 1.0})
    (run / "config.yaml").write_text("train:\n  run_name: <b>bold</b> & co\n")
    (run / "versions.json").write_text(json.dumps({"torch": "2.11.0", "python": "3.11"}))
    section = ReportSection(title="Samples <grid>", html='<div class="grid"><p>modality panel 42</p></div>')
    out = write_report(run, sections=[section])
    assert out == run / "report.html" and out.is_file()
    page = out.read_text(encoding="utf-8")
    assert page.count(_PNG_SRC) >= 4
    for title in ("Loss", "Preference accuracy", "Reward margins", "Learning rate", "Gradient norm", "Other"):
        assert f"<figcaption>{title}</figcaption>" in page
    assert "Denoising errors" not in page and "Log-probs" not in page  # no such keys: no plot
    assert "Summary" in page and "Resolved config" in page and "Versions" in page
    assert '<div class="grid"><p>modality panel 42</p></div>' in page  # trusted fragment, as is
    assert "Samples &lt;grid&gt;" in page  # section title escaped
    # sections come after config and versions
    assert page.index("Resolved config") < page.index("Versions") < page.index("modality panel 42")
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; co" in page
    assert "2.11.0" in page
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temporary file left
    chunk = page.split(_PNG_SRC, 1)[1].split('"', 1)[0]
    assert base64.b64decode(chunk).startswith(b"\x89PNG\r\n\x1a\n")


def _tiny_run(run: Path, rows: list[dict]) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_summary_first_and_last(tmp_path: Path) -> None:
    rows = [{"step": s, "time": 0.0, "rewards/margins": 0.2 * s, "grad_norm": 1.0 / s} for s in range(1, 6)]
    rows[2]["grad_norm"] = None
    page = write_report(_tiny_run(tmp_path / "run", rows)).read_text()
    assert '<tr><th class="k">rewards/margins</th><td>0.2</td><td>1</td></tr>' in page
    assert '<tr><th class="k">grad_norm</th><td>1</td><td>0.2</td></tr>' in page
    assert "steps 1–5" in page
    assert '<th class="k">time</th>' not in page and '<th class="k">step</th>' not in page


def test_output_path_and_title(tmp_path: Path) -> None:
    run = _tiny_run(tmp_path / "run", [{"step": 1, "loss": 1.0}])
    out = write_report(run, output=tmp_path / "elsewhere" / "r.html", title="My <run>")
    assert out == tmp_path / "elsewhere" / "r.html" and out.is_file()
    assert "<title>My &lt;run&gt;</title>" in out.read_text()


def test_diffusion_keys(tmp_path: Path) -> None:
    extra = {"err/policy_chosen": 0.3, "err/ref_chosen": 0.31, "implicit_acc": 0.6, "logps/chosen": -3.0}
    page = write_report(_tiny_run(tmp_path / "run", [{"step": 1, **extra}, {"step": 2, **extra}])).read_text()
    assert "<figcaption>Denoising errors</figcaption>" in page
    assert "<figcaption>Log-probs</figcaption>" in page
    assert 'alt="Preference accuracy: implicit_acc"' in page


def test_missing_metrics_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        write_report(tmp_path)


def test_empty_metrics_file(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("")
    page = write_report(tmp_path).read_text()
    assert "no metrics logged" in page
    assert _PNG_SRC not in page


def test_plot_curves_returns_data_uri() -> None:
    import matplotlib

    backend = matplotlib.get_backend()
    records = [{"step": i, "loss": 1.0 / (i + 1)} for i in range(10)]
    uri = plot_curves(records, ["loss", "absent"], "Loss", smooth=3)
    assert uri.startswith("data:image/png;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]).startswith(b"\x89PNG")
    assert plot_curves([], ["loss"], "Empty").startswith("data:image/png;base64,")
    assert matplotlib.get_backend() == backend  # no global backend switch
    pyplot = sys.modules.get("matplotlib.pyplot")
    assert pyplot is None or not pyplot.get_fignums()  # no pyplot figures left open
