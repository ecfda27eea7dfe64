"""Loading a vision-language model and its processor: one function every VLM component uses (the adapter, the
data builder, the bench runners, the shapes world).

:func:`load_vlm` goes through transformers' auto classes, ``AutoModelForImageTextToText`` and ``AutoProcessor``,
so any image-text-to-text family transformers knows (LLaVA, Qwen2-VL, Qwen2.5-VL, Idefics3, ...) loads the same
way, from a local directory or a hub id (offline runs need the files in the local cache).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["load_vlm", "resolve_dtype", "VLMLoadError"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


class VLMLoadError(ValueError):
    """``path_or_hub_id`` does not hold an image-text-to-text model and its processor."""


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A torch dtype from its name (``"float32"``, ``"bf16"``, ...); None and ``"auto"`` stay None (the default).

    Raises:
        ValueError: naming the valid names.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(_DTYPES)}, auto")
    return _DTYPES[dtype]


def _model_type(path_or_hub_id: str) -> str | None:
    config = Path(path_or_hub_id) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError):
        return None


def load_vlm(
    path_or_hub_id: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
) -> tuple[nn.Module, Any]:
    """``(model, processor)`` of an image-text-to-text model, through ``AutoModelForImageTextToText`` and
    ``AutoProcessor``.

    Args:
        path_or_hub_id: a directory written by ``save_pretrained`` (model and processor), or a hub id.
        dtype: the weights' dtype (a torch dtype or its name); None keeps float32 (transformers' default).
        device: where to put the model; None leaves it on the CPU.
        attn_implementation: ``"eager"`` (needed for ``output_attentions``), ``"sdpa"``, ...; None = transformers'
            default.

    Returns:
        The model in eval mode and its processor (with the model's chat template).

    Raises:
        VLMLoadError: the path is a LoRA adapter directory, a model that is not image-text-to-text (e.g. a plain
            causal LM), or has no processor with an image processor and a tokenizer; the message names the path.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    name = str(path_or_hub_id)
    if (Path(name) / "adapter_config.json").is_file() and not (Path(name) / "config.json").is_file():
        raise VLMLoadError(f"{name} is a LoRA adapter directory, not a model: load its base model (named in "
                           "adapter_config.json, base_model_name_or_path) and apply it with "
                           "peft.PeftModel.from_pretrained, or point at merged weights")
    kwargs: dict[str, Any] = {}
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForImageTextToText.from_pretrained(name, **kwargs)
    except ValueError as e:  # transformers: "Unrecognized configuration class ... for this kind of AutoModel"
        kind = _model_type(name)
        what = f"a {kind!r} model" if kind else "no image-text-to-text model"
        raise VLMLoadError(f"{name} holds {what}, which AutoModelForImageTextToText cannot load (an "
                           f"image-text-to-text model such as LLaVA or Qwen2-VL is needed): "
                           f"{str(e).splitlines()[0]}") from e
    except OSError as e:
        raise VLMLoadError(f"cannot load a model from {name}: {e}") from e
    try:
        processor = AutoProcessor.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise VLMLoadError(f"{name}: no processor could be loaded ({e}); save it with processor.save_pretrained "
                           "next to the model") from e
    if not (hasattr(processor, "image_processor") and hasattr(processor, "tokenizer")):
        raise VLMLoadError(f"{name}: AutoProcessor gave a {type(processor).__name__}, not a processor with an "
                           "image processor and a tokenizer")
    if device is not None:
        model = model.to(device)
    return model.eval(), processor
