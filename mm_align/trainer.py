"""The training loop, top to bottom, for every modality.

One loop serves diffusion errors and token log-probs alike: the adapter turns records into a
batch and a batch into per-sample :class:`~mm_align.types.Scores`; the loss compares the
policy's scores with the reference's. Read :func:`train` from top to bottom: set-up, resume,
then per optimiser step — micro-batches, reference pass (adapters disabled or a frozen copy,
run first so its activations are freed before the policy's are kept; or the on-disk cache), policy
pass, loss, backward, the non-finite guard, clip, step, the divergence guard, log, save.

Three guards stop a run that would otherwise end with exit 0 and a useless or misleading result:

- the output directory: a fresh run refuses a non-empty ``output_dir`` (:class:`OutputDirNotEmptyError`)
  unless it resumes (``resume_from``) or is told to clear it (``overwrite_output_dir``);
- non-finite steps: a step whose loss or gradient is NaN/inf is skipped, and the warning names its
  records; too many in a row (``max_consecutive_nonfinite``) or too large a share at the end
  (``max_skipped_fraction``) raise :class:`NonFiniteLossError` listing them;
- divergence: a step whose loss rose ``divergence_factor``-fold over the first step's, or whose update
  changed the trainable weights' norm by more than ``divergence_update_ratio`` of it, is warned about;
  ``divergence_patience`` of them in a row raise :class:`DivergenceError`.

Data order and every per-sample random draw are functions of ``(seed, epoch, sample index)``,
and the position in the data is saved with each checkpoint, so a resumed run continues exactly
where the killed one stopped, and N processes see the same global batch as one process.
"""

from __future__ import annotations

import contextlib
import copy
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import broadcast_object_list, gather_object, send_to_device, set_seed
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from mm_align.atomic import default_file_mode
from mm_align.checkpoint import (
    ADAPTER_STATE_FILE,
    CHECKPOINT_RE,
    find_latest,
    load_checkpoint,
    model_state,
    save_checkpoint,
)
from mm_align.config import dump_yaml, write_resolved
from mm_align.distributed import (
    check_engine,
    configure_engine,
    engine,
    full_state_dict,
    grad_clip_parameters,
    load_engine_state,
    load_model_state,
    load_optimizer_state,
    loss_scale,
    optimizer_state,
    prepare_reference,
    quiet_engine_detection,
    save_engine_state,
    sharded,
    trainable_norm,
)
from mm_align.lora import add_lora, lora_disabled
from mm_align.losses import compute_loss, get_loss
from mm_align.metrics_log import MetricsLogger
from mm_align.reference_cache import ReferenceCache, default_cache_dir, records_fingerprint, sample_seed
from mm_align.run_config import TrainConfig
from mm_align.types import LossOutput, PreferenceAdapter, Scores, check_adapter

logger = get_logger(__name__)

