"""The types every layer shares: per-sample scores, a loss's output, the adapter protocol.

One idea carries the suite (DESIGN.md): every preference method compares per-sample numbers of
the policy against a reference. Diffusion and flow models give a denoising *error* at a shared
(noise, timestep); token models give a summed *log-probability*. An adapter says which kind it
produces, and a loss says which kind it consumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn

ScoreKind = Literal["logp", "error"]

__all__ = ["ScoreKind", "Scores", "LossOutput", "PreferenceAdapter", "check_adapter", "OPTIONAL_HOOKS"]


@dataclass
class Scores:
    """Per-sample scores of one model (policy or reference) on one batch.

    Paired data: ``chosen[i]`` and ``rejected[i]`` belong to pair ``i``. Unpaired data (KTO):
    ``chosen`` holds every sample's score, ``rejected`` is None and ``desirable`` marks each one.

    Args:
        kind: ``"logp"`` (summed response log-probability, higher = more likely) or
            ``"error"`` (denoising error averaged over every non-batch dim, lower = more likely).
        chosen: ``(B,)`` scores of the chosen samples (or of all samples when unpaired).
        rejected: ``(B,)`` scores of the rejected samples, or None when unpaired.
        desirable: ``(B,)`` bool, only for unpaired data.
        n_tokens_chosen: ``(B,)`` response token counts (logp only; IPO and the SFT term need them).
        n_tokens_rejected: ``(B,)`` response token counts of the rejected responses.
        extra: per-sample side information a loss may read, e.g. ``reward_chosen`` /
            ``reward_rejected`` (SmPO), or ``kl`` (a KTO KL estimate from mismatched pairs).
    """

    kind: ScoreKind
    chosen: torch.Tensor
    rejected: torch.Tensor | None = None
    desirable: torch.Tensor | None = None
    n_tokens_chosen: torch.Tensor | None = None
    n_tokens_rejected: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def paired(self) -> bool:
        return self.rejected is not None

    def detach(self) -> Scores:
        """A copy with every tensor detached (what the reference pass and the cache hold)."""

        def d(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach()

        return Scores(
            kind=self.kind,
            chosen=self.chosen.detach(),
            rejected=d(self.rejected),
            desirable=d(self.desirable),
            n_tokens_chosen=d(self.n_tokens_chosen),
            n_tokens_rejected=d(self.n_tokens_rejected),
            extra={k: v.detach() for k, v in self.extra.items()},
        )


@dataclass
class LossOutput:
    """What every loss returns: a scalar to backpropagate and detached metrics under the shared keys.

    Metric keys (CONVENTIONS.md): ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
    ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``; diffusion losses add
    ``err/policy_chosen``, ``err/policy_rejected``, ``err/ref_chosen``, ``err/ref_rejected`` and
    ``implicit_acc``. Every metric is a 0-dim float tensor, already averaged over the batch.
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class PreferenceAdapter(Protocol):
    """What a modality provides to the trainer. Adding a backbone = one class with these members.

    The trainer owns the reference, not the adapter: it calls :meth:`scores` on the policy, and for
    losses that need a reference once more under ``no_grad`` on the same module with its LoRA
    adapters disabled (``finetune=lora``), on a frozen copy (``finetune=full``), or reads scores it
    cached on disk (``precompute_reference``). An adapter therefore never builds a second model.

    Attributes:
        model: the module the trainer optimises (LoRA is injected into it, or it is fully tuned).
        score_kind: ``"logp"`` or ``"error"``: the kind of :class:`Scores` that ``scores`` returns.
        stochastic_scores: True when a score depends on a random draw made in ``collate`` (noise,
            timestep, mask). The draw is seeded per sample by the trainer, so caching reference
            scores is exact only per (sample, epoch), or for all epochs with ``sample_seeds=fixed``.
        lora_target_modules: default module names LoRA targets in ``model``.
        dataset_formats: ``data.format`` values the adapter reads itself, name ->
            ``"module:reader"`` with ``reader(path, strict=, kind=, **data.options) -> ReadResult``
            (e.g. ``pickapic``); ``{}`` when it reads only the core formats (jsonl, parquet, hf).
        base_dir: where relative media paths in the records resolve (the data file's directory);
            :func:`~mm_align.orchestration.run_training` sets it before training.

    Optional hooks (see :data:`OPTIONAL_HOOKS`); the trainer calls them when an adapter has them:
        ``prepare(records)``: once per training set before the first step, on the main process
            first (dataset-level work: reward normalisation, precomputed latents). It may return the
            records to train on instead (a filtered or rewritten list, e.g. a length audit that drops
            or resizes samples; deterministic, so every process gets the same list); None keeps them.
        ``after_optimizer_step(model)``: after every optimiser step that was taken (e.g. an EMA teacher).
        ``state_dict() -> dict[str, Tensor]`` / ``load_state_dict(state)``: adapter state that a
            checkpoint must hold for an exact resume (e.g. EMA weights); saved as ``adapter_state.safetensors``.
            The two come together.
    """

    model: nn.Module
    score_kind: ScoreKind
    stochastic_scores: bool
    lora_target_modules: list[str]
    dataset_formats: dict[str, str]
    base_dir: Path | None

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> PreferenceAdapter:
        """Build the adapter from its ``model:`` config section (validated by the adapter's own dataclass)."""

    def collate(self, records: list[Any], seeds: list[int]) -> Any:
        """Turn records into a batch. ``seeds[i]`` seeds every random draw made for ``records[i]``."""

    def scores(self, batch: Any, model: nn.Module) -> Scores:
        """Per-sample scores of ``model`` (the policy, or the frozen reference) on ``batch``."""

    def fingerprint(self) -> str:
        """A string that changes whenever the base weights or scoring settings change (cache key)."""

    def save(self, model: nn.Module, output_dir: str, lora: bool, state_dict: dict[str, Any] | None = None) -> None:
        """Write the trained weights in the ecosystem's own format.

        Under a sharded engine (FSDP2, DeepSpeed ZeRO) ``model``'s parameters are shards, so the trainer
        gathers the whole state dict and passes it as ``state_dict`` (keys as ``model.state_dict()``;
        with LoRA it may hold only the trainable parameters): write from it, not from ``model``. Without
        sharding the trainer passes nothing. An adapter whose ``save`` takes no ``state_dict`` trains
        unsharded only.
        """


