"""Two CPU processes (gloo, `accelerate launch --multi_gpu` with ACCELERATE_USE_CPU=true) train to the
same weights as one process with the same global batch (data order, per-sample seeds and schedule are
process-count independent)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

from mm_align.data import write_preferences
from mm_align.synthetic import SyntheticWorld


def _config(tmp: Path, data: Path, name: str, batch_size: int) -> Path:
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
        },
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_two_processes_equal_one(tmp_path):
    data = write_preferences(SyntheticWorld(seed=1234).pairs(256, seed=1), tmp_path / "train.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": "29731"}
    one = subprocess.run(
        [sys.executable, "-m", "mm_align.cli", "train", "--config", str(_config(tmp_path, data, "one", 8))],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "--main_process_port", "29731",
         "-m", "mm_align.cli", "train", "--config", str(_config(tmp_path, data, "two", 4))],
        env={**env, "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    # both ranks really ran (accelerate's own `--cpu --num_processes 2` silently runs a single process)
    assert two.stdout.count("trained 6 steps (0 skipped) on 2 process(es)") == 1, two.stdout
    a = load_file(str(tmp_path / "one" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and a
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # it did train