__all__ = [
    "train",
    "TrainResult",
    "NonFiniteLossError",
    "DivergenceError",
    "OutputDirNotEmptyError",
    "epoch_batches",
    "evaluate",
]


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_consecutive_nonfinite`` optimiser steps in a row had a NaN/inf loss or gradient, or at
    the end of a run whose skipped steps exceed ``max_skipped_fraction``; the message names their records."""


class DivergenceError(RuntimeError):
    """Raised after ``divergence_patience`` diverged steps in a row (see ``TrainConfig.divergence_factor``)."""


class OutputDirNotEmptyError(ValueError):
    """A fresh run was pointed at a non-empty output directory without ``resume_from`` or ``overwrite_output_dir``."""


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    skipped_steps: int
    last_metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None
    final_dir: Path | None = None
    num_processes: int = 1
    is_main_process: bool = True


@dataclass
class _Position:
    """Where the run stands; saved in every checkpoint as ``trainer_state.json``."""

    step: int = 0
    epoch: int = 0
    micro_batch: int = 0  # micro-batches of ``epoch`` already consumed
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    # each skipped step: {"step": the step it would have been, "records": descriptions (see _describe_record)}
    skipped: list[dict[str, Any]] = field(default_factory=list)
    first_loss: float | None = None  # the run's first step's loss: the divergence rule's yardstick
    consecutive_diverged: int = 0


def epoch_batches(n: int, epoch: int, seed: int, batch_size: int, world_size: int, rank: int) -> list[list[int]]:
    """This process's micro-batches for ``epoch``: a seeded permutation cut into global batches.

    Global batch ``g`` holds permutation entries ``[g·B·W, (g+1)·B·W)``; process ``r`` takes the
    ``r``-th slice of size ``B``. So one process with batch ``B·W`` sees exactly the union of what
    ``W`` processes with batch ``B`` see. An incomplete last global batch is dropped.

    Ours rather than accelerate's prepared DataLoader (a ``DistributedSampler`` / ``skip_first_batches``):
    that one shards by ``index % W`` with a per-process batch, so the global batch's contents change with
    the process count, and resuming mid-epoch re-reads the skipped batches through collate. Here the
    order and every per-sample seed depend on ``(seed, epoch, index)`` alone.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g).tolist()
    global_size = batch_size * world_size
    out = []
    for start in range(0, n - global_size + 1, global_size):
        out.append(perm[start + rank * batch_size : start + (rank + 1) * batch_size])
    return out


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, records: Sequence[Any]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.records[i]


class _Collate:
    """Calls the adapter's collate with per-sample seeds; keeps the sample indices beside the batch."""

    def __init__(self, adapter: PreferenceAdapter, seed: int, epoch: int | None) -> None:
        self.adapter, self.seed, self.epoch = adapter, seed, epoch

    def __call__(self, items: list[tuple[int, Any]]) -> tuple[list[int], Any]:
        indices = [i for i, _ in items]
        seeds = [sample_seed(self.seed, i, self.epoch) for i in indices]
        return indices, self.adapter.collate([r for _, r in items], seeds)


def _loader(adapter, records, batches, cfg: TrainConfig, epoch: int | None) -> DataLoader:
    return DataLoader(
        _Indexed(records),
        batch_sampler=batches,
        collate_fn=_Collate(adapter, cfg.seed, epoch),
        num_workers=cfg.num_workers,
    )


def _mean_metrics(outputs: list[LossOutput]) -> dict[str, torch.Tensor]:
    keys = outputs[0].metrics.keys()
    return {k: torch.stack([o.metrics[k].float() for o in outputs]).mean() for k in keys}


def _umask_permissions(directory: Path) -> None:
    """Give every file an adapter's save wrote the umask's permissions (diffusers' LoRA writer leaves 0600)."""
    mode = default_file_mode()
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


def _describe_record(index: int, record: Any) -> str:
    """How a warning names a record: where the reader found it (``origin``: file and line, or row), its ``id``,
    and always its index in the training records."""
    where = []
    if getattr(record, "origin", None):
        where.append(record.origin)
    rid = getattr(record, "id", None)
    if rid is not None:
        where.append(f"id {rid!r}")
    where.append(f"index {index}")
    return "record " + ", ".join(where)


def _nonfinite_samples(*scores: Scores | None) -> set[int]:
    """Batch positions whose per-sample scores (chosen, rejected, extra) hold a NaN or inf, over ``scores``."""
    bad: set[int] = set()
    for s in scores:
        if s is None:
            continue
        tensors = [s.chosen, s.rejected, *s.extra.values()]
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.is_floating_point():
                flat = t.detach().reshape(t.shape[0], -1)  # (B, ...) -> (B, rest)
                bad.update(torch.nonzero(~torch.isfinite(flat).all(dim=1)).flatten().tolist())
    return bad


