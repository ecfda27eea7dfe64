"""Score helpers: summed response log-probs (masking, shift, ignored labels), over several codebooks, and
the denoising error reduced over every non-batch dim, also over the valid elements of padded latents.
Expected values are worked out by hand in the docstrings."""

from __future__ import annotations

import math

import pytest
import torch

from mm_align.scores import (
    denoising_error,
    masked_denoising_error,
    mean_sequence_logps,
    multi_codebook_logps,
    sequence_logps,
)

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


# ---- masked_denoising_error ---------------------------------------------------------------------------


def test_masked_error_audio_hand_computed():
    """Audio (B, C, T) = (2, 2, 3), target 0, mask (B, T) over time:
    sample 0, valid t = 0, 1: ch0 [1, 2 | 100], ch1 [3, 0 | 100] → (1 + 4 + 9 + 0) / 4 = 3.5;
    sample 1, valid t = 0:    ch0 [2 | 5, 5],   ch1 [4 | 5, 5]   → (4 + 16) / 2 = 10."""
    pred = torch.tensor([[[1.0, 2.0, 100.0], [3.0, 0.0, 100.0]], [[2.0, 5.0, 5.0], [4.0, 5.0, 5.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    e = masked_denoising_error(pred, torch.zeros_like(pred), mask)
    assert e.dtype == torch.float32 and e.shape == (2,)
    assert e.tolist() == [3.5, 10.0]
    # the same mask in the full layout, and with the channel dim broadcast: the same numbers
    full = mask[:, None, :].expand(2, 2, 3)
    assert masked_denoising_error(pred, torch.zeros_like(pred), full).tolist() == [3.5, 10.0]
    assert masked_denoising_error(pred, torch.zeros_like(pred), mask[:, None, :].bool()).tolist() == [3.5, 10.0]


def test_masked_error_video_frames_hand_computed():
    """Video (B, C, F, H, W) = (1, 1, 3, 1, 2), mask (B, F) = [[1, 0, 1]] over frames:
    frames [1, 1], [7, 7] (padding), [3, 1] → (1 + 1 + 9 + 1) / 4 = 3. A (B, F, H, W) mask that also drops
    the element 3 of frame 2 → (1 + 1 + 1) / 3 = 1; a full (B, C, F, H, W) mask of one element [f0, w1] → 1."""
    pred = torch.tensor([1.0, 1.0, 7.0, 7.0, 3.0, 1.0]).view(1, 1, 3, 1, 2)
    target = torch.zeros_like(pred)
    assert masked_denoising_error(pred, target, torch.tensor([[1, 0, 1]])).tolist() == [3.0]
    per_element = torch.tensor([[1, 1], [0, 0], [0, 1]]).view(1, 3, 1, 2)  # (B, F, H, W)
    assert masked_denoising_error(pred, target, per_element).tolist() == [1.0]
    one = torch.zeros(1, 1, 3, 1, 2, dtype=torch.bool)
    one[0, 0, 0, 0, 1] = True
    assert masked_denoising_error(pred, target, one).tolist() == [1.0]
    # a (B,) mask keeps whole samples: the plain error (1 + 1 + 49 + 49 + 9 + 1) / 6 = 110 / 6
    assert masked_denoising_error(pred, target, torch.ones(1)).item() == pytest.approx(110 / 6)


def test_masked_error_all_ones_equals_denoising_error_exactly():
    """All-valid masks of every accepted layout give denoising_error bit for bit (also from float16)."""
    g = torch.Generator().manual_seed(3)
    for shape, mask_shape in [
        ((3, 4, 17), (3, 17)),
        ((3, 4, 17), (3, 4, 17)),
        ((3, 4, 17), (3, 1, 17)),
        ((2, 3, 5, 7, 9), (2, 5)),
        ((2, 3, 5, 7, 9), (2, 5, 7, 9)),
        ((2, 3, 5, 7, 9), (2,)),
        ((4, 1000), (4,)),
    ]:
        pred, target = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
        for dtype in (torch.float32, torch.float16):
            p, t = pred.to(dtype), target.to(dtype)
            assert torch.equal(masked_denoising_error(p, t, torch.ones(mask_shape)), denoising_error(p, t)), shape
        assert torch.equal(
            masked_denoising_error(pred, target, torch.ones(mask_shape, dtype=torch.bool)),
            denoising_error(pred, target),
        )


def test_masked_error_makes_clips_of_different_length_comparable():
    """Two clips with the same per-step error (1.0) but lengths 8 and 2, padded (with exact zeros in
    prediction and target) to T = 8: the masked error is 1.0 for both; the unmasked mean dilutes the short one
    to 2/8 = 0.25."""
    target = torch.zeros(2, 3, 8)
    pred = torch.ones(2, 3, 8)
    pred[1, :, 2:] = 0.0  # padding of the short clip
    mask = torch.zeros(2, 8)
    mask[0], mask[1, :2] = 1, 1
    assert masked_denoising_error(pred, target, mask).tolist() == [1.0, 1.0]
    assert denoising_error(pred, target).tolist() == [1.0, 0.25]


def test_masked_error_gradient_only_through_valid_elements():
    """NaN / inf in the padding: the error stays finite, the gradient there is exactly 0, and at a valid
    element it is 2·(p − t) / n_valid."""
    pred = torch.tensor([[[1.0, 2.0, math.nan], [3.0, -1.0, math.inf]]], requires_grad=True)  # (1, 2, 3)
    target = torch.zeros(1, 2, 3)
    e = masked_denoising_error(pred, target, torch.tensor([[1, 1, 0]]))
    assert e.item() == pytest.approx((1 + 4 + 9 + 1) / 4)
    e.sum().backward()
    assert pred.grad[..., 2].tolist() == [[0.0, 0.0]]
    assert torch.allclose(pred.grad[..., :2], torch.tensor([[[0.5, 1.0], [1.5, -0.5]]]))  # 2·x / 4


def test_masked_error_sample_without_valid_elements_raises():
    pred = torch.ones(3, 2, 4)
    mask = torch.ones(3, 4)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\].*no valid element"):
        masked_denoising_error(pred, torch.zeros_like(pred), mask)


def test_masked_error_shape_errors_name_both_shapes():
    video = torch.zeros(2, 3, 4, 5, 5)
    with pytest.raises(ValueError, match=r"mask of shape \(2, 3\).*prediction \(2, 3, 4, 5, 5\)"):
        masked_denoising_error(video, video, torch.ones(2, 3))  # (B, C) is not a mask: S aligns with F = 4
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(2, 3, 4, 5, 5\)"):
        masked_denoising_error(video, video, torch.ones(3, 4))  # batch mismatch
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 5, 5, 1\).*\(2, 3, 4, 5, 5\)"):
        masked_denoising_error(video, video, torch.ones(2, 3, 4, 5, 5, 1))
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 3, 4, 5\)"):
        masked_denoising_error(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5), torch.ones(2, 4))
    with pytest.raises(ValueError, match="batch dim"):
        masked_denoising_error(torch.zeros(3), torch.zeros(3), torch.ones(3))


