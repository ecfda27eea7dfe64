"""Losses by name: one literal dict from name to :class:`LossSpec`, and weighted mixtures."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mm_align.losses import diffusion, sequence
from mm_align.losses.diffusion import check_scores
from mm_align.types import LossOutput, Scores

__all__ = ["LossSpec", "LOSSES", "get_loss", "loss_param_names", "compute_loss"]


@dataclass(frozen=True)
class LossSpec:
    """A loss function and what it needs: a reference pass, a score kind, paired or unpaired data.

    Args:
        name: the registry key.
        fn: ``fn(policy, reference, *, beta, **own_params) -> LossOutput``; its keyword-only
            parameters other than ``beta`` are the loss's own parameters (:func:`loss_param_names`).
        needs_reference: False for reference-free losses (``mapo``, ``sft``): the trainer then
            skips the reference pass.
        score_kind: the :attr:`Scores.kind` the loss consumes; ``"any"`` for ``sft``.
        paired: False for unpaired losses (``kto``, ``diffusion_kto``: ``Scores.desirable`` set).
        default_beta: the paper default of β, used when the run sets none.
    """

    name: str
    fn: Callable[..., LossOutput]
    needs_reference: bool
    score_kind: Literal["logp", "error", "any"]
    paired: bool
    default_beta: float


# One literal dict: adding a loss = one function + one line here + a test.
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
    "sft": LossSpec("sft", sequence.sft, False, "any", True, 0.0),  # β unused; its mixture weight is γ
}


def get_loss(name: str) -> LossSpec:
    """The :class:`LossSpec` of loss ``name``.

    Args:
        name: a key of :data:`LOSSES`.

    Raises:
        ValueError: for an unknown name; the message lists every valid name, sorted.
    """
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss '{name}'; valid losses: {', '.join(sorted(LOSSES))}") from None


def loss_param_names(name: str) -> dict[str, Any]:
    """The loss's own keyword-only parameters (besides ``beta``) with their defaults.

    Args:
        name: a key of :data:`LOSSES`.

    Returns:
        ``{parameter: default}``, e.g. ``{"label_smoothing": 0.0}`` for ``robust``; ``{}`` for ``sigmoid``.
    """
    return dict(_param_defaults(get_loss(name).fn))


@functools.cache
def _param_defaults(fn: Callable[..., Any]) -> tuple[tuple[str, Any], ...]:
    # cached: compute_loss asks on every training step
    sig = inspect.signature(fn)
    return tuple(
        (p.name, p.default)
        for p in sig.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "beta"
    )


def _check(spec: LossSpec, policy: Scores, reference: Scores | None) -> None:
    """Raise a ValueError naming the mismatch when ``spec`` cannot consume these scores.

    ``sft`` (score kind "any") accepts both paired and unpaired scores (it reads the chosen /
    desirable samples only); every other loss must match its ``paired`` flag.
    """
    check_scores(
        spec.name,
        policy,
        reference,
        kind=spec.score_kind,
        paired=None if spec.score_kind == "any" else spec.paired,
        needs_reference=spec.needs_reference,
    )


def compute_loss(
    names: list[str],
    weights: list[float] | None,
    policy: Scores,
    reference: Scores | None,
    beta: float | None = None,
    params: dict[str, Any] | None = None,
) -> LossOutput:
    """The weighted sum ``Σ_k w_k · loss_k`` of the named losses (one name = that loss), with merged metrics.

    Args:
        names: loss names (keys of :data:`LOSSES`), each at most once.
        weights: one weight per name (default all 1.0); the weight of ``sft`` is the γ of ALGORITHMS.md §4.
        policy: the policy scores.
        reference: the reference scores, or None when no selected loss needs them.
        beta: one β for every loss, or None to give each loss its paper default (``default_beta``).
        params: ONE flat dict of the losses' own keyword parameters (e.g. ``{"label_smoothing": 0.1}``);
            each loss receives only the keys it declares (:func:`loss_param_names`).

    Returns:
        :class:`LossOutput`: ``loss`` = the weighted sum; ``metrics`` = the union of the components'
        metrics (the first loss wins on a key clash) plus ``loss/<name>``, each component's detached
        unweighted value.

    Raises:
        ValueError: on an unknown loss name, a duplicate name, a weight count that differs from the
            name count, a parameter no selected loss declares (the message lists the valid ones), a
            score kind the loss does not consume, paired scores for an unpaired loss (or the reverse),
            or a missing reference.
    """
    if not names:
        raise ValueError(f"no loss selected; valid losses: {', '.join(sorted(LOSSES))}")
    if len(set(names)) != len(names):
        raise ValueError(f"loss names must be unique, got {names}")
    weights = [1.0] * len(names) if weights is None else list(weights)
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} loss weights for {len(names)} losses ({', '.join(names)})")
    specs = [get_loss(n) for n in names]
    params = dict(params or {})
    own_params = {s.name: loss_param_names(s.name) for s in specs}
    declared = sorted({k for p in own_params.values() for k in p})
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise ValueError(
            f"unknown loss parameter(s) {', '.join(repr(k) for k in unknown)} for losses {', '.join(names)}; "
            f"valid keys: {', '.join(declared) or 'none (these losses take no parameters besides beta)'}"
        )
    for spec in specs:  # check every loss before computing any
        _check(spec, policy, reference)
    total: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = {}
    for spec, w in zip(specs, weights):
        kwargs = {k: params[k] for k in own_params[spec.name] if k in params}
        out = spec.fn(policy, reference, beta=spec.default_beta if beta is None else beta, **kwargs)
        total = w * out.loss if total is None else total + w * out.loss
        for k, v in out.metrics.items():
            metrics.setdefault(k, v)
        metrics[f"loss/{spec.name}"] = out.loss.detach().float()
    assert total is not None
    return LossOutput(total, metrics)
