"""Writing a trained denoiser in the diffusers format: the pieces every image adapter's ``save`` shares.

The UNet adapter (SD1.5/SDXL) and the flow-matching adapter (SD3/FLUX) differ only in which pipeline class
writes the LoRA file and under which component name; the full-model save, the peft check and the merged
pipeline (loaded before anything is written, fused by diffusers itself, swapped in atomically) are these.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from mm_align.image.loading import quiet_loading
from torch import nn

from mm_align.lora import ADAPTER_NAME

__all__ = ["save_full_component", "peft_lora_config", "load_base_pipeline", "write_merged_pipeline"]


def save_full_component(model: nn.Module, out: Path, component: str, state_dict: dict[str, Any] | None) -> None:
    """A fully fine-tuned denoiser as the pipeline component ``out/<component>`` (``save_pretrained``)."""
    out.mkdir(parents=True, exist_ok=True)
    kw = {} if state_dict is None else {"state_dict": state_dict}
    model.save_pretrained(out / component, **kw)  # type: ignore[operator]


def peft_lora_config(model: nn.Module) -> Any:
    """The peft config of the trained LoRA adapter.

    Raises:
        ValueError: ``model`` holds no peft LoRA adapter of that name.
    """
    config = getattr(model, "peft_config", {}).get(ADAPTER_NAME)
    if config is None:
        raise ValueError(f"cannot save a LoRA: {type(model).__name__} holds no peft adapter {ADAPTER_NAME!r} "
                         f"(adapters: {sorted(getattr(model, 'peft_config', {}))})")
    return config


def load_base_pipeline(pretrained: str, revision: str | None) -> Any:
    """The base pipeline a merged copy is made from (the ``shapes`` names resolved), loaded BEFORE anything is
    written, so a model that cannot be merged leaves the output directory untouched."""
    from diffusers import DiffusionPipeline
    from mm_align.image.toyworld.shapes import resolve_model

    kw = {"revision": revision} if revision else {}
    with quiet_loading():
        return DiffusionPipeline.from_pretrained(resolve_model(pretrained), **kw)


def write_merged_pipeline(base: Any, out: Path) -> None:
    """``out/merged``: ``base`` with the LoRA saved in ``out`` loaded, fused and unloaded by diffusers itself (so
    the merged weights are exactly what plain diffusers makes of the saved LoRA), written to a temporary folder
    and swapped in with one rename."""
    with quiet_loading():
        base.load_lora_weights(out)
    base.fuse_lora()
    base.unload_lora_weights()
    tmp = out / ".merged.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    base.save_pretrained(tmp)
    if (out / "merged").exists():
        shutil.rmtree(out / "merged")
    os.replace(tmp, out / "merged")
