"""Preference losses on summed response log-probabilities (VLMs, video-LLMs, AR/masked speech).

``Scores.kind == "logp"``: ``logπ(y | x)`` is the SUM of the response tokens' log-probabilities
(prompt and image tokens excluded). With ``r⁺ = logπθ(w) − logπref(w)``,
``r⁻ = logπθ(l) − logπref(l)`` and ``Δ = r⁺ − r⁻`` (ALGORITHMS.md §4).

Every loss returns the MEAN over pairs of a per-pair loss (the mean is taken outside logσ).
The paired losses log ``rewards/chosen = mean β·r⁺``, ``rewards/rejected = mean β·r⁻``,
``rewards/margins = mean β·Δ``, ``rewards/accuracies = mean(Δ > 0)`` (ties count 0, as TRL) and
``logps/chosen``, ``logps/rejected`` (mean policy log-probs), all detached 0-dim float tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mm_align.losses.common import check_scores, kto_core, kto_reference_point, masked_mean, upcast
from mm_align.types import LossOutput, Scores

__all__ = ["sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "kto", "sft"]


def _rewards(name: str, policy: Scores, reference: Scores | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated ``(r⁺, r⁻)``, each ``(B,)`` float32."""
    check_scores(name, policy, reference, kind="logp", paired=True, needs_reference=True)
    assert reference is not None and policy.rejected is not None and reference.rejected is not None
    rp = upcast(policy.chosen) - upcast(reference.chosen)
    rn = upcast(policy.rejected) - upcast(reference.rejected)
    return rp, rn


