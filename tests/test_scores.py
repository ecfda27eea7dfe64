"""Score helpers: summed response log-probs (masking, shift, ignored labels) and the denoising error
reduced over every non-batch dim. Expected values are worked out by hand in the docstrings."""

from __future__ import annotations

import math

import pytest
import torch

from mm_align.scores import denoising_error, mean_sequence_logps, sequence_logps

LN2, LN3 = math.log(2.0), math.log(3.0)

# One sequence, T = 4 positions, vocab of 3 tokens. Rows of logits:
#   t=0: [5, −5, 0]          (a prompt position: must not count)
#   t=1: [0, ln 2, 0]        → probs [1/4, 1/2, 1/4]
#   t=2: [0, 0, 0]           → probs [1/3, 1/3, 1/3]
#   t=3: [ln 3, 0, 0]        → probs [3/5, 1/5, 1/5]
LOGITS = torch.tensor([[[5.0, -5.0, 0.0], [0.0, LN2, 0.0], [0.0, 0.0, 0.0], [LN3, 0.0, 0.0]]])
LABELS = torch.tensor([[2, 0, 1, 1]])
MASK = torch.tensor([[0, 0, 1, 1]])  # the first two tokens are the prompt


def test_shifted_logps_mask_out_the_prompt():
    """shift: logits[t] predicts labels[t+1] under mask[t+1] = [0, 1, 1]:
    t=0 → label 0 masked; t=1 → label 1: log(1/2); t=2 → label 1: log(1/3). Sum = −ln 6, 2 tokens.
    Unmasked it would add log p(label 0 | t=0) = 5 − log(e^5 + e^−5 + 1) = −0.0067837."""
    logp, n = sequence_logps(LOGITS, LABELS, MASK)
    assert logp.shape == (1,) and n.shape == (1,)
    assert logp.item() == pytest.approx(-math.log(6.0), abs=1e-6)
    assert n.item() == 2.0
    assert logp.dtype == torch.float32 and n.dtype == torch.float32
    everything, n_all = sequence_logps(LOGITS, LABELS, torch.ones_like(MASK))
    assert n_all.item() == 3.0
    assert everything.item() == pytest.approx(-math.log(6.0) + 5 - math.log(math.exp(5) + math.exp(-5) + 1), abs=1e-6)
    assert mean_sequence_logps(LOGITS, LABELS, MASK).item() == pytest.approx(-math.log(6.0) / 2, abs=1e-6)


def test_unshifted_logps():
    """shift=False: logits[t] scores labels[t] under mask[t] = [0, 0, 1, 1]:
    t=2 → label 1: log(1/3); t=3 → label 1: log(1/5). Sum = −ln 15."""
    logp, n = sequence_logps(LOGITS, LABELS, MASK, shift=False)
    assert logp.item() == pytest.approx(-math.log(15.0), abs=1e-6)
    assert n.item() == 2.0


def test_ignored_label_ids_under_mask_zero_are_fine():
    """Labels −100 (and an id past the vocab) at masked positions contribute exactly 0, even where the
    logit row makes that position −inf; the gradient stays finite."""
    labels = torch.tensor([[-100, -100, 1, 1]])
    logp, n = sequence_logps(LOGITS, labels, MASK)
    assert logp.item() == pytest.approx(-math.log(6.0), abs=1e-6) and n.item() == 2.0
    labels = torch.tensor([[7, 99, 1, 1]])
    logits = LOGITS.clone()
    logits[0, 0] = torch.tensor([-math.inf, 0.0, 0.0])  # label at t=1 would be token 0: log p = −inf
    logits.requires_grad_(True)
    logp, _ = sequence_logps(logits, torch.tensor([[7, 0, 1, 1]]), MASK)
    assert logp.item() == pytest.approx(-math.log(6.0), abs=1e-6)
    logp.sum().backward()
    assert torch.isfinite(logits.grad).all()
    logp, _ = sequence_logps(LOGITS, labels, MASK)
    assert logp.item() == pytest.approx(-math.log(6.0), abs=1e-6)


