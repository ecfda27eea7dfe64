"""Speech restoration sets as records: VoiceBank-DEMAND, the DNS-Challenge 2020 synthetic test set, jsonl manifests.

Each set is read into :class:`SpeechClip` records ``(id, degraded, clean, text, origin)``: the degraded
input a restoration model gets, the clean reference when there is one, and the transcript when known.
Layouts (FORMATS_AND_EVALUATORS.md):

``voicebank``
    ``DIR/clean_testset_wav/*.wav`` and ``DIR/noisy_testset_wav/*.wav`` with the same file names, and
    optional transcripts ``DIR/testset_txt/<name>.txt`` (the training split's ``clean_trainset_28spk_wav``
    ... names work with ``split="trainset_28spk"``). The id is the file stem (``p232_001``).
``dns``
    ``DIR/synthetic/{no_reverb,with_reverb}/{clean,noisy}/`` (``DIR`` may also be the ``synthetic`` folder
    itself). A noisy file ``..._fileid_12.wav`` is matched with the clean file of the same subset whose
    name ends in ``fileid_12`` (``clean_fileid_12.wav``); the id is ``no_reverb/fileid_12``.
``manifest``
    A jsonl file, one ``{"id", "degraded", "clean"?, "text"?}`` object per line; relative paths are
    relative to the manifest's directory. A row without ``id`` takes the degraded file's stem.

Bad entries are SKIPPED AND COUNTED, as the core readers do (:mod:`mm_align.data.io`): the result lists
each skipped file or line with a ``"<category>: <detail>"`` reason (``"missing clean: ..."``, ``"missing
degraded: ..."``, ``"bad name: ..."``, ``"duplicate id: ..."``, ``"missing file: ..."``, ``"empty file:
..."``, ``"malformed json: ..."``), one logger warning summarises the counts, and ``strict=True`` raises
:class:`~mm_align.data.DataError` at the first one, naming the file (``m.jsonl:LINE`` for a manifest row).
The readers look at the layout only; :func:`mm_align.audio.speech_checks.speech_doctor` decodes the audio.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mm_align.audio.io import AUDIO_SUFFIXES

from mm_align.data.io import JSONL_SUFFIXES, READ_SUMMARY, iter_source_rows
from mm_align.data.records import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "SpeechClip", "SkippedClip", "SpeechSetResult", "SPEECH_SET_FORMATS", "VOICEBANK_SPLITS", "DNS_SUBSETS",
    "detect_speech_format", "read_speech_set", "read_voicebank", "read_dns", "read_speech_manifest",
    "check_set_supports",
]

SPEECH_SET_FORMATS = ("voicebank", "dns", "manifest")
VOICEBANK_SPLITS = ("testset", "trainset_28spk", "trainset_56spk")
DNS_SUBSETS = ("no_reverb", "with_reverb")
_FILEID = re.compile(r"fileid_(\d+)$")
_MAX_LISTED = 10


@dataclass
class SpeechClip:
    """One utterance of a restoration set.

    Args:
        id: A stable identifier (``p232_001``, ``no_reverb/fileid_12``, a manifest's ``id``).
        degraded: The degraded (noisy, reverberant, ...) audio file.
        clean: The clean reference, ``None`` when the set has none (blind test sets).
        text: The transcript, when known.
        origin: Where the reader found it (``"noisy_testset_wav/p232_001.wav"`` under the set's directory,
            ``"m.jsonl:3"``), for messages; not part of the value (ignored by ``==``).
    """

    id: str
    degraded: Path
    clean: Path | None = None
    text: str | None = None
    origin: str | None = field(default=None, compare=False, repr=False)


@dataclass
class SkippedClip:
    """A file or manifest line a reader skipped, and why.

    Args:
        source: The file: the degraded (or orphan clean) audio file of a directory layout, or the manifest.
        reason: ``"<category>: <detail>"``, e.g. ``"missing clean: clean_testset_wav/p232_001.wav not found"``.
        line: The 1-based manifest line; ``None`` for directory layouts.
    """

    source: str
    reason: str
    line: int | None = None

    def where(self) -> str:
        """``"<manifest>:LINE"`` for a manifest row, the file otherwise."""
        return self.source if self.line is None else f"{self.source}:{self.line}"


@dataclass
class SpeechSetResult:
    """The clips a reader kept, what it skipped, the set it read and its format."""

    clips: list[SpeechClip]
    skipped: list[SkippedClip]
    source: str
    format: str

    def skipped_by_reason(self) -> dict[str, int]:
        """Skipped entries counted by reason category (the text before the first ``':'``), first seen first."""
        return dict(Counter(s.reason.split(":", 1)[0].strip() for s in self.skipped))

    def summary(self) -> str:
        """``"read N clips from SRC (format)"``, with the skips by reason and the first few skipped entries."""
        lines = [f"read {len(self.clips)} clips from {self.source} ({self.format})"]
        if self.skipped:
            counts = ", ".join(f"{k}: {n}" for k, n in self.skipped_by_reason().items())
            lines[0] += f"; skipped {len(self.skipped)} ({counts})"
            lines += [f"  {s.where()}: {s.reason}" for s in self.skipped[:_MAX_LISTED]]
            if len(self.skipped) > _MAX_LISTED:
                lines.append(f"  ... and {len(self.skipped) - _MAX_LISTED} more")
        return "\n".join(lines)


class _Collector:
    """Kept clips and skips, raising at the first skip when strict (the core readers' loop, for files)."""

    def __init__(self, source: Path, fmt: str, strict: bool) -> None:
        self.result = SpeechSetResult([], [], str(source), fmt)
        self.strict = strict

    def keep(self, clip: SpeechClip) -> None:
        self.result.clips.append(clip)

    def skip(self, source: Path | str, reason: str, line: int | None = None) -> None:
        skipped = SkippedClip(str(source), reason, line)
        if self.strict:
            raise DataError(f"{skipped.where()}: {reason}")
        self.result.skipped.append(skipped)

    def done(self) -> SpeechSetResult:
        out = self.result
        if out.skipped:
            counts = ", ".join(f"{reason}: {n}" for reason, n in out.skipped_by_reason().items())
            logger.warning("%s: kept %d clips, skipped %d (%s)", out.source, len(out.clips), len(out.skipped),
                           counts, extra={READ_SUMMARY: True})
        return out


def _audio_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)


def _empty(path: Path, root: Path) -> str | None:
    return f"empty file: {_rel(path, root)} (0 bytes)" if path.stat().st_size == 0 else None


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


# ---- VoiceBank-DEMAND -------------------------------------------------------------------------------------


def _voicebank_split(root: Path) -> str | None:
    return next((s for s in VOICEBANK_SPLITS
                 if (root / f"clean_{s}_wav").is_dir() and (root / f"noisy_{s}_wav").is_dir()), None)


def _transcript(path: Path) -> tuple[str | None, str | None]:
    """``(text, None)`` (text ``None`` when the file is absent or blank), or ``(None, reason)`` when unreadable."""
    if not path.is_file():
        return None, None
    try:
        return path.read_text(encoding="utf-8").strip() or None, None
    except UnicodeDecodeError:
        return None, f"bad transcript: {path.name} is not UTF-8 text"
    except OSError as exc:
        return None, f"bad transcript: {path.name}: {exc.strerror or exc}"


def read_voicebank(root: str | Path, strict: bool = False, split: str | None = None) -> SpeechSetResult:
    """Read the VoiceBank-DEMAND layout: ``clean_<split>_wav/`` and ``noisy_<split>_wav/`` with the same file names.

    Args:
        root: The directory holding ``clean_testset_wav/`` and ``noisy_testset_wav/`` (and ``testset_txt/``).
        strict: Raise at the first skipped file.
        split: ``testset`` (default when present), ``trainset_28spk`` or ``trainset_56spk``.

    Returns:
        :class:`SpeechSetResult`: one clip per noisy file with its clean file; a noisy file without its
        clean counterpart (``missing clean``), a clean file without a noisy one (``missing degraded``), a
        0-byte file (``empty file``) or an unreadable transcript (``bad transcript``) is skipped and counted.

    Raises:
        DataError: ``root`` lacks the two folders, or (``strict``) the first skipped file.
    """
    root = Path(root)
    found = split or _voicebank_split(root)
    if found not in VOICEBANK_SPLITS:
        raise DataError(f"{root}: not a VoiceBank-DEMAND directory: expected clean_testset_wav/ and "
                        f"noisy_testset_wav/ (or a split of {', '.join(VOICEBANK_SPLITS)})")
    clean_dir, noisy_dir = root / f"clean_{found}_wav", root / f"noisy_{found}_wav"
    for d in (clean_dir, noisy_dir):
        if not d.is_dir():
            raise DataError(f"{d}: no such directory (VoiceBank-DEMAND split {found!r})")
    text_dir = root / f"{found}_txt"
    out = _Collector(root, "voicebank", strict)
    noisy = _audio_files(noisy_dir)
    names = {p.name for p in noisy}
    for path in noisy:
        clean = clean_dir / path.name
        text, bad_text = _transcript(text_dir / f"{path.stem}.txt")
        if not clean.is_file():
            out.skip(path, f"missing clean: {_rel(clean, root)} not found")
        elif problem := _empty(path, root) or _empty(clean, root):
            out.skip(path, problem)
        elif bad_text is not None:
            out.skip(path, bad_text)
        else:
            out.keep(SpeechClip(path.stem, path, clean, text, _rel(path, root)))
    for path in _audio_files(clean_dir):
        if path.name not in names:
            out.skip(path, f"missing degraded: {_rel(noisy_dir / path.name, root)} not found")
    return out.done()


# ---- DNS-Challenge 2020 synthetic test set ----------------------------------------------------------------


def _dns_root(root: Path) -> Path | None:
    for base in (root / "synthetic", root):
        if base.is_dir() and any((base / s).is_dir() for s in DNS_SUBSETS):
            return base
    return None


def _by_fileid(files: list[Path], root: Path, out: _Collector, what: str) -> dict[int, Path]:
    found: dict[int, Path] = {}
    for path in files:
        m = _FILEID.search(path.stem)
        if m is None:
            out.skip(path, f"bad name: a {what} file whose name does not end in fileid_N")
        elif int(m.group(1)) in found:
            out.skip(path, f"duplicate fileid: {_rel(path, root)} has the fileid of "
                           f"{_rel(found[int(m.group(1))], root)}")
        else:
            found[int(m.group(1))] = path
    return found


def read_dns(root: str | Path, strict: bool = False) -> SpeechSetResult:
    """Read the DNS-Challenge 2020 synthetic test layout: ``synthetic/{no_reverb,with_reverb}/{clean,noisy}/``.

    Noisy and clean files of a subset are matched by the ``fileid_N`` suffix of their stems
    (``clnsp1_train_69005_1_snr15_tl-21_fileid_12.wav`` ↔ ``clean_fileid_12.wav``).

    Args:
        root: The directory holding ``synthetic/``, or ``synthetic/`` itself.
        strict: Raise at the first skipped file.

    Returns:
        :class:`SpeechSetResult`: one clip per matched pair, id ``<subset>/fileid_<N>``, in subset and fileid
        order; a name without ``fileid_N`` (``bad name``), a repeated fileid (``duplicate fileid``), an
        unmatched noisy (``missing clean``) or clean file (``missing degraded``) and 0-byte files
        (``empty file``) are skipped and counted.

    Raises:
        DataError: No subset folder, a subset without ``clean/`` or ``noisy/``, or (``strict``) a skip.
    """
    root = Path(root)
    base = _dns_root(root)
    if base is None:
        raise DataError(f"{root}: not a DNS-Challenge synthetic test directory: expected "
                        f"synthetic/{{{','.join(DNS_SUBSETS)}}}/{{clean,noisy}}/")
    out = _Collector(root, "dns", strict)
    for subset in DNS_SUBSETS:
        if not (base / subset).is_dir():
            continue
        clean_dir, noisy_dir = base / subset / "clean", base / subset / "noisy"
        for d in (clean_dir, noisy_dir):
            if not d.is_dir():
                raise DataError(f"{d}: no such directory (DNS subset {subset!r} needs clean/ and noisy/)")
        noisy = _by_fileid(_audio_files(noisy_dir), root, out, "noisy")
        clean = _by_fileid(_audio_files(clean_dir), root, out, "clean")
        for fileid in sorted(noisy):
            path = noisy[fileid]
            if fileid not in clean:
                out.skip(path, f"missing clean: no {_rel(clean_dir, root)}/*fileid_{fileid} file")
            elif problem := _empty(path, root) or _empty(clean[fileid], root):
                out.skip(path, problem)
            else:
                out.keep(SpeechClip(f"{subset}/fileid_{fileid}", path, clean[fileid], None, _rel(path, root)))
        for fileid in sorted(set(clean) - set(noisy)):
            out.skip(clean[fileid], f"missing degraded: no {_rel(noisy_dir, root)}/*fileid_{fileid} file")
    return out.done()


# ---- jsonl manifests --------------------------------------------------------------------------------------


def _manifest_clip(row: dict[str, Any], base: Path) -> SpeechClip | str:
    """A manifest row as a clip, or the skip reason."""
    if "degraded" not in row:
        return "missing column: degraded"
    paths: dict[str, Path | None] = {}
    for key in ("degraded", "clean"):
        value = row.get(key)
        if value is None and key == "clean":
            paths[key] = None
            continue
        if not isinstance(value, str) or not value.strip():
            return f"bad {key}: expected a path to an audio file, got {value!r}"
        p = Path(value.strip()).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            return f"missing file: {value} ({key})"
        if p.stat().st_size == 0:
            return f"empty file: {value} ({key}, 0 bytes)"
        paths[key] = p
    text = row.get("text")
    if text is not None and not isinstance(text, str):
        return f"bad text: expected a string, got {type(text).__name__}"
    rid = row.get("id")
    if rid is None or (isinstance(rid, str) and not rid.strip()):
        rid = Path(row["degraded"]).stem
    elif not isinstance(rid, (str, int)) or isinstance(rid, bool):
        return f"bad id: expected a string, got {rid!r}"
    degraded = paths["degraded"]
    assert degraded is not None
    return SpeechClip(str(rid), degraded, paths["clean"], (text or "").strip() or None)


def read_speech_manifest(path: str | Path, strict: bool = False) -> SpeechSetResult:
    """Read a jsonl restoration manifest: ``{"id", "degraded", "clean"?, "text"?}`` per line.

    Args:
        path: The manifest; relative audio paths are relative to its directory.
        strict: Raise at the first bad line, naming ``file:LINE``.

    Returns:
        :class:`SpeechSetResult`: clips with ``origin`` ``"<manifest>:LINE"``; malformed lines, rows without
        ``degraded``, non-path values, missing or 0-byte audio files and repeated ids are skipped and counted.

    Raises:
        DataError: The manifest cannot be opened, or (``strict``) a bad line.
    """
    p = Path(path)
    out = _Collector(p, "manifest", strict)
    first: dict[str, str] = {}
    for raw in iter_source_rows(p, "jsonl"):
        where = raw.where()
        result = _manifest_clip(raw.data, p.parent) if raw.data is not None else raw.error or "malformed json"
        if isinstance(result, SpeechClip) and result.id in first:
            result = f"duplicate id: {result.id!r} (first at {first[result.id]})"
        if isinstance(result, str):
            out.skip(raw.source, result, raw.line)
            continue
        first[result.id] = where
        result.origin = where
        out.keep(result)
    return out.done()


# ---- detection and dispatch -------------------------------------------------------------------------------


def detect_speech_format(path: str | Path) -> str:
    """``voicebank``, ``dns`` or ``manifest`` from the path's layout.

    Raises:
        DataError: The path does not exist or is none of the layouts (the message lists what each looks like).
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix.lower() in JSONL_SUFFIXES:
            return "manifest"
    elif _voicebank_split(p) is not None:
        return "voicebank"
    elif _dns_root(p) is not None:
        return "dns"
    raise DataError(f"{p}: not a speech restoration set: expected clean_testset_wav/ + noisy_testset_wav/ "
                    "(voicebank), synthetic/{no_reverb,with_reverb}/{clean,noisy}/ (dns) or a .jsonl manifest")


def read_speech_set(path: str | Path, format: str = "auto", strict: bool = False) -> SpeechSetResult:
    """Read a speech restoration set (see the module docstring for the layouts).

    Args:
        path: A VoiceBank-DEMAND or DNS directory, or a jsonl manifest.
        format: ``"auto"`` (:func:`detect_speech_format`), ``"voicebank"``, ``"dns"`` or ``"manifest"``.
        strict: Raise at the first skipped entry instead of counting it.

    Returns:
        :class:`SpeechSetResult`: ``.clips``, ``.skipped`` (each with its file and reason) and ``.summary()``.

    Raises:
        DataError: The set cannot be read or its format told, the format is unknown, or (``strict``) a skip.
    """
    if format == "auto":
        format = detect_speech_format(path)
    readers = {"voicebank": read_voicebank, "dns": read_dns, "manifest": read_speech_manifest}
    if format not in readers:
        raise DataError(f"{path}: unknown speech set format {format!r}; valid: auto, {', '.join(readers)}")
    if not Path(path).exists():
        raise DataError(f"{path}: no such file or directory")
    return readers[format](path, strict=strict)


def check_set_supports(clips: Sequence[SpeechClip], metrics: Sequence[Any]) -> None:
    """Raise ValueError when a metric needs what some clips lack: the clean reference (``needs_reference``) or a
    transcript (``needs_text``); the message names the metrics, how many clips lack it and the first one."""
    needs = (("needs_reference", "clean", "the clean reference"), ("needs_text", "text", "a transcript"))
    for need, attr, what in needs:
        names = [m.name for m in metrics if getattr(m, need)]
        lacking = [c.id for c in clips if not getattr(c, attr)]
        if names and lacking:
            raise ValueError(f"metric(s) {', '.join(names)} need {what}; {len(lacking)} of {len(clips)} inputs have "
                             f"none (e.g. {lacking[0]!r}): drop those metrics or use a set that has it")
