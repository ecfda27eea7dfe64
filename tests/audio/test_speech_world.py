"""The shipped speech world: splits disjoint by sentence and voice, 16 kHz FLAC within the size budget, degraded
inputs reproducible from their seed and worse than the clean speech."""

from __future__ import annotations

import soundfile as sf
import torch
from mm_align.audio.datasets import read_speech_set
from mm_align.audio.toyworld.speech_world import SPLITS, degrade, read_split, world_dir, write_degraded_split


def test_splits_are_disjoint_by_sentence_and_voice():
    splits = {s: read_split(s) for s in SPLITS}
    assert {s: len(u) for s, u in splits.items()} == {"train": 200, "dev": 50, "test": 50}
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not {u.text for u in splits[a]} & {u.text for u in splits[b]}
                assert not {u.voice for u in splits[a]} & {u.voice for u in splits[b]}


def test_shipped_audio_is_16k_flac_within_budget():
    files = sorted(world_dir().glob("*/*.flac"))
    assert len(files) == 300
    assert sum(f.stat().st_size for f in files) <= 15 * 2**20
    for f in files[::37]:
        info = sf.info(str(f))
        assert info.samplerate == 16000 and info.channels == 1 and 1.0 < info.duration < 3.0


def test_degradation_is_seeded_and_degrades(tmp_path):
    utt = read_split("dev", limit=1)[0]
    a, clean = degrade(utt, seed=3)
    b, _ = degrade(utt, seed=3)
    c, _ = degrade(utt, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == clean.shape
    assert float((a - clean).pow(2).mean()) > 1e-4
    manifest = write_degraded_split("dev", tmp_path, seed=3, limit=2)
    clips = read_speech_set(manifest).clips
    assert [c.id for c in clips] == [u.id for u in read_split("dev", limit=2)] and clips[0].text == utt.text
