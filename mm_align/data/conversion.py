"""What a dataset conversion did: counts, skips by reason, and the few lines a ``convert`` command prints.

Shared by every modality's ``mm-align convert`` (image pairs, speech clips): the unit (``pairs``,
``clips``) is a field, the skipped entries are any objects with ``reason`` and ``where()``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ConversionSummary", "MAX_LISTED_SKIPS"]

MAX_LISTED_SKIPS = 10


@dataclass
class ConversionSummary:
    """What a conversion did.

    Args:
        src: The source dataset.
        dst: The written dataset.
        src_format: The source format (detected when ``"auto"`` was asked).
        dst_format: The destination format.
        read: Entries read (and kept by the reader).
        written: Entries written.
        skipped: Everything skipped, each with ``reason`` and ``where()`` (file, row or line).
        unit: What an entry is, for the printed lines (``pairs``, ``clips``).
        skipped_unit: What a skipped entry is called (``rows`` of a table; ``clips``).
    """

    src: str
    dst: str
    src_format: str
    dst_format: str
    read: int
    written: int
    skipped: list[Any] = field(default_factory=list)
    unit: str = "pairs"
    skipped_unit: str = "rows"

    def skipped_by_reason(self) -> dict[str, int]:
        """Skipped entries counted by reason category (the text before the first ``':'``)."""
        return dict(Counter(s.reason.split(":", 1)[0].strip() for s in self.skipped))

    def text(self) -> str:
        """A few lines: entries read (and skipped, by reason, with the first skipped ones), entries written."""
        lines = [f"read {self.read} {self.unit} from {self.src} ({self.src_format})"]
        if self.skipped:
            counts = ", ".join(f"{k}: {n}" for k, n in self.skipped_by_reason().items())
            lines[0] += f"; skipped {len(self.skipped)} {self.skipped_unit} ({counts})"
            lines += [f"  {s.where()}: {s.reason}" for s in self.skipped[:MAX_LISTED_SKIPS]]
            if len(self.skipped) > MAX_LISTED_SKIPS:
                lines.append(f"  ... and {len(self.skipped) - MAX_LISTED_SKIPS} more")
        lines.append(f"wrote {self.written} {self.unit} to {self.dst} ({self.dst_format})")
        return "\n".join(lines)
