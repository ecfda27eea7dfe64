"""Checkpoints: ``checkpoint-N/`` written atomically, keep-last-k, exact resume.

A checkpoint is first written to a hidden temporary directory and renamed to ``checkpoint-N``
only once every file (``trainer_state.json`` last) is on disk, so a run killed mid-save leaves
no directory that :func:`find_latest` would pick. Nothing is pickled: weights in safetensors,
the optimiser state through ``torch.save`` / ``torch.load(weights_only=True)``, the rest JSON.

Why our own and not ``accelerator.save_state`` / ``load_state``: an exact resume needs, beside the
weights and optimiser, the data position (epoch and micro-batch within it) and a check that the
global batch is the one the checkpoint was written with; accelerate's state holds neither. Its
weights are written with pickle-free safetensors only for the model, and it has no atomic rename,
so a run killed mid-save can leave a directory that looks complete. Sharded engines still go
through accelerate: the caller gathers whole weights (``accelerator.get_state_dict``) and, for
DeepSpeed, the engine writes its own optimiser shards into the same temporary directory
(:mod:`mm_align.distributed`), so the rename covers them too.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mm_align.atomic import atomic_write_json

__all__ = [
    "CHECKPOINT_RE",
    "find_latest",
    "list_checkpoints",
    "save_checkpoint",
    "load_checkpoint",
    "LoadedCheckpoint",
    "model_state",
    "rng_state",
    "set_rng_state",
]

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
ADAPTER_STATE_FILE = "adapter_state.safetensors"  # an adapter's own state (e.g. EMA weights), when it has one


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those holding ``trainer_state.json``), oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = CHECKPOINT_RE.match(child.name)
        if m and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def find_latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``output_dir``, or None."""
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) generator states as JSON-able data."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _tuple_to_json(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(_json_to_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]]
        torch.cuda.set_rng_state_all(cuda_states)


def _tuple_to_json(value: Any) -> Any:
    return [_tuple_to_json(v) for v in value] if isinstance(value, tuple) else value


def _json_to_tuple(value: Any) -> Any:
    return tuple(_json_to_tuple(v) for v in value) if isinstance(value, list) else value


def model_state(
    model: nn.Module, trainable_only: bool, full: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds: the trainable parameters (LoRA) or the whole state dict.

    Args:
        model: the (unwrapped) module; gives the names of the trainable parameters.
        trainable_only: keep only parameters that require grad (LoRA).
        full: the whole state dict when it was gathered from shards (:func:`mm_align.distributed.full_state_dict`);
            None reads ``model.state_dict()``.
    """
    state = full if full is not None else model.state_dict()
    if trainable_only:
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        missing = [n for n in names if n not in state]
        if missing:
            raise KeyError(f"trainable parameters absent from the state dict: {missing[:5]}")
        return {n: _whole(state[n]) for n in names}
    return {n: _whole(t) for n, t in state.items()}


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().cpu()


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    scheduler: Any,
    trainer_state: dict[str, Any],
    *,
    is_main: bool,
    rank: int,
    barrier: Any,
    keep_last: int | None = None,
    extra_files: dict[str, str] | None = None,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    engine_state: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``output_dir/checkpoint-{step}`` atomically and prune to the newest ``keep_last``.

    Every process writes its own RNG state (and, with ``engine_state``, its part of an engine's own
    checkpoint, e.g. DeepSpeed's sharded optimiser); the main process writes the whole ``weights``
    (gathered by the caller), the optimiser state, the scheduler and (last) ``trainer_state.json``,
    then renames the directory into place. ``barrier`` is a callable that waits for every process
    (``accelerator.wait_for_everyone``).
    """
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".checkpoint-{step}.tmp"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier()
    atomic_write_json(tmp / f"rng_state_{rank}.json", rng_state())
    if engine_state is not None:
        engine_state(tmp)
    barrier()
    if is_main:
        save_file(weights, str(tmp / "model.safetensors"))
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        atomic_write_json(tmp / "scheduler.json", _jsonable(scheduler.state_dict()))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        for name, tensors in (extra_tensors or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / name))
        atomic_write_json(tmp / STATE_FILE, trainer_state)
        if final.exists():  # a resumed run reaching the same step again: replace the old one
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last is not None:
            for old in list_checkpoints(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` read; the caller puts weights and optimiser state into its (prepared) objects."""

    path: Path
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    trainer_state: dict[str, Any]


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    scheduler: Any,
    *,
    trainable_only: bool,
    rank: int,
) -> LoadedCheckpoint:
    """Read a checkpoint; restore the scheduler and this process's RNG; check the weights fit ``model``.

    The weights and optimiser state are returned, not loaded: under a sharded engine they must go
    through it (:mod:`mm_align.distributed`).
    """
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    weights = load_file(str(path / "model.safetensors"))
    expected = (
        [n for n, p in model.named_parameters() if p.requires_grad] if trainable_only else list(model.state_dict())
    )
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]} "
            "(was it written with another finetune mode or LoRA target list?)"
        )
    optimizer_file = path / "optimizer.pt"
    optimizer = torch.load(optimizer_file, weights_only=True, map_location="cpu") if optimizer_file.is_file() else None
    scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    rng_file = path / f"rng_state_{rank}.json"
    if rng_file.is_file():
        set_rng_state(json.loads(rng_file.read_text()))
    return LoadedCheckpoint(path, weights, optimizer, json.loads((path / STATE_FILE).read_text()))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return None  # e.g. lambdas inside LambdaLR: rebuilt from the config, never serialised