def _metrics(policy: Scores, rp: torch.Tensor, rn: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """The shared sequence metrics (module docstring); ties ``Δ = 0`` count as wrong in the accuracy."""
    assert policy.rejected is not None
    rp, rn = rp.detach(), rn.detach()
    return {
        "rewards/chosen": (beta * rp).mean(),
        "rewards/rejected": (beta * rn).mean(),
        "rewards/margins": (beta * (rp - rn)).mean(),
        "rewards/accuracies": (rp > rn).float().mean(),
        "logps/chosen": upcast(policy.chosen.detach()).mean(),
        "logps/rejected": upcast(policy.rejected.detach()).mean(),
    }


def sigmoid(policy: Scores, reference: Scores | None, *, beta: float) -> LossOutput:
    """DPO (Rafailov et al. 2023, eq. 7): per pair ``−logσ(β·Δ)``, averaged over pairs.

    ``ln 2`` at policy = reference.

    Args:
        policy: ``kind="logp"`` paired scores of the trained model.
        reference: ``kind="logp"`` paired scores of the frozen reference.
        beta: β, the strength of the implicit KL penalty to the reference (default 0.1).

    Returns:
        :class:`LossOutput` with the shared sequence metrics.
    """
    rp, rn = _rewards("sigmoid", policy, reference)
    loss = -F.logsigmoid(beta * (rp - rn)).mean()
    return LossOutput(loss, _metrics(policy, rp, rn, beta))


def hinge(policy: Scores, reference: Scores | None, *, beta: float) -> LossOutput:
    """SLiC hinge loss (Zhao et al. 2023) on DPO's implicit reward: per pair ``max(0, 1 − β·Δ)``.

    1/β is the log-ratio margin beyond which a pair stops contributing. Equals 1 at policy = reference.
    Deviation from SLiC: the margin is on the reference-normalised ``Δ`` (as TRL's ``hinge``), not on
    raw log-likelihoods, and SLiC's separate regularisation term is not included (add ``sft``).

    Args:
        policy: ``kind="logp"`` paired scores of the trained model.
        reference: ``kind="logp"`` paired scores of the frozen reference.
        beta: β, the inverse margin (default 0.1).

    Returns:
        :class:`LossOutput` with the shared sequence metrics.
    """
    rp, rn = _rewards("hinge", policy, reference)
    loss = torch.relu(1.0 - beta * (rp - rn)).mean()
    return LossOutput(loss, _metrics(policy, rp, rn, beta))


def ipo(policy: Scores, reference: Scores | None, *, beta: float) -> LossOutput:
    """IPO (Azar et al. 2023, eq. 17): per pair ``(Δ̄ − 1/(2β))²`` on token-averaged log-probs.

    ``Δ̄ = r⁺/n_w − r⁻/n_l`` where ``n_w``, ``n_l`` are the response token counts (the length
    normalisation of TRL's ``ipo``; the paper uses summed log-probs). ``1/(4β²)`` at policy =
    reference. The logged rewards use the summed log-ratios, like every other sequence loss.

    Args:
        policy: ``kind="logp"`` paired scores with ``n_tokens_chosen`` and ``n_tokens_rejected``.
        reference: ``kind="logp"`` paired scores of the frozen reference (same responses).
        beta: β plays the role of the paper's τ: the target margin is ``1/(2β)`` (default 0.1).

    Returns:
        :class:`LossOutput` with the shared sequence metrics.

    Raises:
        ValueError: if the policy scores carry no token counts.
    """
    rp, rn = _rewards("ipo", policy, reference)
    if policy.n_tokens_chosen is None or policy.n_tokens_rejected is None:
        raise ValueError("ipo needs response token counts: Scores.n_tokens_chosen and Scores.n_tokens_rejected")
    n_w = upcast(policy.n_tokens_chosen).clamp(min=1)  # (B,)
    n_l = upcast(policy.n_tokens_rejected).clamp(min=1)  # (B,)
    delta_bar = rp / n_w - rn / n_l  # (B,)
    loss = (delta_bar - 1.0 / (2.0 * beta)).pow(2).mean()
    return LossOutput(loss, _metrics(policy, rp, rn, beta))


def robust(
    policy: Scores, reference: Scores | None, *, beta: float, label_smoothing: float = 0.0
) -> LossOutput:
    """Robust DPO for noisy preference labels (Chowdhury et al. 2024; cf. cDPO, Mitchell 2023).

    Per pair ``[−(1−ε)·logσ(β·Δ) + ε·logσ(−β·Δ)] / (1 − 2ε)``: the unbiased estimate of the DPO loss
    when each label is flipped with probability ε. Equals DPO (:func:`sigmoid`) at ε = 0 and ``ln 2``
    at policy = reference for every ε. (cDPO's conservative variant ``−(1−ε)logσ(βΔ) − ε·logσ(−βΔ)``
    is a different loss and not implemented here.)

    Args:
        policy: ``kind="logp"`` paired scores of the trained model.
        reference: ``kind="logp"`` paired scores of the frozen reference.
        beta: β, the implicit KL strength (default 0.1).
        label_smoothing: ε, the assumed label-flip rate, in [0, 0.5) (default 0.0).

    Returns:
        :class:`LossOutput` with the shared sequence metrics.

    Raises:
        ValueError: if ``label_smoothing`` is not in [0, 0.5).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust: label_smoothing (ε) must be in [0, 0.5), got {label_smoothing}")
    rp, rn = _rewards("robust", policy, reference)
    x = beta * (rp - rn)  # (B,)
    eps = label_smoothing
    loss = ((-(1.0 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1.0 - 2.0 * eps)).mean()
    return LossOutput(loss, _metrics(policy, rp, rn, beta))


def bco_pair(policy: Scores, reference: Scores | None, *, beta: float) -> LossOutput:
    """BCO on pairs (Jung et al. 2024): per pair ``−logσ(β·r⁺) − logσ(−β·r⁻)``.

    A binary classifier that labels the chosen response's implicit reward positive and the rejected
    one's negative. ``2 ln 2`` at policy = reference. Deviation from TRL's ``bco_pair``: no running
    mean reward shift δ (ALGORITHMS.md §4 states the loss without it).

    Args:
        policy: ``kind="logp"`` paired scores of the trained model.
        reference: ``kind="logp"`` paired scores of the frozen reference.
        beta: β, the scale of the implicit reward (default 0.1).

    Returns:
        :class:`LossOutput` with the shared sequence metrics.
    """
    rp, rn = _rewards("bco_pair", policy, reference)
    loss = (-F.logsigmoid(beta * rp) - F.logsigmoid(-beta * rn)).mean()
    return LossOutput(loss, _metrics(policy, rp, rn, beta))


def sppo_hard(policy: Scores, reference: Scores | None, *, beta: float) -> LossOutput:
    """SPPO with hard labels (Wu et al. 2024): per pair ``(r⁺ − 1/(2β))² + (r⁻ + 1/(2β))²``.

    Regresses the chosen log-ratio to ``+1/(2β)`` and the rejected one to ``−1/(2β)`` (the paper's
    win probabilities replaced by hard 1/0 labels, as TRL's ``sppo_hard``). ``2·(1/(2β))²`` at
    policy = reference.

    Args:
        policy: ``kind="logp"`` paired scores of the trained model.
        reference: ``kind="logp"`` paired scores of the frozen reference.
        beta: β; ``1/β`` plays the role of the paper's η (targets ±1/(2β)) (default 0.1).

    Returns:
        :class:`LossOutput` with the shared sequence metrics.
    """
    rp, rn = _rewards("sppo_hard", policy, reference)
    half = 1.0 / (2.0 * beta)
    loss = ((rp - half).pow(2) + (rn + half).pow(2)).mean()
    return LossOutput(loss, _metrics(policy, rp, rn, beta))


def kto(
    policy: Scores,
    reference: Scores | None,
    *,
    beta: float,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, eq. 8) on unpaired samples.

    Implied reward ``r = logπθ(y|x) − logπref(y|x)``; ``z = r − z_ref``; desirable samples
    ``λ_D(1 − σ(β·z))``, undesirable ``λ_U(1 − σ(−β·z))``; the mean over all samples. ``z_ref`` is
    the batch mean of r, detached and clamped ≥ 0; when both ``policy.extra["kl"]`` and
    ``reference.extra["kl"]`` hold log-probs of mismatched (prompt, response) pairs, it is
    ``max(0, mean(policy_kl − ref_kl))`` instead (the paper's estimate). ``z_ref`` is per process
    (not gathered across GPUs). λ/2 per sample at policy = reference.

    Args:
        policy: ``kind="logp"`` unpaired scores: ``chosen`` holds every sample, ``desirable`` marks them.
        reference: the frozen reference's unpaired scores on the same samples.
        beta: β, the implicit KL strength (default 0.1).
        lambda_d: weight λ_D of desirable samples (default 1.0).
        lambda_u: weight λ_U of undesirable samples (default 1.0).

    Returns:
        :class:`LossOutput` with ``kl`` (z_ref), ``rewards/chosen`` / ``rewards/rejected`` (mean β·r
        over desirable / undesirable samples), ``rewards/margins`` and ``logps/chosen`` /
        ``logps/rejected`` (mean policy log-probs of each group). An absent group reports 0.
    """
    check_scores("kto", policy, reference, kind="logp", paired=False, needs_reference=True)
    assert reference is not None and policy.desirable is not None
    reward = upcast(policy.chosen) - upcast(reference.chosen)  # (B,)
    mismatched = None
    if "kl" in policy.extra and "kl" in reference.extra:
        mismatched = upcast(policy.extra["kl"]) - upcast(reference.extra["kl"])
    z_ref = kto_reference_point(reward, mismatched)
    loss, metrics = kto_core(reward, policy.desirable, z_ref, beta, lambda_d, lambda_u)
    des = policy.desirable.bool()
    metrics["logps/chosen"] = masked_mean(policy.chosen, des)
    metrics["logps/rejected"] = masked_mean(policy.chosen, ~des)
    return LossOutput(loss, metrics)


def sft(policy: Scores, reference: Scores | None, *, beta: float) -> LossOutput:
    """The supervised term added to a preference loss (as in RPO, Pang et al. 2024; MaPO's first term).

    Log-probs: ``−logπθ(w) / n_tokens(w)``, the token-averaged negative log-likelihood of the chosen
    response; errors: ``errθ(w)``, the chosen sample's denoising loss; the mean over samples. Its
    weight in a mixture (``loss_weights``) is γ. With unpaired scores (next to KTO) only the
    desirable samples count (0 if the batch has none). ``reference`` is ignored.

    Args:
        policy: scores of either kind, paired or unpaired; ``logp`` needs ``n_tokens_chosen``.
        reference: ignored.
        beta: unused (kept for the common signature).

    Returns:
        :class:`LossOutput` with ``logps/chosen`` or ``err/policy_chosen``.

    Raises:
        ValueError: if log-prob scores carry no ``n_tokens_chosen``.
    """
    chosen = upcast(policy.chosen)
    if policy.kind == "logp":
        if policy.n_tokens_chosen is None:
            raise ValueError("sft on log-probs needs response token counts (Scores.n_tokens_chosen)")
        per = -chosen / upcast(policy.n_tokens_chosen).clamp(min=1)  # (B,)
        key = "logps/chosen"
    else:
        per = chosen
        key = "err/policy_chosen"
    if policy.paired or policy.desirable is None:
        keep = torch.ones_like(per, dtype=torch.bool)
    else:
        keep = policy.desirable.bool()
    loss = (per * keep).sum() / keep.sum().clamp(min=1)
    return LossOutput(loss, {key: masked_mean(chosen, keep)})
