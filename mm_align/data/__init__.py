"""Preference data: records, readers/writers (jsonl, parquet, HF on disk), the pair builder, the doctor."""

from mm_align.data.doctor import DoctorReport, Finding, RecordCheck, check_referenced_files, doctor
from mm_align.data.io import detect_format, iter_rows, read_preferences, write_preferences
from mm_align.data.pairs import BuiltPair, Candidate, MetricRule, PairBuildResult, build_pairs, compare
from mm_align.data.records import ColumnMap, DataError, PreferencePair, ReadResult, SkippedRow, UnpairedSample

__all__ = [
    "ColumnMap", "DataError", "PreferencePair", "ReadResult", "SkippedRow", "UnpairedSample",
    "detect_format", "iter_rows", "read_preferences", "write_preferences",
    "BuiltPair", "Candidate", "MetricRule", "PairBuildResult", "build_pairs", "compare",
    "DoctorReport", "Finding", "RecordCheck", "check_referenced_files", "doctor",
]
