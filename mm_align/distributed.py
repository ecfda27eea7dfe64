"""What the training loop needs to know about the engine that runs it: one process, DDP, FSDP2 or DeepSpeed ZeRO.

accelerate prepares the model; these helpers hide where the engines differ so the loop in
:mod:`mm_align.trainer` reads the same for all of them:

- **Whole weights from sharded ones.** :func:`full_state_dict` gathers the model's state dict
  (``accelerator.get_state_dict``: FSDP2's full state dict, ZeRO-3's consolidated 16-bit weights);
  every process must call it, the main process gets the whole tensors. Checkpoints and the final
  save are written from it, so a checkpoint of a sharded run is the same file as a 1-process one.
- **Optimiser state.** DDP and one process: ``optimizer.state_dict()`` (identical on every rank).
  FSDP2: torch's full optimiser state dict keyed by parameter name
  (``torch.distributed.checkpoint.state_dict``), gathered for saving and scattered back on load, so a
  resumed sharded run continues exactly. DeepSpeed keeps the optimiser inside its engine:
  :func:`save_engine_state` / :func:`load_engine_state` write and read DeepSpeed's own checkpoint
  beside ours.
- **The reference.** The reference pass runs through the PREPARED model (with the LoRA adapters
  disabled), never the unwrapped module: under FSDP2 or ZeRO-3 the unwrapped module holds only this
  process's shard. The full-fine-tune reference copy is prepared for the engine too
  (:func:`prepare_reference`): sharded under FSDP2 and ZeRO-3, a plain copy on the device otherwise.

FSDP (version 1) is refused with a message pointing at FSDP2: LoRA needs ``use_orig_params`` and
mixed frozen/trainable flat parameters there, which FSDP2's per-parameter sharding does not.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType
from torch import nn

__all__ = [
    "Engine",
    "engine",
    "check_engine",
    "configure_engine",
    "loss_scale",
    "steps_itself",
    "sharded",
    "full_state_dict",
    "optimizer_state",
    "load_model_state",
    "load_optimizer_state",
    "prepare_reference",
    "grad_clip_parameters",
    "trainable_norm",
    "quiet_engine_detection",
    "save_engine_state",
    "load_engine_state",
]

logger = get_logger(__name__)

Engine = Literal["single", "ddp", "fsdp2", "deepspeed"]


def engine(accelerator: Accelerator) -> Engine:
    """The engine running this process: ``single``, ``ddp`` (multi-process data parallel), ``fsdp2``, ``deepspeed``."""
    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    if kind == DistributedType.FSDP:
        return "fsdp2"
    return "ddp" if accelerator.num_processes > 1 else "single"


def check_engine(accelerator: Accelerator, adapter: Any = None) -> None:
    """Refuse what the engine cannot run, with a message that names the fix.

    FSDP version 1 (see the module docstring); and, under a sharded engine, an adapter that keeps
    state of its own over the model's parameters (``state_dict`` / ``after_optimizer_step``, e.g.
    Self-NPO's EMA teacher): that state would hold this process's shards only, so its checkpoint
    would not be whole.
    """
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ValueError(
            "FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
            "(mm_align/configs/accelerate/fsdp.yaml is a working one)"
        )
    if sharded(accelerator) and adapter is not None:
        own = [h for h in ("state_dict", "after_optimizer_step") if hasattr(adapter, h)]
        if own:
            raise ValueError(
                f"{type(adapter).__name__} keeps its own state over the model's parameters ({', '.join(own)}), "
                f"which {engine(accelerator)} would shard: train it with DDP "
                "(accelerate launch --config_file \"$(mm-align ls accelerate ddp)\" ...) or on one process"
            )


def sharded(accelerator: Accelerator) -> bool:
    """True when parameters are split across processes (FSDP2, DeepSpeed), so whole weights must be gathered."""
    return engine(accelerator) in ("fsdp2", "deepspeed")


def configure_engine(
    accelerator: Accelerator, batch_size: int, accumulation: int, max_grad_norm: float | None
) -> None:
    """Hand the run's batch size, accumulation and clipping to an engine that owns them (DeepSpeed), before prepare.

    DeepSpeed steps, accumulates and clips inside its engine, so its config must say what the run's
    config says; a config file that says otherwise is overridden with a warning naming both values.
    """
    if engine(accelerator) != "deepspeed":
        return
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": 0.0 if max_grad_norm is None else float(max_grad_norm),
    }
    for key, value in wanted.items():
        if ds.get(key) not in (None, "auto", value):
            logger.warning(f"DeepSpeed config {key}={ds[key]} overridden by the run's {value}", main_process_only=True)
        ds[key] = value
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the process count


def loss_scale(accelerator: Accelerator, accumulation: int) -> float:
    """What the loop divides each micro-batch loss by: the accumulation steps, except under DeepSpeed (it does)."""
    return 1.0 if engine(accelerator) == "deepspeed" else float(accumulation)


def steps_itself(accelerator: Accelerator) -> bool:
    """True when the engine takes the optimiser step inside ``backward`` (DeepSpeed): no step can be skipped."""
    return engine(accelerator) == "deepspeed"


def full_state_dict(
    accelerator: Accelerator, model: nn.Module, trainable_only: bool = False
) -> dict[str, torch.Tensor]:
    """The whole state dict of a prepared ``model``; call on EVERY process (a collective when sharded).

    The main process gets whole tensors (on the CPU for FSDP2); under DDP or one process this is
    the unwrapped module's own state dict, no copy. ``trainable_only`` gathers only the parameters
    that require grad under FSDP2 and DeepSpeed (the LoRA weights, not the frozen base: a checkpoint of
    a LoRA run on SDXL then moves megabytes, not the whole UNet); elsewhere the caller filters.
    """
    kind = engine(accelerator)
    if kind == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        return get_model_state_dict(model, options=options)
    if kind == "deepspeed" and trainable_only:
        import deepspeed

        named = [(n, p) for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad]
        # ZeRO-3 partitions each parameter: gather just these, read-only (a no-op for ZeRO-2's whole ones)
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            return {n: p.detach().cpu().clone() for n, p in named}
    return accelerator.get_state_dict(model)


def optimizer_state(accelerator: Accelerator, model: nn.Module, optimizer: Any) -> dict[str, Any] | None:
    """The optimiser state to checkpoint; call on every process. None under DeepSpeed (its engine saves it)."""
    kind = engine(accelerator)
    if kind == "deepspeed":
        return None
    if kind == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, _inner(optimizer), options=options)
    return optimizer.state_dict()


def load_model_state(accelerator: Accelerator, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load (a subset of) whole weights into a prepared model, sharding them where the engine shards."""
    kind = engine(accelerator)
    if kind == "deepspeed":  # its engine checkpoint restores the (partitioned) weights: load_engine_state
        return
    if kind == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    accelerator.unwrap_model(model).load_state_dict(state, strict=False)


