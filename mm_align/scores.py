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
    """Summed response log-probability ``log π(y | x) = Σ_t mask_t · log p(y_t | y_<t, x)``.

    The input every log-prob preference loss compares (DPO, Rafailov et al. 2023, eq. 7; KTO, IPO…):
    the SUM over response tokens, prompt and image tokens excluded by ``mask``. Computed in float32
    as ``logit[label] − logsumexp(logits)`` (gather first, so no ``(B, T, V)`` log-softmax is kept).
    Masked positions contribute exactly 0, whatever their label id (e.g. −100).

    Args:
        logits: ``(B, T, V)`` next-token logits.
        labels: ``(B, T)`` token ids (any value, e.g. −100, where ``mask`` is 0).
        mask: ``(B, T)`` 1 (or True) on response tokens, 0 elsewhere.
        shift: when True (causal LM layout), ``logits[:, t]`` predicts ``labels[:, t + 1]`` and the
            mask used is ``mask[:, 1:]``; when False, ``logits[:, t]`` scores ``labels[:, t]``.

    Returns:
        ``(logp, n_tokens)``: ``(B,)`` summed log-probs and ``(B,)`` response token counts, float32.

    Raises:
        ValueError: if the shapes do not agree.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2] or mask.shape != labels.shape:
        raise ValueError(
            f"sequence_logps expects logits (B, T, V) and labels, mask (B, T); got logits "
            f"{tuple(logits.shape)}, labels {tuple(labels.shape)}, mask {tuple(mask.shape)}"
        )
    if shift:
        logits, labels, mask = logits[:, :-1], labels[:, 1:], mask[:, 1:]  # (B, T-1, V), (B, T-1)
    keep = mask.bool()  # (B, T')
    safe = torch.where(keep, labels, torch.zeros_like(labels))  # masked ids may be out of range
    logits = logits.float()
    picked = logits.gather(-1, safe.long().unsqueeze(-1)).squeeze(-1)  # (B, T')
    logp = picked - torch.logsumexp(logits, dim=-1)  # (B, T')
    logp = torch.where(keep, logp, torch.zeros_like(logp))  # exactly 0 off the response, even if -inf
    return logp.sum(-1), keep.float().sum(-1)


def mean_sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, shift: bool = True
) -> torch.Tensor:
    """Token-averaged response log-probability ``log π(y | x) / n_tokens`` (IPO's length-normalised form).

    Args:
        logits: ``(B, T, V)`` next-token logits.
        labels: ``(B, T)`` token ids.
        mask: ``(B, T)`` 1 on response tokens.
        shift: as in :func:`sequence_logps`.

    Returns:
        ``(B,)`` float32; ``n_tokens`` is clamped ≥ 1 so an empty response gives 0, not NaN.
    """
    total, n = sequence_logps(logits, labels, mask, shift)
    return total / n.clamp(min=1)


def denoising_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample denoising error ``err = mean over every non-batch dim of (pred − target)²``.

    The score the diffusion preference losses compare (Diffusion-DPO, Wallace et al. 2023, eq. 14;
    MaPO, Diffusion-KTO, NPO). ``target`` is ε (epsilon-prediction), the velocity (v-prediction) or
    ``noise − x0`` (rectified flow). Reduced over EVERY non-batch dim — C×H×W for 4D images,
    C×F×H×W for 5D video ``(B, C, F, H, W)``, any ndim ≥ 2 — in float32.

    Args:
        pred: ``(B, ...)`` model prediction.
        target: ``(B, ...)`` regression target, the same shape.

    Returns:
        ``(B,)`` float32 errors.

    Raises:
        ValueError: if the shapes differ (the message names both) or ``ndim < 2``.
    """
    if pred.shape != target.shape:
        raise ValueError(f"denoising_error: prediction shape {tuple(pred.shape)} != target {tuple(target.shape)}")
    if pred.ndim < 2:
        raise ValueError(f"denoising_error expects a batch dim and at least one more, got shape {tuple(pred.shape)}")
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)
