"""Several processes train to the same weights as one process with the same global batch.

Data order, per-sample seeds and the schedule are process-count independent, so a run on N
processes must equal a run on one (≤ 1e-5). Engines that run on this CPU machine:

- DDP through the shipped accelerate config (``mm_align/configs/accelerate/ddp.yaml``) on two gloo
  processes (``ACCELERATE_USE_CPU=true``).
- FSDP2 and DeepSpeed ZeRO-2/3: accelerate routes them to accelerators only (on a CPU it silently falls
  back to DDP, or to one process per rank), while torch's ``fully_shard`` and DeepSpeed's CPU accelerator
  run over gloo; ``tests/distributed/engine_on_cpu.py`` makes accelerate report the engine after it has
  set up gloo, so the trainer goes through accelerate's own preparation, clipping, accumulation and
  state-dict gathering for it. Checked: LoRA with accumulation, exact resume from a sharded checkpoint,
  full fine-tuning with the prepared (sharded) reference copy, the reference cache scored sharded and
  gathered. ZeRO-2 runs the LoRA case only, to keep the suite short (ZeRO-3 shards more and runs all).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from mm_align.data import write_preferences
from mm_align.orchestration import load_run_config, run_training
from mm_align.recipes import accelerate_configs
from mm_align.synthetic import SyntheticWorld


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it), so parallel or repeated runs never collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


HARNESS = Path(__file__).parent / "distributed" / "engine_on_cpu.py"


def _config(tmp: Path, data: Path, name: str, batch_size: int, **train) -> Path:
    cfg = {
        "adapter": "synthetic",
        "model": {"dim": 8, "n_outcomes": 16, "hidden": 32},
        "data": {"train": str(data)},
        "train": {
            "output_dir": str(tmp / name),
            "loss": ["sigmoid"],
            "beta": 0.1,
            "learning_rate": 1e-2,
            "lr_scheduler": "cosine",
            "warmup_steps": 2,
            "max_steps": 6,
            "batch_size": batch_size,
            "gradient_accumulation_steps": 2,
            "checkpointing_steps": 3,
            "log_every": 1,
            "report_to": ["none"],
            "cache_dir": str(tmp / "cache"),
            **train,
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _env(port: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port), "ACCELERATE_USE_CPU": "true"}


def _check(run: subprocess.CompletedProcess) -> None:
    errors = [line for line in run.stderr.splitlines() if "Error" in line or "error:" in line]
    assert run.returncode == 0, f"exit {run.returncode}\n{run.stdout[-2000:]}\n" + "\n".join(errors)[-4000:]
    # both ranks really ran (accelerate's own `--cpu --num_processes 2` silently runs a single process)
    assert run.stdout.count("on 2 process(es)") == 1, run.stdout


def _sharded(engine: str, config: Path, *overrides: str) -> None:
    port = free_port()
    _check(subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(HARNESS), "train", "--config", str(config), *overrides],
        env={**_env(port), "MM_ALIGN_TEST_ENGINE": engine}, capture_output=True, text=True, timeout=300,
    ))


def _one(config: Path, *overrides: str) -> None:
    run_training(load_run_config(config, overrides))


def _max_diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys() and x
    assert all(x[k].shape == y[k].shape for k in x)  # whole tensors, not shards
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_preferences(SyntheticWorld(seed=1234).pairs(256, seed=1), tmp_path_factory.mktemp("d") / "t.jsonl")


def test_ddp_config_two_processes_equal_one(tmp_path, data):
    _one(_config(tmp_path, data, "one", 8))
    port = free_port()
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_configs()["ddp"]),
         "--main_process_port", str(port), "-m", "mm_align.cli", "train", "--config",
         str(_config(tmp_path, data, "two", 4))],
        env=_env(port), capture_output=True, text=True, timeout=300,
    )
    _check(two)
    lora = "final/adapter_model.safetensors"
    assert _max_diff(tmp_path / "one" / lora, tmp_path / "two" / lora) <= 1e-5
    assert any(v.abs().sum() > 0 for k, v in load_file(str(tmp_path / "one" / lora)).items() if "lora_B" in k)


@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
def test_sharded_lora_equals_one_process_and_resumes_exactly(tmp_path, data, engine):
    _one(_config(tmp_path, data, "one", 8))
    _sharded(engine, _config(tmp_path, data, "two", 4))
    lora = "final/adapter_model.safetensors"
    assert _max_diff(tmp_path / "one" / lora, tmp_path / "two" / lora) <= 1e-5
    # the sharded run's checkpoint holds whole tensors, like the one-process run's
    ckpt = "checkpoint-3/model.safetensors"
    assert _max_diff(tmp_path / "one" / ckpt, tmp_path / "two" / ckpt) <= 1e-5
    if engine == "zero2":
        return
    # resume on the same engine from checkpoint-3 (weights, sharded optimiser state, schedule, data position)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "two" / "checkpoint-3", resumed / "checkpoint-3")
    _sharded(engine, _config(tmp_path, data, "resumed", 4, resume_from="latest"))
    assert _max_diff(tmp_path / "two" / lora, resumed / lora) <= 1e-6


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_sharded_full_finetune_with_the_prepared_reference_copy(tmp_path, data, engine):
    kw = {"finetune": "full", "learning_rate": 1e-3}
    _one(_config(tmp_path, data, "one", 8, **kw))
    _sharded(engine, _config(tmp_path, data, "two", 4, **kw))
    weights = "final/model.safetensors"
    assert _max_diff(tmp_path / "one" / weights, tmp_path / "two" / weights) <= 1e-5


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_sharded_reference_cache_is_scored_across_processes_and_gathered(tmp_path, data, engine):
    _one(_config(tmp_path, data, "one", 8))  # live reference
    _sharded(engine, _config(tmp_path, data, "two", 4, precompute_reference=True))
    lora = "final/adapter_model.safetensors"
    assert _max_diff(tmp_path / "one" / lora, tmp_path / "two" / lora) <= 1e-5
    caches = list((tmp_path / "cache").glob("ref-*.safetensors"))
    assert len(caches) == 1
    sharded_cache = load_file(str(caches[0]))
    caches[0].unlink()
    _one(_config(tmp_path, data, "three", 8, precompute_reference=True))  # the same cache, one process
    single = load_file(str(next((tmp_path / "cache").glob("ref-*.safetensors"))))
    assert sharded_cache.keys() == single.keys()
    assert all((sharded_cache[k] - single[k]).abs().max() <= 1e-6 for k in single)
    assert single["chosen"].shape == (256,)


@pytest.mark.parametrize("name, stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_configs_parse_into_accelerates_plugin(name, stage):
    cfg = yaml.safe_load(accelerate_configs()[name].read_text())
    assert cfg["distributed_type"] == "DEEPSPEED"
    assert cfg["deepspeed_config"]["zero_stage"] == stage
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(accelerate_configs()[name]))
    assert loaded.deepspeed_config["zero_stage"] == stage


def test_fsdp_version_1_is_refused_with_the_fix_named():
    from accelerate.utils import DistributedType

    from mm_align.distributed import check_engine

    class _Acc:
        distributed_type = DistributedType.FSDP
        is_fsdp2 = False

    with pytest.raises(ValueError, match="fsdp_version: 2"):
        check_engine(_Acc())


def test_an_adapter_with_its_own_parameter_state_is_refused_under_sharding():
    from accelerate.utils import DistributedType

    from mm_align.distributed import check_engine

    class _Acc:
        distributed_type = DistributedType.DEEPSPEED
        is_fsdp2 = False

    class _WithEMA:
        def state_dict(self):
            return {}

        def after_optimizer_step(self, model):
            pass

    with pytest.raises(ValueError, match=r"_WithEMA keeps its own state.*deepspeed would shard: train it with DDP"):
        check_engine(_Acc(), _WithEMA())
    check_engine(_Acc(), object())  # an adapter without such state is fine
