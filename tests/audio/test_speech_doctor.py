"""audio/speech_checks.py: ``mm-align doctor --modality speech`` on pair manifests and restoration sets; every
bad-file case is reported under its check, naming the row (file:LINE), the field and the file."""

import json
import re

import numpy as np
import pytest
import soundfile as sf
from mm_align.audio.speech_checks import SPEECH_CHECKS, clipping, silence, speech_checks, speech_doctor

from mm_align.data import PreferencePair

SR = 16000


def tone(seconds=1.0, sr=SR, amp=0.3, f0=180.0):
    t = np.arange(int(seconds * sr)) / sr
    envelope = (0.5 - 0.5 * np.cos(2 * np.pi * 4.0 * t)) ** 2  # syllable-like bursts
    return (amp * envelope * np.sin(2 * np.pi * f0 * t)).astype(np.float32)


def write(path, data, sr=SR, subtype=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, data, sr, subtype=subtype)
    return path.name


def findings(report):
    return {f.check: f for f in report.findings}


def pair_manifest(root):
    write(root / "deg" / "u.wav", tone())
    write(root / "gen" / "a.wav", tone(f0=200.0))
    write(root / "gen" / "b.wav", tone(f0=220.0))
    write(root / "clean" / "u.wav", tone(f0=180.0))
    write(root / "gen" / "clipped.wav", np.clip(tone(amp=3.0), -1, 1))  # ~30% of samples at full scale
    write(root / "gen" / "silent.wav", np.zeros(SR, np.float32))
    write(root / "deg" / "u8k.wav", tone(sr=8000), sr=8000)
    write(root / "gen" / "short.wav", tone(0.5))
    nan = tone()
    nan[100:110] = np.nan
    write(root / "gen" / "nan.wav", nan, subtype="FLOAT")
    (root / "gen" / "junk.wav").write_bytes(b"this is not a wav file")
    (root / "deg" / "empty.wav").write_bytes(b"")
    good = {"degraded": "deg/u.wav", "chosen": "gen/a.wav", "rejected": "gen/b.wav", "clean": "clean/u.wav"}
    rows = [
        {"id": "ok", **good},  # 1
        {**good, "chosen": "gen/clipped.wav"},  # 2
        {**good, "rejected": "gen/silent.wav"},  # 3
        {**good, "degraded": "deg/u8k.wav"},  # 4: a warning only
        {**good, "chosen": "gen/short.wav"},  # 5
        {**good, "rejected": "gen/nan.wav"},  # 6
        {**good, "degraded": "deg/missing.wav", "clean": "clean/missing.wav"},  # 7
        {**good, "chosen": "gen/junk.wav"},  # 8
        {**good, "degraded": "deg/empty.wav"},  # 9
        {**good, "chosen": "gen/gone.wav"},  # 10: the core doctor's missing_file
    ]
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_each_bad_file_is_named_with_its_row_and_field(tmp_path):
    report = speech_doctor(pair_manifest(tmp_path))
    found = findings(report)
    assert report.rows == 10 and not report.ok
    assert len(found["clipping"].examples) == 1
    assert re.fullmatch(r"pairs\.jsonl:2: chosen: gen/clipped\.wav is clipped \(\d\d\.\d% of samples at "
                        r"\|x\| >= 0\.999, more than 1%\)", found["clipping"].examples[0])
    assert found["silence"].examples == [
        "pairs.jsonl:3: rejected: gen/silent.wav is silent (RMS -inf dBFS < -60 dBFS)"]
    assert found["wrong_sample_rate"].severity == "warning"
    assert found["wrong_sample_rate"].examples == [
        "pairs.jsonl:4: degraded: deg/u8k.wav is 8000 Hz, expected 16000 Hz"]
    assert found["length_mismatch"].examples == [
        "pairs.jsonl:5: chosen: gen/short.wav lasts 0.50 s against 1.00 s of degraded deg/u.wav (50% off, more "
        "than 10%)"]
    assert found["non_finite_audio"].examples == ["pairs.jsonl:6: rejected: gen/nan.wav has 10 NaN/inf samples"]
    assert found["missing_file"].examples == [
        "pairs.jsonl:7: missing file deg/missing.wav (degraded)",
        "pairs.jsonl:7: missing file clean/missing.wav (clean)",
        "pairs.jsonl:10: missing file gen/gone.wav",  # reported by the core doctor, under the same check
    ]
    assert found["unreadable_audio"].examples[0].startswith("pairs.jsonl:8: chosen: gen/junk.wav: not a readable "
                                                            "audio file")
    assert found["unreadable_file"].examples == [
        "pairs.jsonl:9: unreadable file deg/empty.wav (degraded): empty file (0 bytes)"]
    assert all(f.severity == "error" for f in report.findings if f.check != "wrong_sample_rate")
    assert report.valid == 2  # row 1, and row 4 whose only finding is a warning


def test_good_pairs_are_ok_and_the_rate_warning_can_be_turned_off(tmp_path):
    path = pair_manifest(tmp_path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[3]]) + "\n")
    report = speech_doctor(path)
    assert report.ok and [f.check for f in report.findings] == ["wrong_sample_rate"] and report.valid == 2
    assert speech_doctor(path, sample_rate=None).findings == []
    assert speech_doctor(path, sample_rate=8000).findings[0].count == 4 + 3  # the 16 kHz files: 4 in row 1, 3 in row 2
    assert "OK" in report.table()


