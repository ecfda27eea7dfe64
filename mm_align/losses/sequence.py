"""Preference losses on summed response log-probabilities (VLMs, video-LLMs, AR/masked speech).

``Scores.kind == "logp"``. With ``r⁺ = logπθ(w) − logπref(w)``, ``r⁻ = logπθ(l) − logπref(l)``,
``Δ = r⁺ − r⁻`` (ALGORITHMS.md §4). Every loss is the mean over pairs of a per-pair loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mm_align.losses.diffusion import _kl_estimate, kto_core
from mm_align.types import LossOutput, Scores

__all__ = ["sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "kto", "sft"]


def _rewards(policy: Scores, reference: Scores | None) -> tuple[torch.Tensor, torch.Tensor]:
    assert reference is not None and policy.rejected is not None and reference.rejected is not None
    return policy.chosen - reference.chosen, policy.rejected - reference.rejected


def _metrics(policy: Scores, rp: torch.Tensor, rn: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    rp, rn = rp.detach(), rn.detach()
    assert policy.rejected is not None
    return {
        "rewards/chosen": (beta * rp).mean(),
        "rewards/rejected": (beta * rn).mean(),
        "rewards/margins": (beta * (rp - rn)).mean(),
        "rewards/accuracies": (rp > rn).float().mean(),  # ties count as wrong
        "logps/chosen": policy.chosen.detach().mean(),
        "logps/rejected": policy.rejected.detach().mean(),
    }


def sigmoid(policy: Scores, reference: Scores | None, *, beta: float) -> LossOutput:
    """DPO (Rafailov et al. 2023, eq. 7): ``−logσ(βΔ)``. β = KL strength (default 0.1); ln 2 at Δ = 0."""
    rp, rn = _rewards(policy, reference)
    return LossOutput(-F.logsigmoid(beta * (rp - rn)).mean(), _metrics(policy, rp, rn, beta))


def hinge(policy: Scores, reference: Scores | None, *, beta: float) -> LossOutput:
    """SLiC-style hinge (Zhao et al. 2023): ``max(0, 1 − βΔ)``; 1/β is the margin. 1 at Δ = 0."""
    rp, rn = _rewards(policy, reference)
    return LossOutput(torch.relu(1 - beta * (rp - rn)).mean(), _metrics(policy, rp, rn, beta))


def ipo(policy: Scores, reference: Scores | None, *, beta: float) -> LossOutput:
    """IPO (Azar et al. 2023, eq. 17): ``(Δ̄ − 1/(2β))²`` with log-probs averaged over response tokens.

    β plays the role of τ: the target margin is 1/(2β). 1/(4β²) at Δ̄ = 0.
    """
    assert reference is not None and policy.rejected is not None and reference.rejected is not None
    if policy.n_tokens_chosen is None or policy.n_tokens_rejected is None:
        raise ValueError("ipo needs response token counts (Scores.n_tokens_chosen / n_tokens_rejected)")
    nw, nl = policy.n_tokens_chosen.clamp(min=1), policy.n_tokens_rejected.clamp(min=1)
    rp = (policy.chosen - reference.chosen) / nw
    rn = (policy.rejected - reference.rejected) / nl
    loss = ((rp - rn) - 1 / (2 * beta)).pow(2).mean()
    return LossOutput(loss, _metrics(policy, rp, rn, beta))


def robust(policy: Scores, reference: Scores | None, *, beta: float, label_smoothing: float = 0.0) -> LossOutput:
    """Robust DPO for noisy labels (Chowdhury et al. 2024; cDPO, Mitchell 2023).

    ``[−(1−ε)·logσ(βΔ) + ε·logσ(−βΔ)] / (1 − 2ε)``, ε = ``label_smoothing`` (the label-flip rate,
    < 0.5). Equals DPO at ε = 0; ln 2 at Δ = 0 for every ε.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    rp, rn = _rewards(policy, reference)
    x = beta * (rp - rn)
    eps = label_smoothing
    loss = ((-(1 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1 - 2 * eps)).mean()
    return LossOutput(loss, _metrics(policy, rp, rn, beta))


def bco_pair(policy: Scores, reference: Scores | None, *, beta: float) -> LossOutput:
    """BCO on pairs (Jung et al. 2024): ``−logσ(β·r⁺) − logσ(−β·r⁻)``, as ALGORITHMS.md §4 states it.

    Deviation from TRL: no running-mean reward shift δ. 2 ln 2 at policy = reference.
    """
    rp, rn = _rewards(policy, reference)
    loss = (-F.logsigmoid(beta * rp) - F.logsigmoid(-beta * rn)).mean()
    return LossOutput(loss, _metrics(policy, rp, rn, beta))


def sppo_hard(policy: Scores, reference: Scores | None, *, beta: float) -> LossOutput:
    """SPPO with hard labels (Wu et al. 2024): ``(r⁺ − 1/(2β))² + (r⁻ + 1/(2β))²``.

    Pushes the chosen log-ratio to +1/(2β) and the rejected to −1/(2β); 2·(1/(2β))² at r = 0.
    """
    rp, rn = _rewards(policy, reference)
    loss = ((rp - 1 / (2 * beta)).pow(2) + (rn + 1 / (2 * beta)).pow(2)).mean()
    return LossOutput(loss, _metrics(policy, rp, rn, beta))


def kto(
    policy: Scores, reference: Scores | None, *, beta: float, lambda_d: float = 1.0, lambda_u: float = 1.0
) -> LossOutput:
    """KTO (Ethayarajh et al. 2024, eq. 8) on unpaired samples.

    ``r = logπθ − logπref``; ``z_ref`` = batch-mean KL estimate (detached, clamped ≥ 0; from
    mismatched pairs when ``extra["kl"]`` is given); desirable: ``λ_D(1 − σ(β(r − z_ref)))``,
    undesirable: ``λ_U(1 − σ(−β(r − z_ref)))``. λ/2 per sample at policy = reference.
    """
    assert reference is not None and policy.desirable is not None
    reward = policy.chosen - reference.chosen
    kl = _kl_estimate(policy, reference, reward.detach())
    loss, metrics = kto_core(reward, policy.desirable, kl, beta, lambda_d, lambda_u)
    des = policy.desirable.bool()
    if des.any():
        metrics["logps/chosen"] = policy.chosen[des].detach().mean()
    if (~des).any():
        metrics["logps/rejected"] = policy.chosen[~des].detach().mean()
    return LossOutput(loss, metrics)


def sft(policy: Scores, reference: Scores | None, *, beta: float) -> LossOutput:
    """The supervised term added to a preference loss (RPO, Pang et al. 2024; MaPO's first term).

    Log-probs: ``−logπθ(w) / n_tokens(w)`` (token-averaged NLL of the chosen response); errors:
    ``errθ(w)``. β is unused; its weight in a mixture (``loss_weights``) is γ.
    """
    if policy.kind == "logp":
        if policy.n_tokens_chosen is None:
            raise ValueError("sft needs response token counts (Scores.n_tokens_chosen)")
        loss = (-policy.chosen / policy.n_tokens_chosen.clamp(min=1)).mean()
    else:
        loss = policy.chosen.mean()
    return LossOutput(loss, {})