def load_optimizer_state(accelerator: Accelerator, model: nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    """The inverse of :func:`optimizer_state` (not used under DeepSpeed)."""
    if engine(accelerator) == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, _inner(optimizer), state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)


def grad_clip_parameters(accelerator: Accelerator, model: nn.Module, trainable: list[nn.Parameter]) -> list:
    """The parameter list to hand ``accelerator.clip_grad_norm_``.

    FSDP2 replaces the module's parameters with sharded ones when it is prepared, and accelerate's
    FSDP clipping recognises a model only by its full parameter list; elsewhere, the trainable ones.
    """
    return list(model.parameters()) if engine(accelerator) == "fsdp2" else trainable


def quiet_engine_detection() -> None:
    """Tell DeepSpeed, when it is installed and no GPU is visible, that it runs on the CPU.

    accelerate imports DeepSpeed (when installed) inside ``unwrap_model``, and DeepSpeed's device
    detection then warns "Setting accelerator to CPU ..." on every CPU run, in the middle of our bar.
    ``DS_ACCELERATOR=cpu`` is what that detection falls back to anyway; a value the user set is kept.
    """
    import os

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def trainable_norm(accelerator: Accelerator, model: nn.Module) -> float:
    """The L2 norm of the model's trainable parameters, whole across processes.

    Replicated parameters (one process, DDP, DeepSpeed ZeRO-1/2) are read as they are; sharded ones are
    summed over their local pieces and all-reduced: FSDP2's DTensors (``to_local``) and DeepSpeed
    ZeRO-3's partitions (``ds_tensor``). A collective under those engines: every process calls it.
    """
    total = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    pieces = False
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "to_local"):
            t, pieces = p.to_local(), True
        elif hasattr(p, "ds_tensor"):
            t, pieces = p.ds_tensor, True
        else:
            t = p
        total += t.detach().to(torch.float64).pow(2).sum().to(total.device)
    if sharded(accelerator):
        flag = torch.tensor(float(pieces), device=accelerator.device)
        if accelerator.reduce(flag, reduction="sum").item() > 0:
            total = accelerator.reduce(total, reduction="sum")
    return float(total.sqrt().item())


def prepare_reference(accelerator: Accelerator, reference: nn.Module) -> nn.Module:
    """A frozen full-fine-tune reference copy made ready for the engine (sharded where the policy is)."""
    kind = engine(accelerator)
    if kind == "fsdp2":
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, reference.to(accelerator.device))
    if kind == "deepspeed":
        import deepspeed

        config = dict(accelerator.state.deepspeed_plugin.deepspeed_config)
        stage = config.get("zero_optimization", {}).get("stage", 0)
        # an inference engine: ZeRO-3 shards the copy like the policy; below 3 a whole copy per process
        config["zero_optimization"] = {"stage": 3 if stage == 3 else 0}
        config.pop("optimizer", None), config.pop("scheduler", None)
        engine_, *_ = deepspeed.initialize(model=reference, config=config)
        engine_.eval()
        return engine_
    return reference.to(accelerator.device)


def save_engine_state(accelerator: Accelerator, model: Any, directory: str) -> None:
    """DeepSpeed only: its engine's own checkpoint (sharded optimiser state) under ``directory``; every process."""
    if engine(accelerator) == "deepspeed":
        model.save_checkpoint(directory, tag="engine", exclude_frozen_parameters=True)


def load_engine_state(accelerator: Accelerator, model: Any, directory: str) -> None:
    """DeepSpeed only: read back what :func:`save_engine_state` wrote (optimiser state; weights too)."""
    if engine(accelerator) == "deepspeed":
        # strict off: the engine checkpoint excludes the frozen base weights (the model already holds them)
        model.load_checkpoint(directory, tag="engine", load_optimizer_states=True, load_lr_scheduler_states=False,
                              load_module_strict=False)


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimiser inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)
