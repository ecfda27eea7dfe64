"""VLMAdapter.save: the exports load in the ecosystem's own loaders and give the trained model's logits.

- LoRA: the adapter directory loads with plain peft, ``PeftModel.from_pretrained(AutoModelForImageTextToText
  .from_pretrained(base), dir)``, and AutoProcessor loads the processor saved beside it;
- ``save_merged``: ``merged/`` loads with ``AutoModelForImageTextToText.from_pretrained`` alone;
- full fine-tuning: the output directory is a model + processor directory.

The LoRA weights are those a short DPO run (run_training, save_final) wrote, so the export is the trainer's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from mm_align import recipes
from mm_align.data import read_preferences
from mm_align.lora import LoraSettings, lora_disabled
from mm_align.orchestration import run_training
from mm_align.run_config import DataConfig, RunConfig, TrainConfig

from .tiny_vlms import TINY_VLM_BUILDERS, write_pairs


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlm_export")
    out = {name: build(root / name) for name, build in TINY_VLM_BUILDERS.items()}
    out["pairs"] = write_pairs(root / "data", n=4)
    return out


def _train(world: dict[str, Path], family: str, out: Path, finetune: str = "lora", **model_kw):
    model = {"pretrained": str(world[family]), "max_length": 256, **model_kw}
    train = TrainConfig(output_dir=str(out), loss=["sigmoid"], beta=0.1, learning_rate=5e-2, weight_decay=0.0,
                        lr_scheduler="constant", max_steps=2, batch_size=4, finetune=finetune,
                        lora=LoraSettings(r=4, alpha=8), log_every=1, report_to=["none"],
                        cache_dir=str(out.parent / "cache"))
    adapter = recipes.build_adapter("vlm", model)
    result = run_training(RunConfig(adapter="vlm", model=model, data=DataConfig(train=str(world["pairs"])),
                                    train=train), adapter=adapter)
    return adapter, result


def _inputs(adapter, world: dict[str, Path]) -> dict[str, torch.Tensor]:
    adapter.base_dir = world["pairs"].parent
    records = list(read_preferences(world["pairs"]).records)[:2]
    return adapter.collate(records, [0, 1])["inputs"]


@pytest.mark.parametrize("family", list(TINY_VLM_BUILDERS))
def test_lora_loads_in_plain_peft_and_merged_in_transformers(world: dict[str, Path], tmp_path: Path,
                                                             family: str) -> None:
    """final/ (LoRA): plain peft on the base model gives the trained policy's logits; final/merged gives them
    through AutoModelForImageTextToText alone; both directories hold a processor AutoProcessor loads; the LoRA
    is not a no-op (the base's logits differ)."""
    from peft import PeftModel

    adapter, result = _train(world, family, tmp_path / "run", save_merged=True)
    final = result.final_dir
    config = json.loads((final / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == world[family].resolve()
    assert all(t.startswith("model.language_model.") for t in config["target_modules"])
    assert config["r"] == 4 and config["lora_alpha"] == 8
    inputs = _inputs(adapter, world)
    adapter.model.eval()
    with torch.no_grad():
        want = adapter.model(**inputs).logits
        with lora_disabled(adapter.model):
            base_logits = adapter.model(**inputs).logits
        assert not torch.allclose(base_logits, want, atol=1e-4)  # training moved the LoRA

        via_peft = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(world[family]), final)
        assert torch.allclose(via_peft.eval()(**inputs).logits, want, atol=1e-5)
        merged = AutoModelForImageTextToText.from_pretrained(final / "merged").eval()
        assert type(merged).__name__ == type(adapter.model).__name__
        assert not any("lora" in k for k in merged.state_dict())
        assert torch.allclose(merged(**inputs).logits, want, atol=1e-4)
    for directory in (final, final / "merged"):
        processor = AutoProcessor.from_pretrained(directory)
        assert type(processor).__name__ == type(adapter.processor).__name__
        assert processor.chat_template == adapter.processor.chat_template


def test_full_finetune_saves_a_model_directory(world: dict[str, Path], tmp_path: Path) -> None:
    """finetune=full: final/ is a model + processor directory; AutoModelForImageTextToText loads the trained
    weights exactly, and they differ from the base's."""
    adapter, result = _train(world, "llava", tmp_path / "full", finetune="full")
    loaded = AutoModelForImageTextToText.from_pretrained(result.final_dir)
    trained = adapter.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())
    base = AutoModelForImageTextToText.from_pretrained(world["llava"]).state_dict()
    assert any(not torch.equal(base[k], trained[k]) for k in trained)
    assert (result.final_dir / "processor_config.json").is_file() or (
        result.final_dir / "preprocessor_config.json").is_file()
