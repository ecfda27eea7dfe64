"""The README's ``mm-align train --config synthetic_dpo`` line works as written, from a fresh directory."""

from __future__ import annotations

import shlex
from pathlib import Path

from mm_align import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def _train_line() -> str:
    (line,) = [ln for ln in README.read_text(encoding="utf-8").splitlines() if "train --config synthetic_dpo" in ln]
    return line.split("#", 1)[0].strip()


def test_readme_synthetic_dpo_line_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's relative data paths resolve here, as for a user
    commands = [shlex.split(part) for part in _train_line().split("&&")]
    assert [c[:2] for c in commands] == [["mm-align", "quickstart"], ["mm-align", "train"]]
    quickstart, train = (c[1:] for c in commands)
    assert "--world" in quickstart and quickstart[quickstart.index("--world") + 1] == "synthetic"
    assert cli.main([*quickstart, "--steps", "2"]) == 0  # as written, only shorter
    fast = ["train.max_steps=2", "train.eval_every=1", "train.report_to=[none]", f"train.output_dir={tmp_path / 'r'}"]
    assert cli.main([*train, *fast]) == 0
    assert (tmp_path / "r" / "config.yaml").is_file()
