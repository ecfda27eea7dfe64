"""Speech checks for ``mm-align doctor DATA --modality speech``: unreadable, silent, clipped, non-finite,
mismatched and off-rate audio, on speech pair manifests and on restoration sets.

Two kinds of data are checked by :func:`speech_doctor`:

- speech PAIR manifests (FORMATS_AND_EVALUATORS.md), read as :func:`~mm_align.audio.speech_records.read_speech_pairs`
  reads them (``degraded`` is the prompt; ``chosen``/``rejected``, or ``completion`` for ``kind="unpaired"``;
  ``clean`` when present): the core doctor (malformed rows, missing columns, ties, duplicates, NaN fields,
  missing chosen/rejected files) plus the checks below;
- RESTORATION sets (a ``{"id", "degraded", "clean"?, "text"?}`` manifest, a VoiceBank-DEMAND or a DNS
  directory), read by :func:`~mm_align.audio.datasets.read_speech_set`: what the reader skips is reported under
  its reason (``missing_file``, ``missing_clean``, ``duplicate_id``, ...; a 0-byte file is ``unreadable_file``),
  then the checks below on every clip's ``degraded`` and ``clean`` files.

The checks, each reported under its function name (errors unless said otherwise):

- ``missing_file`` / ``unreadable_file``: the ``degraded`` and ``clean`` files (the core doctor already checks
  ``chosen``/``rejected``), and a non-path value in an audio field;
- ``unreadable_audio``: a non-empty file soundfile cannot decode;
- ``non_finite_audio``: NaN or infinite samples (a float wav can hold them);
- ``silence``: RMS below :data:`SILENCE_DBFS` (-60 dBFS), digital silence included;
- ``clipping``: more than :data:`CLIP_FRACTION` (1 %) of the samples at ``|x| >=`` :data:`CLIP_LEVEL` (0.999);
- ``length_mismatch``: ``clean``/``chosen``/``rejected``/``completion`` lasting more than
  :data:`LENGTH_TOLERANCE` (10 %) longer or shorter than ``degraded`` (durations in seconds, so files at
  different rates compare fairly);
- ``wrong_sample_rate`` (WARNING, not fatal: the adapters resample): a file not at the expected rate
  (default :data:`EXPECTED_SAMPLE_RATE`, 16 kHz).

Every example names the row (``d.jsonl:LINE``; for a directory layout, the degraded file under it), the field
and the file: ``"d.jsonl:3: chosen: gen/u1_2.wav is clipped (4.2% of samples at |x| >= 0.999, more than 1%)"``.
Each file is decoded once per doctor run (a small cache keyed by path, size and modification time).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from mm_align.audio.datasets import SPEECH_SET_FORMATS, SpeechClip, detect_speech_format, read_speech_set

from mm_align.data import DataError, DoctorReport, PreferencePair, RecordCheck, UnpairedSample, doctor
from mm_align.data.doctor import FILE_EXTENSIONS
from mm_align.data.io import JSONL_SUFFIXES, iter_source_rows, row_to_record
from mm_align.data.records import ColumnMap

__all__ = [
    "speech_doctor", "speech_checks", "SPEECH_CHECKS", "audio_fields", "SPEECH_DOCTOR_FORMATS",
    "EXPECTED_SAMPLE_RATE", "SILENCE_DBFS", "CLIP_LEVEL", "CLIP_FRACTION", "LENGTH_TOLERANCE",
    "missing_file", "unreadable_file", "unreadable_audio", "non_finite_audio", "silence", "clipping",
    "length_mismatch", "wrong_sample_rate",
]

EXPECTED_SAMPLE_RATE = 16000
"""The rate ``wrong_sample_rate`` expects by default (DNSMOS, PESQ-WB and most speech models work at 16 kHz)."""
SILENCE_DBFS = -60.0
"""``silence`` flags a file whose RMS level is below this (dB relative to full scale)."""
CLIP_LEVEL = 0.999
"""A sample at ``|x| >=`` this counts as clipped."""
CLIP_FRACTION = 0.01
"""``clipping`` flags a file with more than this fraction of clipped samples."""
LENGTH_TOLERANCE = 0.10
"""``length_mismatch`` flags a file whose duration differs from the degraded input's by more than this fraction."""

