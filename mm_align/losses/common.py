"""Helpers every loss family shares: dtype upcasting, score validation, tie-aware accuracy, KTO's value function.

Used by :mod:`mm_align.losses.diffusion` (denoising errors), :mod:`mm_align.losses.sequence`
(log-probabilities) and :mod:`mm_align.losses.registry`.
"""

from __future__ import annotations

import torch

from mm_align.types import Scores

__all__ = ["upcast", "check_scores", "tie_half_accuracy", "masked_mean", "kto_reference_point", "kto_core"]


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least float32 (half and bfloat16 are upcast; float64 is kept), gradient preserved."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def check_scores(
    name: str,
    policy: Scores,
    reference: Scores | None,
    *,
    kind: str,
    paired: bool | None,
    needs_reference: bool,
) -> None:
    """Raise a ValueError that says what is wrong when ``policy``/``reference`` do not fit loss ``name``.

    Args:
        name: the loss name, for the message.
        policy: the policy scores.
        reference: the reference scores (only checked when ``needs_reference``).
        kind: the score kind the loss consumes (``"logp"``, ``"error"`` or ``"any"``).
        paired: True for pairwise losses, False for unpaired ones (KTO), None to accept both.
        needs_reference: whether the loss reads ``reference``.
    """
    if kind != "any" and policy.kind != kind:
        raise ValueError(f"loss '{name}' needs '{kind}' scores (Scores.kind), got '{policy.kind}' scores")
    if paired is True and not policy.paired:
        raise ValueError(
            f"loss '{name}' needs paired scores (Scores.rejected set), got unpaired scores (rejected is None)"
        )
    if paired is False:
        if policy.paired:
            raise ValueError(
                f"loss '{name}' needs unpaired scores (rejected None, desirable set), got paired scores"
            )
        if policy.desirable is None:
            raise ValueError(f"loss '{name}' needs Scores.desirable (a bool per sample) for unpaired data")
        if policy.desirable.shape != policy.chosen.shape:
            raise ValueError(
                f"loss '{name}': desirable has shape {tuple(policy.desirable.shape)}, "
                f"scores have {tuple(policy.chosen.shape)}"
            )
    if policy.paired and policy.rejected is not None and policy.rejected.shape != policy.chosen.shape:
        raise ValueError(
            f"loss '{name}': chosen scores have shape {tuple(policy.chosen.shape)}, "
            f"rejected {tuple(policy.rejected.shape)}"
        )
    if not needs_reference:
        return
    if reference is None:
        raise ValueError(f"loss '{name}' needs reference scores, got reference=None")
    if reference.kind != policy.kind:
        raise ValueError(
            f"loss '{name}': policy scores are '{policy.kind}' but reference scores are '{reference.kind}'"
        )
    if reference.paired != policy.paired:
        raise ValueError(f"loss '{name}': policy and reference scores disagree on paired/unpaired")
    if reference.chosen.shape != policy.chosen.shape:
        raise ValueError(
            f"loss '{name}': policy scores have shape {tuple(policy.chosen.shape)}, "
            f"reference {tuple(reference.chosen.shape)}"
        )


def tie_half_accuracy(d: torch.Tensor) -> torch.Tensor:
    """``mean(d < 0)`` with exact ties (``d == 0``) counting ½ (ALGORITHMS.md §1: implicit accuracy).

    Args:
        d: ``(B,)`` per-pair differences where negative means "the chosen sample wins".

    Returns:
        A 0-dim float32 tensor in [0, 1].
    """
    d = d.detach()
    return ((d < 0).float() + 0.5 * (d == 0).float()).mean()


# ---- KTO (shared by diffusion_kto and sequence.kto) ----------------------------------------------------


def kto_reference_point(batch_reward: torch.Tensor, mismatched_reward: torch.Tensor | None) -> torch.Tensor:
    """KTO's reference point ``z_ref``: a batch-mean KL estimate, detached and clamped ≥ 0.

    Args:
        batch_reward: ``(B,)`` implied rewards of the batch itself.
        mismatched_reward: ``(B',)`` implied rewards on mismatched (prompt, sample) pairs, the
            estimate the KTO paper prefers, or None to use the batch itself.

    Returns:
        A 0-dim tensor ``max(0, mean(reward))``, detached.
    """
    r = mismatched_reward if mismatched_reward is not None else batch_reward
    return upcast(r.detach()).mean().clamp(min=0)


def kto_core(
    reward: torch.Tensor,
    desirable: torch.Tensor,
    z_ref: torch.Tensor,
    beta: float,
    lambda_d: float,
    lambda_u: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO's value function on implied rewards, shared by :func:`~mm_align.losses.diffusion.diffusion_kto` and
    :func:`~mm_align.losses.sequence.kto`.

    ``z = r − z_ref``; desirable samples ``λ_D(1 − σ(β·z))``, undesirable ``λ_U(1 − σ(−β·z))``; the
    mean over all samples.

    Returns:
        ``(loss, metrics)`` with ``kl`` (= z_ref), ``rewards/chosen`` (mean β·r over desirable samples,
        0 if none), ``rewards/rejected`` (over undesirable samples, 0 if none), ``rewards/margins``
        (their difference).
    """
    reward = upcast(reward)
    des = desirable.bool()
    z = reward - z_ref  # (B,)
    per = torch.where(des, lambda_d * (1 - torch.sigmoid(beta * z)), lambda_u * (1 - torch.sigmoid(-beta * z)))
    r = (beta * reward).detach()
    chosen, rejected = masked_mean(r, des), masked_mean(r, ~des)
    metrics = {
        "kl": z_ref.detach().reshape(()),
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
    }
    return per.mean(), metrics


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Detached float mean of ``x`` where ``mask`` is True; 0 when the mask is empty (keys stay stable)."""
    x = upcast(x.detach())
    n = mask.sum()
    return torch.where(n > 0, (x * mask).sum() / n.clamp(min=1), x.new_zeros(()))
