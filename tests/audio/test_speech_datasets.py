"""audio/datasets.py: VoiceBank-DEMAND, DNS 2020 synthetic and jsonl manifest readers on small trees in the
real layouts, with every skipped entry counted and named."""

import json
import logging

import numpy as np
import pytest
import soundfile as sf
from mm_align.audio.datasets import (
    SkippedClip,
    SpeechClip,
    detect_speech_format,
    read_dns,
    read_speech_manifest,
    read_speech_set,
    read_voicebank,
)

from mm_align.data import DataError

SR = 16000


def wav(path, f0=220.0, seconds=0.1, sr=SR):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * f0 * t)).astype(np.float32), sr)
    return path


def voicebank_tree(root):
    for name in ("p232_001", "p232_002", "p257_001"):
        wav(root / "noisy_testset_wav" / f"{name}.wav")
    for name in ("p232_001", "p232_002", "p232_003"):  # p257_001 has no clean file; p232_003 no noisy one
        wav(root / "clean_testset_wav" / f"{name}.wav")
    (root / "noisy_testset_wav" / "README.txt").write_text("not audio")  # ignored
    (root / "testset_txt").mkdir()
    (root / "testset_txt" / "p232_001.txt").write_text("Please call Stella.\n")
    return root


def test_voicebank_pairs_by_file_name_with_transcripts(tmp_path):
    root = voicebank_tree(tmp_path / "vb")
    result = read_voicebank(root)
    assert [c.id for c in result.clips] == ["p232_001", "p232_002"]
    first = result.clips[0]
    assert first.degraded == root / "noisy_testset_wav" / "p232_001.wav"
    assert first.clean == root / "clean_testset_wav" / "p232_001.wav"
    assert first.text == "Please call Stella." and result.clips[1].text is None
    assert first.origin == "noisy_testset_wav/p232_001.wav"
    assert result.skipped == [
        SkippedClip(str(root / "noisy_testset_wav" / "p257_001.wav"),
                    "missing clean: clean_testset_wav/p257_001.wav not found"),
        SkippedClip(str(root / "clean_testset_wav" / "p232_003.wav"),
                    "missing degraded: noisy_testset_wav/p232_003.wav not found"),
    ]
    assert result.skipped_by_reason() == {"missing clean": 1, "missing degraded": 1}
    summary = result.summary()
    assert summary.startswith(f"read 2 clips from {root} (voicebank); skipped 2 (missing clean: 1, missing "
                              "degraded: 1)")
    assert "p257_001.wav: missing clean" in summary


def test_voicebank_strict_names_the_file(tmp_path):
    root = voicebank_tree(tmp_path / "vb")
    with pytest.raises(DataError, match=r"noisy_testset_wav/p257_001.wav: missing clean: "):
        read_voicebank(root, strict=True)


def test_voicebank_empty_files_and_bad_transcripts_are_skipped(tmp_path):
    root = voicebank_tree(tmp_path / "vb")
    (root / "clean_testset_wav" / "p232_002.wav").write_bytes(b"")
    (root / "testset_txt" / "p232_001.txt").write_bytes(b"\xff\xfe bad")
    reasons = [s.reason for s in read_voicebank(root).skipped]
    assert "empty file: clean_testset_wav/p232_002.wav (0 bytes)" in reasons
    assert "bad transcript: p232_001.txt is not UTF-8 text" in reasons


def test_voicebank_training_split(tmp_path):
    wav(tmp_path / "noisy_trainset_28spk_wav" / "p226_001.wav")
    wav(tmp_path / "clean_trainset_28spk_wav" / "p226_001.wav")
    (tmp_path / "trainset_28spk_txt").mkdir()
    (tmp_path / "trainset_28spk_txt" / "p226_001.txt").write_text("hello")
    result = read_speech_set(tmp_path)
    assert result.format == "voicebank" and [(c.id, c.text) for c in result.clips] == [("p226_001", "hello")]


def dns_tree(root):
    nr = root / "synthetic" / "no_reverb"
    for n in (0, 1, 2, 10):
        wav(nr / "noisy" / f"clnsp{n}_white_3374_snr{n}_tl-27_fileid_{n}.wav", f0=200 + n)
    for n in (0, 1, 10, 5):  # fileid_2 has no clean file; fileid_5 no noisy one
        wav(nr / "clean" / f"clean_fileid_{n}.wav", f0=200 + n)
    wav(nr / "noisy" / "stray_noisy.wav")  # no fileid_N suffix
    wr = root / "synthetic" / "with_reverb"
    wav(wr / "noisy" / "clnsp7_babble_12_snr0_tl-30_fileid_0.wav")
    wav(wr / "clean" / "clean_fileid_0.wav")
    return root


