"""Metric sinks: always ``metrics.jsonl``; TensorBoard by default (offline); Weights & Biases optional.

``metrics.jsonl`` holds one JSON object per :meth:`MetricsLogger.log` call::

    {"step": 10, "time": 1712345678.9, "loss": 0.69, "lr": 1e-05, ...}

``time`` is Unix seconds. Tensors are converted with ``.item()``. JSON has no NaN or infinity, so
a non-finite float (a NaN loss, an infinite gradient norm) is written as ``null``; readers (the
report) skip nulls. Each line is flushed as it is written, so a killed run loses at most the line
being written, which :func:`read_metrics` skips.

TensorBoard and W&B go through accelerate's own trackers (``accelerate.tracking.TensorBoardTracker``,
``WandBTracker``), the same code ``Accelerator(log_with=...)`` runs, so their behaviour follows the
ecosystem's. ``metrics.jsonl`` stays our own writer: accelerate has no JSON-lines tracker, and this
file is the run's source of truth that the report, the benchmarks and exact resume read, with
guarantees no tracker gives — a flush per line, ``null`` for non-finite values (a tracker would drop
them or write NaN), an atomic rewrite that drops the steps after the resumed checkpoint, and a reader
that tolerates a truncated last line. It must also be written whatever trackers are installed.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.tracking import GeneralTracker, TensorBoardTracker, WandBTracker

from mm_align.atomic import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["MetricsLogger", "read_metrics", "SINKS"]

SINKS = ("tensorboard", "wandb", "none")
TENSORBOARD_DIR = "tensorboard"  # under output_dir


def _value(key: str, v: Any) -> Any:
    """A metric value as a JSON-able scalar: tensors/NumPy scalars via ``.item()``, non-finite -> None."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"metric '{key}' is a tensor of shape {tuple(v.shape)}; log a scalar (one element)")
        v = v.detach().item()
    elif not isinstance(v, (bool, int, float, str)) and hasattr(v, "item"):  # NumPy scalars and 0-d arrays
        v = v.item()
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        v = float(v)
        return v if math.isfinite(v) else None  # JSON has no NaN/inf: written as null
    raise TypeError(f"metric '{key}' has a value of type {type(v).__name__}; log numbers or scalar tensors")


