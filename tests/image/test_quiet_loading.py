"""Loading a pipeline or building the SD adapter draws none of diffusers'/transformers' own bars and raises no
deprecation warning from our calls (issue 11, item 7: one bar per job is ours)."""

from __future__ import annotations

import warnings

from mm_align.image.diffusion_adapter import DiffusionModelConfig, StableDiffusionAdapter
from mm_align.image.sampling import SamplerConfig, load_pipeline

from .tiny_pipeline import save_tiny_sd15


def test_no_library_bars_and_no_deprecations(tmp_path, capfd):
    model = save_tiny_sd15(tmp_path / "sd15")
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_pipeline(str(model), cfg=SamplerConfig(device="cpu"))
        StableDiffusionAdapter(DiffusionModelConfig(pretrained=str(model), resolution=16))
    out, err = capfd.readouterr()
    assert "Loading" not in out + err, (out + err)[-2000:]
    deprecations = [str(w.message) for w in caught if "deprecated" in str(w.message)]
    assert not [d for d in deprecations if "torch_dtype" in d], deprecations
    from diffusers.utils import logging as diffusers_logging

    assert diffusers_logging.is_progress_bar_enabled()  # restored for the user's own code


def test_unet_only_lora_loads_without_a_text_encoder_warning(tmp_path):
    """Our LoRA holds UNet weights only: loading it (fused, as an NPO branch or as a conditional branch) must not
    make diffusers warn that no LoRA keys matched the text encoder (issue 11, item 7: the bench's LoRA warning)."""
    import torch

    from mm_align.lora import LoraSettings, add_lora

    model = save_tiny_sd15(tmp_path / "sd15")
    adapter = StableDiffusionAdapter(DiffusionModelConfig(pretrained=str(model), resolution=16))
    add_lora(adapter.model, LoraSettings(r=4, alpha=8), adapter.lora_target_modules)
    with torch.no_grad():
        for name, p in adapter.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    adapter.save(adapter.model, str(tmp_path / "final"), lora=True)
    import logging

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    # diffusers' loggers do not propagate to the root (caplog), and its stderr handler holds the stream it
    # found at import: listen on its library logger itself
    collect = Collect()
    library_logger = logging.getLogger("diffusers")
    library_logger.addHandler(collect)
    try:
        base = load_pipeline(str(model), cfg=SamplerConfig(device="cpu"))
        fused = load_pipeline(str(model), lora=str(tmp_path / "final"), cfg=SamplerConfig(device="cpu"))
        load_pipeline(str(model), npo_lora=str(tmp_path / "final"), cfg=SamplerConfig(device="cpu"))
        load_pipeline(str(model), cond_lora=str(tmp_path / "final"), cfg=SamplerConfig(device="cpu"))
    finally:
        library_logger.removeHandler(collect)
    assert not [m for m in collect.messages if "LoRA" in m], collect.messages
    # and the LoRA did land in the UNet: the fused weights differ from the base ones
    changed = [n for (n, a), b in zip(base.unet.state_dict().items(), fused.unet.state_dict().values())
               if not torch.equal(a, b)]
    assert changed
