"""audio/converters.py: ``mm-align convert speech`` between VoiceBank-DEMAND, DNS and manifests: copied,
referenced and resampled audio, skips counted, one error line on bad input, nothing half-written."""

import json

import numpy as np
import pytest
import soundfile as sf
from mm_align.audio.converters import convert_main, convert_speech, file_stem
from mm_align.audio.datasets import read_speech_set

SR = 16000


def wav(path, f0=220.0, seconds=0.1, sr=SR, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * f0 * t)).astype(np.float32), sr, format=fmt)
    return path


def voicebank(root):
    for i, name in enumerate(("p232_001", "p232_002", "p257_001")):
        wav(root / "noisy_testset_wav" / f"{name}.wav", f0=200 + 10 * i)
        if name != "p257_001":
            wav(root / "clean_testset_wav" / f"{name}.wav", f0=300 + 10 * i)
    (root / "testset_txt").mkdir()
    (root / "testset_txt" / "p232_001.txt").write_text("Please call Stella.")
    return root


def dns(root):
    for subset in ("no_reverb", "with_reverb"):
        for n in (0, 3):
            wav(root / "synthetic" / subset / "noisy" / f"clnsp{n}_white_1_snr5_tl-25_fileid_{n}.wav")
            wav(root / "synthetic" / subset / "clean" / f"clean_fileid_{n}.wav", seconds=0.2)
    return root


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_voicebank_to_manifest_copies_the_files(tmp_path, capsys):
    src = voicebank(tmp_path / "vb")
    out = tmp_path / "out"
    assert convert_main([str(src), str(out), "--to", "manifest"]) == 0
    printed = capsys.readouterr().out
    assert "read 2 clips" in printed and "skipped 1 clips (missing clean: 1)" in printed and "p257_001.wav" in printed
    assert f"wrote 2 clips to {out / 'manifest.jsonl'} (manifest)" in printed
    assert rows(out / "manifest.jsonl") == [
        {"id": "p232_001", "degraded": "audio/degraded/p232_001.wav", "clean": "audio/clean/p232_001.wav",
         "text": "Please call Stella."},
        {"id": "p232_002", "degraded": "audio/degraded/p232_002.wav", "clean": "audio/clean/p232_002.wav"},
    ]
    assert (out / "audio/clean/p232_002.wav").read_bytes() == (src / "clean_testset_wav/p232_002.wav").read_bytes()
    back = read_speech_set(out / "manifest.jsonl")
    assert [(c.id, c.text) for c in back.clips] == [("p232_001", "Please call Stella."), ("p232_002", None)]
    assert not back.skipped
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_dns_to_voicebank_resampled(tmp_path):
    out = tmp_path / "vb8k"
    summary = convert_speech(dns(tmp_path / "dns"), out, dst_format="voicebank", sample_rate=8000)
    assert (summary.src_format, summary.dst_format, summary.read, summary.written) == ("dns", "voicebank", 4, 4)
    names = sorted(p.name for p in (out / "noisy_testset_wav").iterdir())
    assert names == ["no_reverb_fileid_0.wav", "no_reverb_fileid_3.wav", "with_reverb_fileid_0.wav",
                     "with_reverb_fileid_3.wav"]
    info = sf.info(out / "clean_testset_wav" / "with_reverb_fileid_3.wav")
    assert info.samplerate == 8000 and info.channels == 1 and info.frames == 1600  # 0.2 s at 8 kHz
    assert not (out / "testset_txt").exists()  # no transcripts
    back = read_speech_set(out)
    assert back.format == "voicebank" and len(back.clips) == 4 and not back.skipped


def test_manifest_reference_mode_copies_nothing(tmp_path):
    src = voicebank(tmp_path / "vb")
    first = tmp_path / "m1" / "index.jsonl"
    convert_speech(src, first, audio="reference")
    assert not (tmp_path / "m1" / "index_audio").exists()
    assert rows(first)[0]["degraded"] == "../vb/noisy_testset_wav/p232_001.wav"
    back = read_speech_set(first).clips
    assert back[0].degraded.resolve() == (src / "noisy_testset_wav" / "p232_001.wav").resolve()
    # a .jsonl destination with copied audio keeps it in <stem>_audio/
    second = tmp_path / "m2" / "set.jsonl"
    convert_speech(first, second)
    assert rows(second)[1]["clean"] == "set_audio/clean/p232_002.wav"
    assert (tmp_path / "m2" / "set_audio" / "clean" / "p232_002.wav").is_file()


