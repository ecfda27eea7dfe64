"""Score helpers: the per-sample numbers every preference loss compares.

Token models: the SUM of the response tokens' log-probabilities (prompt and image tokens
excluded by the mask), also over several codebooks for speech codec models
(:func:`multi_codebook_logps`). Diffusion / flow models: the denoising error averaged over EVERY
non-batch dimension (C×H×W for images, C×F×H×W for video) — reducing over only some dims is a known
defect; for variable-length latents, over every VALID element (:func:`masked_denoising_error`).
"""

from __future__ import annotations

import torch

__all__ = [
    "sequence_logps",
    "mean_sequence_logps",
    "multi_codebook_logps",
    "denoising_error",
    "masked_denoising_error",
]


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


def multi_codebook_logps(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, *, shift: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability over codebooks and time, ``log π(y | x) = Σ_k Σ_t mask_kt · log p(y_kt | ·)``.

    The score of speech codec models that predict ``K`` parallel token streams (autoregressive models
    such as MusicGen/VALL-E-style decoders with one head per codebook, and masked generative models
    such as MaskGCT/SoundStorm-style ones): the DPO input of ALGORITHMS.md §7 (Rafailov et al. 2023,
    eq. 7, with the sequence log-probability summed over every codebook's tokens). The conventions are
    those of :func:`sequence_logps`: float32, ``logit[label] − logsumexp(logits)`` (gather first),
    masked positions contribute exactly 0 whatever their label id. Any delay or interleaving pattern
    between codebooks is the model's business: ``logits[:, k, t]`` must already be aligned with
    ``labels[:, k, t]`` (after the shift, when ``shift`` is True).

    For a masked generative model, ``mask`` is the ONE shared random mask of the masked positions
    (the same for the chosen, the rejected sample and the reference pass) and ``shift=False``.

    Worked example (B = 1, K = 2, T = 2, V = 2, ``shift=False``, mask ``(B, T) = [[1, 1]]``): codebook 0
    logits ``[[0, 0], [ln 3, 0]]`` with labels ``[0, 0]`` give ``ln ½ + ln ¾``; codebook 1 logits
    ``[[0, ln 3], [0, 0]]`` with labels ``[1, 1]`` give ``ln ¾ + ln ½``; ``logp = 2·ln(3/8)``,
    ``n_tokens = 4``.

    Args:
        logits: ``(B, K, T, V)`` logits, one row of ``V`` per codebook ``k`` and step ``t``.
        labels: ``(B, K, T)`` token ids (any value, e.g. −100, where the mask is 0).
        mask: ``(B, K, T)`` per codebook, or ``(B, T)`` shared by every codebook (broadcast over ``K``);
            1 (or True) on scored tokens, 0 elsewhere.
        shift: keyword-only and required, because the two model families differ: True for
            autoregressive models (``logits[:, :, t]`` predicts ``labels[:, :, t + 1]`` under
            ``mask[..., t + 1]``), False for masked-token models (``logits[:, :, t]`` scores
            ``labels[:, :, t]``).

    Returns:
        ``(logp, n_tokens)``: ``(B,)`` log-probs summed over codebooks and time and ``(B,)`` counts of
        scored tokens (over codebooks and time), float32.

    Raises:
        ValueError: if the shapes do not agree (the message names all three).
    """
    ok = logits.ndim == 4 and labels.shape == logits.shape[:3]
    if not ok or mask.shape not in (labels.shape, (labels.shape[0], labels.shape[2])):
        raise ValueError(
            f"multi_codebook_logps expects logits (B, K, T, V), labels (B, K, T) and mask (B, K, T) or (B, T); "
            f"got logits {tuple(logits.shape)}, labels {tuple(labels.shape)}, mask {tuple(mask.shape)}"
        )
    if mask.ndim == 2:
        mask = mask[:, None, :].expand(labels.shape)  # (B, T) -> (B, K, T)
    if shift:
        # (B, K, T-1, V), (B, K, T-1): the shift is along time, within each codebook
        logits, labels, mask = logits[:, :, :-1], labels[:, :, 1:], mask[:, :, 1:]
    keep = mask.bool()  # (B, K, T')
    safe = torch.where(keep, labels, torch.zeros_like(labels))  # masked ids may be out of range
    logits = logits.float()
    picked = logits.gather(-1, safe.long().unsqueeze(-1)).squeeze(-1)  # (B, K, T')
    logp = picked - torch.logsumexp(logits, dim=-1)  # (B, K, T')
    logp = torch.where(keep, logp, torch.zeros_like(logp))  # exactly 0 off the scored tokens, even if -inf
    return logp.sum(dim=(1, 2)), keep.float().sum(dim=(1, 2))


def masked_denoising_error(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample denoising error over the VALID elements only: ``err_b = Σ m·(pred − target)² / Σ m``.

    :func:`denoising_error` (Diffusion-DPO, Wallace et al. 2023, eq. 14: the per-sample error the
    diffusion preference losses compare) for variable-length latents — audio ``(B, C, T)``, video
    ``(B, C, F, H, W)`` — batched with padding. Padding must be excluded: a short clip padded to the
    batch's length would have its error averaged with the (near-)zero error of its padding frames,
    diluted by the fraction of padding, so two clips of different length would not be comparable,
    and the difference ``err(w) − err(l)`` of a pair would measure their lengths, not the model. Both
    sums run over every non-batch element (``Σ m`` counts the valid ones after broadcasting), so a
    valid element weighs the same in every sample. With an all-ones mask the result equals
    :func:`denoising_error` exactly (bit for bit). Computed in float32; a masked element contributes
    exactly 0 to the value and to the gradient, even if it holds NaN or inf.

    How ``mask`` is aligned with ``pred`` (one rule):

    - ``mask.ndim == pred.ndim``: the full layout; each mask dim equals pred's or is 1 (broadcast),
      e.g. ``(B, C, T)`` or ``(B, 1, T)``.
    - ``mask.ndim < pred.ndim``: ``mask`` is ``(B, *S)``: its first dim is the batch, and ``S`` is
      aligned with pred's LEADING non-channel dims, i.e. pred's dims ``2 … 1 + len(S)`` (dim 1, the
      channels, is skipped) and it broadcasts over the channels and any dims after ``S``. So
      ``(B, T)`` masks the time steps of audio ``(B, C, T)``; ``(B, F)`` masks the frames of video
      ``(B, C, F, H, W)``; ``(B, F, H, W)`` masks video elements shared by every channel; ``(B,)``
      masks whole samples. Again each dim of ``S`` equals pred's or is 1.

    In both cases the batch dim must equal pred's. Any nonzero value (or True) marks a valid element.

    Args:
        pred: ``(B, C, ...)`` model prediction (any ndim ≥ 2).
        target: the regression target, pred's shape (ε, the velocity, or ``noise − x0``).
        mask: the validity mask, aligned with ``pred`` by the rule above.

    Returns:
        ``(B,)`` float32 errors.

    Raises:
        ValueError: if ``pred`` and ``target`` differ in shape, ``mask`` cannot be aligned with ``pred``
            (the message names both shapes), or a sample has no valid element (the message names it;
            its error would be 0/0).
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"masked_denoising_error: prediction shape {tuple(pred.shape)} != target {tuple(target.shape)}"
        )
    if pred.ndim < 2:
        raise ValueError(
            f"masked_denoising_error expects a batch dim and at least one more, got shape {tuple(pred.shape)}"
        )
    if mask.ndim == pred.ndim:
        view = mask  # the full layout (B, C, ...), with size-1 dims broadcast
    elif 1 <= mask.ndim < pred.ndim:
        # (B, *S) -> (B, 1, *S, 1, ..., 1): skip the channel dim, S on the leading non-channel dims
        view = mask.reshape(mask.shape[0], 1, *mask.shape[1:], *([1] * (pred.ndim - mask.ndim - 1)))
    else:
        view = None
    if view is None or view.shape[0] != pred.shape[0] or any(m not in (1, p) for m, p in zip(view.shape, pred.shape)):
        raise ValueError(
            f"masked_denoising_error: mask of shape {tuple(mask.shape)} does not align with prediction "
            f"{tuple(pred.shape)}: give the full shape (size-1 dims broadcast) or (B, *S) with S on the "
            "leading non-channel dims, e.g. (B, T) for (B, C, T) audio, (B, F) for (B, C, F, H, W) video"
        )
    keep = view.bool()  # (B, 1 or C, ...): broadcasts against pred
    diff = pred.float() - target.float()  # (B, C, ...)
    diff = torch.where(keep, diff, torch.zeros_like(diff))  # masked: exactly 0, no NaN·0 in the gradient
    sq = diff.pow(2).flatten(1)  # (B, N), N = every non-batch element
    count = torch.broadcast_to(keep, pred.shape).flatten(1).sum(1)  # (B,) int64: valid elements per sample
    empty = (count == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"masked_denoising_error: sample(s) {empty} of the batch have no valid element (all-zero mask); "
            "their error is undefined (0/0). Drop them from the batch."
        )
    # mean over all N elements, rescaled by N / count: with a full mask the factor is exactly 1.0, so the
    # result is bit-identical to denoising_error's
    scale = (sq.shape[1] / count.to(torch.float64)).to(torch.float32)  # (B,)
    return sq.mean(1) * scale
