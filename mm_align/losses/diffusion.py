"""Preference losses on denoising errors (image and video diffusion, flow matching).

``Scores.kind == "error"``: ``err = mean over every non-batch dim of (prediction − target)²`` at a
noise and timestep shared by the chosen, the rejected and the reference pass. Every loss is the
mean over pairs of a per-pair loss (the mean is taken outside logσ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mm_align.types import LossOutput, Scores

__all__ = ["diffusion_dpo", "npo", "smpo", "mapo", "diffusion_kto", "minmax_normalise", "tie_half_accuracy"]


def tie_half_accuracy(d: torch.Tensor) -> torch.Tensor:
    """mean(d < 0) with exact ties counting ½ (ALGORITHMS.md §1: implicit accuracy)."""
    return ((d < 0).float() + 0.5 * (d == 0).float()).mean()


def _dpo_core(pw, pl, rw, rl, beta: torch.Tensor | float) -> LossOutput:
    d = (pw - rw) - (pl - rl)  # (B,)
    loss = -F.logsigmoid(-0.5 * beta * d).mean()
    acc = tie_half_accuracy(d.detach())
    b = beta.detach() if isinstance(beta, torch.Tensor) else beta
    metrics = {
        "err/policy_chosen": pw.detach().mean(),
        "err/policy_rejected": pl.detach().mean(),
        "err/ref_chosen": rw.detach().mean(),
        "err/ref_rejected": rl.detach().mean(),
        "implicit_acc": acc,
        "rewards/accuracies": acc,
        "rewards/chosen": (-0.5 * b * (pw - rw).detach()).mean(),
        "rewards/rejected": (-0.5 * b * (pl - rl).detach()).mean(),
        "rewards/margins": (-0.5 * b * d.detach()).mean(),
    }
    return LossOutput(loss, metrics)


def diffusion_dpo(policy: Scores, reference: Scores | None, *, beta: float) -> LossOutput:
    """Diffusion-DPO (Wallace et al. 2023, eq. 14).

    ``d = (errθ(w) − errref(w)) − (errθ(l) − errref(l))``, ``loss = −logσ(−β/2 · d)``, averaged over
    pairs. β is the KL-regularisation strength (paper default 5000 for SD1.5/SDXL); β/2 because the
    paper folds the timestep weighting into the constant. With policy = reference, loss = ln 2.
    """
    assert reference is not None and policy.rejected is not None and reference.rejected is not None
    return _dpo_core(policy.chosen, policy.rejected, reference.chosen, reference.rejected, beta)


def npo(policy: Scores, reference: Scores | None, *, beta: float) -> LossOutput:
    """Diffusion-NPO (Wang et al. 2025): Diffusion-DPO with chosen and rejected swapped.

    The model learns what humans *dislike*; used as the negative branch of classifier-free
    guidance at inference (ALGORITHMS.md §2). β defaults to 500 (SD1.5; 2000 for SDXL). The
    metrics describe the swapped roles (``rewards/chosen`` is the reward of the rejected sample).
    """
    assert reference is not None and policy.rejected is not None and reference.rejected is not None
    return _dpo_core(policy.rejected, policy.chosen, reference.rejected, reference.chosen, beta)


def minmax_normalise(t: torch.Tensor) -> torch.Tensor:
    """Scale rewards to [0, 1] by their min and max (done once over the whole dataset, for SmPO)."""
    lo, hi = t.min(), t.max()
    return torch.zeros_like(t) if hi == lo else (t - lo) / (hi - lo)


def smpo(policy: Scores, reference: Scores | None, *, beta: float) -> LossOutput:
    """SmPO-Diffusion-style smoothed preference (Lu et al. 2025): Diffusion-DPO with a per-pair β.

    ``β_i = β · 10 · (2·p_w − 1)``, ``p_w = softmax(r_w, r_l)[0] = σ(r_w − r_l)`` from the pair's reward
    scores ``policy.extra["reward_chosen"|"reward_rejected"]``, which the data step min-max
    normalises to [0, 1] once over the dataset (:func:`minmax_normalise`). A pair whose rewards
    barely differ gets a small β; a pair the reward model disagrees with gets a negative one.
    """
    if "reward_chosen" not in policy.extra or "reward_rejected" not in policy.extra:
        raise ValueError("smpo needs per-pair reward scores: Scores.extra['reward_chosen'] and ['reward_rejected']")
    p_w = torch.sigmoid(policy.extra["reward_chosen"].float() - policy.extra["reward_rejected"].float())
    beta_i = beta * 10.0 * (2.0 * p_w - 1.0)  # (B,)
    assert reference is not None and policy.rejected is not None and reference.rejected is not None
    return _dpo_core(policy.chosen, policy.rejected, reference.chosen, reference.rejected, beta_i)


def _f(z: torch.Tensor) -> torch.Tensor:
    """z / (eᶻ − 1), with its limit 1 at z = 0 (MaPO's log-odds transform of an error)."""
    small = z.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(z), z)
    return torch.where(small, 1.0 - z / 2.0, safe / torch.expm1(safe))