SPEECH_DOCTOR_FORMATS = ("auto", "pairs", "jsonl", "parquet", "hf", *SPEECH_SET_FORMATS)
_PAIR_COLUMNS = ColumnMap(prompt="degraded")
_OUTPUT_FIELDS = ("chosen", "rejected", "completion")
_SKIP_CHECKS = {"empty file": "unreadable_file"}  # reader skip category -> the core doctor's check name

Record = PreferencePair | UnpairedSample | SpeechClip


@dataclass(frozen=True)
class _Probe:
    """What decoding one file gave (every sample, all channels), or why it could not be decoded."""

    error: str | None
    sample_rate: int = 0
    frames: int = 0
    rms_dbfs: float = -math.inf
    non_finite: int = 0
    clipped: float = 0.0  # fraction of the samples at |x| >= CLIP_LEVEL

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


@functools.lru_cache(maxsize=65536)  # a probe is a few numbers: a whole data set's worth stays cheap
def _probe_file(path: str, mtime_ns: int, size: int) -> _Probe:
    del mtime_ns, size  # part of the cache key only: a rewritten file is decoded again
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        return _Probe(f"not a readable audio file ({exc})")
    finite = np.isfinite(data)
    values = np.where(finite, data, 0.0).astype(np.float64)
    mean_square = float(np.mean(np.square(values))) if values.size else 0.0
    level = 10.0 * math.log10(mean_square) if mean_square > 0 else -math.inf
    clipped = float(np.mean(np.abs(values) >= CLIP_LEVEL)) if values.size else 0.0
    return _Probe(None, int(sr), int(data.shape[0]), level, int(values.size - finite.sum()), clipped)


def audio_fields(record: Record) -> list[tuple[str, Any]]:
    """The audio values of a record with their field names: ``degraded`` first, then the outputs, then ``clean``.

    ``degraded`` is a pair's ``prompt`` (as :func:`~mm_align.audio.speech_records.read_speech_pairs` reads it);
    ``clean`` comes from ``record.meta`` and is left out when absent or ``None``.
    """
    if isinstance(record, SpeechClip):
        fields = [("degraded", str(record.degraded))]
        return fields + ([("clean", str(record.clean))] if record.clean is not None else [])
    fields = [("degraded", record.prompt)]
    if isinstance(record, PreferencePair):
        fields += [("chosen", record.chosen), ("rejected", record.rejected)]
    else:
        fields.append(("completion", record.completion))
    clean = record.meta.get("clean")
    return fields + ([("clean", clean)] if clean is not None else [])


def _resolve(value: Any, base_dir: Path) -> Path | None:
    if not isinstance(value, str) or not value.strip() or "://" in value:
        return None
    p = Path(value.strip()).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


def _core_checks(field: str, value: Any) -> bool:
    """Whether the core doctor's file checks already look at this value (outputs with a media extension)."""
    return field in _OUTPUT_FIELDS and isinstance(value, str) and value.strip().lower().endswith(FILE_EXTENSIONS)


def _probes(record: Record, base_dir: Path) -> list[tuple[str, str, _Probe]]:
    """``(field, file, probe)`` for every audio value that names an existing, non-empty file."""
    out = []
    for field, value in audio_fields(record):
        path = _resolve(value, base_dir)
        if path is None:
            continue
        try:
            stat = path.stat()
        except OSError:
            continue  # missing: missing_file reports it
        if path.is_file() and stat.st_size > 0:
            out.append((field, str(value).strip(), _probe_file(str(path), stat.st_mtime_ns, stat.st_size)))
    return out