def _list_skipped(skipped: list[dict[str, Any]], limit: int = 20) -> str:
    lines = [f"  step {s['step']}: {'; '.join(s['records'])}" for s in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more skipped steps")
    return "\n".join(lines)


def _summarise_dir(directory: Path, limit: int = 8) -> str:
    """What a directory holds, checkpoints as a range: ``checkpoint-300 … checkpoint-400 (3 checkpoints), final/``."""
    children = sorted(directory.iterdir(), key=lambda p: p.name)
    ckpts = sorted((int(m.group(1)), c.name) for c in children if (m := CHECKPOINT_RE.match(c.name)))
    parts = []
    if len(ckpts) == 1:
        parts.append(ckpts[0][1])
    elif ckpts:
        parts.append(f"{ckpts[0][1]} … {ckpts[-1][1]} ({len(ckpts)} checkpoints)")
    others = [c.name + ("/" if c.is_dir() else "") for c in children if not CHECKPOINT_RE.match(c.name)]
    parts += others[:limit]
    if len(others) > limit:
        parts.append(f"and {len(others) - limit} more")
    return ", ".join(parts)


def _check_output_dir(output_dir: Path, cfg: TrainConfig, accelerator: Accelerator) -> None:
    """Refuse a non-empty ``output_dir`` for a fresh run; clear it under ``overwrite_output_dir``.

    A run is fresh unless ``resume_from`` names a checkpoint, or is ``latest`` and ``output_dir`` holds one.
    The main process decides (and clears, before anything is written); every process gets its verdict, so
    all raise together.
    """
    error = None
    if accelerator.is_main_process:
        resumes = bool(cfg.resume_from) and (cfg.resume_from != "latest" or find_latest(output_dir) is not None)
        used = output_dir.is_dir() and any(output_dir.iterdir())
        if used and not resumes:
            resolved = output_dir.resolve()
            precious = resolved in (Path.cwd().resolve(), Path.home().resolve(), Path(resolved.anchor))
            if cfg.overwrite_output_dir and (precious or (output_dir / ".git").exists()):
                error = (
                    f"train.overwrite_output_dir=true would delete everything in {output_dir}, which is the working "
                    "directory, the home directory, the filesystem root or a git checkout; refusing. Point "
                    "train.output_dir at the run's own directory."
                )
            elif cfg.overwrite_output_dir:
                logger.warning(
                    f"overwrite_output_dir=true: deleting the contents of {output_dir} "
                    f"({_summarise_dir(output_dir)})",
                    main_process_only=True,
                )
                for child in list(output_dir.iterdir()):
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            else:
                why = (
                    "resume_from=latest found no checkpoint in it, and it is not empty"
                    if cfg.resume_from
                    else "it is not empty"
                )
                error = (
                    f"output directory {output_dir} is already used by another run ({why}): it holds "
                    f"{_summarise_dir(output_dir)}. A new run would replace an earlier run's metrics.jsonl and "
                    "final/, and its old checkpoints would outrank the new ones (keep-last-k, resume_from=latest). "
                    "Pass train.resume_from=latest to continue that run, train.overwrite_output_dir=true to delete "
                    "its contents and start afresh, or choose another train.output_dir."
                )
    if accelerator.num_processes > 1:
        verdict = [error]
        broadcast_object_list(verdict, from_process=0)
        error = verdict[0]
        accelerator.wait_for_everyone()  # the directory is cleared before any process writes
    if error is not None:
        raise OutputDirNotEmptyError(error)


def _optimizer_format(accelerator: Accelerator) -> str:
    """How a checkpoint's optimiser state is laid out: torch's (by index), FSDP2's full (by name), DeepSpeed's."""
    return {"fsdp2": "fsdp2-full", "deepspeed": "deepspeed"}.get(engine(accelerator), "torch")


def train(
    adapter: PreferenceAdapter,
    records: Sequence[Any],
    cfg: TrainConfig,
    eval_records: Sequence[Any] | None = None,
    run_config: Any | None = None,
) -> TrainResult:
    """Train ``adapter.model`` on preference ``records`` with ``cfg``; returns where it ended.

    The reference of every loss that needs one is the base model: the policy with its LoRA
    adapters disabled (``finetune=lora``, no second copy), or a frozen deep copy
    (``finetune=full``), or scores cached on disk (``precompute_reference``).
    """
    # ---- set-up -------------------------------------------------------------------------------
    check_adapter(adapter)
    specs = [get_loss(name) for name in cfg.loss]
    needs_reference = any(s.needs_reference for s in specs)
    for s in specs:
        if s.score_kind not in ("any", adapter.score_kind):
            raise ValueError(f"loss '{s.name}' needs '{s.score_kind}' scores; adapter gives '{adapter.score_kind}'")
    if len(records) == 0:
        raise ValueError("no training records (all rows skipped or the dataset is empty)")

    if AcceleratorState._shared_state and not PartialState().use_distributed:
        # a second run in the same single process (a notebook, a test) may change the precision
        AcceleratorState._reset_state()
    quiet_engine_detection()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    check_engine(accelerator, adapter)
    world, rank, is_main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    _check_output_dir(output_dir, cfg, accelerator)  # before anything is written into it
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_resolved(run_config if run_config is not None else cfg, output_dir)

    prepare = getattr(adapter, "prepare", None)
    if prepare is not None:
        with accelerator.main_process_first():
            kept = prepare(list(records))
        if kept is not None:  # the adapter filtered or rewrote the set (e.g. a length audit); same on every process
            records = list(kept)
            if not records:
                raise ValueError(f"no training records left after {type(adapter).__name__}.prepare() "
                                 "(it dropped every one: see its report)")
    model = adapter.model
    reference_model: nn.Module | None = None
    if cfg.finetune == "lora":
        add_lora(model, cfg.lora, adapter.lora_target_modules)
    elif needs_reference and (not cfg.precompute_reference or (eval_records and cfg.eval_every)):
        # the training cache covers the training data only: eval still needs the frozen copy
        reference_model = copy.deepcopy(model).requires_grad_(False).eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )
    # The scheduler is stepped by hand once per optimiser step (not prepared), so N processes
    # follow the same schedule as one.
    scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps
    )
    # `model` is the prepared (possibly wrapped or sharded) module every forward pass goes through;
    # `base` the unwrapped one, for names and hooks only (under FSDP2 the two are one object).
    configure_engine(accelerator, cfg.batch_size, cfg.gradient_accumulation_steps, cfg.max_grad_norm)
    model, optimizer = accelerator.prepare(model, optimizer)
    base = accelerator.unwrap_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]  # FSDP2 swapped in sharded parameters
    clip_params = grad_clip_parameters(accelerator, model, trainable)
    if reference_model is not None:
        reference_model = prepare_reference(accelerator, reference_model)
    trainable_only = cfg.finetune == "lora"

    pos = _Position()
    if cfg.resume_from:
        ckpt = find_latest(output_dir) if cfg.resume_from == "latest" else Path(cfg.resume_from)
        if ckpt is None:
            logger.warning(f"resume_from=latest: no checkpoint in {output_dir}: starting fresh",
                           main_process_only=True)
        else:
            loaded = load_checkpoint(ckpt, base, scheduler, trainable_only=trainable_only, rank=rank)
            state = loaded.trainer_state
            saved_engine = state.get("optimizer_format", "torch")
            if saved_engine != _optimizer_format(accelerator):
                raise ValueError(
                    f"{ckpt} holds optimiser state written under {saved_engine!r}; this run is "
                    f"{_optimizer_format(accelerator)!r}: resume with the engine that wrote it"
                )
            load_model_state(accelerator, model, loaded.weights)
            if loaded.optimizer is not None:
                load_optimizer_state(accelerator, model, optimizer, loaded.optimizer)
            load_engine_state(accelerator, model, str(ckpt))
            if state["global_batch"] != cfg.batch_size * world * cfg.gradient_accumulation_steps:
                raise ValueError(
                    f"{ckpt} was written with a global batch of {state['global_batch']}; this run has "
                    f"{cfg.batch_size * world * cfg.gradient_accumulation_steps} "
                    "(batch_size × processes × accumulation)"
                )
            pos = _Position(**state["position"])
            if hasattr(adapter, "load_state_dict") and (ckpt / ADAPTER_STATE_FILE).is_file():
                adapter.load_state_dict(load_file(str(ckpt / ADAPTER_STATE_FILE)))
            logger.warning(f"resumed from {ckpt} at step {pos.step}", main_process_only=True)

    metrics_log = MetricsLogger(
        output_dir,
        report_to=cfg.report_to,
        run_name=cfg.run_name,
        enabled=is_main,
        resume_step=pos.step if cfg.resume_from else None,
    )
    n = len(records)
    micro_per_epoch = len(epoch_batches(n, 0, cfg.seed, cfg.batch_size, world, rank))
    steps_per_epoch = micro_per_epoch // cfg.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise ValueError(
            f"{n} records give no complete optimiser step with batch_size {cfg.batch_size} × {world} processes × "
            f"{cfg.gradient_accumulation_steps} accumulation steps"
        )
    draw_epoch = (lambda e: None) if cfg.sample_seeds == "fixed" else (lambda e: e)

    # ---- the reference pass -------------------------------------------------------------------
    def reference_scores(batch: Any) -> Scores:
        # through the prepared model: under FSDP2 / ZeRO-3 the unwrapped module holds only a shard
        with torch.no_grad(), accelerator.autocast():
            if reference_model is not None:
                return adapter.scores(batch, reference_model).detach()
            with lora_disabled(model):
                return adapter.scores(batch, model).detach()

    caches: dict[int | None, ReferenceCache] = {}

    def reference_cache(epoch: int) -> ReferenceCache:
        key_epoch = draw_epoch(epoch) if adapter.stochastic_scores else None
        if key_epoch not in caches:
            caches.clear()  # one epoch's cache in memory at a time
            key = ReferenceCache.key(
                adapter.fingerprint(),
                records_fingerprint(records),
                {"seed": cfg.seed, "epoch": key_epoch, "precision": cfg.mixed_precision},
            )
            path = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
            path = path / f"ref-{key}.safetensors"

            def compute(idx: list[int]) -> Scores:
                items = [(i, records[i]) for i in idx]
                _, batch = _Collate(adapter, cfg.seed, key_epoch)(items)
                return reference_scores(send_to_device(batch, accelerator.device))

            # every process scores its share (the passes are collectives under sharding) and the shares are gathered
            caches[key_epoch] = ReferenceCache.load_or_build(
                path, n, compute, cfg.batch_size, is_main, rank=rank, world=world,
                gather=lambda t: accelerator.gather(t.to(accelerator.device)).cpu(),
            )
        return caches[key_epoch]

    # ---- the loop -----------------------------------------------------------------------------
    model.train()
    bar = tqdm(total=cfg.max_steps, initial=pos.step, disable=not is_main, desc="train", dynamic_ncols=True)
    window: list[dict[str, torch.Tensor]] = []
    last_logged: dict[str, float] = {}
    last_ckpt: Path | None = find_latest(output_dir)
    batches_iter: Iterator[tuple[list[int], Any]] | None = None
    t_window = time.perf_counter()

    def next_micro_batch() -> tuple[list[int], Any]:
        nonlocal batches_iter
        while True:
            if batches_iter is None:
                batches = epoch_batches(n, pos.epoch, cfg.seed, cfg.batch_size, world, rank)
                batches = batches[: steps_per_epoch * cfg.gradient_accumulation_steps][pos.micro_batch :]
                batches_iter = iter(_loader(adapter, records, batches, cfg, draw_epoch(pos.epoch)))
            item = next(batches_iter, None)
            if item is not None:
                pos.micro_batch += 1
                return item
            pos.epoch, pos.micro_batch, batches_iter = pos.epoch + 1, 0, None

    def last_good() -> str:
        return str(last_ckpt) if last_ckpt is not None else "none (no checkpoint written yet)"

    def stop(error: Exception) -> None:
        """End the run on a guard: close the bar and the metric sinks, then raise ``error``."""
        bar.close()
        metrics_log.close()
        raise error

    weights_norm: float | None = None  # ‖θ‖ of the trainable weights after the last step (the update rule)
    while pos.step < cfg.max_steps:
        outputs: list[LossOutput] = []
        finite = torch.ones((), device=accelerator.device)
        step_indices: list[int] = []  # this process's records of the step, in order
        bad_indices: list[int] = []  # ... of them, those whose policy or reference scores are non-finite
        for micro in range(cfg.gradient_accumulation_steps):
            indices, batch = next_micro_batch()
            batch = send_to_device(batch, accelerator.device)
            last_micro = micro == cfg.gradient_accumulation_steps - 1
            sync = contextlib.nullcontext() if last_micro else accelerator.no_sync(model)
            with sync:
                # The live reference pass runs BEFORE the policy's: its activations are freed before the
                # policy's are saved for backward, so the step's peak memory is the plain step's.
                live_reference = reference_scores(batch) if needs_reference and not cfg.precompute_reference else None
                with accelerator.autocast():
                    policy = adapter.scores(batch, model)
                reference = None
                if needs_reference:
                    reference = (
                        reference_cache(pos.epoch).lookup(indices, policy, accelerator.device)
                        if cfg.precompute_reference
                        else live_reference
                    )
                out = compute_loss(cfg.loss, cfg.loss_weights, policy, reference, cfg.beta, cfg.loss_params)
                finite = finite * torch.isfinite(out.loss.detach()).float()
                step_indices += indices
                if not torch.isfinite(out.loss.detach()):
                    bad_indices += [indices[i] for i in sorted(_nonfinite_samples(policy, reference))]
                accelerator.gradient_state._set_sync_gradients(last_micro)  # DeepSpeed steps at the boundary only
                accelerator.backward(out.loss / loss_scale(accelerator, cfg.gradient_accumulation_steps))
            outputs.append(out)

        max_norm = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
        grad_norm = accelerator.clip_grad_norm_(clip_params, max_norm)
        if grad_norm is None:  # backends that clip internally (DeepSpeed) report no norm
            grad_norm = torch.zeros(())
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 reports the norm as a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        finite = finite * torch.isfinite(torch.as_tensor(grad_norm, device=accelerator.device)).float()
        finite = accelerator.reduce(finite, reduction="sum") if world > 1 else finite
        if finite.item() < world:  # every process skips together
            optimizer.zero_grad(set_to_none=True)
            if world > 1:  # the records of the whole global step (a collective: every process is here)
                step_indices, bad_indices = (sum(gather_object([x]), []) for x in (step_indices, bad_indices))
            # the records whose scores are non-finite when the scores tell; else every record of the step
            # (a non-finite gradient, or a loss that is non-finite from finite scores)
            named = bad_indices or step_indices
            described = [_describe_record(i, records[i]) for i in named]
            pos.skipped_steps += 1
            pos.consecutive_nonfinite += 1
            pos.skipped.append({"step": pos.step + 1, "records": described})
            which = "non-finite scores in" if bad_indices else "the step's records"
            logger.warning(
                f"non-finite loss or gradient at step {pos.step + 1}: step skipped "
                f"({pos.consecutive_nonfinite} in a row, {pos.skipped_steps} in all); {which}: "
                f"{'; '.join(described)}",
                main_process_only=True,
            )
            if pos.consecutive_nonfinite >= cfg.max_consecutive_nonfinite:
                stop(NonFiniteLossError(
                    f"{pos.consecutive_nonfinite} optimiser steps in a row had a non-finite loss or gradient "
                    f"(at step {pos.step + 1}); stopping. The last good checkpoint is {last_good()}. Lower the "
                    "learning rate or β, enable gradient clipping, or check the data. Records of the skipped "
                    f"steps:\n{_list_skipped(pos.skipped[-pos.consecutive_nonfinite:])}"
                ))
            continue
        if cfg.divergence_patience and weights_norm is None:  # the yardstick of the update rule (start, resume)
            weights_norm = trainable_norm(accelerator, model)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if hasattr(adapter, "after_optimizer_step"):
            adapter.after_optimizer_step(base)
        pos.step += 1
        pos.consecutive_nonfinite = 0
        step_metrics = _mean_metrics(outputs)
        step_metrics["loss"] = torch.stack([o.loss.detach().float() for o in outputs]).mean()
        step_metrics["grad_norm"] = torch.as_tensor(grad_norm, dtype=torch.float32, device=accelerator.device)
        window.append(step_metrics)
        bar.update(1)

        # the divergence guard: |loss| rose divergence_factor-fold over the first step's (floor 1), or the
        # step changed the trainable weights' norm by more than divergence_update_ratio of it
        diverged = False
        if cfg.divergence_patience:
            step_loss = step_metrics["loss"]
            step_loss = float((accelerator.reduce(step_loss, reduction="sum") / world).item() if world > 1
                              else step_loss.item())
            if pos.first_loss is None:
                pos.first_loss = step_loss
            limit = cfg.divergence_factor * max(abs(pos.first_loss), 1.0)
            before, weights_norm = weights_norm, trainable_norm(accelerator, model)
            update = abs(weights_norm - before) / before if before else 0.0
            why = []
            if abs(step_loss) > limit:
                why.append(f"loss {step_loss:.4g} > divergence_factor {cfg.divergence_factor:g} × max(|first step's "
                           f"loss {pos.first_loss:.4g}|, 1) = {limit:.4g}")
            if update > cfg.divergence_update_ratio or not math.isfinite(weights_norm):
                why.append(f"the update changed the trainable weights' norm from {before:.4g} to {weights_norm:.4g} "
                           f"(|Δ‖θ‖| / ‖θ‖ = {update:.3g} > divergence_update_ratio {cfg.divergence_update_ratio:g})")
            diverged = bool(why)
            pos.consecutive_diverged = pos.consecutive_diverged + 1 if diverged else 0
            if diverged:
                logger.warning(
                    f"step {pos.step} diverged: {'; '.join(why)} ({pos.consecutive_diverged} in a row; the run "
                    f"stops at divergence_patience={cfg.divergence_patience})",
                    main_process_only=True,
                )
            if pos.consecutive_diverged >= cfg.divergence_patience:
                stop(DivergenceError(
                    f"{pos.consecutive_diverged} optimiser steps in a row diverged (at step {pos.step}: "
                    f"{'; '.join(why)}); stopping. The last good checkpoint is {last_good()}. Lower the "
                    "learning rate or β, enable gradient clipping (max_grad_norm), or raise divergence_factor / "
                    "divergence_update_ratio, or set divergence_patience=null if this run legitimately grows."
                ))

        if pos.step % cfg.log_every == 0 or pos.step == cfg.max_steps:
            stacked = {k: torch.stack([m[k] for m in window]).mean() for k in window[0]}
            if world > 1:
                stacked = {k: v / world for k, v in accelerator.reduce(stacked, reduction="sum").items()}
            elapsed = time.perf_counter() - t_window
            last_logged = {k: float(v.item()) for k, v in stacked.items()}
            last_logged.update(
                lr=scheduler.get_last_lr()[0],
                skipped_steps=pos.skipped_steps,
                epoch=pos.epoch,
                steps_per_second=len(window) / max(elapsed, 1e-9),
            )
            metrics_log.log(pos.step, last_logged)
            bar.set_postfix(loss=f"{last_logged['loss']:.4f}")
            window, t_window = [], time.perf_counter()

        if cfg.eval_every and eval_records and pos.step % cfg.eval_every == 0:
            metrics_log.log(pos.step, evaluate(adapter, model, eval_records, cfg, accelerator, reference_model))

        # a diverged step writes no periodic checkpoint: keep-last-k must not prune a good one for it
        if (pos.step % cfg.checkpointing_steps == 0 and not diverged) or pos.step == cfg.max_steps:
            gathered = full_state_dict(accelerator, model, trainable_only) if sharded(accelerator) else None
            opt_state = optimizer_state(accelerator, model, optimizer)
            last_ckpt = save_checkpoint(
                output_dir,
                pos.step,
                model_state(base, trainable_only, gathered) if is_main else {},
                opt_state,
                scheduler,
                {
                    "position": vars(pos).copy(),
                    "global_batch": cfg.batch_size * world * cfg.gradient_accumulation_steps,
                    "loss": cfg.loss,
                    "finetune": cfg.finetune,
                    "optimizer_format": _optimizer_format(accelerator),
                },
                is_main=is_main,
                rank=rank,
                barrier=accelerator.wait_for_everyone,
                keep_last=cfg.checkpoints_total_limit,
                extra_files={"config.yaml": dump_yaml(run_config if run_config is not None else cfg)},
                extra_tensors={ADAPTER_STATE_FILE: adapter.state_dict()} if hasattr(adapter, "state_dict") else None,
                engine_state=(lambda d: save_engine_state(accelerator, model, str(d)))
                if engine(accelerator) == "deepspeed" else None,
            )
            del gathered, opt_state
    bar.close()
    metrics_log.close()

    attempted = pos.step + pos.skipped_steps
    if cfg.max_skipped_fraction is not None and attempted and pos.skipped_steps / attempted > cfg.max_skipped_fraction:
        raise NonFiniteLossError(
            f"{pos.skipped_steps} of {attempted} optimiser steps ({pos.skipped_steps / attempted:.1%}) were skipped "
            f"for a non-finite loss or gradient, more than max_skipped_fraction={cfg.max_skipped_fraction:g}; "
            f"final/ was not written (the last checkpoint is {last_ckpt}). Fix or drop these records, or resume "
            "with train.resume_from=latest train.max_skipped_fraction=null to write final/ from it anyway. "
            f"Records of the skipped steps:\n{_list_skipped(pos.skipped)}"
        )

    final_dir = None
    if cfg.save_final:
        # sharded weights are gathered whole (a collective) and handed to the adapter's save
        gathered = full_state_dict(accelerator, model, trainable_only) if sharded(accelerator) else None
        if is_main:
            final_dir = output_dir / "final"
            if gathered is None:
                adapter.save(base, str(final_dir), lora=trainable_only)
            else:
                adapter.save(base, str(final_dir), lora=trainable_only, state_dict=gathered)
            _umask_permissions(final_dir)
    accelerator.wait_for_everyone()
    return TrainResult(output_dir, pos.step, pos.skipped_steps, last_logged, last_ckpt, final_dir, world, is_main)


