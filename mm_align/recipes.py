"""The recipe layer: adapters and modality commands by name, and the shipped configs.

This layer sits above the modalities (DESIGN.md), so it may name them; it imports a modality
only when that name is used, so ``mm-align ls`` and the core stay light.
"""

from __future__ import annotations

import importlib
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "ADAPTERS", "MODALITY_COMMANDS", "MODALITY_DOCTORS", "QUICKSTARTS", "modality_doctor", "load_object",
    "build_adapter",
    "shipped_configs", "accelerate_configs", "resolve_config_path",
]

# name -> "module:attribute". One literal dict; `mm-align ls adapters` prints it.
ADAPTERS: dict[str, str] = {
    "synthetic": "mm_align.synthetic:SyntheticAdapter",
    "sd": "mm_align.image.diffusion_adapter:StableDiffusionAdapter",
    "sd_self_npo": "mm_align.image.self_npo:SelfNPOAdapter",
    "sd3": "mm_align.image.flow_adapter:SD3Adapter",
    "flux": "mm_align.image.flow_adapter:FluxAdapter",
    "speech_flow": "mm_align.audio.speech_adapter:FlowSpeechAdapter",
    "speech_masked": "mm_align.audio.token_adapters:MaskedTokenSpeechAdapter",
    "speech_ar": "mm_align.audio.token_adapters:ARSpeechAdapter",
    "vlm": "mm_align.vlm.vlm_adapter:VLMAdapter",
}

# (command, modality) -> "module:function(argv) -> exit code". Absent = not implemented yet.
MODALITY_COMMANDS: dict[tuple[str, str], str] = {
    ("generate", "image"): "mm_align.image.generate:generate_main",
    ("evaluate", "image"): "mm_align.image.evaluators:evaluate_main",
    ("bench", "image"): "mm_align.image.bench:bench_main",
    ("convert", "image"): "mm_align.image.converters:convert_main",
    ("convert", "speech"): "mm_align.audio.converters:convert_main",
    ("convert", "vlm"): "mm_align.vlm.converters:convert_main",
    ("generate", "speech"): "mm_align.audio.generate:generate_main",
    ("generate", "vlm"): "mm_align.vlm.generate:generate_main",
    ("restore", "speech"): "mm_align.audio.restore:restore_main",
    ("bench", "speech"): "mm_align.audio.bench:bench_main",
    ("bench", "vlm"): "mm_align.vlm.bench:bench_main",
}

# `mm-align quickstart --world W` -> "module:function(output_dir, steps=...) -> report path"
QUICKSTARTS: dict[str, str] = {
    "shapes": "mm_align.image.quickstart:run_shapes_quickstart",
    "speech": "mm_align.audio.quickstart:run_speech_quickstart",
    "vlm": "mm_align.vlm.quickstart:run_vlm_quickstart",
    "synthetic": "mm_align.quickstart:run_quickstart",
}

# modality -> "module:function(path, format=, kind=) -> DoctorReport" (`mm-align doctor --modality M`):
# the core doctor with the modality's record checks and its own formats.
MODALITY_DOCTORS: dict[str, str] = {
    "image": "mm_align.image.image_checks:image_doctor",
    "speech": "mm_align.audio.speech_checks:speech_doctor",
    "vlm": "mm_align.vlm.vlm_checks:vlm_doctor",
}

MODALITIES = ("image", "video", "vlm", "speech")


def load_object(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def modality_doctor(modality: str | None) -> Any:
    """``doctor(path, format=, kind=)``, with the modality's own checks and formats (the core one for ``None``)."""
    from mm_align.data import doctor

    if modality is None:
        return doctor
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality '{modality}'; valid: {', '.join(MODALITIES)}")
    if modality not in MODALITY_DOCTORS:
        return doctor
    return load_object(MODALITY_DOCTORS[modality])


def build_adapter(name: str, model_config: dict[str, Any]) -> Any:
    """Instantiate adapter ``name`` from its ``model:`` config section (validated by the adapter)."""
    if name not in ADAPTERS:
        raise ValueError(f"unknown adapter '{name}'; valid adapters: {', '.join(sorted(ADAPTERS))}")
    return load_object(ADAPTERS[name]).from_config(model_config)


def shipped_configs() -> dict[str, Path]:
    """Configs shipped with the package, by name (file stem)."""
    found: dict[str, Path] = {}
    for package in ("mm_align", "mm_align.image", "mm_align.video", "mm_align.audio", "mm_align.vlm"):
        root = resources.files(package) / "configs"
        if root.is_dir():
            found.update({Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")})
    return found


def accelerate_configs() -> dict[str, Path]:
    """The shipped accelerate config files by name: ``ddp``, ``fsdp`` (FSDP2), ``zero2``, ``zero3`` (DeepSpeed)."""
    root = resources.files("mm_align") / "configs" / "accelerate"
    return {Path(p.name).stem: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def resolve_config_path(value: str) -> Path:
    """A path to a YAML file, or the name of a shipped config."""
    path = Path(value)
    if path.is_file():
        return path
    shipped = shipped_configs()
    if value in shipped:
        return shipped[value]
    raise FileNotFoundError(
        f"config '{value}' is neither a file nor a shipped config; shipped: {', '.join(sorted(shipped))}"
    )