def test_dns_matches_by_fileid_suffix_per_subset(tmp_path):
    root = dns_tree(tmp_path / "dns")
    result = read_dns(root)
    ids = [c.id for c in result.clips]
    assert ids == ["no_reverb/fileid_0", "no_reverb/fileid_1", "no_reverb/fileid_10", "with_reverb/fileid_0"]
    by_id = {c.id: c for c in result.clips}
    assert by_id["no_reverb/fileid_1"].clean.name == "clean_fileid_1.wav"  # not fileid_10
    assert by_id["no_reverb/fileid_10"].degraded.name.endswith("_fileid_10.wav")
    assert by_id["with_reverb/fileid_0"].clean.parent.parent.name == "with_reverb"
    assert by_id["no_reverb/fileid_0"].origin == "synthetic/no_reverb/noisy/clnsp0_white_3374_snr0_tl-27_fileid_0.wav"
    assert result.skipped_by_reason() == {"bad name": 1, "missing clean": 1, "missing degraded": 1}
    where = {s.reason.split(":")[0]: s.source for s in result.skipped}
    assert where["bad name"].endswith("no_reverb/noisy/stray_noisy.wav")
    assert where["missing clean"].endswith("_fileid_2.wav")
    assert where["missing degraded"].endswith("clean/clean_fileid_5.wav")
    # the synthetic folder itself reads the same
    assert [c.id for c in read_speech_set(root / "synthetic").clips] == ids


def test_dns_duplicate_fileid_and_missing_subfolder(tmp_path):
    root = dns_tree(tmp_path / "dns")
    wav(root / "synthetic" / "with_reverb" / "noisy" / "other_fileid_0.wav")
    dup = [s for s in read_dns(root).skipped if s.reason.startswith("duplicate fileid")]
    assert len(dup) == 1 and "has the fileid of synthetic/with_reverb/noisy/clnsp7" in dup[0].reason
    (tmp_path / "bad" / "synthetic" / "no_reverb" / "noisy").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no_reverb/clean: no such directory"):
        read_dns(tmp_path / "bad")
    with pytest.raises(DataError, match=r"no_reverb/noisy/stray_noisy.wav: bad name: a noisy file whose name does "
                                        r"not end in fileid_N"):
        read_dns(root, strict=True)


def manifest_tree(root):
    wav(root / "deg" / "a.wav")
    wav(root / "clean" / "a.wav")
    wav(root / "deg" / "b.wav")
    absolute = wav(root / "elsewhere" / "c.wav")
    lines = [
        json.dumps({"id": "a", "degraded": "deg/a.wav", "clean": "clean/a.wav", "text": " the cat "}),
        json.dumps({"degraded": str(absolute)}),  # no id: the stem
        json.dumps({"id": "x", "clean": "clean/a.wav"}),  # line 3: no degraded
        "{not json",  # line 4
        json.dumps({"id": "m", "degraded": "deg/missing.wav"}),  # line 5
        "",
        json.dumps({"id": "a", "degraded": "deg/b.wav"}),  # line 7: the id of line 1
        json.dumps({"id": "b", "degraded": "deg/b.wav", "clean": 3}),  # line 8
        json.dumps({"id": "b2", "degraded": "deg/b.wav", "text": None, "clean": None}),
    ]
    path = root / "m.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_manifest_rows_relative_paths_and_named_skips(tmp_path, caplog):
    path = manifest_tree(tmp_path)
    with caplog.at_level(logging.WARNING):
        result = read_speech_manifest(path)
    assert result.clips == [
        SpeechClip("a", tmp_path / "deg" / "a.wav", tmp_path / "clean" / "a.wav", "the cat"),
        SpeechClip("c", tmp_path / "elsewhere" / "c.wav"),
        SpeechClip("b2", tmp_path / "deg" / "b.wav"),
    ]
    assert [c.origin for c in result.clips] == [f"{path}:1", f"{path}:2", f"{path}:9"]
    skipped = {s.where(): s.reason for s in result.skipped}
    assert skipped[f"{path}:3"] == "missing column: degraded"
    assert skipped[f"{path}:4"].startswith("malformed json")
    assert skipped[f"{path}:5"] == "missing file: deg/missing.wav (degraded)"
    assert skipped[f"{path}:7"] == f"duplicate id: 'a' (first at {path}:1)"
    assert skipped[f"{path}:8"] == "bad clean: expected a path to an audio file, got 3"
    assert "kept 3 clips, skipped 5" in caplog.text
    with pytest.raises(DataError, match=r"m.jsonl:3: missing column: degraded"):
        read_speech_set(path, strict=True)


def test_detection_and_bad_paths(tmp_path):
    assert detect_speech_format(voicebank_tree(tmp_path / "vb")) == "voicebank"
    assert detect_speech_format(dns_tree(tmp_path / "dns")) == "dns"
    assert detect_speech_format(manifest_tree(tmp_path / "man")) == "manifest"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: not a speech restoration set: expected clean_testset_wav/"):
        read_speech_set(tmp_path / "empty")
    with pytest.raises(DataError, match="nowhere: no such file or directory"):
        read_speech_set(tmp_path / "nowhere")
    with pytest.raises(DataError, match="unknown speech set format 'libri'; valid: auto, voicebank, dns, manifest"):
        read_speech_set(tmp_path / "vb", format="libri")
    with pytest.raises(DataError, match="not a VoiceBank-DEMAND directory"):
        read_speech_set(tmp_path / "dns", format="voicebank")
