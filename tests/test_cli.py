"""The ``mm-align`` commands, run in-process through ``main`` as a user runs them."""

from __future__ import annotations

import json

import pytest
import yaml

from mm_align.cli import COMMANDS, main
from mm_align.data import PreferencePair, write_preferences
from mm_align.synthetic import SyntheticWorld


@pytest.fixture()
def data(tmp_path):
    return write_preferences(SyntheticWorld(seed=1234).pairs(120, seed=1), tmp_path / "train.jsonl")


def _config(tmp_path, data, **train):
    cfg = {
        "adapter": "synthetic",
        "model": {"hidden": 16},
        "data": {"train": str(data)},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 3, "batch_size": 8, "report_to": ["none"],
                  "log_every": 1, **train},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_then_report(tmp_path, data, capsys):
    assert main(["train", "--config", str(_config(tmp_path, data)), "train.learning_rate=1e-3"]) == 0
    run = tmp_path / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["learning_rate"] == pytest.approx(1e-3)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file()


def test_unknown_config_key_names_it_and_the_valid_keys(tmp_path, data, capsys):
    assert main(["train", "--config", str(_config(tmp_path, data)), "train.lerning_rate=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "train.lerning_rate" in err and "learning_rate" in err


def test_ill_typed_value_is_an_error(tmp_path, data, capsys):
    assert main(["train", "--config", str(_config(tmp_path, data)), "train.max_steps=abc"]) == 2
    assert "train.max_steps" in capsys.readouterr().err


def test_unknown_model_key_is_checked_by_the_adapter(tmp_path, data, capsys):
    assert main(["train", "--config", str(_config(tmp_path, data)), "model.hiden=3"]) == 2
    assert "model.hiden" in capsys.readouterr().err


def test_unknown_loss_lists_valid_losses(tmp_path, data, capsys):
    assert main(["train", "--config", str(_config(tmp_path, data)), "train.loss=[dpoo]"]) == 2
    err = capsys.readouterr().err
    assert "dpoo" in err and "sigmoid" in err


def test_bad_rows_are_skipped_counted_and_reported(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    good = SyntheticWorld(seed=1234).pairs(40, seed=2)
    write_preferences(good, path)
    with path.open("a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"prompt": good[0].prompt, "chosen": 3, "rejected": 3}) + "\n")
    assert main(["train", "--config", str(_config(tmp_path, path))]) == 0
    out = capsys.readouterr().out
    assert "40 records, 2 rows skipped" in out


def test_strict_data_stops_at_the_bad_row(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    write_preferences(SyntheticWorld(seed=1234).pairs(10, seed=2), path)
    with path.open("a") as f:
        f.write("{not json\n")
    assert main(["train", "--config", str(_config(tmp_path, path)), "data.strict=true"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "10" in err  # the file and the 0-based row of the bad line


def test_missing_data_file_is_named(tmp_path, capsys):
    assert main(["train", "--config", str(_config(tmp_path, tmp_path / "nope.jsonl"))]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_doctor_exit_codes(tmp_path, data, capsys):
    assert main(["doctor", str(data)]) == 0
    bad = tmp_path / "bad.jsonl"
    write_preferences([PreferencePair(prompt="", chosen="a.png", rejected="b")], bad)
    assert main(["doctor", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "ERRORS FOUND" in out


def test_ls_lists_losses_adapters_configs(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for name in ("diffusion_dpo", "mapo", "sigmoid", "kto", "synthetic", "synthetic_dpo"):
        assert name in out


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_unimplemented_modality_commands_say_so(command, capsys):
    assert main([command, "video"]) == 2
    assert "not implemented yet" in capsys.readouterr().err


def test_command_list_is_explicit():
    assert COMMANDS == ("train", "generate", "evaluate", "bench", "convert", "doctor", "report", "quickstart", "ls")


def test_quickstart_end_to_end(tmp_path, capsys):
    assert main(["quickstart", "--world", "synthetic", "--output-dir", str(tmp_path / "qs"), "--steps", "150"]) == 0
    out = capsys.readouterr().out
    report = tmp_path / "qs" / "run" / "report.html"
    assert str(report) in out and report.is_file()
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert summary["aligned_accuracy"] > summary["base_accuracy"] + 0.2
