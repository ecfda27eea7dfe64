"""The speech world: the embedded default of the speech modality.

300 short utterances synthesised by espeak-ng (``make_speech_world.py``, shipped as 16 kHz FLAC under
``data/``), split train / dev / test by sentence AND voice: a dev or test utterance is a sentence never
heard in training spoken by a voice never heard in training. The degraded inputs are not shipped: each
is made on the fly by :func:`degrade`, the general-restoration mix of GenSR (reverb, noise, clipping,
bandwidth loss; :func:`mm_align.audio.degradations.gensr_mix`) drawn from a seed per (utterance, seed),
so any number of degraded versions of the same utterance can be drawn reproducibly.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from mm_align.audio.degradations import gensr_mix
from mm_align.audio.io import load_audio, save_audio

from mm_align.atomic import atomic_write_text

__all__ = ["WorldUtterance", "world_dir", "read_split", "utterance_seed", "degrade", "write_degraded_split",
           "SAMPLE_RATE", "SPLITS"]

SAMPLE_RATE = 16000
SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class WorldUtterance:
    """One clean utterance of the world: ``clean`` is the shipped FLAC file."""

    id: str
    clean: Path
    text: str
    voice: str
    split: str


def world_dir() -> Path:
    """The directory of the shipped utterances and their manifests."""
    return Path(__file__).resolve().parent / "data"


def read_split(split: str, limit: int | None = None) -> list[WorldUtterance]:
    """The utterances of ``split`` (``train``, ``dev`` or ``test``), in manifest order."""
    if split not in SPLITS:
        raise ValueError(f"unknown speech-world split {split!r}; valid: {', '.join(SPLITS)}")
    root = world_dir()
    manifest = root / f"{split}.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} is missing: the speech world is not installed "
                                "(regenerate it with python -m mm_align.audio.toyworld.make_speech_world)")
    rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [WorldUtterance(r["id"], root / r["clean"], r["text"], r["voice"], split) for r in rows[:limit]]


def utterance_seed(utterance_id: str, seed: int) -> int:
    """A stable 31-bit seed per (utterance, seed): the same on every machine and Python (crc32, not ``hash``)."""
    return zlib.crc32(f"{seed}:{utterance_id}".encode()) & 0x7FFFFFFF


def degrade(utterance: WorldUtterance, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(degraded, clean)`` waveforms at 16 kHz; the degradation chain and its noise are drawn from the seed."""
    clean, _ = load_audio(utterance.clean, SAMPLE_RATE)
    s = utterance_seed(utterance.id, seed)
    return gensr_mix(s, SAMPLE_RATE)(clean, SAMPLE_RATE, s), clean


def write_degraded_split(split: str, out: Path, seed: int = 0, limit: int | None = None) -> Path:
    """Write ``split``'s degraded inputs as wav files under ``out`` and a restoration manifest
    (``{id, degraded, clean, text}``; ``degraded`` relative to the manifest, ``clean`` the shipped file);
    returns the manifest path. Files already written are kept (a rerun is cheap and gives the same bytes)."""
    out = Path(out)
    rows = []
    for utt in read_split(split, limit):
        rel = Path("degraded") / f"{utt.id}.wav"
        if not (out / rel).is_file():
            save_audio(out / rel, degrade(utt, seed)[0], SAMPLE_RATE)
        rows.append({"id": utt.id, "degraded": str(rel), "clean": str(utt.clean), "text": utt.text})
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / f"{split}.jsonl"
    atomic_write_text(manifest, "".join(json.dumps(r) + "\n" for r in rows))
    return manifest
