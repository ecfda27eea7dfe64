"""Make the speech world's clean utterances: ``python -m mm_align.audio.toyworld.make_speech_world``.

Deterministic, and needs espeak-ng (``apt install espeak-ng``) only here, at generation time; the
result is shipped with the package (``audio/toyworld/data``), so nothing else ever calls espeak-ng.

- Texts: short sentences from a fixed grammar (``the <colour> <animal> <verb> <preposition> the <thing>``),
  drawn without repetition by a seeded generator; every word is common, so a tiny character CTC
  recogniser trained on the train split can transcribe the others.
- Voices: ten espeak-ng voices (a language voice and a variant, with a fixed speed and pitch each).
- Splits: the texts are split 200 / 50 / 50 into train / dev / test, and the voices 6 / 2 / 2, so a dev
  or test utterance is a sentence never heard in training, in a voice never heard in training.
- Audio: espeak-ng's 22.05 kHz output, silence trimmed to 50 ms each side, resampled to 16 kHz, peak
  0.5 normalised, written as 16-bit FLAC with a manifest per split (``{split}.jsonl``: id, clean, text,
  voice). About 300 files, ~1.6 s each.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from mm_align.audio.io import resample, save_audio

__all__ = ["VOICES", "texts", "make_world", "SPLIT_SIZES"]

COLOURS = ["red", "green", "blue", "black", "white", "brown", "pink", "grey"]
ANIMALS = ["cat", "dog", "bird", "fish", "fox", "cow", "pig", "hen", "frog", "goat"]
VERBS = ["sits", "runs", "sleeps", "jumps", "waits", "looks"]
PREPOSITIONS = ["on", "by", "near", "under"]
THINGS = ["mat", "box", "bed", "tree", "rock", "wall", "door", "road"]

# (name, espeak-ng voice, words per minute, pitch 0-99)
VOICES: list[tuple[str, str, int, int]] = [
    ("us_m3", "en-us+m3", 165, 45), ("gb_f2", "en-gb+f2", 155, 60), ("us_f4", "en-us+f4", 170, 55),
    ("scot_m1", "en-gb-scotland+m1", 150, 40), ("rp_f1", "en-gb-x-rp+f1", 160, 65), ("car_m4", "en-029+m4", 158, 50),
    ("us_m6", "en-us+m6", 162, 35),  # dev
    ("gb_f5", "en-gb+f5", 168, 70),  # dev
    ("lanc_m2", "en-gb-x-gbclan+m2", 157, 42),  # test
    ("us_f3", "en-us+f3", 152, 58),  # test
]
SPLIT_VOICES = {"train": VOICES[:6], "dev": VOICES[6:8], "test": VOICES[8:]}
SPLIT_SIZES = {"train": 200, "dev": 50, "test": 50}
SAMPLE_RATE = 16000


def texts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct sentences of the grammar, in a seeded order."""
    grammar = [f"the {c} {a} {v} {p} the {t}" for c in COLOURS for a in ANIMALS for v in VERBS for p in PREPOSITIONS
               for t in THINGS]
    return random.Random(seed).sample(grammar, n)


def _speak(text: str, voice: str, speed: int, pitch: int, tmp: Path) -> torch.Tensor:
    out = tmp / "u.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(out), text],
                   check=True, capture_output=True)
    data, sr = sf.read(str(out), dtype="float32")
    voiced = np.flatnonzero(np.abs(data) > 0.01 * np.abs(data).max())
    pad = int(0.05 * sr)
    data = data[max(0, voiced[0] - pad): voiced[-1] + pad]
    wave = resample(torch.from_numpy(np.ascontiguousarray(data)), sr, SAMPLE_RATE)
    return wave * (0.5 / float(wave.abs().max()))


def make_world(out: Path, seed: int = 0) -> dict[str, int]:
    """Synthesise every split into ``out`` (replacing it); returns the utterance count per split."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed: apt install espeak-ng (needed only to regenerate the world)")
    all_texts = texts(sum(SPLIT_SIZES.values()), seed)
    if out.exists():
        shutil.rmtree(out)
    counts, start = {}, 0
    with tempfile.TemporaryDirectory() as tmp:
        for split, size in SPLIT_SIZES.items():
            rows = []
            for i, text in enumerate(all_texts[start: start + size]):
                name, voice, speed, pitch = SPLIT_VOICES[split][i % len(SPLIT_VOICES[split])]
                uid = f"{split}_{i:03d}_{name}"
                save_audio(out / split / f"{uid}.flac", _speak(text, voice, speed, pitch, Path(tmp)), SAMPLE_RATE)
                rows.append({"id": uid, "clean": f"{split}/{uid}.flac", "text": text, "voice": name})
            (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            counts[split], start = len(rows), start + size
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "data")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(make_world(args.out, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
