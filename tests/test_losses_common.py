"""The helpers every loss family shares live in one public module, and both families use those."""

from __future__ import annotations

import pytest
import torch

from mm_align.losses import common, diffusion, registry, sequence


@pytest.mark.parametrize(("dtype", "expected"), [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                                 (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_upcast_keeps_at_least_float32_and_the_gradient(dtype, expected):
    x = torch.tensor([1.5, -2.0], dtype=dtype, requires_grad=True)
    y = common.upcast(x)
    assert y.dtype == expected
    y.sum().backward()
    assert x.grad is not None and torch.equal(x.grad.float(), torch.ones(2))


def test_both_loss_families_use_the_shared_helpers():
    for name in ("check_scores", "kto_core", "kto_reference_point", "masked_mean"):
        assert getattr(diffusion, name) is getattr(common, name)
        assert getattr(sequence, name) is getattr(common, name)
    assert registry.check_scores is common.check_scores
    assert diffusion.tie_half_accuracy is common.tie_half_accuracy  # still importable where it was
    assert not hasattr(diffusion, "_up")