def missing_file(record: Record, base_dir: Path) -> list[str]:
    """Audio fields naming no file (``degraded``, ``clean``; outputs the core doctor does not check), or no path.

    Returns:
        `list[str]`: e.g. ``"missing file deg/u1.wav (degraded)"``, ``"degraded: 3 is not a path to an audio file"``.
    """
    problems = []
    for field, value in audio_fields(record):
        if _core_checks(field, value):
            continue
        path = _resolve(value, base_dir)
        if path is None:
            problems.append(f"{field}: {value!r} is not a path to an audio file")
        elif not path.exists():
            problems.append(f"missing file {value} ({field})")
    return problems


def unreadable_file(record: Record, base_dir: Path) -> list[str]:
    """``degraded``/``clean`` files that cannot be opened or hold 0 bytes (the core checks the outputs' files).

    Returns:
        `list[str]`: e.g. ``"unreadable file deg/u1.wav (degraded): empty file (0 bytes)"``.
    """
    problems = []
    for field, value in audio_fields(record):
        path = _resolve(value, base_dir)
        if path is None or _core_checks(field, value) or not path.exists():
            continue
        try:
            with path.open("rb") as f:
                empty = not f.read(1)
        except OSError as exc:
            problems.append(f"unreadable file {value} ({field}): {exc.strerror or exc}")
            continue
        if empty:
            problems.append(f"unreadable file {value} ({field}): empty file (0 bytes)")
    return problems


def unreadable_audio(record: Record, base_dir: Path) -> list[str]:
    """Non-empty files soundfile cannot decode. Returns e.g. ``"chosen: a.wav: not a readable audio file (...)"``."""
    return [f"{field}: {name}: {p.error}" for field, name, p in _probes(record, base_dir) if p.error]


def non_finite_audio(record: Record, base_dir: Path) -> list[str]:
    """Files with NaN or infinite samples. Returns e.g. ``"rejected: b.wav has 12 NaN/inf samples"``."""
    return [f"{field}: {name} has {p.non_finite} NaN/inf samples"
            for field, name, p in _probes(record, base_dir) if not p.error and p.non_finite]


def silence(record: Record, base_dir: Path, threshold_dbfs: float = SILENCE_DBFS) -> list[str]:
    """Files whose RMS level ``20·log10(sqrt(mean(x²)))`` is below ``threshold_dbfs`` (NaN/inf samples count as 0).

    Returns:
        `list[str]`: e.g. ``"degraded: d.wav is silent (RMS -inf dBFS < -60 dBFS)"``.
    """
    return [f"{field}: {name} is silent (RMS {p.rms_dbfs:.1f} dBFS < {threshold_dbfs:g} dBFS)"
            for field, name, p in _probes(record, base_dir) if not p.error and p.rms_dbfs < threshold_dbfs]


def clipping(record: Record, base_dir: Path, max_fraction: float = CLIP_FRACTION) -> list[str]:
    """Files with more than ``max_fraction`` of their samples at ``|x| >=`` :data:`CLIP_LEVEL`.

    Returns:
        `list[str]`: e.g. ``"chosen: a.wav is clipped (4.2% of samples at |x| >= 0.999, more than 1%)"``.
    """
    return [f"{field}: {name} is clipped ({100 * p.clipped:.1f}% of samples at |x| >= {CLIP_LEVEL:g}, "
            f"more than {100 * max_fraction:g}%)"
            for field, name, p in _probes(record, base_dir) if not p.error and p.clipped > max_fraction]


def length_mismatch(record: Record, base_dir: Path, tolerance: float = LENGTH_TOLERANCE) -> list[str]:
    """Outputs and ``clean`` whose duration differs from the degraded input's by more than ``tolerance`` (relative).

    ``|d - d_degraded| / d_degraded > tolerance`` with durations in seconds (frames / sample rate).

    Returns:
        `list[str]`: e.g. ``"chosen: a.wav lasts 0.50 s against 1.00 s of degraded d.wav (50% off, more than 10%)"``.
    """
    probes = [(f, n, p) for f, n, p in _probes(record, base_dir) if not p.error]
    ref = next(((n, p) for f, n, p in probes if f == "degraded"), None)
    if ref is None or ref[1].seconds == 0:
        return []
    ref_name, ref_probe = ref
    problems = []
    for field, name, p in probes:
        off = abs(p.seconds - ref_probe.seconds) / ref_probe.seconds
        if field != "degraded" and off > tolerance:
            problems.append(f"{field}: {name} lasts {p.seconds:.2f} s against {ref_probe.seconds:.2f} s of degraded "
                            f"{ref_name} ({100 * off:.0f}% off, more than {100 * tolerance:g}%)")
    return problems