@torch.no_grad()
def evaluate(
    adapter: PreferenceAdapter,
    model: nn.Module,
    records: Sequence[Any],
    cfg: TrainConfig,
    accelerator: Accelerator | None = None,
    reference_model: nn.Module | None = None,
) -> dict[str, float]:
    """The loss and its metrics over ``records`` (fixed per-sample draws), as ``eval/<key>``.

    Each process scores its share of the records; the means are combined across processes.
    """
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    specs = [get_loss(name) for name in cfg.loss]
    needs_reference = any(s.needs_reference for s in specs)
    was_training = model.training
    model.eval()
    idx = list(range(rank, len(records), world))
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros((), device=device)
    autocast = accelerator.autocast() if accelerator is not None else contextlib.nullcontext()
    with autocast:
        for start in range(0, len(idx), cfg.batch_size):
            chunk = idx[start : start + cfg.batch_size]
            _, batch = _Collate(adapter, cfg.seed + 1, None)([(i, records[i]) for i in chunk])
            batch = send_to_device(batch, device)
            policy = adapter.scores(batch, model)
            reference = None
            if needs_reference:
                if reference_model is not None:
                    reference = adapter.scores(batch, reference_model)
                else:
                    with lora_disabled(model):
                        reference = adapter.scores(batch, model)
            out = compute_loss(cfg.loss, cfg.loss_weights, policy, reference, cfg.beta, cfg.loss_params)
            w = float(len(chunk))
            for k, v in {"loss": out.loss, **out.metrics}.items():
                sums[k] = sums.get(k, torch.zeros((), device=device)) + v.detach().float() * w
            count += w
    if accelerator is not None and world > 1:
        sums = accelerator.reduce(sums, reduction="sum")
        count = accelerator.reduce(count, reduction="sum")
    model.train(was_training)
    return {f"eval/{k}": float((v / count.clamp(min=1)).item()) for k, v in sums.items()}