def test_thresholds_are_the_documented_ones(tmp_path):
    base = tone()
    for name, frac in (("c05.wav", 0.005), ("c2.wav", 0.02)):
        data = base.copy()
        data[: int(frac * data.size)] = 1.0
        write(tmp_path / name, data)
    write(tmp_path / "quiet70.wav", tone(amp=0.3 * 10 ** (-45 / 20)))  # about -70 dBFS RMS
    write(tmp_path / "quiet50.wav", tone(amp=0.3 * 10 ** (-25 / 20)))  # about -50 dBFS RMS
    write(tmp_path / "d.wav", tone())

    def pair(chosen, rejected):
        return PreferencePair("d.wav", chosen, rejected)

    assert clipping(pair("c05.wav", "c2.wav"), tmp_path) == [
        "rejected: c2.wav is clipped (2.0% of samples at |x| >= 0.999, more than 1%)"]
    quiet = silence(pair("quiet70.wav", "quiet50.wav"), tmp_path)
    assert [p.split(" is ")[0] for p in quiet] == ["chosen: quiet70.wav"]
    assert clipping(pair("c05.wav", "c2.wav"), tmp_path, max_fraction=0.03) == []
    assert len(speech_checks()) == len(SPEECH_CHECKS) == 7
    with pytest.raises(ValueError, match="clip_fraction"):
        speech_checks(clip_fraction=1.5)


def test_unpaired_completion_is_checked(tmp_path):
    write(tmp_path / "d.wav", tone())
    write(tmp_path / "c.wav", tone(0.7))
    path = tmp_path / "kto.jsonl"
    path.write_text(json.dumps({"degraded": "d.wav", "completion": "c.wav", "label": True}) + "\n")
    report = speech_doctor(path, kind="unpaired")
    assert findings(report)["length_mismatch"].examples[0].startswith("kto.jsonl:1: completion: c.wav lasts 0.70 s")


def test_restoration_manifest_rows_are_checked_and_named(tmp_path):
    write(tmp_path / "deg" / "a.wav", tone())
    write(tmp_path / "clean" / "a.wav", np.clip(tone(amp=3.0), -1, 1))
    write(tmp_path / "deg" / "b.wav", tone())
    path = tmp_path / "restore.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "degraded": "deg/a.wav", "clean": "clean/a.wav"},
        {"id": "m", "degraded": "deg/missing.wav"},
        {"id": "a", "degraded": "deg/b.wav"},
        {"id": "b", "degraded": "deg/b.wav", "text": "fine"},
    ]) + "\n")
    report = speech_doctor(path)
    found = findings(report)
    assert found["clipping"].examples[0].startswith("restore.jsonl:1: clean: ")
    assert found["missing_file"].examples == ["restore.jsonl:2: missing file: deg/missing.wav (degraded)"]
    assert found["duplicate_id"].examples == [f"restore.jsonl:3: duplicate id: 'a' (first at {path}:1)"]
    assert (report.rows, report.valid) == (4, 1) and not report.ok


def test_voicebank_and_dns_directories(tmp_path):
    vb = tmp_path / "vb"
    write(vb / "noisy_testset_wav" / "p232_001.wav", tone())
    write(vb / "clean_testset_wav" / "p232_001.wav", tone(0.8))
    write(vb / "noisy_testset_wav" / "p232_002.wav", np.zeros(SR, np.float32))
    write(vb / "clean_testset_wav" / "p232_002.wav", tone())
    write(vb / "noisy_testset_wav" / "p257_001.wav", tone())
    found = findings(speech_doctor(vb))
    assert found["missing_clean"].examples == [
        "noisy_testset_wav/p257_001.wav: missing clean: clean_testset_wav/p257_001.wav not found"]
    assert found["silence"].examples[0].startswith("noisy_testset_wav/p232_002.wav: degraded: ")
    assert found["length_mismatch"].examples[0].startswith("noisy_testset_wav/p232_001.wav: clean: ")
    dns = tmp_path / "dns" / "synthetic" / "no_reverb"
    write(dns / "noisy" / "clnsp1_x_snr0_fileid_1.wav", tone(), sr=SR)
    write(dns / "clean" / "clean_fileid_1.wav", tone(sr=22050), sr=22050)
    report = speech_doctor(tmp_path / "dns")
    assert report.ok and findings(report)["wrong_sample_rate"].examples[0].startswith(
        "synthetic/no_reverb/noisy/clnsp1_x_snr0_fileid_1.wav: clean: ")


def test_missing_data_and_bad_options(tmp_path):
    report = speech_doctor(tmp_path / "nowhere.jsonl")
    assert not report.ok and report.findings[0].check == "unreadable"
    assert findings(speech_doctor(tmp_path / "nowhere", format="voicebank"))["unreadable"].count == 1
    with pytest.raises(ValueError, match="unknown speech data format 'wav'; valid: auto, pairs"):
        speech_doctor(tmp_path, format="wav")