# ---- multi_codebook_logps -----------------------------------------------------------------------------


def test_multi_codebook_docstring_example():
    """B = 1, K = 2, T = 2, V = 2, shift=False, mask (B, T) = [[1, 1]]:
    codebook 0: logits [0, 0] label 0 → ln ½; [ln 3, 0] label 0 → ln ¾;
    codebook 1: logits [0, ln 3] label 1 → ln ¾; [0, 0] label 1 → ln ½.  logp = 2·ln(3/8), 4 tokens."""
    logits = torch.tensor([[[[0.0, 0.0], [LN3, 0.0]], [[0.0, LN3], [0.0, 0.0]]]])  # (1, 2, 2, 2)
    labels = torch.tensor([[[0, 0], [1, 1]]])
    logp, n = multi_codebook_logps(logits, labels, torch.tensor([[1, 1]]), shift=False)
    assert logp.dtype == torch.float32 and n.dtype == torch.float32
    assert logp.item() == pytest.approx(2 * math.log(3 / 8), abs=1e-6)
    assert n.item() == 4.0


def test_multi_codebook_shifted_hand_computed():
    """K = 2, T = 3, V = 3, shift=True, a per-codebook mask [[0, 1, 1], [0, 1, 0]]; logits[:, k, t] predicts
    labels[:, k, t + 1]:
    codebook 0: t=0 → label 0 under [5, −5, 0]: 5 − log(e⁵ + e⁻⁵ + 1); t=1 → label 1 under [0, ln 2, 0]: ln ½;
    codebook 1: t=0 → label 0 under [ln 3, 0, 0]: ln(3/5); t=1 → label 2 masked (0 whatever its row).
    The last step's logits (t=2) predict nothing."""
    logits = torch.tensor(
        [
            [
                [[5.0, -5.0, 0.0], [0.0, LN2, 0.0], [9.0, 9.0, 9.0]],
                [[LN3, 0.0, 0.0], [-math.inf, 0.0, 0.0], [1.0, 2.0, 3.0]],
            ]
        ]
    )  # (1, 2, 3, 3)
    labels = torch.tensor([[[2, 0, 1], [-100, 0, 2]]])
    mask = torch.tensor([[[0, 1, 1], [0, 1, 0]]])
    logp, n = multi_codebook_logps(logits, labels, mask, shift=True)
    expected = 5 - math.log(math.exp(5) + math.exp(-5) + 1) - LN2 + math.log(3 / 5)
    assert logp.item() == pytest.approx(expected, abs=1e-6)
    assert n.item() == 3.0


