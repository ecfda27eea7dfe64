"""The ``mm-align`` commands, run in-process through ``main`` as a user runs them."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from safetensors.torch import load_file

import mm_align.cli as cli
from mm_align.cli import COMMANDS, main
from mm_align.data import PreferencePair, write_preferences
from mm_align.losses import LOSSES
from mm_align.recipes import ADAPTERS, shipped_configs
from mm_align.run_config import TrainConfig
from mm_align.synthetic import SyntheticModelConfig, SyntheticWorld


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


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_then_report(tmp_path, data, capsys):
    """The resolved config holds the file's values and the override; 3 steps log 3 rows; the saved LoRA
    is the hidden-16 model's; the report renders the curves and the config."""
    assert main(["train", "--config", str(_config(tmp_path, data)), "train.learning_rate=1e-3"]) == 0
    run = tmp_path / "run"
    assert f"trained 3 steps (0 skipped) on 1 process(es); output: {run}" in capsys.readouterr().out
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["train"]["learning_rate"] == pytest.approx(1e-3)  # the override won over the default 1e-5
    assert resolved["adapter"] == "synthetic" and resolved["model"]["hidden"] == 16
    assert resolved["train"]["max_steps"] == 3 and resolved["train"]["batch_size"] == 8
    assert resolved["data"]["train"] == str(data)
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["lr"] == pytest.approx(1e-3) for r in rows)
    assert rows[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)  # ln 2: policy = reference at step 0
    base = json.loads((run / "final" / "adapter_config.json").read_text())["base"]
    assert base["hidden"] == 16  # the model section reached the adapter
    lora = load_file(str(run / "final" / "adapter_model.safetensors"))
    assert lora and all(v.shape[0] == 16 for k, v in lora.items() if "net.0.lora_B" in k)
    assert main(["report", str(run)]) == 0
    report = run / "report.html"
    assert str(report) in capsys.readouterr().out
    page = report.read_text()
    assert "mm-align run: run" in page and "<img" in page and "learning_rate" in page


