"""Score helpers: the per-sample numbers every preference loss compares.

Token models: the SUM of the response tokens' log-probabilities (prompt and image tokens
excluded by the mask). Diffusion / flow models: the denoising error averaged over EVERY non-batch
dimension (C×H×W for images, C×F×H×W for video) — reducing over only some dims is a known defect.
"""

from __future__ import annotations

import torch

__all__ = ["sequence_logps", "mean_sequence_logps", "denoising_error"]


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, shift: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probability ``log π(y | x) = Σ_t mask_t · log p(y_t | y_<t, x)`` (DPO, eq. 7 inputs).

    Args:
        logits: ``(B, T, V)`` next-token logits.
        labels: ``(B, T)`` token ids (any value, e.g. −100, where ``mask`` is 0).
        mask: ``(B, T)`` 1 on response tokens.
        shift: when True, ``logits[:, t]`` predicts ``labels[:, t + 1]`` (causal LM layout).

    Returns:
        ``(logp (B,), n_tokens (B,))`` in float32.
    """
    if shift:
        logits, labels, mask = logits[:, :-1], labels[:, 1:], mask[:, 1:]
    mask = mask.to(torch.float32)
    safe = torch.where(mask.bool(), labels, torch.zeros_like(labels))  # masked ids may be out of range
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (logp * mask).sum(-1), mask.sum(-1)


def mean_sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, shift: bool = True
) -> torch.Tensor:
    """Token-averaged response log-probability (IPO's length-normalised ``log π``)."""
    total, n = sequence_logps(logits, labels, mask, shift)
    return total / n.clamp(min=1)


def denoising_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``err = mean over every non-batch dim of (pred − target)²`` (Diffusion-DPO, eq. 14), float32, shape ``(B,)``.

    ``target`` is ε (epsilon-prediction), the velocity (v-prediction) or ``noise − x0`` (rectified
    flow); works for any ndim ≥ 2 — 4D images, 5D video ``(B, C, F, H, W)``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"denoising_error: prediction shape {tuple(pred.shape)} != target {tuple(target.shape)}")
    if pred.ndim < 2:
        raise ValueError(f"denoising_error expects a batch dim and at least one more, got shape {tuple(pred.shape)}")
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)
