"""A fresh run refuses a used output directory; overwrite clears it; resume says what it resumed; the quickstart
re-runs into its own directory."""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import pytest
from conftest import small_train_config

from mm_align.checkpoint import list_checkpoints
from mm_align.quickstart import run_quickstart
from mm_align.synthetic import SyntheticAdapter, SyntheticWorld
from mm_align.trainer import OutputDirNotEmptyError, train

WORLD = SyntheticWorld(seed=1234)
PAIRS = WORLD.pairs(200, seed=3)


_cfg = partial(small_train_config, max_steps=4, checkpointing_steps=2)  # conftest.py: the shared config


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``directory``: its bytes and mtime."""
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_fresh_run_into_a_used_directory_is_refused_and_the_old_files_are_untouched(tmp_path):
    run = tmp_path / "run"
    train(SyntheticAdapter(), PAIRS, _cfg(tmp_path, max_steps=6))
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    before = _snapshot(run)
    with pytest.raises(OutputDirNotEmptyError) as info:
        train(SyntheticAdapter(), PAIRS, _cfg(tmp_path, max_steps=2))
    message = str(info.value)
    assert isinstance(info.value, ValueError)  # the CLI prints ValueErrors as "error: ..."
    assert str(run) in message
    assert "checkpoint-2 … checkpoint-6 (3 checkpoints)" in message
    assert "metrics.jsonl" in message and "final/" in message
    assert "train.resume_from=latest" in message and "train.overwrite_output_dir=true" in message
    assert _snapshot(run) == before


def test_resume_latest_without_a_checkpoint_is_refused_in_a_used_directory_and_starts_fresh_in_an_empty_one(
    tmp_path,
):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirNotEmptyError, match=r"resume_from=latest found no checkpoint.*notes\.txt"):
        train(SyntheticAdapter(), PAIRS, _cfg(tmp_path, resume_from="latest"))
    assert (run / "notes.txt").read_text() == "mine" and sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    result = train(SyntheticAdapter(), PAIRS, _cfg(tmp_path, output_dir=str(empty), resume_from="latest"))
    assert result.step == 4 and _steps(empty) == [1, 2, 3, 4]


def test_overwrite_clears_the_directory_and_trains(tmp_path):
    run = tmp_path / "run"
    train(SyntheticAdapter(), PAIRS, _cfg(tmp_path, max_steps=6))
    (run / "stale.txt").write_text("old")
    result = train(SyntheticAdapter(), PAIRS, _cfg(tmp_path, max_steps=2, overwrite_output_dir=True))
    assert result.step == 2
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2"]  # the old 4 and 6 are gone, 2 is the new one
    assert not (run / "stale.txt").exists()
    assert _steps(run) == [1, 2]
    state = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["position"]["step"] == 2
    assert (run / "final").is_dir() and (run / "config.yaml").is_file()


def test_resume_says_which_checkpoint_and_step_on_the_console(tmp_path, caplog):
    run = tmp_path / "run"
    train(SyntheticAdapter(), PAIRS, _cfg(tmp_path, max_steps=4))
    with caplog.at_level(logging.WARNING):  # the level a plain console shows (no logging configured)
        result = train(SyntheticAdapter(), PAIRS, _cfg(tmp_path, max_steps=6, resume_from="latest"))
    assert result.step == 6
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(f"resumed from {run / 'checkpoint-4'} at step 4" in m for m in messages), messages
    assert _steps(run) == [1, 2, 3, 4, 5, 6]


def test_resume_from_an_explicit_checkpoint_into_a_used_directory_is_allowed(tmp_path):
    run = tmp_path / "run"
    train(SyntheticAdapter(), PAIRS, _cfg(tmp_path, max_steps=4))
    result = train(SyntheticAdapter(), PAIRS, _cfg(tmp_path, max_steps=6, resume_from=str(run / "checkpoint-2")))
    assert result.step == 6


def test_synthetic_quickstart_twice_into_one_directory(tmp_path):
    """`mm-align quickstart --world synthetic` re-run into the same directory retrains its run/ from scratch:
    no checkpoint of the first run is left beside the second's."""
    first = run_quickstart(tmp_path, steps=20)
    assert first.is_file()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-10", "checkpoint-20"]
    second = run_quickstart(tmp_path, steps=10)
    assert second.is_file()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-5", "checkpoint-10"]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 10


def test_overwrite_refuses_to_clear_the_working_directory(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "precious.txt").write_text("keep")
    monkeypatch.chdir(work)
    with pytest.raises(OutputDirNotEmptyError, match="refusing"):
        train(SyntheticAdapter(), PAIRS, _cfg(tmp_path, output_dir=".", overwrite_output_dir=True))
    assert (work / "precious.txt").read_text() == "keep"
