"""Tests of mm_align.metrics_log: metrics.jsonl, resume truncation, TensorBoard, disabled processes."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from mm_align.metrics_log import MetricsLogger, read_metrics


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_content_and_flush(tmp_path: Path) -> None:
    log = MetricsLogger(tmp_path, report_to=["none"])
    log.log(1, {"loss": torch.tensor(0.5), "lr": 1e-5, "rewards/accuracies": 1, "grad_norm": float("nan")})
    # flushed after each line: visible before close()
    rows = _lines(tmp_path / "metrics.jsonl")
    assert len(rows) == 1
    row = rows[0]
    assert row["step"] == 1 and isinstance(row["time"], float)
    assert row["loss"] == pytest.approx(0.5)
    assert row["lr"] == pytest.approx(1e-5)
    assert row["rewards/accuracies"] == 1
    assert row["grad_norm"] is None  # non-finite -> null
    log.log(2, {"loss": torch.tensor([0.25]), "grad_norm": float("inf")})
    log.close()
    log.close()  # idempotent
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["grad_norm"] is None
    assert not (tmp_path / "tensorboard").exists()


def test_context_manager_and_log_after_close(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, report_to="none") as log:
        log.log(0, {"loss": 1.0})
    with pytest.raises(RuntimeError, match="after close"):
        log.log(1, {"loss": 1.0})


def test_bad_metric_values(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, report_to=["none"]) as log:
        with pytest.raises(ValueError, match="'loss' is a tensor of shape"):
            log.log(1, {"loss": torch.zeros(3)})
        with pytest.raises(ValueError, match="reserved"):
            log.log(1, {"step": 3})


def test_fresh_run_replaces_old_log(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, report_to=["none"]) as log:
        log.log(1, {"loss": 1.0})
    with MetricsLogger(tmp_path, report_to=["none"]) as log:
        log.log(1, {"loss": 2.0})
    assert [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [2.0]


def test_resume_truncates_later_steps(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, report_to=["none"]) as log:
        for step in range(1, 9):
            log.log(step, {"loss": float(step)})
    # the run was killed mid-write after step 8; its last checkpoint was at step 5
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 9, "lo')
    with MetricsLogger(tmp_path, report_to=["none"], resume_step=5) as log:
        assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
        for step in range(6, 8):
            log.log(step, {"loss": 10.0 + step})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert rows[5]["loss"] == 16.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left


def test_resume_without_previous_log(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path / "new", report_to=["none"], resume_step=3) as log:
        log.log(4, {"loss": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path / "new" / "metrics.jsonl")] == [4]


def test_tensorboard_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, report_to=["tensorboard"], config={"train": {"lr": 1e-5}}) as log:
        log.log(1, {"loss": 0.75, "rewards/margins": torch.tensor(0.5)})
        log.log(2, {"loss": 0.5, "rewards/margins": torch.tensor(1.0)})
    tb_dir = tmp_path / "tensorboard"
    assert any(p.name.startswith("events.out.tfevents") for p in tb_dir.iterdir())
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    assert {"loss", "rewards/margins"} <= set(acc.Tags()["scalars"])
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 2]
    assert loss[1].value == pytest.approx(0.5)
    assert acc.Scalars("rewards/margins")[0].value == pytest.approx(0.5)


def test_tensorboard_resume_purges_later_steps(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path) as log:
        for step in range(1, 9):
            log.log(step, {"loss": float(step)})
    with MetricsLogger(tmp_path, resume_step=5) as log:
        for step in range(6, 8):
            log.log(step, {"loss": 10.0 + step})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(s, float(s)) for s in range(1, 6)] + [
        (6, 16.0),
        (7, 17.0),
    ]


def test_disabled_creates_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with MetricsLogger(out, report_to=["tensorboard"], enabled=False, resume_step=3) as log:
        log.log(1, {"loss": 1.0})
    assert not out.exists()


def test_unknown_sink(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown report_to.*'tensorbaord'.*valid: tensorboard, wandb, none"):
        MetricsLogger(tmp_path / "run", report_to=["tensorbaord"])
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="valid"):  # validated on non-main processes too
        MetricsLogger(tmp_path / "run", report_to=["mlflow"], enabled=False)


def test_wandb_missing_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        MetricsLogger(tmp_path / "run", report_to=["wandb"])
    assert not (tmp_path / "run").exists()


def test_read_metrics_tolerates_truncated_last_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": null}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING, logger="mm_align.metrics_log"):
        rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[1]["loss"] is None
    assert "skipped 1 unreadable line" in caplog.text


def test_read_metrics_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "metrics.jsonl")


def test_numpy_scalars(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    with MetricsLogger(tmp_path, report_to=["none"]) as log:
        log.log(1, {"a": np.float32(0.5), "b": np.int64(3), "c": np.float64(math.inf)})
    row = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert row["a"] == 0.5 and row["b"] == 3 and row["c"] is None


def test_tensorboard_goes_through_accelerates_tracker(tmp_path: Path) -> None:
    """The event file written by accelerate's TensorBoardTracker, read back with EventAccumulator: the numeric
    scalars at their steps, the config as text at step 0; nulls (non-finite), bools and strings are not scalars.
    The events lie directly in output_dir/tensorboard (the layout before the tracker)."""
    from accelerate.tracking import TensorBoardTracker
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, report_to="tensorboard", config={"train": {"beta": 0.1}}) as log:
        assert [type(t) for t in log.trackers] == [TensorBoardTracker]
        log.log(3, {"loss": 0.25, "rewards/accuracies": 1, "grad_norm": math.nan, "flag": True, "note": "x"})
        log.log(7, {"loss": torch.tensor(0.125), "grad_norm": 2.0})
    assert log.trackers == ()  # closed
    assert [p.name.split(".")[0] for p in (tmp_path / "tensorboard").iterdir()] == ["events"]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["grad_norm", "loss", "rewards/accuracies"]
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(3, 0.25), (7, 0.125)]
    assert [(e.step, e.value) for e in acc.Scalars("grad_norm")] == [(7, 2.0)]  # the NaN at step 3 is skipped
    assert [(e.step, e.value) for e in acc.Scalars("rewards/accuracies")] == [(3, 1.0)]
    (text,) = acc.Tensors("config/text_summary")
    assert text.step == 0 and json.loads(text.tensor_proto.string_val[0].decode().strip("`\n")) == {
        "train": {"beta": 0.1}
    }
    # metrics.jsonl keeps everything, the null included
    row = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert row["grad_norm"] is None and row["flag"] is True and row["note"] == "x"


def test_tensorboard_resume_passes_purge_step_to_the_writer(tmp_path: Path) -> None:
    """The purge on resume reaches the tracker's SummaryWriter as purge_step = resume_step + 1 (its effect:
    test_tensorboard_resume_purges_later_steps); the config text is not written again on resume."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsLogger(tmp_path, config={"a": 1}, resume_step=5) as log:
        (tb,) = log.trackers
        assert tb.init_kwargs == {"purge_step": 6}
        log.log(6, {"loss": 1.0})
    with MetricsLogger(tmp_path / "fresh") as log:
        assert log.trackers[0].init_kwargs == {"purge_step": None}
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert acc.Tags()["tensors"] == [] and [e.step for e in acc.Scalars("loss")] == [6]


