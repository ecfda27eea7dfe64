"""benchmarks/image_step.py on the flow adapters: each step variant runs once on the tiny SD3-type and FLUX-type
sizes through ``FlowMatchingAdapter.scores`` + ``compute_loss`` (the shipped recipes' losses), and the GPU sizes
(SD3-medium, FLUX.1-dev configs) build, LoRA and run forward + backward on the ``meta`` device.

Imported the way ``benchmarks/run.py`` imports a benchmark: ``benchmarks/`` on ``sys.path`` (appended), then by
name. No timing is asserted.
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.append(str(BENCHMARKS))

image_step = importlib.import_module("image_step")

LN2 = math.log(2)


@pytest.mark.parametrize("size", ["sd3_small", "flux_small"])
def test_each_variant_runs_one_step(tmp_path, size):
    """Step 0 is policy = reference (LoRA B = 0): Flow-DPO is ln 2 with the live and with the cached reference;
    every variant's loss is finite and the LoRA moves."""
    bench = image_step.Bench(image_step.SIZES[size], torch.device("cpu"), tmp_path)
    assert bench.adapter.family == image_step.SIZES[size].family
    assert bench.losses["dpo"][0] == ["diffusion_dpo"] and bench.losses["mapo"][0] == ["mapo"]
    lora = {n: p.detach().clone() for n, p in bench.model.named_parameters() if p.requires_grad}
    assert bench.step("dpo") == pytest.approx(LN2, abs=1e-6)
    assert bench.dpo_cached_ref() != pytest.approx(LN2, abs=1e-9)  # the first step moved the policy off the cache
    for variant in image_step.VARIANTS:
        assert math.isfinite(bench.step(variant)), variant
    moved = [n for n, p in bench.model.named_parameters() if p.requires_grad and not torch.equal(p, lora[n])]
    assert moved


def test_cached_reference_is_the_base_at_step_zero(tmp_path):
    bench = image_step.Bench(image_step.SIZES["sd3_small"], torch.device("cpu"), tmp_path)
    assert bench.step("dpo_cached_ref") == pytest.approx(LN2, abs=1e-6)


@pytest.mark.parametrize("size, parameters", [("sd3", 2.03e9), ("flux", 11.9e9)])
def test_gpu_sizes_build_and_run_on_meta(tmp_path, size, parameters):
    """SD3-medium's and FLUX.1-dev's transformer configs at full size, LoRA r 64, gradient checkpointing, the
    1024 px batch: forward, the Flow-DPO loss and backward run on ``meta`` (shapes only, no memory)."""
    bench = image_step.Bench(image_step.SIZES[size], torch.device("meta"), tmp_path)
    assert bench.params == pytest.approx(parameters, rel=0.01)
    assert bench.cached_ref.chosen.shape == (1,)
    loss = bench._loss("dpo", bench._policy(), bench.cached_ref)
    loss.backward()
    assert loss.shape == () and all(p.grad is not None for p in bench.trainable[:4])
