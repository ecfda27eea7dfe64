"""``mm-align quickstart --world synthetic``: the core's own toy world, end to end, in seconds on a CPU.

The default quickstart is the shapes world (:mod:`mm_align.image.quickstart`); this one needs no
modality: write preference data from the synthetic world's hidden utility (:mod:`mm_align.synthetic`),
check it with the doctor, train DPO with LoRA through the real loop, measure held-out preference
accuracy of the base and the aligned policy, and write the HTML report.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from mm_align.data import doctor, read_preferences, write_preferences
from mm_align.lora import LoraSettings, lora_disabled
from mm_align.report import ReportSection, write_report
from mm_align.run_config import TrainConfig
from mm_align.synthetic import SyntheticAdapter, SyntheticWorld, preference_accuracy
from mm_align.trainer import train

__all__ = ["run_quickstart"]


def run_quickstart(output_dir: Path, steps: int = 800, seed: int = 0) -> Path:
    """Generate → doctor → train (DPO, LoRA) → held-out accuracy → report; returns the report path."""
    data_dir = output_dir / "data"
    world = SyntheticWorld(seed=1234)
    train_path = write_preferences(world.pairs(4000, seed=1), data_dir / "train.jsonl")
    heldout = world.pairs(1000, seed=2)
    write_preferences(heldout, data_dir / "heldout.jsonl")
    check = doctor(train_path)
    if not check.ok:
        raise ValueError(f"quickstart data failed the doctor:\n{check.table()}")

    adapter = SyntheticAdapter()
    base_acc = preference_accuracy(adapter.model, heldout)
    cfg = TrainConfig(
        output_dir=str(output_dir / "run"),
        loss=["sigmoid"],
        beta=1.0,
        learning_rate=3e-3,
        weight_decay=0.0,
        lora=LoraSettings(r=16),
        lr_scheduler="constant",
        max_steps=steps,
        batch_size=64,
        checkpointing_steps=max(steps // 2, 1),
        log_every=10,
        eval_every=max(steps // 6, 1),
        seed=seed,
        overwrite_output_dir=True,  # its own sub-directory: a second quickstart into output_dir retrains from scratch
    )
    records = read_preferences(train_path).records
    result = train(adapter, records, cfg, eval_records=heldout[:256])
    aligned_acc = preference_accuracy(adapter.model, heldout)
    with lora_disabled(adapter.model):
        base_check = preference_accuracy(adapter.model, heldout)
    summary = {
        "heldout_pairs": len(heldout),
        "base_accuracy": base_acc,
        "aligned_accuracy": aligned_acc,
        "base_accuracy_with_lora_disabled": base_check,
        "steps": result.step,
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in summary.items())
    section = ReportSection(
        "Held-out preference accuracy (synthetic world)",
        "<p>Fraction of held-out pairs where the policy ranks the outcome the hidden utility prefers above the "
        f"other one.</p><table>{rows}</table>",
    )
    return write_report(result.output_dir, sections=[section], title="mm-align quickstart")
