"""From a run config to a trained model: what ``mm-align train`` and every quickstart call.

:func:`run_training` does the orchestration that sits between a config and :func:`~mm_align.trainer.train`:
it builds the adapter by name (:data:`~mm_align.recipes.ADAPTERS`), checks it against the adapter
contract, infers the data kind from the losses (paired, or unpaired for KTO-type losses; ``sft``
goes with either), points the adapter's ``base_dir`` at the data root, reads the training and eval
data in the core formats or the adapter's own (``dataset_formats``), and trains. No modality
imports the CLI to train: each calls this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from accelerate.logging import get_logger

from mm_align.config import from_dict, load_config
from mm_align.data import ColumnMap, ReadResult, read_preferences
from mm_align.losses import get_loss
from mm_align.run_config import DataConfig, RunConfig
from mm_align.trainer import TrainResult, train
from mm_align.types import check_adapter

logger = get_logger(__name__)

__all__ = ["load_run_config", "infer_data_kind", "read_data", "run_training"]


def load_run_config(config: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """A :class:`RunConfig` from a YAML file or a shipped config's name, with ``key=value`` overrides."""
    from mm_align.recipes import resolve_config_path

    return load_config(RunConfig, resolve_config_path(str(config)), list(overrides))


def infer_data_kind(losses: Sequence[str]) -> Literal["paired", "unpaired"]:
    """``"paired"`` or ``"unpaired"`` from the losses of a run; ``sft`` goes with either.

    Raises:
        ValueError: the losses mix paired and unpaired ones.
    """
    kinds = {s.paired for s in (get_loss(n) for n in losses) if s.name != "sft"} or {True}
    if len(kinds) > 1:
        raise ValueError(f"losses {list(losses)} mix paired and unpaired losses")
    return "paired" if kinds.pop() else "unpaired"


def read_data(adapter: Any, path: str, data: DataConfig, kind: Literal["paired", "unpaired"]) -> ReadResult:
    """Read ``path`` in ``data.format``: one of the adapter's own formats, or a core one (jsonl, parquet, hf)."""
    from mm_align.recipes import load_object

    formats = getattr(adapter, "dataset_formats", {}) or {}
    if data.format in formats:  # reader(path, strict=, kind=, **data.options); it rejects a kind it cannot give
        return load_object(formats[data.format])(path, strict=data.strict, kind=kind, **data.options)
    if data.options:
        raise ValueError(
            f"data.options is only read by an adapter's own formats ({', '.join(formats) or 'this adapter has none'})"
        )
    columns = from_dict(ColumnMap, data.columns, path="data.columns")
    return read_preferences(path, data.format, kind, columns, strict=data.strict)


def _records(adapter: Any, path: str, data: DataConfig, kind: Literal["paired", "unpaired"],
             log: Callable[[str], Any]) -> list[Any]:
    result = read_data(adapter, path, data, kind)
    if result.skipped:
        counts = ", ".join(f"{k}: {v}" for k, v in result.skipped_by_reason().items())
        log(f"{path}: {len(result.records)} records, {len(result.skipped)} rows skipped ({counts})")
    return list(result.records)[: data.max_samples]


def run_training(
    config: RunConfig, adapter: Any | None = None, log: Callable[[str], Any] | None = None
) -> TrainResult:
    """Build the adapter, read the data, train; returns where training ended.

    Args:
        config: the whole run (adapter, model, data, train); see :func:`load_run_config`.
        adapter: an adapter already built (e.g. by a script that holds the model); None builds
            ``config.adapter`` from ``config.model``.
        log: where the data summary goes (skipped rows and their reasons); the CLI passes ``print``.

    Raises:
        ValueError: no training data, losses that mix data kinds, an unknown adapter or format.
        TypeError: the adapter does not meet the adapter contract (the message names what is missing).
    """
    from mm_align.recipes import build_adapter

    say = log if log is not None else (lambda msg: logger.info(msg, main_process_only=True))
    if not config.data.train:
        raise ValueError("data.train is not set")
    kind = infer_data_kind(config.train.loss)
    if adapter is None:
        adapter = build_adapter(config.adapter, config.model)
    check_adapter(adapter, construction=True)
    train_path = Path(config.data.train).resolve()
    adapter.base_dir = train_path if train_path.is_dir() else train_path.parent  # relative media paths
    records = _records(adapter, config.data.train, config.data, kind, say)
    eval_records = _records(adapter, config.data.eval, config.data, kind, say) if config.data.eval else None
    return train(adapter, records, config.train, eval_records, run_config=config)
