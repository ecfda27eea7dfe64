"""Where the speech world's shipped recogniser lives: a tiny character CTC model for the content metrics.

The model (a transformers ``Wav2Vec2BertForCTC``, trained by :mod:`mm_align.audio.toyworld.train_speech_asr` on the
world's train split) and its processor are saved with ``save_pretrained`` under ``weights/speech_asr``, so they load
as any user's local CTC model: ``TransformersCTCASR(speech_asr_dir())``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["WEIGHTS_DIR", "speech_asr_dir"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def speech_asr_dir() -> Path:
    """The shipped speech-world recogniser (a ``save_pretrained`` directory of the model and its processor)."""
    path = WEIGHTS_DIR / "speech_asr"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the speech world's recogniser is not there; rebuild it with "
                                "python -m mm_align.audio.toyworld.train_speech_asr")
    return path