def test_multi_codebook_equals_sequence_logps_on_the_flattened_codebooks():
    """(B, K, T, V) scored as B·K sequences of (T, V) and summed over K; masks (B, K, T) and (B, T); both shifts;
    K = 1 is sequence_logps itself."""
    g = torch.Generator().manual_seed(0)
    b, k, t, v = 3, 4, 6, 11
    logits = torch.randn(b, k, t, v, generator=g)
    labels = torch.randint(v, (b, k, t), generator=g)
    for mask in (torch.rand(b, k, t, generator=g) > 0.4, torch.rand(b, t, generator=g) > 0.4):
        full = mask if mask.ndim == 3 else mask[:, None, :].expand(b, k, t)  # (B, K, T)
        for shift in (True, False):
            logp, n = multi_codebook_logps(logits, labels, mask, shift=shift)
            ref, ref_n = sequence_logps(
                logits.reshape(b * k, t, v), labels.reshape(b * k, t), full.reshape(b * k, t), shift=shift
            )  # (B·K,)
            assert torch.allclose(logp, ref.view(b, k).sum(1), atol=1e-5)
            assert torch.equal(n, ref_n.view(b, k).sum(1))
    one, n1 = multi_codebook_logps(logits[:, :1], labels[:, :1], torch.ones(b, t), shift=True)
    seq, ns = sequence_logps(logits[:, 0], labels[:, 0], torch.ones(b, t), shift=True)
    assert torch.equal(one, seq) and torch.equal(n1, ns)


def test_multi_codebook_masked_positions_get_no_gradient():
    """shift=False: only the logit rows of scored (k, t) get a gradient; masked labels may be −100 or past V."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 2, 3, 5, generator=g).bfloat16().requires_grad_(True)
    labels = torch.tensor([[[1, -100, 2], [4, 99, 0]], [[0, 1, 2], [3, 4, 0]]])
    mask = torch.tensor([[[1, 0, 1], [1, 0, 1]], [[0, 0, 0], [0, 1, 0]]])
    logp, n = multi_codebook_logps(logits, labels, mask, shift=False)
    assert logp.dtype == torch.float32 and n.tolist() == [4.0, 1.0]
    logp.sum().backward()
    has_grad = logits.grad.float().abs().sum(-1) > 0  # (B, K, T)
    assert torch.equal(has_grad, mask.bool())
    empty, n0 = multi_codebook_logps(logits, labels, torch.zeros(2, 3), shift=False)
    assert empty.tolist() == [0.0, 0.0] and n0.tolist() == [0.0, 0.0]


def test_multi_codebook_shape_errors():
    logits, labels = torch.zeros(2, 4, 6, 5), torch.zeros(2, 4, 6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"logits \(2, 4, 6, 5\), labels \(2, 4, 6\), mask \(2, 4\)"):
        multi_codebook_logps(logits, labels, torch.ones(2, 4), shift=True)  # (B, K) is not (B, T)
    with pytest.raises(ValueError, match="labels"):
        multi_codebook_logps(logits, labels[:, :3], torch.ones(2, 6), shift=True)
    with pytest.raises(ValueError, match=r"\(B, K, T, V\)"):
        multi_codebook_logps(logits[0], labels[0], torch.ones(4, 6), shift=True)