class _FakeRun:
    def __init__(self, calls: list) -> None:
        self.calls = calls

    def log(self, values: dict, step: int | None = None) -> None:
        self.calls.append(("log", values, step))

    def finish(self) -> None:
        self.calls.append(("finish",))


def test_wandb_goes_through_accelerates_tracker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """wandb is not a dependency: a stand-in module records what accelerate's WandBTracker calls. The run is
    initialised with our name, config, directory, resume="allow" and WANDB_MODE; logs drop nulls, keep the step."""
    import sys
    import types

    from accelerate.tracking import WandBTracker

    calls: list = []
    fake = types.ModuleType("wandb")

    def init(**kwargs):
        calls.append(("init", kwargs))
        return _FakeRun(calls)

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    with MetricsLogger(tmp_path, report_to=["wandb"], run_name="dpo-1", config={"lr": 1e-5}) as log:
        assert [type(t) for t in log.trackers] == [WandBTracker]
        log.log(2, {"loss": 0.5, "grad_norm": math.inf, "flag": True})
    assert calls[0] == (
        "init",
        {
            "project": None,
            "name": "dpo-1",
            "config": {"lr": 1e-5},
            "dir": str(tmp_path),
            "resume": "allow",
            "mode": "offline",
        },
    )
    assert calls[1:] == [("log", {"loss": 0.5, "flag": True}, 2), ("finish",)]
    assert not (tmp_path / "tensorboard").exists()


def test_atomic_writes_get_the_umask_permissions_not_0600(tmp_path):
    import os
    import stat

    from mm_align.atomic import atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
        os.umask(0o077)
        atomic_write_json(tmp_path / "b.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "b.json").stat().st_mode) == 0o600
    finally:
        os.umask(old)
