"""Preference losses: pure functions on per-sample scores, dispatched by name (:data:`LOSSES`)."""

from mm_align.losses.diffusion import diffusion_dpo, diffusion_kto, mapo, minmax_normalise, npo, smpo
from mm_align.losses.registry import LOSSES, LossSpec, compute_loss, get_loss, loss_param_names
from mm_align.losses.sequence import bco_pair, hinge, ipo, kto, robust, sft, sigmoid, sppo_hard

__all__ = [
    "LOSSES",
    "LossSpec",
    "compute_loss",
    "get_loss",
    "loss_param_names",
    "diffusion_dpo",
    "npo",
    "smpo",
    "mapo",
    "diffusion_kto",
    "minmax_normalise",
    "sigmoid",
    "hinge",
    "ipo",
    "robust",
    "bco_pair",
    "sppo_hard",
    "kto",
    "sft",
]
