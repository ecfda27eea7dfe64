"""What ``mm-align`` prints when something is wrong: once, in one line, without a raw traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mm_align import cli


def _lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = {"prompt": "a red circle", "chosen": "a", "rejected": "b"}


def test_doctor_prints_the_verdict_once(tmp_path, capsys):
    path = _lines(tmp_path / "d.jsonl", [GOOD, {**GOOD, "prompt": ""}])
    assert cli.main(["doctor", str(path)]) == 1
    out = capsys.readouterr().out
    assert out.count("2 rows, 1 valid") == 1, out
    assert out.count("ERRORS FOUND") == 1
    assert "d.jsonl:2: empty prompt" in out  # the 1-based line of the file


def test_doctor_on_pair_folders_without_modality_says_to_add_it(tmp_path, capsys):
    pair = tmp_path / "pairs" / "0001"
    pair.mkdir(parents=True)
    (pair / "prompt.txt").write_text("a red circle", encoding="utf-8")
    (pair / "chosen.png").write_bytes(b"png")
    (pair / "rejected.png").write_bytes(b"png")
    assert cli.main(["doctor", str(tmp_path / "pairs")]) == 2
    err = capsys.readouterr().err
    assert "--modality image" in err and "pair folders" in err
    assert len(err.strip().splitlines()) == 1


def test_a_directory_that_is_not_a_model_is_one_line(tmp_path, capsys):
    pytest.importorskip("diffusers")
    notamodel = tmp_path / "notamodel"
    notamodel.mkdir()
    data = _lines(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "a.png", "rejected": "b.png"}])
    code = cli.main(["train", "--config", "sd15_diffusion_dpo", f"model.pretrained={notamodel}", f"data.train={data}",
                     "data.eval=null", f"train.output_dir={tmp_path / 'run'}"])
    captured = capsys.readouterr()
    assert code == 2
    (line,) = captured.err.strip().splitlines()
    assert str(notamodel) in line and "not a diffusers/transformers model directory" in line
    assert "Traceback" not in captured.err + captured.out


def test_an_oserror_that_is_not_a_model_load_still_raises(monkeypatch, tmp_path):
    import mm_align.orchestration as orchestration

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(orchestration, "run_training", disk_full)
    with pytest.raises(OSError, match="No space left"):
        cli.main(["train", "--config", "synthetic_dpo", f"train.output_dir={tmp_path / 'run'}"])


def test_trainer_stops_are_one_message_and_a_nonzero_exit(monkeypatch, tmp_path, capsys):
    import mm_align.orchestration as orchestration
    from mm_align.trainer import NonFiniteLossError

    class DivergenceError(RuntimeError):  # stands in for any stop the trainer defines later
        pass

    DivergenceError.__module__ = "mm_align.trainer"
    args = ["train", "--config", "synthetic_dpo", f"train.output_dir={tmp_path / 'run'}"]
    for exc in (NonFiniteLossError("non-finite loss for 5 steps in a row; stopping"), DivergenceError("diverged")):
        def stop(*a, _exc=exc, **k):
            raise _exc

        monkeypatch.setattr(orchestration, "run_training", stop)
        assert cli.main(args) == 1
        err = capsys.readouterr().err
        assert err.strip() == f"error: {type(exc).__name__}: {exc}"

    def bug(*a, **k):
        raise RuntimeError("a bug, not a stop")

    monkeypatch.setattr(orchestration, "run_training", bug)
    with pytest.raises(RuntimeError, match="a bug"):  # other RuntimeErrors keep their traceback
        cli.main(args)


def test_train_prints_the_skip_counts_once(tmp_path):
    from mm_align.data import write_preferences
    from mm_align.synthetic import SyntheticWorld

    data = write_preferences(SyntheticWorld(seed=1234).pairs(16, seed=1), tmp_path / "train.jsonl")
    with data.open("a") as f:
        f.write("{broken\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mm_align.cli", "train", "--config", "synthetic_dpo", f"data.train={data}",
         "data.eval=null", "train.eval_every=null", "train.max_steps=1", "train.batch_size=4",
         "train.report_to=[none]", f"train.output_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    both = proc.stdout + proc.stderr
    assert both.count("malformed json: 1") == 1, both
