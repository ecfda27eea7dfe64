"""LoRA through peft on any ``nn.Module``, and the reference pass as "adapters disabled".

The reference model of every DPO-family loss is the base network, so with LoRA it is the same
module with its adapters switched off: no second copy of the weights (Diffusion-DPO, DPO).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from mm_align.config import option

__all__ = ["LoraSettings", "add_lora", "lora_disabled", "lora_state_dict", "load_lora_state_dict", "has_lora"]

ADAPTER_NAME = "default"


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (peft ``LoraConfig``)."""

    r: int = option(8, help="LoRA rank (Diffusion-DPO and NPO use 8; MIA-DPO 128).")
    alpha: float | None = option(None, help="LoRA alpha; None = r (scale 1), as the diffusers DPO scripts do.")
    dropout: float = option(0.0, help="Dropout on the LoRA branch.")
    target_modules: list[str] | None = option(
        None, help="Module names (peft matching) to adapt; None = the adapter's default for its backbone."
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


def add_lora(model: nn.Module, settings: LoraSettings, default_targets: list[str]) -> nn.Module:
    """Inject LoRA layers into ``model`` in place; only the LoRA weights stay trainable.

    LoRA (Hu et al. 2021): ``W x + (alpha / r) · B A x`` with ``B = 0`` at initialisation, so the
    policy equals the reference at step 0 (the DPO losses then equal ln 2).
    """
    targets = settings.target_modules or default_targets
    if not targets:
        raise ValueError("LoRA needs target modules: set train.lora.target_modules")
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha if settings.alpha is not None else settings.r,
        lora_dropout=settings.dropout,
        target_modules=targets,
        init_lora_weights=True,
    )
    model.requires_grad_(False)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n_trainable == 0:
        raise ValueError(f"LoRA target modules {targets} matched no layer of {type(model).__name__}")
    return model


def _tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def has_lora(model: nn.Module) -> bool:
    """True when ``model`` holds peft LoRA layers."""
    return bool(_tuner_layers(model))


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base network (the frozen reference): every LoRA layer switched off."""
    layers = _tuner_layers(model)
    if not layers:
        raise ValueError("lora_disabled: the model has no LoRA layers; a full fine-tune needs a reference copy")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The LoRA weights in peft's naming (no adapter name in the keys).

    ``state_dict``: the model's whole state dict when it was gathered from a sharded engine; None reads the model's.
    """
    state = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=ADAPTER_NAME)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load LoRA weights saved by :func:`lora_state_dict`; unexpected or missing keys are errors."""
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    if unexpected:
        raise ValueError(f"LoRA state has keys the model lacks: {unexpected[:5]}")
