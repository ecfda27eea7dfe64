"""Speech preference records: the jsonl manifest of pairs, and the waveforms a batch is made of.

The pair manifest (FORMATS_AND_EVALUATORS.md) has one row per pair::

    {"id": "u0001-s3", "degraded": "deg/u0001.wav", "chosen": "gen/u0001_2.wav", "rejected": "gen/u0001_0.wav",
     "clean": "clean/u0001.wav", "text": "the cat sat", "scores": {"pesq": [2.9, 2.1], ...}}

and the unpaired (KTO) form has ``completion`` and ``label`` instead of ``chosen``/``rejected``. The
degraded input plays the role of the prompt: :func:`read_speech_pairs` reads it into
``record.prompt``; ``clean``, ``text`` and ``scores`` stay in ``record.meta``. Relative paths resolve
against the manifest's directory (the adapter's ``base_dir``).

Every backbone's ``collate`` gets its waveforms from :func:`load_pair_waves`: one random crop
offset per record, drawn from the record's seed and shared by the degraded input, the chosen and
the rejected restoration, so the three stay time-aligned and the reference pass sees the same crop.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal

import torch
from mm_align.audio.io import AudioError, load_audio

from mm_align.data.io import read_preferences
from mm_align.data.records import ColumnMap, PreferencePair, ReadResult, UnpairedSample

__all__ = ["read_speech_pairs", "resolve_path", "load_pair_waves", "PairWaves"]


def read_speech_pairs(path: str | Path, strict: bool = False, kind: Literal["paired", "unpaired"] = "paired",
                      **columns: str) -> ReadResult:
    """Read a speech pair manifest (jsonl, or any core format): ``degraded`` becomes ``record.prompt``.

    ``columns`` renames source columns as :class:`ColumnMap` does (``prompt=`` defaults to ``degraded``).
    """
    cols = ColumnMap(**{"prompt": "degraded", **columns})
    return read_preferences(path, "auto", kind, cols, strict=strict)


def resolve_path(value: Any, base_dir: Path | None, what: str, origin: str | None) -> Path:
    """A record's audio path, relative ones resolved against ``base_dir``; a non-string is an error naming the row."""
    where = f"{origin}: " if origin else ""
    if not isinstance(value, (str, Path)) or not str(value):
        raise AudioError(f"{where}'{what}' must be a path to an audio file, got {type(value).__name__}")
    p = Path(value)
    return p if p.is_absolute() or base_dir is None else base_dir / p


class PairWaves:
    """The time-aligned waveforms of one record: ``degraded``, and ``chosen``/``rejected`` (paired) or
    ``completion`` (unpaired), each ``(T,)`` at the adapter's rate, cropped/padded to one length."""

    def __init__(self, degraded: torch.Tensor, outputs: list[torch.Tensor], length: int) -> None:
        self.degraded = degraded
        self.outputs = outputs  # [chosen, rejected] or [completion]
        self.length = length  # samples of real audio before padding


def _fit(wave: torch.Tensor, offset: int, n: int) -> torch.Tensor:
    piece = wave[offset: offset + n]
    return torch.nn.functional.pad(piece, (0, n - piece.numel())) if piece.numel() < n else piece


def load_pair_waves(record: PreferencePair | UnpairedSample, base_dir: Path | None, sample_rate: int,
                    crop_samples: int | None, seed: int) -> PairWaves:
    """Load a record's degraded input and restoration(s), resampled to ``sample_rate``.

    With ``crop_samples``, every wave is cut at ONE offset drawn from ``seed`` (uniform over the
    shortest wave's valid offsets) and zero-padded to ``crop_samples`` when shorter; without it, all
    are padded to the longest. Raises :class:`AudioError` naming the row and the file when a file is
    missing or unreadable, or when the restorations are much shorter than the degraded input
    (more than 10 %, a sign that they do not belong together).
    """
    origin = getattr(record, "origin", None)
    outs = [record.chosen, record.rejected] if isinstance(record, PreferencePair) else [record.completion]
    names = ["chosen", "rejected"] if isinstance(record, PreferencePair) else ["completion"]
    try:
        degraded = load_audio(resolve_path(record.prompt, base_dir, "degraded", origin), sample_rate)[0]
        waves = [load_audio(resolve_path(v, base_dir, n, origin), sample_rate)[0] for v, n in zip(outs, names)]
    except AudioError as e:
        msg = str(e)
        raise AudioError(msg if origin is None or msg.startswith(origin) else f"{origin}: {msg}") from None
    shortest = min(w.numel() for w in [degraded, *waves])
    if shortest < 0.9 * degraded.numel():
        raise AudioError(f"{origin or 'record'}: a restoration has {shortest} samples against the degraded "
                         f"input's {degraded.numel()}: they must be the same utterance at the same length")
    if crop_samples is None:
        n, offset = max(w.numel() for w in [degraded, *waves]), 0
    else:
        n = crop_samples
        offset = random.Random(seed).randrange(max(1, shortest - crop_samples + 1))
    length = min(n, shortest - offset)
    return PairWaves(_fit(degraded, offset, n), [_fit(w, offset, n) for w in waves], length)
