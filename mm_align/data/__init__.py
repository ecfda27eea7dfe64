"""Preference data: records, readers/writers (jsonl, parquet, HF on disk), the pair builder, the doctor.

Modality-agnostic: nothing here imports image, video or audio code.
"""

from mm_align.data.doctor import FILE_EXTENSIONS, DoctorReport, Finding, RecordCheck, check_referenced_files, doctor
from mm_align.data.io import (
    RawRow,
    detect_format,
    is_empty,
    iter_rows,
    iter_source_rows,
    read_preferences,
    row_to_record,
    write_preferences,
)
from mm_align.data.pairs import (
    BuiltPair,
    Candidate,
    MetricRule,
    PairBuildResult,
    build_pairs,
    compare,
    unanimous_winner,
)
from mm_align.data.records import ColumnMap, DataError, PreferencePair, ReadResult, SkippedRow, UnpairedSample

__all__ = [
    # records
    "ColumnMap",
    "DataError",
    "PreferencePair",
    "ReadResult",
    "SkippedRow",
    "UnpairedSample",
    # io
    "RawRow",
    "detect_format",
    "is_empty",
    "iter_rows",
    "iter_source_rows",
    "read_preferences",
    "row_to_record",
    "write_preferences",
    # pairs
    "BuiltPair",
    "Candidate",
    "MetricRule",
    "PairBuildResult",
    "build_pairs",
    "compare",
    "unanimous_winner",
    # doctor
    "FILE_EXTENSIONS",
    "DoctorReport",
    "Finding",
    "RecordCheck",
    "check_referenced_files",
    "doctor",
]
