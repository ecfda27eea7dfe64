"""The length audit: every VLM record is checked against ``max_length`` before training, and one that does not fit
is resized or dropped, never truncated.

Truncating a VLM sequence at ``max_length`` is unsafe in a way it is not for text: the image tokens sit inside the
prompt, so a cut can land among them (the model then gets pixel values for image tokens that are no longer in
``input_ids``, and fails or silently mis-aligns), or remove the answer the loss is computed on. So for every record
the tokenised length of prompt + its longest answer (both sides of an image-side rejection) is measured with the
model's own processor and chat template, and a record that is too long is, per ``policy``:

- ``"resize"``: scored with fewer image pixels: the largest image's pixel budget is cut by ``resize_step`` (area)
  and the record measured again, down to ``min_image_pixels``; the first budget at which it fits is kept (and
  stored in ``record.meta["max_image_pixels"]``, which the adapter honours). A record that still does not fit at
  the floor (the reason says so when its image token count never shrank: processors that resize every image to a
  fixed input, such as LLaVA-1.5's), or that has no image, is dropped;
- ``"drop"``: dropped.

Every resized or dropped record is one row of the report (:meth:`LengthAudit.table`: row, tokens, action, why).
Nothing here depends on a model family: the adapter passes a ``measure(record, max_image_pixels)`` function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

__all__ = ["Length", "AuditRow", "LengthAudit", "fit_record", "audit_records", "AUDIT_POLICIES",
           "MAX_PIXELS_KEY"]

AUDIT_POLICIES = ("resize", "drop")
# the per-record pixel budget the audit chose (the adapter downscales every image of the record to fit it)
MAX_PIXELS_KEY = "max_image_pixels"


class Length(NamedTuple):
    """A record's measured length at one pixel budget.

    Attributes:
        total: tokens of the longest row (prompt + answer, over chosen and rejected, and both inputs of an
            image-side rejection).
        prompt: tokens of the longest prompt (chat template and image tokens included).
        image_tokens: image tokens in that prompt.
        pixels: the largest image's area (pixels) as it is fed to the processor; 0 without images.
    """

    total: int
    prompt: int
    image_tokens: int
    pixels: int


Measure = Callable[[Any, "int | None"], Length]


@dataclass
class AuditRow:
    """One record the audit resized or dropped.

    Attributes:
        index: the record's index in the audited list.
        row: where it was read (``origin``: file and line) or ``index N``.
        tokens: its length before (prompt + longest answer).
        action: ``"resized"`` or ``"dropped"``.
        why: the reason, with the numbers.
        tokens_after: its length after resizing (None when dropped).
        max_image_pixels: the pixel budget it is scored at (None when dropped).
    """

    index: int
    row: str
    tokens: int
    action: Literal["resized", "dropped"]
    why: str
    tokens_after: int | None = None
    max_image_pixels: int | None = None


@dataclass
class LengthAudit:
    """The outcome of :func:`audit_records`.

    Attributes:
        kept: the records to train on, in order (resized ones included, dropped ones left out).
        rows: the resized and dropped records, one :class:`AuditRow` each.
        max_length: the limit audited against.
        n_records: how many records were audited.
    """

    kept: list[Any]
    rows: list[AuditRow] = field(default_factory=list)
    max_length: int = 0
    n_records: int = 0

    @property
    def resized(self) -> list[AuditRow]:
        return [r for r in self.rows if r.action == "resized"]

    @property
    def dropped(self) -> list[AuditRow]:
        return [r for r in self.rows if r.action == "dropped"]

    def summary(self) -> str:
        """One line: how many records were audited, resized and dropped."""
        return (f"length audit (max_length {self.max_length}): {self.n_records} records, "
                f"{len(self.resized)} resized, {len(self.dropped)} dropped")

    def table(self) -> str:
        """The summary line and a Markdown table of every resized or dropped record (row, tokens, action, why)."""
        lines = [self.summary()]
        if self.rows:
            lines += ["", "| row | tokens | action | why |", "|---|---|---|---|"]
            for r in self.rows:
                tokens = f"{r.tokens} → {r.tokens_after}" if r.tokens_after is not None else str(r.tokens)
                lines.append(f"| {r.row} | {tokens} | {r.action} | {r.why} |")
        return "\n".join(lines)


def _name(index: int, record: Any) -> str:
    origin = getattr(record, "origin", None)
    return origin if origin else f"index {index}"


def _too_long(length: Length, max_length: int) -> str:
    where = (f"the prompt alone ({length.prompt} tokens, {length.image_tokens} of them image tokens) exceeds "
             f"max_length {max_length}: a cut would land in its image tokens"
             if length.prompt > max_length else
             f"prompt {length.prompt} (image tokens {length.image_tokens}) + answer = {length.total} tokens > "
             f"max_length {max_length}")
    return where


def _check_settings(policy: str, resize_step: float) -> None:
    if policy not in AUDIT_POLICIES:
        raise ValueError(f"unknown length-audit policy {policy!r}; valid: {', '.join(AUDIT_POLICIES)}")
    if not 0.0 < resize_step < 1.0:
        raise ValueError(f"resize_step must be in (0, 1), got {resize_step}")


def fit_record(
    record: Any,
    measure: Measure,
    max_length: int,
    policy: Literal["resize", "drop"] = "resize",
    min_image_pixels: int = 3136,
    resize_step: float = 0.5,
    index: int = 0,
    start_pixels: int | None = None,
) -> tuple[Length, AuditRow | None]:
    """Fit one record into ``max_length`` (see the module docstring).

    Args:
        record: the record.
        measure: ``measure(record, max_image_pixels) -> Length``; ``max_image_pixels`` None = the images as
            configured.
        max_length: the token limit.
        policy: ``"resize"`` or ``"drop"``.
        min_image_pixels: the floor of the largest image's area when resizing.
        resize_step: the factor the pixel budget (area) is multiplied by per retry, in (0, 1).
        index: the record's index (for the report).
        start_pixels: the budget it is measured at first (None = as configured).

    Returns:
        ``(length, row)``: its length as it will be scored, and None when it fits unchanged, or the
        :class:`AuditRow` saying it was resized (``row.max_image_pixels`` is the budget) or dropped.
    """
    _check_settings(policy, resize_step)
    first = measure(record, start_pixels)
    if first.total <= max_length:
        return first, None
    name, why = _name(index, record), _too_long(first, max_length)
    if policy == "drop":
        return first, AuditRow(index, name, first.total, "dropped", f"{why} (policy drop)")
    if first.pixels == 0:
        return first, AuditRow(index, name, first.total, "dropped", f"{why}; the record has no image to resize")
    last, budget = first, first.pixels
    while True:
        budget = int(budget * resize_step)
        if budget < min_image_pixels:
            break
        last = measure(record, budget)
        if last.total <= max_length:
            return last, AuditRow(index, name, first.total, "resized",
                                  f"{why}; largest image {first.pixels} → {last.pixels} px, image tokens "
                                  f"{first.image_tokens} → {last.image_tokens}", last.total, budget)
    if last is first:
        why += (f"; the largest image ({first.pixels} px) cannot shrink by resize_step {resize_step} without going "
                f"under the floor min_image_pixels {min_image_pixels}")
    elif last.image_tokens >= first.image_tokens:
        why += (f"; the processor gives {first.image_tokens} image tokens whatever the image size (it resizes every "
                "image to a fixed input), so resizing cannot help")
    else:
        why += (f"; still {last.total} tokens with the largest image at {last.pixels} px (the floor "
                f"min_image_pixels is {min_image_pixels})")
    return first, AuditRow(index, name, first.total, "dropped", why)


def audit_records(
    records: Sequence[Any],
    measure: Measure,
    max_length: int,
    policy: Literal["resize", "drop"] = "resize",
    min_image_pixels: int = 3136,
    resize_step: float = 0.5,
) -> LengthAudit:
    """Audit every record's length before training (see the module docstring).

    A resized record gets ``record.meta["max_image_pixels"]`` (:data:`MAX_PIXELS_KEY`), the budget it fits at;
    the records themselves are otherwise untouched.

    Args:
        records: the records (VLM pairs or unpaired samples).
        measure: ``measure(record, max_image_pixels) -> Length`` with the model's processor.
        max_length: the token limit.
        policy: ``"resize"`` (fewer image pixels, retried down to ``min_image_pixels``; dropped if that fails)
            or ``"drop"``.
        min_image_pixels: the floor of the largest image's area when resizing.
        resize_step: the factor the pixel budget (area) is multiplied by per retry.

    Returns:
        The :class:`LengthAudit`: the kept records and one row per resized or dropped record.
    """
    _check_settings(policy, resize_step)
    audit = LengthAudit(kept=[], max_length=max_length, n_records=len(records))
    for i, record in enumerate(records):
        _, row = fit_record(record, measure, max_length, policy, min_image_pixels, resize_step, index=i,
                            start_pixels=record.meta.get(MAX_PIXELS_KEY))
        if row is not None:
            audit.rows.append(row)
            if row.action == "dropped":
                continue
            record.meta[MAX_PIXELS_KEY] = row.max_image_pixels
        audit.kept.append(record)
    return audit
