"""Losses by name: one literal dict from name to :class:`LossSpec`, and weighted mixtures."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mm_align.losses import diffusion, sequence
from mm_align.types import LossOutput, Scores

__all__ = ["LossSpec", "LOSSES", "get_loss", "loss_param_names", "compute_loss"]


@dataclass(frozen=True)
class LossSpec:
    """A loss function and what it needs: a reference pass, a score kind, paired or unpaired data."""

    name: str
    fn: Callable[..., LossOutput]
    needs_reference: bool
    score_kind: Literal["logp", "error", "any"]
    paired: bool
    default_beta: float


LOSSES: dict[str, LossSpec] = {
    "diffusion_dpo": LossSpec("diffusion_dpo", diffusion.diffusion_dpo, True, "error", True, 5000.0),
    "npo": LossSpec("npo", diffusion.npo, True, "error", True, 500.0),
    "smpo": LossSpec("smpo", diffusion.smpo, True, "error", True, 5000.0),
    "mapo": LossSpec("mapo", diffusion.mapo, False, "error", True, 0.1),
    "diffusion_kto": LossSpec("diffusion_kto", diffusion.diffusion_kto, True, "error", False, 1000.0),
    "sigmoid": LossSpec("sigmoid", sequence.sigmoid, True, "logp", True, 0.1),
    "hinge": LossSpec("hinge", sequence.hinge, True, "logp", True, 0.1),
    "ipo": LossSpec("ipo", sequence.ipo, True, "logp", True, 0.1),
    "robust": LossSpec("robust", sequence.robust, True, "logp", True, 0.1),
    "bco_pair": LossSpec("bco_pair", sequence.bco_pair, True, "logp", True, 0.1),
    "sppo_hard": LossSpec("sppo_hard", sequence.sppo_hard, True, "logp", True, 0.1),
    "kto": LossSpec("kto", sequence.kto, True, "logp", False, 0.1),
    "sft": LossSpec("sft", sequence.sft, False, "any", True, 0.0),
}


def get_loss(name: str) -> LossSpec:
    """The spec of loss ``name``; an unknown name is an error listing the valid ones."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss '{name}'; valid losses: {', '.join(sorted(LOSSES))}") from None


def loss_param_names(name: str) -> dict[str, Any]:
    """The loss's own keyword parameters (besides β) with their defaults."""
    sig = inspect.signature(get_loss(name).fn)
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "beta"
    }


def _check(spec: LossSpec, policy: Scores, reference: Scores | None) -> None:
    if spec.score_kind != "any" and spec.score_kind != policy.kind:
        raise ValueError(f"loss '{spec.name}' needs '{spec.score_kind}' scores, got '{policy.kind}' scores")
    if spec.name != "sft" and spec.paired != policy.paired:
        need, got = ("paired", "unpaired") if spec.paired else ("unpaired", "paired")
        raise ValueError(f"loss '{spec.name}' needs {need} data, got {got} scores")
    if spec.needs_reference and reference is None:
        raise ValueError(f"loss '{spec.name}' needs reference scores, got none")


def compute_loss(
    names: list[str],
    weights: list[float] | None,
    policy: Scores,
    reference: Scores | None,
    beta: float | None = None,
    params: dict[str, Any] | None = None,
) -> LossOutput:
    """The weighted sum of the named losses (one name = that loss), with merged metrics.

    ``beta=None`` gives each loss its paper default. ``params`` is one flat dict; each loss gets
    the keys it declares, and a key no selected loss declares is an error.
    """
    if weights is None:
        weights = [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} loss weights for {len(names)} losses")
    specs = [get_loss(n) for n in names]
    params = params or {}
    declared = {k: v for s in specs for k, v in loss_param_names(s.name).items()}
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise ValueError(
            f"unknown loss parameter(s) {', '.join(unknown)} for losses {', '.join(names)}; "
            f"valid: {', '.join(sorted(declared)) or 'none'}"
        )
    total: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = {}
    for spec, w in zip(specs, weights):
        _check(spec, policy, reference)
        own = {k: params[k] for k in loss_param_names(spec.name) if k in params}
        out = spec.fn(policy, reference, beta=spec.default_beta if beta is None else beta, **own)
        total = w * out.loss if total is None else total + w * out.loss
        for k, v in out.metrics.items():
            metrics.setdefault(k, v)
        if len(specs) > 1:
            metrics[f"loss/{spec.name}"] = out.loss.detach()
    assert total is not None
    return LossOutput(total, metrics)
