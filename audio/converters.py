"""``mm-align convert speech``: speech restoration sets between VoiceBank-DEMAND, DNS 2020 and jsonl manifests.

``mm-align convert speech SRC OUT [--from voicebank|dns|manifest] [--to manifest|voicebank] [--sample-rate SR]
[--audio copy|reference] [--strict] [--overwrite]``

Sources are read by :func:`mm_align.audio.datasets.read_speech_set` (the format detected from the layout
unless ``--from`` names it); entries it skips are counted in the summary, or stop the conversion with
``--strict``. Outputs:

``manifest``
    A jsonl manifest, one ``{"id", "degraded", "clean"?, "text"?}`` object per line with paths relative to
    the manifest's directory. ``OUT`` ending in ``.jsonl`` is the manifest itself and its audio goes to
    ``<OUT stem>_audio/``; any other ``OUT`` is a directory that gets ``manifest.jsonl`` and ``audio/``.
    The audio lands under ``degraded/<id>.<ext>`` and ``clean/<id>.<ext>`` there:

    - ``--audio copy`` (the default): the files are copied byte for byte, so the output stands on its own
      (it can be moved or shipped) and the source set may be deleted;
    - ``--audio reference``: nothing is copied; the rows point at the source files (relative paths from
      the manifest's directory), for a quick index of a large set that stays where it is;
    - ``--sample-rate SR``: every file is decoded, mixed down to mono, resampled to ``SR`` Hz
      (:func:`mm_align.audio.io.resample`) and written as 16-bit wav (not with ``--audio reference``).

``voicebank``
    ``OUT/noisy_testset_wav/<id>.wav``, ``OUT/clean_testset_wav/<id>.wav`` and ``OUT/testset_txt/<id>.txt``
    (when the clip has a transcript). Clips without a clean file are skipped (``no clean``). wav files are
    copied as they are; other formats, and every file with ``--sample-rate``, are decoded and written as wav.

Ids become file names with every character outside ``[A-Za-z0-9._-]`` replaced by ``_`` (``no_reverb/fileid_3``
→ ``no_reverb_fileid_3``); a second clip with the same file name is skipped (``duplicate name``). A file that
cannot be decoded for resampling is skipped (``unreadable audio``).

Writes are staged: everything goes to a temporary folder next to the output first and is moved into place
at the end, so a failed conversion leaves nothing half-written. An existing output is refused unless
``--overwrite``, which REPLACES the folders this command writes (``audio/`` or ``<stem>_audio/`` and the
manifest; or the three VoiceBank folders) and leaves every other file alone.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mm_align.audio.datasets import SPEECH_SET_FORMATS, SkippedClip, SpeechClip, read_speech_set
from mm_align.audio.io import AudioError, load_audio, save_audio

from mm_align.atomic import atomic_write_text
from mm_align.data import DataError
from mm_align.data.conversion import ConversionSummary
from mm_align.data.io import JSONL_SUFFIXES
from mm_align.help_format import HelpFormatter

__all__ = ["OUTPUT_FORMATS", "AUDIO_MODES", "SpeechConvertSummary", "convert_speech", "convert_main", "file_stem"]

OUTPUT_FORMATS = ("manifest", "voicebank")
AUDIO_MODES = ("copy", "reference")
_VOICEBANK_DIRS = ("noisy_testset_wav", "clean_testset_wav", "testset_txt")


@dataclass
class SpeechConvertSummary(ConversionSummary):
    """What :func:`convert_speech` did: clips read (and kept by the reader), skipped (by the reader or the
    conversion, each with its file and reason), written (the manifest file, or the VoiceBank directory)."""

    unit: str = "clips"
    skipped_unit: str = "clips"


def file_stem(clip_id: str) -> str:
    """A clip id as a file name stem: characters outside ``[A-Za-z0-9._-]`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", clip_id).strip("._") or "clip"


def _occupied(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


class _Writer:
    """Puts one clip's audio into the staging folder: copied as is, or decoded (and resampled) into wav."""

    def __init__(self, stage: Path, sample_rate: int | None, force_wav: bool) -> None:
        self.stage, self.sample_rate, self.force_wav = stage, sample_rate, force_wav

    def put(self, source: Path, folder: str, stem: str) -> Path:
        """Write ``source`` as ``stage/folder/stem.<ext>``; the staged path is returned."""
        decode = self.sample_rate is not None or (self.force_wav and source.suffix.lower() != ".wav")
        target = self.stage / folder / f"{stem}{'.wav' if decode else source.suffix.lower()}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if decode:
            wave, sr = load_audio(source, self.sample_rate)
            save_audio(target, wave, sr)
        else:
            shutil.copyfile(source, target)
        return target


def _targets(dst: Path, dst_format: str) -> tuple[Path, Path | None]:
    """``(manifest or VoiceBank root, audio folder)``; the audio folder is ``None`` for a VoiceBank output."""
    if dst_format == "voicebank":
        return dst, None
    if dst.suffix.lower() in JSONL_SUFFIXES:
        return dst, dst.parent / f"{dst.stem}_audio"
    return dst / "manifest.jsonl", dst / "audio"


def _check_args(src: Path, dst: Path, dst_format: str, audio: str, sample_rate: int | None) -> str:
    if dst_format == "auto":
        if dst.suffix.lower() not in JSONL_SUFFIXES:
            raise DataError(f"{dst}: cannot tell the output format; pass --to manifest or --to voicebank "
                            "(a .jsonl destination is a manifest)")
        dst_format = "manifest"
    if dst_format not in OUTPUT_FORMATS:
        raise DataError(f"unknown output format {dst_format!r}; valid: {', '.join(OUTPUT_FORMATS)}")
    if audio not in AUDIO_MODES:
        raise DataError(f"unknown audio mode {audio!r}; valid: {', '.join(AUDIO_MODES)}")
    if audio == "reference" and (dst_format == "voicebank" or sample_rate is not None):
        raise DataError("--audio reference writes a manifest that points at the source files: it cannot resample "
                        "(--sample-rate) or write a VoiceBank layout")
    if sample_rate is not None and sample_rate <= 0:
        raise DataError(f"--sample-rate must be a positive number of Hz, got {sample_rate}")
    if src.expanduser().resolve() == dst.expanduser().resolve():
        raise DataError(f"{src}: source and destination are the same")
    return dst_format


def convert_speech(src: str | Path, dst: str | Path, src_format: str = "auto", dst_format: str = "auto",
                   sample_rate: int | None = None, audio: str = "copy", strict: bool = False,
                   overwrite: bool = False) -> SpeechConvertSummary:
    """Convert a speech restoration set to a jsonl manifest or the VoiceBank-DEMAND layout (see the module doc).

    Args:
        src: A VoiceBank-DEMAND or DNS directory, or a jsonl manifest.
        dst: A ``.jsonl`` file or a directory (manifest), or a directory (voicebank).
        src_format: ``"auto"`` or one of :data:`~mm_align.audio.datasets.SPEECH_SET_FORMATS`.
        dst_format: ``"auto"`` (``.jsonl`` → manifest), ``"manifest"`` or ``"voicebank"``.
        sample_rate: Resample every file to this rate (mono 16-bit wav); ``None`` keeps the files as they are.
        audio: ``"copy"`` or ``"reference"`` (manifest only: point at the source files).
        strict: Stop at the first skipped entry.
        overwrite: Replace an existing output (the folders this command writes, and the manifest).

    Returns:
        :class:`SpeechConvertSummary`: counts read / written / skipped by reason.

    Raises:
        DataError: The source cannot be read, the arguments do not fit together, the output exists (without
            ``overwrite``), or (``strict``) a skipped entry; the message names the file.
    """
    src_p, dst_p = Path(src), Path(dst)
    to = _check_args(src_p, dst_p, dst_format, audio, sample_rate)
    result = read_speech_set(src_p, src_format, strict=strict)
    target, audio_dir = _targets(dst_p, to)
    if to == "voicebank":
        existing = [target / d for d in _VOICEBANK_DIRS]
    else:
        existing = [target] if audio == "reference" else [target, audio_dir]
    if not overwrite and any(p is not None and _occupied(p) for p in existing):
        raise DataError(f"{dst_p}: the output exists already; pass --overwrite to replace it")
    skipped = list(result.skipped)

    def skip(clip: SpeechClip, reason: str) -> None:
        entry = SkippedClip(str(clip.degraded), reason)
        if strict:
            raise DataError(f"{entry.where()}: {reason}")
        skipped.append(entry)

    stage_parent = target if to == "voicebank" else target.parent
    created = not stage_parent.exists()
    stage_parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".mm-align-convert.", dir=stage_parent))
    published = False
    try:
        writer = _Writer(stage, sample_rate, force_wav=to == "voicebank")
        rows: list[dict[str, str]] = []
        used: dict[str, str] = {}
        for clip in result.clips:
            stem = file_stem(clip.id)
            if stem in used:
                skip(clip, f"duplicate name: id {clip.id!r} gives the file name of id {used[stem]!r}")
                continue
            if to == "voicebank" and clip.clean is None:
                skip(clip, f"no clean: clip {clip.id!r} has no clean file for clean_testset_wav/")
                continue
            try:
                row = _convert_clip(clip, stem, to, audio, writer, target, audio_dir)
            except AudioError as exc:
                skip(clip, f"unreadable audio: {exc}")
                continue
            used[stem] = clip.id
            rows.append(row)
        _publish(stage, to, target, audio_dir, rows, audio)
        published = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not published and not any(stage_parent.iterdir()):
            stage_parent.rmdir()  # a failed conversion leaves no trace, not even the folder it made
    return SpeechConvertSummary(str(src_p), str(target), result.format, to, len(result.clips), len(rows), skipped)


def _convert_clip(clip: SpeechClip, stem: str, to: str, audio: str, writer: _Writer, target: Path,
                  audio_dir: Path | None) -> dict[str, str]:
    """Stage one clip's files; the manifest row (paths as they will be once published)."""
    if to == "voicebank":
        writer.put(clip.degraded, "noisy_testset_wav", stem)
        writer.put(clip.clean, "clean_testset_wav", stem)  # type: ignore[arg-type]  (checked by the caller)
        if clip.text is not None:
            (writer.stage / "testset_txt").mkdir(exist_ok=True)
            (writer.stage / "testset_txt" / f"{stem}.txt").write_text(clip.text + "\n", encoding="utf-8")
        return {"id": clip.id}
    row = {"id": clip.id}
    for key, source in (("degraded", clip.degraded), ("clean", clip.clean)):
        if source is None:
            continue
        if audio == "reference":
            row[key] = Path(os.path.relpath(source.resolve(), target.parent.resolve())).as_posix()
        else:
            staged = writer.put(source, key, stem)
            assert audio_dir is not None
            row[key] = (audio_dir / staged.relative_to(writer.stage)).relative_to(target.parent).as_posix()
    if clip.text is not None:
        row["text"] = clip.text
    return row


def _publish(stage: Path, to: str, target: Path, audio_dir: Path | None, rows: list[dict[str, str]],
             audio: str) -> None:
    """Move the staged folders into place (replacing the ones this command owns), then write the manifest."""
    if to == "voicebank":
        target.mkdir(parents=True, exist_ok=True)
        for name in _VOICEBANK_DIRS:
            shutil.rmtree(target / name, ignore_errors=True)
            if (stage / name).is_dir():
                (stage / name).rename(target / name)
        return
    assert audio_dir is not None
    if audio == "copy":
        shutil.rmtree(audio_dir, ignore_errors=True)
        stage.rename(audio_dir)
        stage.mkdir()  # the caller removes the (now empty) staging folder
    atomic_write_text(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def convert_main(argv: list[str]) -> int:
    """``mm-align convert speech SRC OUT [...]``: print the summary; 2 and one ``error:`` line on bad input."""
    parser = argparse.ArgumentParser(
        prog="mm-align convert speech",
        description="Convert a speech restoration set (VoiceBank-DEMAND, DNS 2020 synthetic test, jsonl manifest) "
                    "to a jsonl manifest or the VoiceBank-DEMAND layout.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("src", help="source: a VoiceBank-DEMAND directory (clean_testset_wav/ + noisy_testset_wav/), "
                                    "a DNS directory (synthetic/{no_reverb,with_reverb}/{clean,noisy}/) or a .jsonl "
                                    "manifest")
    parser.add_argument("dst", help="destination: a .jsonl file or a directory (manifest: DIR/manifest.jsonl + "
                                    "DIR/audio/), or a directory (voicebank)")
    parser.add_argument("--from", dest="src_format", choices=("auto", *SPEECH_SET_FORMATS), default="auto",
                        help="source format (default: auto, from the layout)")
    parser.add_argument("--to", dest="dst_format", choices=("auto", *OUTPUT_FORMATS), default="auto",
                        help="destination format (default: auto: a .jsonl destination is a manifest)")
    parser.add_argument("--sample-rate", type=int, default=None, metavar="SR",
                        help="decode, mix down to mono and resample every file to SR Hz (16-bit wav); default: "
                             "keep the files as they are")
    parser.add_argument("--audio", choices=AUDIO_MODES, default="copy",
                        help="manifest output: copy the files next to the manifest (default) or reference the "
                             "source files by relative paths")
    parser.add_argument("--strict", action="store_true", help="stop at the first skipped entry instead of counting it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output (the folders this command writes, and the manifest)")
    args = parser.parse_args(argv)
    try:
        summary = convert_speech(args.src, args.dst, args.src_format, args.dst_format, args.sample_rate,
                                 args.audio, strict=args.strict, overwrite=args.overwrite)
    except (DataError, AudioError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or args.dst}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(summary.text())
    return 0
