"""Per-pair reward scores for SmPO (Lu et al. 2025, ALGORITHMS.md §1): read from records, min-max normalised
over the training set. Shared by every diffusion / flow adapter of the image wing.

A pair carries its rewards in ``meta`` under two keys (``reward_chosen`` / ``reward_rejected`` by default).
The range is taken ONCE over every chosen and rejected reward of the training set (the adapter's
``prepare``) and applied to every batch, training or eval, so a batch never normalises itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from mm_align.data import PreferencePair

__all__ = ["reward_keys", "record_rewards", "dataset_reward_range", "batch_rewards"]


def reward_keys(configured: Sequence[str] | None) -> tuple[str, str]:
    """The meta keys of the chosen and rejected rewards: ``configured`` or (``reward_chosen``, ``reward_rejected``)."""
    keys = list(configured or ["reward_chosen", "reward_rejected"])
    return keys[0], keys[1]


def record_rewards(record: Any, keys: tuple[str, str]) -> tuple[float, float] | None:
    """``(chosen, rejected)`` rewards of ``record``, or None when it carries none.

    Raises:
        ValueError: a reward is not a number or not finite (the message names the record).
    """
    kc, kr = keys
    meta = getattr(record, "meta", {}) or {}
    if kc not in meta or kr not in meta or meta[kc] is None or meta[kr] is None:
        return None
    try:
        w, l = float(meta[kc]), float(meta[kr])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"record {record.id!r}: rewards {kc}/{kr} are not numbers: {exc}") from exc
    if not (math.isfinite(w) and math.isfinite(l)):
        raise ValueError(f"record {record.id!r}: non-finite reward ({kc}={w}, {kr}={l})")
    return w, l


def dataset_reward_range(records: Sequence[Any], keys: tuple[str, str]) -> tuple[float, float] | None:
    """``(min, max)`` over every chosen and rejected reward of the training pairs; None when no pair has rewards.

    Raises:
        ValueError: some pairs carry rewards and others do not.
    """
    rewards = [record_rewards(r, keys) for r in records if isinstance(r, PreferencePair)]
    present = [r for r in rewards if r is not None]
    if not present:
        return None
    if len(present) != len(rewards):
        raise ValueError(
            f"{len(rewards) - len(present)} of {len(rewards)} pairs carry no reward scores "
            f"({' / '.join(keys)}): give every pair rewards, or none"
        )
    flat = [v for pair in present for v in pair]
    return min(flat), max(flat)


def batch_rewards(records: Sequence[Any], keys: tuple[str, str],
                  reward_range: tuple[float, float] | None) -> dict[str, torch.Tensor]:
    """``reward_chosen`` / ``reward_rejected`` ``(B,)`` in [0, 1] for a batch of pairs; ``{}`` when none has rewards.

    Raises:
        ValueError: only some records of the batch carry rewards, or ``reward_range`` is None (not prepared).
    """
    rewards = [record_rewards(r, keys) for r in records]
    if all(x is None for x in rewards):
        return {}
    if any(x is None for x in rewards):
        missing = next(r.id for r, x in zip(records, rewards) if x is None)
        raise ValueError(f"record {missing!r} carries no reward scores but others in its batch do")
    if reward_range is None:
        raise ValueError("reward scores found but the adapter was not prepared on the training set (prepare)")
    low, high = reward_range
    span = (high - low) or 1.0
    w = torch.tensor([(x[0] - low) / span for x in rewards], dtype=torch.float32)
    l = torch.tensor([(x[1] - low) / span for x in rewards], dtype=torch.float32)
    return {"reward_chosen": w, "reward_rejected": l}
