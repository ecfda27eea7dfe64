"""Tests of mm_align.config: strict dataclass configs from YAML + key=value overrides."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from mm_align.config import (
    ConfigError,
    apply_overrides,
    describe,
    dump_yaml,
    from_dict,
    library_versions,
    load_config,
    option,
    to_dict,
    write_resolved,
)


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = option("adamw", help="Optimiser name.")
    betas: tuple[float, ...] = option((0.9, 0.999), help="Adam betas.")

    def __post_init__(self) -> None:
        if any(not 0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")


@dataclass
class TrainSection:
    learning_rate: float = option(1e-4, help="Peak learning rate.")
    max_steps: int = option(100, help="Optimiser steps.")
    batch_size: int = option(4, help="Samples per batch.")
    bf16: bool = option(False, help="Use bfloat16 autocast.")
    loss: list[str] = option(default_factory=lambda: ["sigmoid"], help="Loss names.")
    ids: list[int] = option(default_factory=list, help="Some ids.")
    clip: float | None = option(1.0, help="Gradient clipping; None = off.")
    loss_params: dict[str, Any] = option(default_factory=dict, help="Loss-specific parameters.")
    weights: dict[str, float] = option(default_factory=dict, help="Per-loss weights.")
    optim: OptimConfig = option(default_factory=OptimConfig, help="Optimiser settings.")


@dataclass
class RunCfg:
    name: str = option(help="Run name (required).")
    output_dir: Path = option(Path("runs/x"), help="Output directory.")
    mode: Literal["lora", "full"] = option("lora", help="Finetuning mode.")
    train: TrainSection = option(default_factory=TrainSection, help="Training settings.")


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ---------------------------------------------------------------------------- round trips


def test_round_trip_to_dict_from_dict() -> None:
    cfg = RunCfg(
        name="r",
        output_dir=Path("out/y"),
        train=TrainSection(
            learning_rate=3e-5,
            loss=["sigmoid", "ipo"],
            ids=[1, 2],
            clip=None,
            loss_params={"label_smoothing": 0.1, "nested": {"a": [1, 2]}},
            weights={"sigmoid": 1.0},
            optim=OptimConfig(name="sgd", betas=(0.5, 0.6)),
        ),
    )
    data = to_dict(cfg)
    assert data["output_dir"] == "out/y"
    assert data["train"]["optim"]["betas"] == [0.5, 0.6]
    yaml.safe_dump(data)  # plain YAML-able types only
    assert from_dict(RunCfg, data) == cfg
    assert from_dict(RunCfg, yaml.safe_load(dump_yaml(cfg))) == cfg


def test_int_accepted_for_float_and_path_from_str() -> None:
    cfg = from_dict(RunCfg, {"name": "r", "output_dir": "a/b", "train": {"learning_rate": 1, "clip": 2}})
    assert isinstance(cfg.train.learning_rate, float) and cfg.train.learning_rate == 1.0
    assert isinstance(cfg.train.clip, float)
    assert cfg.output_dir == Path("a/b")


# ---------------------------------------------------------------------------- YAML + overrides


def test_yaml_and_overrides(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "name: base\ntrain:\n  learning_rate: 1.0e-4\n  max_steps: 10\n  loss: [sigmoid]\n  clip: 0.5\n",
    )
    cfg = load_config(
        RunCfg,
        p,
        [
            "train.max_steps=20",  # override wins
            "train.learning_rate=1e-5",  # YAML 1.1 reads this as a string
            "train.loss=[ipo, hinge]",
            "train.clip=null",
            "train.bf16=true",
            "train.optim.name=sgd",
            "train.loss_params.label_smoothing=0.1",
        ],
    )
    assert cfg.name == "base"
    assert cfg.train.max_steps == 20
    assert cfg.train.learning_rate == pytest.approx(1e-5) and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.loss == ["ipo", "hinge"]
    assert cfg.train.clip is None
    assert cfg.train.bf16 is True
    assert cfg.train.optim.name == "sgd"
    assert cfg.train.loss_params == {"label_smoothing": 0.1}


def test_yaml_scientific_notation_in_file(tmp_path: Path) -> None:
    cfg = load_config(RunCfg, _write(tmp_path, "name: a\ntrain:\n  learning_rate: 3e-6\n"))
    assert cfg.train.learning_rate == pytest.approx(3e-6)


def test_load_config_without_file_uses_defaults_and_overrides() -> None:
    cfg = load_config(RunCfg, None, ["name=x"])
    assert cfg == RunCfg(name="x")


def test_override_errors() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.max_steps"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"train": {"max_steps": 3}}, ["train.max_steps.x=1"])
    with pytest.raises(ConfigError, match="empty part"):
        apply_overrides({}, ["train..x=1"])
    assert apply_overrides({"a": None}, ["a.b=1"]) == {"a": {"b": 1}}
    assert apply_overrides({}, ["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}


def test_unknown_override_key_caught_by_from_dict() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lerning_rate'") as e:
        load_config(RunCfg, None, ["name=x", "train.lerning_rate=1e-5"])
    assert "did you mean 'learning_rate'?" in str(e.value)


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found") as e:
        load_config(RunCfg, tmp_path / "missing.yaml")
    assert "missing.yaml" in str(e.value)
    bad = _write(tmp_path, "name: a\ntrain: [1,\n  learning_rate: 2\n", "bad.yaml")
    with pytest.raises(ConfigError, match="invalid YAML") as e:
        load_config(RunCfg, bad)
    assert "bad.yaml" in str(e.value) and "line " in str(e.value)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(RunCfg, _write(tmp_path, "- a\n- b\n", "list.yaml"))


# ---------------------------------------------------------------------------- unknown keys


def test_unknown_top_level_key() -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(RunCfg, {"name": "x", "trian": {}})
    msg = str(e.value)
    assert "unknown config key 'trian'" in msg
    assert "valid keys for the top level: mode, name, output_dir, train" in msg
    assert "did you mean 'train'?" in msg


def test_unknown_nested_key() -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(RunCfg, {"name": "x", "train": {"lerning_rate": 1e-3}})
    msg = str(e.value)
    assert "unknown config key 'train.lerning_rate'" in msg
    assert "valid keys for train: batch_size, bf16, clip, ids, learning_rate, loss, loss_params" in msg
    assert "did you mean 'learning_rate'?" in msg
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.optim\.nmae'.*valid keys for train\.optim"):
        from_dict(RunCfg, {"name": "x", "train": {"optim": {"nmae": "sgd"}}})


def test_unknown_key_without_close_match_has_no_suggestion() -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(RunCfg, {"name": "x", "zzzzzz": 1})
    assert "did you mean" not in str(e.value)


# ---------------------------------------------------------------------------- types


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({"train": {"max_steps": "abc"}}, ["config key 'train.max_steps' expects int", "got 'abc' (str)"]),
        ({"train": {"bf16": 1}}, ["config key 'train.bf16' expects bool", "got 1 (int)"]),
        ({"train": {"bf16": "yes"}}, ["config key 'train.bf16' expects bool", "got 'yes' (str)"]),
        ({"mode": "half"}, ["config key 'mode' must be one of 'lora', 'full'", "got 'half'"]),
        ({"train": {"ids": [1, "x"]}}, ["config key 'train.ids[1]' expects int", "got 'x' (str)"]),
        ({"train": {"ids": 3}}, ["config key 'train.ids' expects list[int]", "got 3 (int)"]),
        ({"train": {"learning_rate": "fast"}}, ["config key 'train.learning_rate' expects float", "'fast'"]),
        ({"train": {"learning_rate": True}}, ["config key 'train.learning_rate' expects float", "True (bool)"]),
        ({"train": {"clip": "x"}}, ["config key 'train.clip' expects float", "got 'x' (str)"]),
        ({"train": {"weights": {"a": "b"}}}, ["config key 'train.weights.a' expects float"]),
        ({"train": {"optim": {"name": "adam"}}}, ["config key 'train.optim.name' must be one of 'adamw', 'sgd'"]),
        ({"train": {"optim": 3}}, ["config section 'train.optim' expects a mapping"]),
        ({"train": 5}, ["config section 'train' expects a mapping"]),
        ({"name": 5}, ["config key 'name' expects str", "got 5 (int)", "quote it"]),
    ],
)
def test_wrong_types(data: dict, fragments: list[str]) -> None:
    data = {"name": "x", **data}
    with pytest.raises(ConfigError) as e:
        from_dict(RunCfg, data)
    for fragment in fragments:
        assert fragment in str(e.value)


def test_int_from_numeric_string() -> None:
    assert from_dict(RunCfg, {"name": "x", "train": {"max_steps": "12"}}).train.max_steps == 12


def test_missing_required() -> None:
    with pytest.raises(ConfigError, match="config key 'name' is required"):
        from_dict(RunCfg, {})


def test_post_init_error_surfaces_with_section_path() -> None:
    with pytest.raises(ConfigError, match=r"^train\.optim: betas must lie in \[0, 1\)"):
        from_dict(RunCfg, {"name": "x", "train": {"optim": {"betas": [0.9, 1.5]}}})


def test_config_error_is_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------------------- outputs


def test_write_resolved_round_trip(tmp_path: Path) -> None:
    cfg = load_config(RunCfg, None, ["name=w", "train.learning_rate=2e-5", "train.optim.betas=[0.8, 0.9]"])
    out = tmp_path / "run"
    write_resolved(cfg, out)
    assert (out / "config.yaml").is_file() and (out / "versions.json").is_file()
    assert load_config(RunCfg, out / "config.yaml") == cfg
    versions = json.loads((out / "versions.json").read_text())
    assert "torch" in versions and "python" in versions
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    write_resolved(cfg, out)  # overwriting is fine


def test_library_versions() -> None:
    versions = library_versions()
    expected = {
        "python", "platform", "mm_align", "torch", "torchvision", "torchaudio", "diffusers", "transformers",
        "peft", "accelerate", "open_clip_torch", "datasets",
    }  # fmt: skip
    assert expected <= set(versions)
    assert versions["torch"] != "not installed"
    assert all(isinstance(v, str) for v in versions.values())


def test_describe_lists_nested_fields_with_help() -> None:
    text = describe(RunCfg)
    lines = text.splitlines()
    assert any(line.startswith("name: str = <required>") and "Run name (required)." in line for line in lines)
    assert any(
        line.startswith("train.learning_rate: float = 0.0001") and "Peak learning rate." in line for line in lines
    )
    assert any(
        line.startswith("train.optim.name: one of 'adamw', 'sgd'") and "Optimiser name." in line for line in lines
    )
    assert any(line.startswith("train.clip: float | None = 1.0") for line in lines)
    assert any(line.startswith("train.loss: list[str] = ['sigmoid']") for line in lines)


def test_option_stores_help() -> None:
    from dataclasses import fields

    f = {f.name: f for f in fields(TrainSection)}
    assert f["max_steps"].metadata["help"] == "Optimiser steps."


@dataclass
class _WithPlainField:
    x: int = field(default=1)


def test_field_without_help_is_described() -> None:
    assert describe(_WithPlainField) == "x: int = 1"


def test_yaml_no_is_read_back_as_the_literal_no(tmp_path):
    """`mixed_precision: no` (YAML 1.1 parses it as False) means the option "no", on the CLI and in files."""
    from mm_align.run_config import RunConfig

    cfg = load_config(RunConfig, None, ["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(RunConfig, path).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(RunConfig, None, ["train.mixed_precision=yes"])  # no literal spells True


def test_replace_checked_names_unknown_keys():
    from dataclasses import dataclass

    from mm_align.config import replace_checked

    @dataclass
    class Settings:
        seed: int = 0
        steps: int = 8

    assert replace_checked(Settings(), {"steps": 3}, "bench option") == Settings(0, 3)
    with pytest.raises(TypeError, match=r"unknown bench option\(s\) stepz; valid: seed, steps"):
        replace_checked(Settings(), {"stepz": 3}, "bench option")
