"""The training loop's own overhead per step against a bare PyTorch loop (target ≤ 1.05×).

Both loops run the same work on the same model and the same batches: collate the records, the
policy pass with grad, the reference pass under no_grad with LoRA disabled, the DPO (sigmoid)
loss, backward, gradient clipping, AdamW step. The mm-align loop adds what a real run needs
(per-sample seeding, the non-finite guard, metrics, logging every step, the progress bar).
Per-step time = median of the intervals between consecutive steps, after warm-up; the two
loops alternate, several repetitions each, in one process.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mm_align.lora import LoraSettings, add_lora, lora_disabled
from mm_align.reference_cache import sample_seed
from mm_align.run_config import TrainConfig
from mm_align.synthetic import SyntheticAdapter, SyntheticModelConfig, SyntheticWorld
from mm_align.trainer import epoch_batches, train

MODEL = SyntheticModelConfig(dim=64, n_outcomes=512, hidden=1024, depth=4)
BATCH = 128
LR = 1e-4


def _bare_loop(records, steps: int) -> list[float]:
    adapter = SyntheticAdapter(MODEL)
    model = add_lora(adapter.model, LoraSettings(r=8), adapter.lora_target_modules)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=1e-2)
    batches = epoch_batches(len(records), 0, 0, BATCH, 1, 0)
    stamps = []
    for step in range(steps):
        idx = batches[step % len(batches)]
        batch = adapter.collate([records[i] for i in idx], [sample_seed(0, i, 0) for i in idx])
        policy = adapter.scores(batch, model)
        with torch.no_grad(), lora_disabled(model):
            ref = adapter.scores(batch, model)
        delta = (policy.chosen - ref.chosen) - (policy.rejected - ref.rejected)
        loss = -torch.nn.functional.logsigmoid(0.1 * delta).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # a real loop reads the loss every step too
        stamps.append(time.perf_counter())
    return stamps


def _mm_align_loop(records, steps: int, tmp: Path) -> list[float]:
    cfg = TrainConfig(
        output_dir=str(tmp), loss=["sigmoid"], beta=0.1, learning_rate=LR, lr_scheduler="constant",
        max_steps=steps, batch_size=BATCH, checkpointing_steps=10**9, log_every=1, report_to=["none"],
        save_final=False,
    )
    train(SyntheticAdapter(MODEL), records, cfg)
    lines = [json.loads(x) for x in (tmp / "metrics.jsonl").read_text().splitlines()]
    return [x["time"] for x in lines]


def _per_step(stamps: list[float], warmup: int) -> list[float]:
    return [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :])]


def run(quick: bool = False) -> dict:
    torch.manual_seed(0)
    steps, reps, warmup = (12, 1, 2) if quick else (40, 5, 5)
    world = SyntheticWorld(dim=MODEL.dim, n_outcomes=MODEL.n_outcomes, seed=0)
    records = world.pairs(BATCH * 8, seed=1)
    bare, ours = [], []
    with tempfile.TemporaryDirectory() as d:
        for r in range(reps):
            bare += _per_step(_bare_loop(records, steps), warmup)
            ours += _per_step(_mm_align_loop(records, steps, Path(d) / f"run{r}"), warmup)
    bare_med, ours_med = statistics.median(bare), statistics.median(ours)
    ratio = ours_med / bare_med
    md = (
        f"Model: synthetic MLP policy (d={MODEL.dim}, hidden={MODEL.hidden}, depth={MODEL.depth}, "
        f"K={MODEL.n_outcomes}), LoRA r=8, DPO (sigmoid) with the reference pass, batch {BATCH} pairs, "
        f"{reps} alternating repetitions × {steps - warmup - 1} timed steps each.\n\n"
        "| loop | median s/step |\n|---|---|\n"
        f"| bare PyTorch | {bare_med:.4f} |\n| mm-align `train()` (log every step) | {ours_med:.4f} |\n\n"
        f"**Overhead ratio: {ratio:.3f}×** (target ≤ 1.05×) — {'PASS' if ratio <= 1.05 else 'FAIL'}."
    )
    return {
        "benchmark": "loop_overhead",
        "model": vars(MODEL) if hasattr(MODEL, "__dict__") else str(MODEL),
        "batch_pairs": BATCH,
        "timed_steps_per_loop": len(bare),
        "bare_median_s_per_step": bare_med,
        "mm_align_median_s_per_step": ours_med,
        "ratio": ratio,
        "target_ratio": 1.05,
        "pass": ratio <= 1.05,
        "markdown": md,
    }