# What the training loop calls (train()); the rest of the protocol is what the CLI and recipes use.
TRAINING_MEMBERS = ("model", "score_kind", "stochastic_scores", "lora_target_modules", "collate", "scores",
                    "fingerprint", "save")
CONSTRUCTION_MEMBERS = ("from_config", "dataset_formats", "base_dir")
OPTIONAL_HOOKS = ("prepare", "after_optimizer_step", "state_dict", "load_state_dict")
_CALLABLE = {"collate", "scores", "fingerprint", "save", "from_config", *OPTIONAL_HOOKS}


def check_adapter(adapter: Any, construction: bool = False) -> None:
    """Validate an adapter against :class:`PreferenceAdapter` up front, naming every problem at once.

    Args:
        adapter: the object to check.
        construction: also require the members the CLI and recipes use (``from_config``,
            ``dataset_formats``, ``base_dir``); :func:`train` alone needs only the training members.

    Raises:
        TypeError: listing each missing member and each member of the wrong type.
    """
    name = type(adapter).__name__
    required = TRAINING_MEMBERS + (CONSTRUCTION_MEMBERS if construction else ())
    problems = [f"missing '{m}'" for m in required if not hasattr(adapter, m)]
    for m in _CALLABLE:
        if hasattr(adapter, m) and not callable(getattr(adapter, m)):
            problems.append(f"'{m}' is not callable")
    if hasattr(adapter, "model") and not isinstance(adapter.model, nn.Module):
        problems.append(f"'model' is a {type(adapter.model).__name__}, not a torch.nn.Module")
    if hasattr(adapter, "score_kind") and adapter.score_kind not in ("logp", "error"):
        problems.append(f"'score_kind' is {adapter.score_kind!r}; valid: 'logp', 'error'")
    if hasattr(adapter, "stochastic_scores") and not isinstance(adapter.stochastic_scores, bool):
        problems.append(f"'stochastic_scores' is a {type(adapter.stochastic_scores).__name__}, not a bool")
    targets = getattr(adapter, "lora_target_modules", [])
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
        problems.append("'lora_target_modules' is not a list of module names")
    formats = getattr(adapter, "dataset_formats", {})
    if not isinstance(formats, dict) or not all(isinstance(v, str) and ":" in v for v in formats.values()):
        problems.append("'dataset_formats' is not a dict of name -> 'module:reader'")
    if hasattr(adapter, "state_dict") != hasattr(adapter, "load_state_dict"):
        problems.append("'state_dict' and 'load_state_dict' come together (an exact resume needs both)")
    if problems:
        raise TypeError(f"{name} is not a PreferenceAdapter: " + "; ".join(problems) + " (mm_align/types.py)")
