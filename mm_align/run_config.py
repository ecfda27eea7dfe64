"""The configuration of a training run: what to train (adapter + model), on what (data), how (train)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mm_align.config import option
from mm_align.lora import LoraSettings

__all__ = ["TrainConfig", "DataConfig", "RunConfig"]


@dataclass
class TrainConfig:
    """How to train: loss, optimisation, precision, checkpoints, logging (one section of a run YAML)."""

    output_dir: str = option("runs/run", help="Where checkpoints, metrics, the resolved config and the report go.")
    loss: list[str] = option(default_factory=lambda: ["sigmoid"], help="Loss name(s); several = a weighted mixture.")
    loss_weights: list[float] | None = option(None, help="One weight per loss (default 1.0 each).")
    beta: float | None = option(None, help="The loss's β; None = the paper default of each loss.")
    loss_params: dict[str, Any] = option(
        default_factory=dict, help="Loss-specific parameters (e.g. label_smoothing, lambda_d, s)."
    )
    finetune: Literal["lora", "full"] = option(
        "lora", help="lora: reference = adapters disabled; full: a frozen reference copy."
    )
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "LoRA settings (finetune=lora)."})
    learning_rate: float = option(1e-5, help="Peak learning rate (AdamW).")
    weight_decay: float = option(1e-2, help="AdamW weight decay.")
    adam_beta1: float = option(0.9, help="AdamW β1.")
    adam_beta2: float = option(0.999, help="AdamW β2.")
    adam_epsilon: float = option(1e-8, help="AdamW ε.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = option(
        "constant_with_warmup", help="Learning-rate schedule (transformers.get_scheduler)."
    )
    warmup_steps: int = option(0, help="Linear warm-up steps.")
    max_steps: int = option(1000, help="Optimiser steps to train for (epochs repeat as needed).")
    batch_size: int = option(4, help="Pairs (or unpaired samples) per process per micro-batch.")
    gradient_accumulation_steps: int = option(1, help="Micro-batches per optimiser step.")
    max_grad_norm: float | None = option(1.0, help="Clip the gradient norm to this; None = no clipping.")
    mixed_precision: Literal["no", "fp16", "bf16"] = option("no", help="Autocast precision (accelerate).")
    seed: int = option(0, help="Seeds the data order, every per-sample draw (noise, t, masks) and the init.")
    sample_seeds: Literal["per_epoch", "fixed"] = option(
        "per_epoch",
        help="per_epoch: a sample's random draw (noise, t) changes each epoch; fixed: the same draw every epoch "
        "(one reference cache for all epochs).",
    )
    precompute_reference: bool = option(False, help="Compute reference scores once and cache them on disk.")
    cache_dir: str | None = option(None, help="Reference-score cache; None = $MM_ALIGN_CACHE or ~/.cache/mm_align.")
    checkpointing_steps: int = option(500, help="Save checkpoint-N every this many steps (and at the end).")
    checkpoints_total_limit: int | None = option(3, help="Keep only the newest k checkpoints; None = keep all.")
    resume_from: str | None = option(
        None,
        help="'latest' or a checkpoint directory to resume exactly from. 'latest' in a directory that holds no "
        "checkpoint starts fresh when the directory is empty or absent, and is refused like a fresh run when it "
        "holds other files (see overwrite_output_dir).",
    )
    overwrite_output_dir: bool = option(
        False,
        help="A fresh run (no resume_from, or resume_from=latest finding no checkpoint) refuses an output_dir "
        "that exists and is not empty, so an earlier run's checkpoints, metrics.jsonl and final/ are never "
        "overwritten, pruned or resumed by mistake; true deletes everything in output_dir first and trains "
        "from scratch. Ignored when resuming from a checkpoint.",
    )
    log_every: int = option(10, help="Log averaged metrics every this many steps.")
    report_to: list[str] = option(default_factory=lambda: ["tensorboard"], help="tensorboard, wandb or none.")
    run_name: str | None = option(None, help="Run name for trackers.")
    eval_every: int | None = option(None, help="Evaluate the loss metrics on the eval data every this many steps.")
    max_consecutive_nonfinite: int = option(
        5, help="Stop (NonFiniteLossError) after this many steps in a row with a non-finite loss or gradient."
    )
    max_skipped_fraction: float | None = option(
        0.05,
        help="At the end of training, fail (NonFiniteLossError, listing the records of every skipped step) when "
        "the skipped steps are more than this share of all attempted steps (skipped / (max_steps + skipped)); "
        "final/ is then not written, the last checkpoint is kept. None = never.",
    )
    divergence_factor: float = option(
        1e3,
        help="A step diverges when |loss| > divergence_factor × max(|loss of the run's first step|, 1). The first "
        "step is computed before any update (with LoRA it is the reference's loss, ln 2 for DPO-type losses), so "
        "the rule reads a rise from the start; the floor of 1 keeps losses that start near 0 from firing.",
    )
    divergence_update_ratio: float = option(
        1.0,
        help="A step also diverges when it changes the norm of the trainable weights by more than this share of "
        "the norm before it: |‖θ_t‖ − ‖θ_t−1‖| / ‖θ_t−1‖ > divergence_update_ratio. That change is a lower bound on "
        "the relative update ‖Δθ‖/‖θ‖ (triangle inequality) and costs one norm per step; a healthy step moves it "
        "by well under 1%. It catches an exploding update (e.g. a learning rate of 1e6) at the step that makes it, "
        "before the loss shows it.",
    )
    divergence_patience: int | None = option(
        3,
        help="Warn at each diverged step; stop (DivergenceError, naming the last checkpoint written before the "
        "divergence) after this many diverged steps in a row. A diverged step writes no periodic checkpoint, so "
        "keep-last-k never prunes a good one for it. None or 0 = no divergence check.",
    )
    num_workers: int = option(0, help="DataLoader worker processes for collation.")
    save_final: bool = option(True, help="Write the trained weights in the backbone's own format at the end.")

    def __post_init__(self) -> None:
        if not self.loss:
            raise ValueError("loss must name at least one loss")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss):
            raise ValueError(f"loss_weights has {len(self.loss_weights)} entries for {len(self.loss)} losses")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpointing_steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError("checkpoints_total_limit must be >= 1 or null")
        if self.max_consecutive_nonfinite < 1:
            raise ValueError("max_consecutive_nonfinite must be >= 1")
        if self.max_skipped_fraction is not None and not 0.0 <= self.max_skipped_fraction <= 1.0:
            raise ValueError(f"max_skipped_fraction must be in [0, 1] or null, got {self.max_skipped_fraction}")
        if not self.divergence_factor > 1.0:
            raise ValueError(f"divergence_factor must be > 1, got {self.divergence_factor}")
        if not self.divergence_update_ratio > 0.0:
            raise ValueError(f"divergence_update_ratio must be > 0, got {self.divergence_update_ratio}")
        if self.divergence_patience is not None and self.divergence_patience < 0:
            raise ValueError(f"divergence_patience must be >= 0 or null, got {self.divergence_patience}")


@dataclass
class DataConfig:
    """Which preference data to read and how."""

    train: str = option("", help="Training data: a jsonl file, parquet file/shard dir, or an HF dataset on disk.")
    eval: str | None = option(None, help="Held-out data for eval metrics.")
    format: str = option("auto", help="auto, jsonl, parquet, hf, or a format the adapter reads (e.g. pickapic).")
    columns: dict[str, str] = option(default_factory=dict, help="Column renames, e.g. {prompt: caption}.")
    strict: bool = option(False, help="Stop at the first bad row instead of skipping and counting it.")
    max_samples: int | None = option(None, help="Use only the first N records (after skipping bad rows).")
    options: dict[str, Any] = option(
        default_factory=dict,
        help="Keyword options for an adapter's own format reader (e.g. the caption perturber of format=captions).",
    )


@dataclass
class RunConfig:
    """A whole training run: ``mm-align train --config run.yaml key=value ...``."""

    adapter: str = option("synthetic", help="The modality adapter (mm-align ls lists them).")
    model: dict[str, Any] = option(default_factory=dict, help="The adapter's own settings (validated by it).")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Preference data."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Training settings."})