def test_unknown_config_key_names_it_and_the_valid_keys(tmp_path, data, capsys):
    assert main(["train", "--config", str(_config(tmp_path, data)), "train.lerning_rate=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.lerning_rate'" in err and "did you mean 'learning_rate'" in err
    for field in dataclasses.fields(TrainConfig):  # every valid key of the section is listed
        assert field.name in err, field.name
    assert not (tmp_path / "run").exists()  # nothing trained


def test_ill_typed_value_is_an_error(tmp_path, data, capsys):
    assert main(["train", "--config", str(_config(tmp_path, data)), "train.max_steps=abc"]) == 2
    assert "config key 'train.max_steps' expects int, got 'abc'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_unknown_model_key_is_checked_by_the_adapter(tmp_path, data, capsys):
    assert main(["train", "--config", str(_config(tmp_path, data)), "model.hiden=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'model.hiden'" in err and "did you mean 'hidden'" in err
    valid = ", ".join(sorted(f.name for f in dataclasses.fields(SyntheticModelConfig)))
    assert f"valid keys for model: {valid}" in err
    assert not (tmp_path / "run").exists()


def test_unknown_loss_lists_valid_losses(tmp_path, data, capsys):
    assert main(["train", "--config", str(_config(tmp_path, data)), "train.loss=[dpoo]"]) == 2
    err = capsys.readouterr().err
    assert f"unknown loss 'dpoo'; valid losses: {', '.join(sorted(LOSSES))}" in err
    assert not (tmp_path / "run").exists()


def test_bad_rows_are_skipped_counted_and_reported(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    good = SyntheticWorld(seed=1234).pairs(40, seed=2)
    write_preferences(good, path)
    with path.open("a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"prompt": good[0].prompt, "chosen": 3, "rejected": 3}) + "\n")
    assert main(["train", "--config", str(_config(tmp_path, path))]) == 0
    out = capsys.readouterr().out
    assert f"{path}: 40 records, 2 rows skipped (malformed json: 1, tie: 1)" in out
    assert "trained 3 steps (0 skipped)" in out
    assert [r["step"] for r in _rows(tmp_path / "run")] == [1, 2, 3]  # training went on with the 40 good rows


def test_strict_data_stops_at_the_bad_row(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    write_preferences(SyntheticWorld(seed=1234).pairs(10, seed=2), path)
    with path.open("a") as f:
        f.write("{not json\n")
    assert main(["train", "--config", str(_config(tmp_path, path)), "data.strict=true"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:11: malformed json" in err  # the file and the 1-based line of the bad row
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_data_file_is_named(tmp_path, capsys):
    assert main(["train", "--config", str(_config(tmp_path, tmp_path / "nope.jsonl"))]) == 2
    assert f"error: {tmp_path / 'nope.jsonl'}: no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_doctor_exit_codes(tmp_path, data, capsys):
    assert main(["doctor", str(data)]) == 0
    out = capsys.readouterr().out
    assert f"{data}: 120 rows, 120 valid — OK" in out and "ERRORS FOUND" not in out
    bad = tmp_path / "bad.jsonl"
    write_preferences([PreferencePair(prompt="", chosen="a.png", rejected="b")], bad)
    assert main(["doctor", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{bad}: 1 rows, 0 valid — ERRORS FOUND" in out
    assert "empty_prompt" in out and "bad.jsonl:1: empty prompt" in out  # the check, the file and the line


def test_ls_lists_losses_adapters_configs(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name, spec in LOSSES.items():  # every registered loss, with its score kind and data kind
        line = next(x for x in lines if x.split()[:1] == [name])
        assert line.split()[1:3] == [spec.score_kind, "paired" if spec.paired else "unpaired"], line
        assert f"β={spec.default_beta:g}" in line
    for name, target in ADAPTERS.items():
        assert any(x.split() == [name, target] for x in lines), name
    for name, path in shipped_configs().items():
        assert any(x.split() == [name, str(path)] for x in lines), name
    assert {"synthetic_dpo", "sd15_diffusion_dpo", "shapes_diffusion_dpo"} <= set(shipped_configs())


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_unimplemented_modality_commands_say_so(command, capsys):
    assert main([command, "video"]) == 2
    err = capsys.readouterr().err
    assert f"mm-align {command} video: not implemented yet" in err and f"{command} image" in err


def test_command_list_is_explicit(capsys):
    """COMMANDS is the list the parser accepts, exactly; any other command is refused."""
    assert COMMANDS == ("train", "generate", "evaluate", "bench", "convert", "restore", "doctor", "report",
                        "quickstart", "ls")
    sub = next(a for a in cli._parser()._actions if a.dest == "command")
    assert tuple(sub.choices) == COMMANDS
    with pytest.raises(SystemExit) as exc:
        main(["fit"])
    assert exc.value.code == 2 and "invalid choice: 'fit'" in capsys.readouterr().err


def test_quickstart_end_to_end(tmp_path, capsys):
    """Measured at 150 steps: held-out accuracy 0.488 base, 0.908 aligned (1000 pairs); eval loss 0.572 at
    step 25 → 0.226 at step 150. The bounds keep headroom for float drift."""
    assert main(["quickstart", "--world", "synthetic", "--output-dir", str(tmp_path / "qs"), "--steps", "150"]) == 0
    out = capsys.readouterr().out
    qs = tmp_path / "qs"
    report = qs / "run" / "report.html"
    assert f"report: {report}" in out and report.is_file()
    summary = json.loads((qs / "summary.json").read_text())
    assert summary["steps"] == 150 and summary["heldout_pairs"] == 1000
    assert len((qs / "data" / "train.jsonl").read_text().splitlines()) == 4000
    assert len((qs / "data" / "heldout.jsonl").read_text().splitlines()) == 1000
    assert summary["base_accuracy_with_lora_disabled"] == summary["base_accuracy"]  # the reference is untouched
    assert 0.44 <= summary["base_accuracy"] <= 0.56
    assert summary["aligned_accuracy"] >= 0.85 and summary["aligned_accuracy"] > summary["base_accuracy"] + 0.3
    rows = _rows(qs / "run")
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in train_rows] == list(range(10, 151, 10))  # log_every 10
    assert [r["step"] for r in eval_rows] == list(range(25, 151, 25))  # eval_every 150 // 6
    assert eval_rows[-1]["eval/loss"] < 0.6 * eval_rows[0]["eval/loss"] and eval_rows[0]["eval/loss"] < 0.6931472
    assert (qs / "run" / "final" / "adapter_model.safetensors").is_file()
    page = report.read_text()
    assert "Held-out preference accuracy (synthetic world)" in page and f"{summary['aligned_accuracy']:.4g}" in page
