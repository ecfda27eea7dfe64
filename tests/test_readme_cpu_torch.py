"""The README's CPU-only install line (issue 11, item 10) installs the CPU build of exactly the pinned torch set."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_torch_line_matches_the_pins():
    (line,) = [ln for ln in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
               if "download.pytorch.org/whl/cpu" in ln]
    assert line.startswith("pip install ") and "--index-url https://download.pytorch.org/whl/cpu" in line
    readme = dict(re.findall(r"\b(torch|torchvision|torchaudio)==([\d.]+)", line))
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")  # no tomllib: Python 3.10 is supported
    pinned = dict(re.findall(r'^\s*"(torch|torchvision|torchaudio)==([\d.]+)",', pyproject, flags=re.M))
    assert readme == pinned and set(pinned) == {"torch", "torchvision", "torchaudio"}
