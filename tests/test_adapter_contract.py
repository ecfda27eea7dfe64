"""The adapter contract is checked up front (names what is missing), and run_training orchestrates a run."""

from __future__ import annotations

import json

import pytest
import torch

from mm_align.data import write_preferences
from mm_align.orchestration import infer_data_kind, load_run_config, run_training
from mm_align.run_config import TrainConfig
from mm_align.synthetic import SyntheticAdapter, SyntheticWorld
from mm_align.trainer import train
from mm_align.types import OPTIONAL_HOOKS, PreferenceAdapter, check_adapter

WORLD = SyntheticWorld(seed=1234)


def _cfg(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=8, report_to=["none"],
                       learning_rate=1e-2, **kw)


class _NoScores:
    model = torch.nn.Linear(2, 2)
    score_kind = "logp"
    stochastic_scores = False
    lora_target_modules = ["weight"]

    def collate(self, records, seeds):
        return records

    def fingerprint(self):
        return "x"

    def save(self, model, output_dir, lora):
        pass


def test_train_names_what_an_adapter_lacks_before_doing_anything(tmp_path):
    with pytest.raises(TypeError, match=r"_NoScores is not a PreferenceAdapter: missing 'scores'"):
        train(_NoScores(), WORLD.pairs(16, seed=1), _cfg(tmp_path))
    assert not (tmp_path / "run").exists()  # nothing written


def test_every_problem_is_named_at_once():
    bad = _NoScores()
    bad.score_kind = "likelihood"
    bad.stochastic_scores = "no"
    bad.model = "not a module"
    bad.state_dict = lambda: {}
    with pytest.raises(TypeError) as info:
        check_adapter(bad)
    msg = str(info.value)
    for part in ("missing 'scores'", "'score_kind' is 'likelihood'; valid: 'logp', 'error'",
                 "'stochastic_scores' is a str", "'model' is a str",
                 "'state_dict' and 'load_state_dict' come together"):
        assert part in msg, (part, msg)


def test_construction_members_are_required_for_the_cli_only():
    check_adapter(_AdapterWithoutConstruction())  # enough to train
    with pytest.raises(TypeError, match=r"missing 'from_config'; missing 'dataset_formats'; missing 'base_dir'"):
        check_adapter(_AdapterWithoutConstruction(), construction=True)


class _AdapterWithoutConstruction(_NoScores):
    def scores(self, batch, model):
        raise AssertionError("not called")


def test_the_shipped_adapters_meet_the_whole_contract():
    adapter = SyntheticAdapter()
    check_adapter(adapter, construction=True)
    assert isinstance(adapter, PreferenceAdapter)
    assert set(OPTIONAL_HOOKS) == {"prepare", "after_optimizer_step", "state_dict", "load_state_dict"}


def test_data_kind_follows_the_losses():
    assert infer_data_kind(["sigmoid"]) == "paired"
    assert infer_data_kind(["kto"]) == "unpaired"
    assert infer_data_kind(["sft"]) == "paired"
    assert infer_data_kind(["kto", "sft"]) == "unpaired"
    with pytest.raises(ValueError, match="mix paired and unpaired"):
        infer_data_kind(["sigmoid", "kto"])


def test_run_training_builds_reads_and_trains(tmp_path):
    data = write_preferences(WORLD.pairs(64, seed=2), tmp_path / "data" / "train.jsonl")
    cfg = load_run_config("synthetic_dpo", [f"data.train={data}", f"train.output_dir={tmp_path / 'run'}",
                                            "train.max_steps=3", "train.report_to=[none]", "data.max_samples=40",
                                            "data.eval=null", "train.batch_size=8"])
    said: list[str] = []
    result = run_training(cfg, log=said.append)
    assert result.step == 3 and result.final_dir is not None and result.final_dir.is_dir()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 3
    assert said == []  # no row skipped, nothing to say


def test_run_training_sets_the_data_root_and_reports_skipped_rows(tmp_path):
    data = tmp_path / "data" / "train.jsonl"
    write_preferences(WORLD.pairs(32, seed=3), data)
    with data.open("a") as f:
        f.write("{not json\n")
    cfg = load_run_config("synthetic_dpo", [f"data.train={data}", f"train.output_dir={tmp_path / 'run'}",
                                            "train.max_steps=1", "train.report_to=[none]", "data.eval=null",
                                            "train.batch_size=8"])
    adapter = SyntheticAdapter()
    said: list[str] = []
    run_training(cfg, adapter=adapter, log=said.append)
    assert adapter.base_dir == data.parent.resolve()
    assert len(said) == 1 and "32 records, 1 rows skipped" in said[0]


def test_run_training_refuses_no_data():
    cfg = load_run_config("synthetic_dpo", ["data.train="])
    with pytest.raises(ValueError, match="data.train is not set"):
        run_training(cfg)


class _OwnerOnlySave(SyntheticAdapter):
    """Writes its weights the way diffusers' LoRA writer does here: an owner-only (0600) file."""

    def save(self, model, output_dir, lora, state_dict=None):
        import os

        super().save(model, output_dir, lora, state_dict)
        for f in os.listdir(output_dir):
            os.chmod(os.path.join(output_dir, f), 0o600)


def test_final_outputs_get_the_umask_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        result = train(_OwnerOnlySave(), WORLD.pairs(16, seed=4), _cfg(tmp_path))
    finally:
        os.umask(old)
    files = [p for p in result.final_dir.iterdir() if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in files), [
        (p.name, oct(p.stat().st_mode)) for p in files]
    assert stat.S_IMODE((tmp_path / "run" / "config.yaml").stat().st_mode) == 0o644