def test_manifest_to_voicebank_skips_clips_without_clean_and_writes_wav(tmp_path):
    wav(tmp_path / "src" / "a.flac", fmt="FLAC")
    wav(tmp_path / "src" / "a_clean.wav")
    wav(tmp_path / "src" / "b.wav")
    manifest = tmp_path / "src" / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "degraded": "a.flac", "clean": "a_clean.wav", "text": "hi"}) + "\n"
                        + json.dumps({"id": "b", "degraded": "b.wav"}) + "\n")
    summary = convert_speech(manifest, tmp_path / "vb", dst_format="voicebank")
    assert summary.written == 1 and summary.skipped_by_reason() == {"no clean": 1}
    assert summary.skipped[0].source.endswith("b.wav")
    assert sf.info(tmp_path / "vb" / "noisy_testset_wav" / "a.wav").format == "WAV"  # decoded from flac
    assert (tmp_path / "vb" / "testset_txt" / "a.txt").read_text() == "hi\n"


def test_unreadable_audio_and_duplicate_names_are_skipped(tmp_path):
    (tmp_path / "junk.wav").write_bytes(b"RIFF but not really audio")
    wav(tmp_path / "ok.wav")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in [
        {"id": "j", "degraded": "junk.wav"}, {"id": "a/b", "degraded": "ok.wav"}, {"id": "a_b", "degraded": "ok.wav"},
    ]) + "\n")
    summary = convert_speech(manifest, tmp_path / "out", dst_format="manifest", sample_rate=8000)
    assert summary.written == 1 and summary.skipped_by_reason() == {"unreadable audio": 1, "duplicate name": 1}
    assert "junk.wav: not a readable audio file" in summary.skipped[0].reason
    assert "id 'a_b' gives the file name of id 'a/b'" in summary.skipped[1].reason
    assert file_stem("no_reverb/fileid_3") == "no_reverb_fileid_3"
    # strict: stops at the junk file after staging ok.wav, and leaves no output and no staging folder behind
    manifest.write_text(json.dumps({"id": "a", "degraded": "ok.wav"}) + "\n" + json.dumps({"degraded": "junk.wav"}))
    with pytest.raises(ValueError, match=r"junk.wav: unreadable audio: .*junk.wav: not a readable audio file"):
        convert_speech(manifest, tmp_path / "strict", dst_format="manifest", sample_rate=8000, strict=True)
    assert not (tmp_path / "strict").exists()


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0]
    return err[0]


def test_bad_input_is_one_error_line(tmp_path, capsys):
    src = voicebank(tmp_path / "vb")
    assert convert_main([str(tmp_path / "nowhere"), str(tmp_path / "o.jsonl")]) == 2
    assert "nowhere: no such file or directory" in one_error_line(capsys)
    assert convert_main([str(src), str(tmp_path / "outdir")]) == 2
    assert "cannot tell the output format; pass --to manifest or --to voicebank" in one_error_line(capsys)
    assert convert_main([str(src), str(tmp_path / "o.jsonl"), "--audio", "reference", "--sample-rate", "8000"]) == 2
    assert "--audio reference" in one_error_line(capsys)
    assert convert_main([str(src), str(src), "--to", "voicebank"]) == 2
    assert "source and destination are the same" in one_error_line(capsys)
    assert convert_main([str(src), str(tmp_path / "o.jsonl"), "--strict"]) == 2
    assert "noisy_testset_wav/p257_001.wav: missing clean" in one_error_line(capsys)
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o_audio").exists()  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_existing_output_needs_overwrite_which_replaces_it(tmp_path, capsys):
    src = voicebank(tmp_path / "vb")
    out = tmp_path / "o.jsonl"
    assert convert_main([str(src), str(out)]) == 0
    stale = tmp_path / "o_audio" / "degraded" / "stale.wav"
    wav(stale)
    assert convert_main([str(src), str(out)]) == 2
    assert "the output exists already; pass --overwrite" in one_error_line(capsys)
    assert convert_main([str(src), str(out), "--overwrite", "--sample-rate", "8000"]) == 0
    assert not stale.exists()
    assert sf.info(tmp_path / "o_audio" / "degraded" / "p232_001.wav").samplerate == 8000


def test_help_names_the_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mm-align convert speech") and "--sample-rate SR" in out and "``" not in out
