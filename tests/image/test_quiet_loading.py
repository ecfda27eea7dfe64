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
