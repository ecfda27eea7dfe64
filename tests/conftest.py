"""Test-wide settings: no network (an accidental download fails fast), no trackers, few threads; and
:func:`small_train_config`, the small training config the trainer tests share."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mm_align.run_config import TrainConfig

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("MM_ALIGN_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), "mm_align_test_cache"))


def small_train_config(tmp_path: Path, *, max_steps: int, checkpointing_steps: int, **overrides: Any) -> TrainConfig:
    """A short sigmoid-DPO run writing under ``tmp_path``: ``run/`` (output) and ``cache/``.

    β 0.1, learning rate 1e-2 (constant), batch 8, a metrics row every step, no trackers. A test module binds its
    own ``max_steps`` and ``checkpointing_steps`` (``functools.partial``); ``overrides`` (any ``TrainConfig``
    field, these two included) win.
    """
    from mm_align.run_config import (
        TrainConfig,  # here, not at the top: it imports huggingface_hub, after the env above
    )

    base = dict(
        output_dir=str(tmp_path / "run"),
        loss=["sigmoid"],
        beta=0.1,
        learning_rate=1e-2,
        lr_scheduler="constant",
        max_steps=max_steps,
        batch_size=8,
        checkpointing_steps=checkpointing_steps,
        log_every=1,
        report_to=["none"],
        cache_dir=str(tmp_path / "cache"),
    )
    base.update(overrides)
    return TrainConfig(**base)