class MetricsLogger:
    """
    Writes each `log(step, metrics)` to `output_dir/metrics.jsonl` and to the chosen trackers.

    Args:
        output_dir (`str` or `Path`):
            The run directory; created if needed (only when `enabled`).
        report_to (`Sequence[str]`, *optional*, defaults to `("tensorboard",)`):
            Trackers besides `metrics.jsonl`: `"tensorboard"` (accelerate's `TensorBoardTracker`, event
            files under `output_dir/tensorboard`, one scalar per numeric key), `"wandb"` (accelerate's
            `WandBTracker`; needs `pip install wandb`; the mode follows `WANDB_MODE`, the project
            `WANDB_PROJECT`), `"none"`. A single string is accepted.
        run_name (`str`, *optional*):
            The run's name for W&B.
        config (`dict`, *optional*):
            The resolved config, stored with the W&B run and as text (`config`, step 0) in TensorBoard.
        enabled (`bool`, *optional*, defaults to `True`):
            `False` on non-main processes: nothing is created or written.
        resume_step (`int`, *optional*):
            Resuming from step `N`: `metrics.jsonl` is first rewritten (atomically) to keep only the
            lines with `step <= N`, and TensorBoard purges events after `N` (`purge_step=N + 1`, passed
            through the tracker to its `SummaryWriter`), so the resumed run's log has no steps
            duplicated from the killed part. W&B cannot purge: a resumed run is a new W&B run (unless
            `WANDB_RUN_ID` names the old one, in which case W&B itself ignores steps it already has).
            `None` (a fresh run) starts a fresh `metrics.jsonl`, replacing one left in the directory.

    Raises:
        `ValueError`: on an unknown `report_to` value (the message lists the valid ones).
        `ImportError`: for `"wandb"` when wandb is not installed.

    Example:

    ```python
    with MetricsLogger("runs/x", report_to=["tensorboard"]) as log:
        log.log(10, {"loss": 0.69, "lr": 1e-5})
    ```
    """

    def __init__(
        self,
        output_dir: str | Path,
        report_to: Sequence[str] = ("tensorboard",),
        run_name: str | None = None,
        config: dict | None = None,
        enabled: bool = True,
        resume_step: int | None = None,
    ) -> None:
        if isinstance(report_to, str):
            report_to = [report_to]
        bad = [s for s in report_to if s not in SINKS]
        if bad:
            raise ValueError(f"unknown report_to value(s) {', '.join(map(repr, bad))}; valid: {', '.join(SINKS)}")
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / "metrics.jsonl"
        self.report_to = tuple(report_to)
        self._file: Any = None
        self._trackers: list[GeneralTracker] = []
        if not enabled:
            return

        if "wandb" in self.report_to:  # fail before creating anything
            try:
                import wandb  # noqa: F401  (the tracker imports it again in start())
            except ImportError as exc:
                raise ImportError(
                    "report_to includes 'wandb' but the wandb package is not installed: pip install wandb "
                    "(or use report_to=tensorboard / none)"
                ) from exc

        self.output_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            if self.path.exists():
                records = read_metrics(self.path)
                kept = [r for r in records if isinstance(r.get("step"), int) and r["step"] <= resume_step]
                if len(kept) != len(records):
                    logger.info(f"{self.path}: dropped {len(records) - len(kept)} record(s) after step {resume_step}")
                atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()  # a fresh run into an old directory starts a fresh log
        self._file = self.path.open("a", encoding="utf-8")

        try:
            if "tensorboard" in self.report_to:
                purge = resume_step + 1 if resume_step is not None else None
                # the tracker's SummaryWriter writes to logging_dir/run_name = output_dir/tensorboard
                tb = TensorBoardTracker(TENSORBOARD_DIR, self.output_dir, purge_step=purge)
                tb.start()
                self._trackers.append(tb)
                if config is not None and resume_step is None:
                    tb.log({"config": "```\n" + json.dumps(config, indent=2, default=str) + "\n```"}, step=0)
            if "wandb" in self.report_to:
                # accelerate passes its first argument to wandb.init as `project`: None keeps W&B's default
                # (WANDB_PROJECT); the run's name goes through the init kwargs
                wb = WandBTracker(
                    None,  # type: ignore[arg-type]
                    name=run_name,
                    config=config,
                    dir=str(self.output_dir),
                    resume="allow",
                    mode=os.environ.get("WANDB_MODE") or None,
                )
                wb.start()
                self._trackers.append(wb)
        except BaseException:
            self.close()  # no half-open writers left behind
            raise

    @property
    def trackers(self) -> tuple[GeneralTracker, ...]:
        """The accelerate trackers in use (TensorBoard first, then W&B; e.g. for `log_images`); empty when disabled."""
        return tuple(self._trackers)

    def log(self, step: int, metrics: Mapping[str, float | int | torch.Tensor]) -> None:
        """
        Record `metrics` at `step` in every sink.

        Args:
            step (`int`):
                The optimiser step.
            metrics (`Mapping[str, float | int | torch.Tensor]`):
                Scalar values by key (the keys of the logging conventions: `loss`, `lr`,
                `rewards/chosen`, ...). Tensors must hold one element. Keys `step` and `time` are
                reserved.
        """
        if not self.enabled:
            return
        if self._file is None:
            raise RuntimeError("MetricsLogger.log called after close()")
        reserved = {"step", "time"} & set(metrics)
        if reserved:
            raise ValueError(f"metric keys {sorted(reserved)} are reserved by metrics.jsonl")
        values = {str(k): _value(str(k), v) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": int(step), "time": time.time(), **values}, allow_nan=False) + "\n")
        self._file.flush()
        scalars = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in self._trackers:
            if tracker.name == "tensorboard":
                tracker.log(scalars, step=step)  # numbers only (nulls and strings skipped); flushed
            else:
                tracker.log({k: v for k, v in values.items() if v is not None}, step=step)

    def close(self) -> None:
        """Close `metrics.jsonl` and the trackers; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        trackers, self._trackers = self._trackers, []
        for tracker in trackers:
            tracker.finish()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """
    The records of a `metrics.jsonl`, in file order.

    A line that is not a JSON object (the truncated last line of a run killed mid-write) is
    skipped and counted in a logged warning. Non-finite values were written as `null` and read
    back as `None`.

    Args:
        path (`str` or `Path`):
            The `metrics.jsonl` file.

    Returns:
        `list[dict[str, Any]]`: one dict per logged step.

    Raises:
        `FileNotFoundError`: when `path` does not exist.
    """
    out: list[dict[str, Any]] = []
    bad: list[int] = []
    with Path(path).open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad.append(lineno)
                continue
            if isinstance(record, dict):
                out.append(record)
            else:
                bad.append(lineno)
    if bad:
        logger.warning(
            f"{path}: skipped {len(bad)} unreadable line(s) (line {', '.join(map(str, bad[:5]))}"
            f"{', ...' if len(bad) > 5 else ''}; a run killed mid-write leaves a truncated last line)"
        )
    return out