def mapo(
    policy: Scores, reference: Scores | None, *, beta: float, s: float = 0.5, num_train_timesteps: int = 1000
) -> LossOutput:
    """MaPO, margin-aware preference optimisation, reference-free (Hong et al. 2024, eq. 10–12).

    ``f(z) = z/(eᶻ − 1)``, ``m = f(s·errθ(w)) − f(s·errθ(l))``,
    ``loss = errθ(w) − β_m · logσ(T · m)``: the chosen sample's denoising loss plus a margin term
    that pushes the chosen error below the rejected one. β here is β_m (default 0.1); ``s`` = 0.5,
    ``T`` = ``num_train_timesteps`` = 1000. The reference argument is ignored. At
    errθ(w) = errθ(l) = e the loss is e + β_m·ln 2.
    """
    assert policy.rejected is not None
    pw, pl = policy.chosen, policy.rejected
    m = _f(s * pw) - _f(s * pl)
    loss = (pw - beta * F.logsigmoid(num_train_timesteps * m)).mean()
    acc = tie_half_accuracy((pw - pl).detach())
    return LossOutput(
        loss,
        {
            "err/policy_chosen": pw.detach().mean(),
            "err/policy_rejected": pl.detach().mean(),
            "rewards/margins": m.detach().mean(),
            "implicit_acc": acc,
            "rewards/accuracies": acc,
        },
    )


def kto_core(reward: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             lambda_d: float, lambda_u: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO's value function on implied rewards: desirable λ_D(1 − σ(β(r − z))), undesirable λ_U(1 − σ(−β(r − z)))."""
    z = reward - kl
    des = desirable.bool()
    per = torch.where(des, lambda_d * (1 - torch.sigmoid(beta * z)), lambda_u * (1 - torch.sigmoid(-beta * z)))
    r = (beta * reward).detach()
    zero = torch.zeros((), device=reward.device)
    metrics = {
        "kl": kl.detach().reshape(()),
        "rewards/chosen": r[des].mean() if des.any() else zero,
        "rewards/rejected": r[~des].mean() if (~des).any() else zero,
    }
    return per.mean(), metrics


def _kl_estimate(policy: Scores, reference: Scores, reward: torch.Tensor) -> torch.Tensor:
    if "kl" in policy.extra and "kl" in reference.extra:  # from mismatched (prompt, sample) pairs
        kl = (policy.extra["kl"] - reference.extra["kl"]).mean()
    else:  # the batch itself
        kl = reward.mean()
    return kl.detach().clamp(min=0)


def diffusion_kto(
    policy: Scores, reference: Scores | None, *, beta: float, lambda_d: float = 1.0, lambda_u: float = 1.0
) -> LossOutput:
    """Diffusion-KTO (Li et al. 2024): Kahneman–Tversky optimisation on per-sample errors.

    Implied reward ``r = errref − errθ``; ``z_ref`` = the batch mean of r (detached, clamped ≥ 0;
    or the mean over mismatched samples when ``extra["kl"]`` is given); desirable samples:
    ``λ_D(1 − σ(β(r − z_ref)))``, undesirable: ``λ_U(1 − σ(−β(r − z_ref)))``. β default 1000. With
    policy = reference each sample's loss is λ/2. ``z_ref`` is per process (not gathered).
    """
    assert reference is not None and policy.desirable is not None
    reward = reference.chosen - policy.chosen  # (B,): lower error than the reference = positive reward
    kl = _kl_estimate(policy, reference, reward.detach())
    loss, metrics = kto_core(reward, policy.desirable, kl, beta, lambda_d, lambda_u)
    des = policy.desirable.bool()
    if des.any():
        metrics["err/policy_chosen"] = policy.chosen[des].detach().mean()
        metrics["err/ref_chosen"] = reference.chosen[des].detach().mean()
    if (~des).any():
        metrics["err/policy_rejected"] = policy.chosen[~des].detach().mean()
        metrics["err/ref_rejected"] = reference.chosen[~des].detach().mean()
    return LossOutput(loss, metrics)