def wrong_sample_rate(record: Record, base_dir: Path, expected: int = EXPECTED_SAMPLE_RATE) -> list[str]:
    """Files not at ``expected`` Hz; :func:`speech_doctor` reports them as WARNINGS (the adapters resample).

    Returns:
        `list[str]`: e.g. ``"clean: c.wav is 8000 Hz, expected 16000 Hz"``.
    """
    return [f"{field}: {name} is {p.sample_rate} Hz, expected {expected} Hz"
            for field, name, p in _probes(record, base_dir) if not p.error and p.sample_rate != expected]


def speech_checks(silence_dbfs: float = SILENCE_DBFS, clip_fraction: float = CLIP_FRACTION,
                  length_tolerance: float = LENGTH_TOLERANCE) -> list[RecordCheck]:
    """The error-severity speech checks with other thresholds, for ``doctor(path, checks=speech_checks(...))``.

    Returns:
        `list[RecordCheck]`: ``missing_file``, ``unreadable_file``, ``unreadable_audio``, ``non_finite_audio``,
        ``silence``, ``clipping``, ``length_mismatch`` (``wrong_sample_rate`` is a warning, added by
        :func:`speech_doctor`).

    Raises:
        ValueError: ``clip_fraction`` not in [0, 1) or ``length_tolerance`` negative.
    """
    if not 0 <= clip_fraction < 1:
        raise ValueError(f"clip_fraction must be in [0, 1), got {clip_fraction}")
    if length_tolerance < 0:
        raise ValueError(f"length_tolerance must not be negative, got {length_tolerance}")
    return [
        missing_file, unreadable_file, unreadable_audio, non_finite_audio,
        functools.partial(silence, threshold_dbfs=silence_dbfs),
        functools.partial(clipping, max_fraction=clip_fraction),
        functools.partial(length_mismatch, tolerance=length_tolerance),
    ]


SPEECH_CHECKS: list[RecordCheck] = speech_checks()
"""The default speech checks, loaded by ``mm-align doctor --modality speech``."""


def _check_name(check: Callable[..., Any]) -> str:
    while isinstance(check, functools.partial):
        check = check.func
    return check.__name__


def _detect(path: Path, format: str, kind: str) -> str:
    """``pairs`` or a restoration set format for ``format`` ``auto``/``jsonl``."""
    if format not in ("auto", "jsonl"):
        return format
    if not path.exists():
        return "pairs"  # the core doctor reports it
    if path.is_dir():
        try:
            return detect_speech_format(path)
        except DataError:
            return "pairs"  # parquet shards or an HF dataset of pairs; the core doctor reports what it cannot read
    if kind == "unpaired" or path.suffix.lower() not in JSONL_SUFFIXES or not path.is_file():
        return "pairs"
    seen = 0
    try:
        for raw in iter_source_rows(path, "jsonl"):
            if raw.data is None:
                continue
            if any(k in raw.data for k in _OUTPUT_FIELDS):
                return "pairs"
            if "degraded" in raw.data:
                return "manifest"
            seen += 1
            if seen >= 20:
                break
    except DataError:
        pass
    return "pairs"


