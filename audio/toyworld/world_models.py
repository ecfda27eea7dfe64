"""The speech world's shipped base restorers, by name.

``speech_flow``, ``speech_masked`` and ``speech_ar`` name the model directories under ``weights/`` that
:mod:`mm_align.audio.toyworld.train_speech_restorers` makes; anywhere a restorer directory is asked for
(``model.pretrained``, ``--model``), these names stand for them, as ``shapes`` does for the image world.
"""

from __future__ import annotations

from pathlib import Path

from mm_align.audio.toyworld.asr_weights import WEIGHTS_DIR

__all__ = ["WORLD_RESTORERS", "restorer_dir", "resolve_restorer"]

WORLD_RESTORERS = {"speech_flow": "flow", "speech_masked": "masked", "speech_ar": "ar"}


def restorer_dir(paradigm: str) -> Path:
    """The shipped base restorer of ``paradigm`` (``flow``, ``masked`` or ``ar``): a model directory."""
    names = {v: k for k, v in WORLD_RESTORERS.items()}
    if paradigm not in names:
        raise ValueError(f"unknown paradigm {paradigm!r}; valid: {', '.join(names)}")
    path = WEIGHTS_DIR / names[paradigm]
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the speech world's {paradigm} restorer is not there; rebuild it with "
                                "python -m mm_align.audio.toyworld.train_speech_restorers")
    return path


def resolve_restorer(name: str) -> str:
    """``speech_flow`` / ``speech_masked`` / ``speech_ar`` → the shipped directory; any other name or path unchanged.

    A local path wins: a directory literally called ``speech_flow`` in the working directory is that directory.
    """
    if name in WORLD_RESTORERS and not Path(name).exists():
        return str(restorer_dir(WORLD_RESTORERS[name]))
    return name
