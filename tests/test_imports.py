"""Every module imports, and the core never imports a modality."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import mm_align

MODALITIES = ("mm_align.image", "mm_align.video", "mm_align.audio")


def _modules() -> list[str]:
    """The core's modules, plus every module of the modality packages (mapped from image/, video/, audio/)."""
    names = {m.name for m in pkgutil.walk_packages(mm_align.__path__, "mm_align.")}
    for pkg in MODALITIES:
        module = importlib.import_module(pkg)
        names.add(pkg)
        names |= {m.name for m in pkgutil.walk_packages(module.__path__, pkg + ".")}
    return sorted(names)


def test_every_module_imports():
    names = _modules()
    assert "mm_align.trainer" in names and "mm_align.losses" in names and "mm_align.image" in names
    for name in names:
        importlib.import_module(name)


def test_core_never_imports_a_modality():
    core = [n for n in _modules() if not n.startswith(MODALITIES)
            and n not in ("mm_align.cli", "mm_align.recipes")]
    code = (
        "import importlib, sys\n"
        f"for n in {core!r}: importlib.import_module(n)\n"
        "bad = [m for m in sys.modules if m.startswith(('mm_align.image', 'mm_align.video', 'mm_align.audio'))]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""
