"""Preference losses on denoising errors (image and video diffusion, flow matching).

``Scores.kind == "error"``: ``err = mean over every non-batch dim of (prediction − target)²`` at a
noise and timestep shared by the chosen sample, the rejected sample and the reference pass
(ALGORITHMS.md §1). Lower error = the model finds the sample more likely.

Every loss returns the MEAN over pairs (or samples) of a per-pair loss; the mean is taken outside
logσ (taking it inside is a known defect of some public versions). Metrics are detached 0-dim
float tensors averaged over the batch, under the keys of CONVENTIONS.md.

TDPO (text preference) and TKTO are not separate losses: they are :func:`diffusion_dpo` and
:func:`diffusion_kto` applied to (image, true caption) vs (same image, mismatched caption) scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mm_align.losses.common import (
    check_scores,
    kto_core,
    kto_reference_point,
    masked_mean,
    tie_half_accuracy,
    upcast,
)
from mm_align.types import LossOutput, Scores

__all__ = ["diffusion_dpo", "npo", "smpo", "mapo", "diffusion_kto", "minmax_normalise", "tie_half_accuracy"]


def _dpo_core(
    pw: torch.Tensor, pl: torch.Tensor, rw: torch.Tensor, rl: torch.Tensor, beta: torch.Tensor | float
) -> LossOutput:
    """Diffusion-DPO on errors of the "winner" (pw, rw) and the "loser" (pl, rl); ``beta`` scalar or ``(B,)``."""
    pw, pl, rw, rl = upcast(pw), upcast(pl), upcast(rw), upcast(rl)
    d_w = pw - rw  # (B,) how much the policy beats (negative) or loses to the reference on the winner
    d_l = pl - rl  # (B,)
    d = d_w - d_l  # (B,)
    loss = -F.logsigmoid(-0.5 * beta * d).mean()  # mean OUTSIDE logσ
    b = beta.detach() if isinstance(beta, torch.Tensor) else beta
    acc = tie_half_accuracy(d)
    metrics = {
        "err/policy_chosen": pw.detach().mean(),
        "err/policy_rejected": pl.detach().mean(),
        "err/ref_chosen": rw.detach().mean(),
        "err/ref_rejected": rl.detach().mean(),
        "implicit_acc": acc,
        "rewards/accuracies": acc,
        "rewards/chosen": (-0.5 * b * d_w.detach()).mean(),
        "rewards/rejected": (-0.5 * b * d_l.detach()).mean(),
        "rewards/margins": (-0.5 * b * d.detach()).mean(),
    }
    return LossOutput(loss, metrics)


# ---- pairwise losses ------------------------------------------------------------------------------


def diffusion_dpo(policy: Scores, reference: Scores | None, *, beta: float) -> LossOutput:
    """Diffusion-DPO (Wallace et al. 2023, eq. 14).

    ``d = (errθ(w) − errref(w)) − (errθ(l) − errref(l))``, per pair ``−logσ(−β/2 · d)``, averaged over
    pairs outside logσ. With policy = reference, ``d = 0`` and the loss is ``ln 2``. TDPO and the
    text-preference variants reuse this loss unchanged (w and l = one image under two captions).

    Args:
        policy: ``kind="error"`` paired scores of the trained model.
        reference: ``kind="error"`` paired scores of the frozen base at the same noise and timestep.
        beta: KL-regularisation strength β (paper default 5000 for SD1.5 and SDXL). The factor ½
            follows the paper's released code (the timestep weighting is folded into β).

    Returns:
        :class:`LossOutput` with ``err/policy_chosen``, ``err/policy_rejected``, ``err/ref_chosen``,
        ``err/ref_rejected``, ``implicit_acc`` (= ``mean(d < 0)``, ties ½), ``rewards/chosen``
        (``−β/2·(errθ(w) − errref(w))``), ``rewards/rejected``, ``rewards/margins`` (``−β/2·d``),
        ``rewards/accuracies`` (= ``implicit_acc``).
    """
    check_scores("diffusion_dpo", policy, reference, kind="error", paired=True, needs_reference=True)
    assert reference is not None and policy.rejected is not None and reference.rejected is not None
    return _dpo_core(policy.chosen, policy.rejected, reference.chosen, reference.rejected, beta)


def npo(policy: Scores, reference: Scores | None, *, beta: float) -> LossOutput:
    """Diffusion-NPO training loss (Wang et al. 2025): Diffusion-DPO with chosen and rejected swapped.

    ``d' = (errθ(l) − errref(l)) − (errθ(w) − errref(w))``, per pair ``−logσ(−β/2 · d')``: the model
    learns what humans *dislike* and is used as the negative branch of classifier-free guidance at
    inference (ALGORITHMS.md §2). ``ln 2`` at policy = reference.

    Args:
        policy: ``kind="error"`` paired scores (``chosen`` = the human-preferred sample, as everywhere).
        reference: ``kind="error"`` paired scores of the frozen base.
        beta: KL strength β (default 500 for SD1.5; the paper uses 2000 for SDXL).

    Returns:
        :class:`LossOutput` with the Diffusion-DPO metrics computed on the SWAPPED roles:
        ``err/policy_chosen`` is the error of the rejected sample, ``implicit_acc`` counts pairs where
        the policy moved toward the rejected sample, and so on.
    """
    check_scores("npo", policy, reference, kind="error", paired=True, needs_reference=True)
    assert reference is not None and policy.rejected is not None and reference.rejected is not None
    return _dpo_core(policy.rejected, policy.chosen, reference.rejected, reference.chosen, beta)


def minmax_normalise(t: torch.Tensor) -> torch.Tensor:
    """Min-max normalise reward scores to [0, 1]: ``(t − min t) / (max t − min t)``.

    SmPO expects rewards normalised ONCE over the whole dataset (not per batch): the data step calls
    this on every reward of the dataset before batching. A constant tensor maps to zeros.

    Args:
        t: reward scores of any shape.

    Returns:
        A float tensor of the same shape with values in [0, 1].
    """
    t = upcast(t)
    lo, hi = t.min(), t.max()
    if bool(hi == lo):
        return torch.zeros_like(t)
    return (t - lo) / (hi - lo)


def smpo(policy: Scores, reference: Scores | None, *, beta: float) -> LossOutput:
    """SmPO-Diffusion smoothed preference weight (Lu et al. 2025): Diffusion-DPO with a per-pair β.

    ``β_i = β · 10 · (2·p_w − 1)`` with ``p_w = softmax(r_w, r_l)[0] = σ(r_w − r_l)``, then the
    Diffusion-DPO loss ``−logσ(−β_i/2 · d_i)`` averaged over pairs. ``r_w, r_l`` are the pair's reward
    scores from ``policy.extra["reward_chosen"]`` and ``policy.extra["reward_rejected"]``; they must
    already be min-max normalised to [0, 1]. The normalisation is done once over the dataset by the
    data step (:func:`minmax_normalise` on every reward), never per batch here. A pair whose rewards barely
    differ gets β_i ≈ 0 (little push); a pair the reward model disagrees with gets a negative β_i.
    ``ln 2`` at policy = reference.

    Only the reward-derived β weighting of the paper is implemented (ALGORITHMS.md §1, "SmPO weight");
    the paper's other components (e.g. its renoising-based likelihood estimate) are not.

    Args:
        policy: ``kind="error"`` paired scores with ``extra["reward_chosen"]`` and
            ``extra["reward_rejected"]`` (``(B,)``, in [0, 1]).
        reference: ``kind="error"`` paired scores of the frozen base.
        beta: base KL strength β (default 5000, as Diffusion-DPO); the per-pair β is ``β·10·(2p_w − 1)``.

    Returns:
        :class:`LossOutput` with the Diffusion-DPO metrics, rewards computed with the per-pair β.

    Raises:
        ValueError: if either reward is missing from ``policy.extra``.
    """
    check_scores("smpo", policy, reference, kind="error", paired=True, needs_reference=True)
    missing = [k for k in ("reward_chosen", "reward_rejected") if k not in policy.extra]
    if missing:
        raise ValueError(
            f"smpo needs per-pair reward scores in policy.extra: missing {', '.join(missing)} "
            "(min-max normalised over the dataset by the data step)"
        )
    assert reference is not None and policy.rejected is not None and reference.rejected is not None
    r_w = upcast(policy.extra["reward_chosen"].detach())
    r_l = upcast(policy.extra["reward_rejected"].detach())
    p_w = torch.softmax(torch.stack([r_w, r_l], dim=-1), dim=-1)[..., 0]  # (B,)
    beta_i = beta * 10.0 * (2.0 * p_w - 1.0)  # (B,)
    return _dpo_core(policy.chosen, policy.rejected, reference.chosen, reference.rejected, beta_i)


def _f(z: torch.Tensor) -> torch.Tensor:
    """``f(z) = z / (eᶻ − 1)`` with ``f(0) = 1``, stable for any z (MaPO's transform of an error).

    For ``n = −|z|``: ``f(z) = n/expm1(n)`` when ``z < 0`` and ``n·eⁿ/expm1(n)`` when ``z > 0`` (the
    same value rewritten with ``e^{−z}``), so no ``eᶻ`` overflows; the series ``1 − z/2 + z²/12``
    covers ``|z| < 1e-6`` where ``0/0`` would appear.
    """
    small = z.abs() < 1e-6
    zs = torch.where(small, torch.ones_like(z), z)  # keeps the unused branch (and its gradient) finite
    n = -zs.abs()
    base = n / torch.expm1(n)
    big = base * torch.where(zs > 0, torch.exp(n), torch.ones_like(n))
    return torch.where(small, 1.0 - z / 2.0 + z * z / 12.0, big)


def mapo(
    policy: Scores,
    reference: Scores | None,
    *,
    beta: float,
    s: float = 0.5,
    num_train_timesteps: int = 1000,
) -> LossOutput:
    """MaPO, margin-aware preference optimisation, reference-free (Hong et al. 2024).

    ``f(z) = z/(eᶻ − 1)``, ``m = f(s·errθ(w)) − f(s·errθ(l))``, per pair
    ``errθ(w) − β_m · logσ(T · m)``, averaged over pairs: the chosen sample's denoising loss plus a
    margin term pushing the chosen error below the rejected one. ``reference`` is ignored entirely
    (it may be None). At ``errθ(w) = errθ(l) = e`` the loss is ``e + β_m·ln 2``.

    Args:
        policy: ``kind="error"`` paired scores of the trained model.
        reference: ignored.
        beta: β_m, the weight of the margin term (paper default 0.1).
        s: the error scale inside f (default 0.5).
        num_train_timesteps: T, the number of training timesteps that scales the margin (default 1000).

    Returns:
        :class:`LossOutput` with ``err/policy_chosen``, ``err/policy_rejected``, ``rewards/margins``
        (= ``mean(m)``), ``implicit_acc`` (= ``mean(errθ(w) < errθ(l))``, ties ½) and
        ``rewards/accuracies`` (= ``implicit_acc``).
    """
    check_scores("mapo", policy, None, kind="error", paired=True, needs_reference=False)
    assert policy.rejected is not None
    pw, pl = upcast(policy.chosen), upcast(policy.rejected)
    m = _f(s * pw) - _f(s * pl)  # (B,) > 0 when the chosen error is lower (f decreases)
    loss = (pw - beta * F.logsigmoid(num_train_timesteps * m)).mean()
    acc = tie_half_accuracy(pw - pl)
    metrics = {
        "err/policy_chosen": pw.detach().mean(),
        "err/policy_rejected": pl.detach().mean(),
        "rewards/margins": m.detach().mean(),
        "implicit_acc": acc,
        "rewards/accuracies": acc,
    }
    return LossOutput(loss, metrics)


# ---- unpaired (KTO) -------------------------------------------------------------------------------


def diffusion_kto(
    policy: Scores,
    reference: Scores | None,
    *,
    beta: float,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
) -> LossOutput:
    """Diffusion-KTO (Li et al. 2024): Kahneman–Tversky optimisation on per-sample denoising errors.

    Implied reward ``r = errref − errθ`` (positive when the policy denoises the sample better than
    the reference); ``z = r − z_ref``; desirable samples ``λ_D(1 − σ(β·z))``, undesirable
    ``λ_U(1 − σ(−β·z))``; the mean over all samples. ``z_ref`` is the batch mean of
    ``errref − errθ``, detached and clamped ≥ 0. When both ``policy.extra["kl"]`` and
    ``reference.extra["kl"]`` hold errors on mismatched (prompt, sample) pairs, ``z_ref`` is instead
    ``max(0, mean(ref_kl − policy_kl))`` (the KTO paper's estimate, same sign as r). ``z_ref`` is
    per process (not gathered across GPUs). At policy = reference each sample's loss is λ/2.
    TKTO reuses this loss with (image, true caption) desirable and (image, mismatched caption)
    undesirable.

    Args:
        policy: ``kind="error"`` unpaired scores: ``chosen`` holds every sample, ``desirable`` marks them.
        reference: the frozen base's unpaired scores on the same samples.
        beta: KL strength β (paper default 1000).
        lambda_d: weight λ_D of desirable samples (default 1.0).
        lambda_u: weight λ_U of undesirable samples (default 1.0).

    Returns:
        :class:`LossOutput` with ``kl`` (z_ref), ``rewards/chosen`` / ``rewards/rejected`` (mean β·r
        over the desirable / undesirable samples), ``rewards/margins``, and ``err/policy_chosen``,
        ``err/ref_chosen`` (desirable), ``err/policy_rejected``, ``err/ref_rejected`` (undesirable).
        A group absent from the batch reports 0, so every batch has the same keys.
    """
    check_scores("diffusion_kto", policy, reference, kind="error", paired=False, needs_reference=True)
    assert reference is not None and policy.desirable is not None
    reward = upcast(reference.chosen) - upcast(policy.chosen)  # (B,)
    mismatched = None
    if "kl" in policy.extra and "kl" in reference.extra:
        mismatched = upcast(reference.extra["kl"]) - upcast(policy.extra["kl"])
    z_ref = kto_reference_point(reward, mismatched)
    loss, metrics = kto_core(reward, policy.desirable, z_ref, beta, lambda_d, lambda_u)
    des = policy.desirable.bool()
    metrics["err/policy_chosen"] = masked_mean(policy.chosen, des)
    metrics["err/policy_rejected"] = masked_mean(policy.chosen, ~des)
    metrics["err/ref_chosen"] = masked_mean(reference.chosen, des)
    metrics["err/ref_rejected"] = masked_mean(reference.chosen, ~des)
    return LossOutput(loss, metrics)