def _pairs_doctor(path: Path, core_format: str, kind: str, sample_rate: int | None) -> DoctorReport:
    report = doctor(path, core_format, kind, _PAIR_COLUMNS, checks=SPEECH_CHECKS)  # type: ignore[arg-type]
    if sample_rate is None or any(f.check == "unreadable" for f in report.findings):
        return report
    base_dir = path if path.is_dir() else path.parent
    try:  # a second pass for the warnings: the core doctor counts every custom check as an error
        for raw in iter_source_rows(path, core_format):
            record = row_to_record(raw.data, kind, _PAIR_COLUMNS) if raw.data is not None else None  # type: ignore
            if isinstance(record, (PreferencePair, UnpairedSample)):
                where = raw.where(Path(raw.source).name)
                for problem in wrong_sample_rate(record, base_dir, sample_rate):
                    report.add("wrong_sample_rate", f"{where}: {problem}", "warning")
    except DataError:
        pass
    return report


def _set_doctor(path: Path, format: str, sample_rate: int | None) -> DoctorReport:
    report = DoctorReport(str(path))
    try:
        result = read_speech_set(path, format)
    except DataError as exc:
        report.add("unreadable", str(exc), "error")
        return report
    manifest = result.format == "manifest"
    for s in result.skipped:
        where = f"{Path(s.source).name}:{s.line}" if s.line is not None else _under(Path(s.source), path)
        category = s.reason.split(":", 1)[0].strip()
        report.add(_SKIP_CHECKS.get(category, category.replace(" ", "_")), f"{where}: {s.reason}")
    for clip in result.clips:
        where = Path(clip.origin).name if manifest and clip.origin else (clip.origin or clip.id)
        ok = True
        for check in SPEECH_CHECKS:
            for problem in check(clip, path.parent):
                report.add(_check_name(check), f"{where}: {problem}")
                ok = False
        if sample_rate is not None:
            for problem in wrong_sample_rate(clip, path.parent, sample_rate):
                report.add("wrong_sample_rate", f"{where}: {problem}", "warning")
        report.valid += ok
    report.rows = len(result.clips) + len(result.skipped)
    if report.rows == 0 and not report.findings:
        report.add("no_rows", f"{path.name}: no clips", "error")
    return report


def _under(file: Path, root: Path) -> str:
    try:
        return str(file.relative_to(root))
    except ValueError:
        return str(file)


def speech_doctor(path: str | Path, format: str = "auto", kind: str = "paired",
                  sample_rate: int | None = EXPECTED_SAMPLE_RATE) -> DoctorReport:
    """``mm-align doctor --modality speech``: the core doctor with the speech checks, on pairs and restoration sets.

    Args:
        path: A speech pair manifest (jsonl, or parquet/HF with the same columns), a restoration manifest, a
            VoiceBank-DEMAND or a DNS directory.
        format: ``"auto"`` (a jsonl whose rows have ``chosen``/``rejected``/``completion`` is a pair manifest,
            one with only ``degraded`` a restoration manifest; directories by their layout), ``"pairs"``,
            ``"jsonl"``, ``"parquet"``, ``"hf"``, ``"manifest"``, ``"voicebank"`` or ``"dns"``.
        kind: ``"paired"`` or ``"unpaired"`` (pair manifests).
        sample_rate: The expected rate for the ``wrong_sample_rate`` warning; ``None`` turns it off.

    Returns:
        :class:`~mm_align.data.DoctorReport`: ``report.ok`` is ``False`` when an error-severity check fired.

    Raises:
        ValueError: ``format`` or ``kind`` is not one of the valid values.
    """
    if format not in SPEECH_DOCTOR_FORMATS:
        raise ValueError(f"unknown speech data format {format!r}; valid: {', '.join(SPEECH_DOCTOR_FORMATS)}")
    if kind not in ("paired", "unpaired"):
        raise ValueError(f"kind must be 'paired' or 'unpaired', got {kind!r}")
    p = Path(path)
    fmt = _detect(p, format, kind)
    if fmt in SPEECH_SET_FORMATS:
        return _set_doctor(p, fmt, sample_rate)
    return _pairs_doctor(p, format if format in ("jsonl", "parquet", "hf") else "auto", kind, sample_rate)