def test_batch_and_bfloat16_logits():
    """Two rows: the hand example, and the same with a full mask on the response only at t=3 (−ln 5 unshifted
    … shifted: mask[1:] = [0, 0, 1] → t=2 predicts label 1: −ln 3). bfloat16 logits are scored in float32."""
    logits = torch.cat([LOGITS, LOGITS]).bfloat16()
    labels = torch.cat([LABELS, LABELS])
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]])
    logp, n = sequence_logps(logits, labels, mask)
    assert logp.dtype == torch.float32
    assert logp.tolist() == pytest.approx([-math.log(6.0), -LN3], abs=2e-2)  # bf16 rounding of ln 2, ln 3
    assert n.tolist() == [2.0, 1.0]


def test_empty_response_gives_zero_not_nan():
    logp, n = sequence_logps(LOGITS, LABELS, torch.zeros_like(MASK))
    assert logp.item() == 0.0 and n.item() == 0.0
    assert mean_sequence_logps(LOGITS, LABELS, torch.zeros_like(MASK)).item() == 0.0


def test_sequence_logps_shape_errors():
    with pytest.raises(ValueError, match="logits .*labels .*mask"):
        sequence_logps(LOGITS, LABELS[:, :3], MASK)
    with pytest.raises(ValueError, match="logits"):
        sequence_logps(LOGITS[0], LABELS, MASK)


def test_denoising_error_4d_is_the_mean_over_c_h_w():
    """(2, 3, 4, 5): err[b] = Σ_{c,h,w} (p − t)² / 60."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)
    e = denoising_error(pred, target)
    assert e.shape == (2,) and e.dtype == torch.float32
    manual = [sum(float(x) ** 2 for x in (pred[b] - target[b]).flatten()) / 60 for b in range(2)]
    assert e.tolist() == pytest.approx(manual, rel=1e-5)


def test_denoising_error_5d_video_reduces_every_dim_including_frames():
    """(B, C, F, H, W) = (2, 3, 4, 2, 2): err[b] = Σ over c, f, h, w / 48. Frames get different error
    magnitudes, so a per-frame mean over only (C, H, W) (the known defect of reshaping (B, C, F, H, W) to
    (B·F, C, H, W)) differs."""
    g = torch.Generator().manual_seed(1)
    target = torch.randn(2, 3, 4, 2, 2, generator=g)
    frame_scale = torch.tensor([0.1, 1.0, 2.0, 3.0]).view(1, 1, 4, 1, 1)
    pred = target + frame_scale * torch.randn(2, 3, 4, 2, 2, generator=g)
    e = denoising_error(pred, target)
    assert e.shape == (2,)
    manual = [sum(float(x) ** 2 for x in (pred[b] - target[b]).flatten()) / 48 for b in range(2)]
    assert e.tolist() == pytest.approx(manual, rel=1e-5)
    # the defect: frames folded into the batch, mean over (C, H, W) only → one number per (b, frame)
    wrong = (pred - target).pow(2).permute(0, 2, 1, 3, 4).reshape(2 * 4, 3, 2, 2).mean(dim=(1, 2, 3))  # (B·F,)
    assert wrong.shape == (8,)
    assert not torch.allclose(e, wrong[::4])  # taking frame 0 of each sample as "the" error is wrong
    assert torch.allclose(e, wrong.view(2, 4).mean(1))  # the full mean is the mean of the per-frame means


def test_denoising_error_any_ndim_and_half_precision():
    """(3, 7): mean over the one non-batch dim; float16 inputs give float32."""
    pred, target = torch.ones(3, 7, dtype=torch.float16), torch.zeros(3, 7, dtype=torch.float16)
    pred[1] = 3.0
    e = denoising_error(pred, target)
    assert e.dtype == torch.float32 and e.tolist() == [1.0, 9.0, 1.0]


def test_denoising_error_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 3, 4, 5\)"):
        denoising_error(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match="batch dim"):
        denoising_error(torch.zeros(3), torch.zeros(3))
