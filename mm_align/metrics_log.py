"""Metric sinks: always ``metrics.jsonl``; TensorBoard by default (offline); W&B optional."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["MetricsLogger", "read_metrics", "SINKS"]

SINKS = ("tensorboard", "wandb", "none")


def _value(v: Any) -> float | int | None:
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf: written as null
    return v


class MetricsLogger:
    """Writes each ``log(step, metrics)`` to ``metrics.jsonl`` and the chosen trackers.

    ``enabled=False`` (non-main processes) writes nothing. ``resume_step=N`` first drops lines
    with step > N, so a resumed run's log has no steps duplicated from the killed part.
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
        bad = [s for s in report_to if s not in SINKS]
        if bad:
            raise ValueError(f"unknown report_to {bad}; valid: {', '.join(SINKS)}")
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = self._wandb = None
        self._file = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # a fresh run into an old directory starts a fresh log
        self._file = self.path.open("a", encoding="utf-8")
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError as exc:
                raise ImportError("report_to=wandb needs the wandb package: pip install wandb") from exc
            self._wandb = wandb.init(name=run_name, config=config, dir=str(output_dir), resume="allow")

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        values = {k: _value(v) for k, v in metrics.items()}
        assert self._file is not None
        self._file.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a truncated line (a killed run) is skipped with a warning."""
    out, bad = [], 0
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    if bad:
        logger.warning(f"{path}: skipped {bad} unreadable line(s) (a run killed mid-write)")
    return out
