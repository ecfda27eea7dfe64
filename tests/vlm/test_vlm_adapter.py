"""vlm/vlm_adapter.py: DPO on image-text-to-text models, on a tiny LLaVA and a tiny Qwen2-VL built from configs,
saved with save_pretrained and loaded back through AutoModelForImageTextToText / AutoProcessor (tests/vlm/tiny_vlms).

Checked: the adapter contract and config; the response mask (the answer's tokens only: no prompt, image or padding
token, asserted on a decoded example); chosen and rejected scored by ONE forward over [chosen ; rejected], equal to
each row scored alone with full logits; image-side rejections (the same answer under other images is the rejected
row, scored as a plain pair under those images would be); a few DPO steps through ``mm-align train`` and
``run_training`` (loss ln 2 at step 0, every LoRA weight moved, the base and the vision tower unchanged); cached
reference scores equal the live reference pass; full fine-tuning keeps the vision tower frozen; unpaired records.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from mm_align.vlm.vlm_adapter import VLMAdapter, default_lora_targets, render_prompt_answer
from mm_align.vlm.vlm_loading import VLMLoadError
from torch import nn

from mm_align import recipes
from mm_align.data import PreferencePair, UnpairedSample, read_preferences
from mm_align.lora import LoraSettings, add_lora, lora_disabled
from mm_align.orchestration import run_training
from mm_align.run_config import DataConfig, RunConfig, TrainConfig
from mm_align.types import check_adapter

from .tiny_vlms import TINY_VLM_BUILDERS, draw_shape, write_pairs

FAMILIES = list(TINY_VLM_BUILDERS)
RECIPE = Path(__file__).resolve().parents[2] / "vlm" / "configs" / "vlm_dpo.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both tiny model directories and 8 pairs (tests/vlm/tiny_vlms.write_pairs) with their images."""
    root = tmp_path_factory.mktemp("vlm_world")
    out = {name: build(root / name) for name, build in TINY_VLM_BUILDERS.items()}
    out["pairs"] = write_pairs(root / "data", n=8)
    return out


def _adapter(world: dict[str, Path], family: str, **kw) -> VLMAdapter:
    adapter = recipes.build_adapter("vlm", {"pretrained": str(world[family]), "max_length": 256, **kw})
    adapter.base_dir = world["pairs"].parent
    return adapter


def _records(world: dict[str, Path]) -> list:
    return list(read_preferences(world["pairs"]).records)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_cfg(out: Path, **kw) -> TrainConfig:
    base = dict(output_dir=str(out), loss=["sigmoid"], beta=0.1, learning_rate=1e-2, weight_decay=0.0,
                lr_scheduler="constant", max_steps=3, batch_size=4, lora=LoraSettings(r=4), log_every=1,
                checkpointing_steps=1000, report_to=["none"], cache_dir=str(out.parent / f"{out.name}-cache"),
                save_final=False)
    base.update(kw)
    return TrainConfig(**base)


def _run(world: dict[str, Path], family: str, out: Path, model_kw: dict | None = None, **kw):
    """run_training on the jsonl pairs (the core reader); returns (adapter, result, metric rows)."""
    model = {"pretrained": str(world[family]), "max_length": 256, **(model_kw or {})}
    config = RunConfig(adapter="vlm", model=model, data=DataConfig(train=str(world["pairs"])),
                       train=_train_cfg(out, **kw))
    adapter = recipes.build_adapter("vlm", model)
    result = run_training(config, adapter=adapter)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return adapter, result, rows


def _alone(adapter: VLMAdapter, record, side: int) -> float:
    """One side of ``record`` (0 chosen, 1 rejected) tokenised on its own (no padding, no other row) and scored
    from the model's FULL logits by hand: Σ over its answer tokens t of log_softmax(logits[t − 1])[token t]."""
    rows, _ = adapter._rows(record, None)
    enc = adapter._encode([rows[side]])
    ids, mask = enc["inputs"]["input_ids"][0], enc["response_mask"][0]
    assert enc["inputs"]["attention_mask"].all()  # one row: nothing padded
    with torch.no_grad():
        logp = adapter.model(**enc["inputs"]).logits[0].float().log_softmax(-1)  # (T, V)
    return sum(logp[t - 1, ids[t]].item() for t in mask.nonzero().flatten().tolist())


# ---- the adapter on its own ----------------------------------------------------------------------------------
def test_contract_config_and_lora_targets(world: dict[str, Path], tmp_path: Path) -> None:
    """Built by name ("vlm" in ADAPTERS) from a model: section; meets the whole contract; deterministic log-prob
    scores; reads the TRL and LLaMA-Factory formats; LoRA targets = the language model's projections only (none in
    the vision tower, which is frozen), the vision tower's linears added when it is not frozen; a fingerprint that
    changes with the scoring settings; a non-VLM directory and bad settings are refused by name."""
    assert recipes.ADAPTERS["vlm"] == "mm_align.vlm.vlm_adapter:VLMAdapter"
    adapter = _adapter(world, "llava")
    check_adapter(adapter, construction=True)
    assert adapter.score_kind == "logp" and adapter.stochastic_scores is False
    assert set(adapter.dataset_formats) == {"trl_vision", "llamafactory", "vlm_jsonl"}
    names = {n for n, _ in adapter.model.named_modules()}
    assert adapter.lora_target_modules and all(t in names for t in adapter.lora_target_modules)
    assert all(t.startswith("model.language_model.") for t in adapter.lora_target_modules)
    assert {t.rsplit(".", 1)[-1] for t in adapter.lora_target_modules} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    tower = adapter.model.get_submodule("model.vision_tower")
    assert not any(p.requires_grad for p in tower.parameters())
    assert any(p.requires_grad for p in adapter.model.get_submodule("model.language_model").parameters())
    with_vision = default_lora_targets(adapter.model, include_vision=True)
    assert any(t.startswith("model.vision_tower.") for t in with_vision)
    unfrozen = _adapter(world, "llava", freeze_vision_tower=False)
    assert any(p.requires_grad for p in unfrozen.model.get_submodule("model.vision_tower").parameters())
    assert any(t.startswith("model.vision_tower.") for t in unfrozen.lora_target_modules)

    assert adapter.fingerprint() == _adapter(world, "llava").fingerprint()
    assert adapter.fingerprint() != _adapter(world, "llava", max_image_pixels=400).fingerprint()
    assert adapter.fingerprint() != _adapter(world, "qwen2vl").fingerprint()

    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "lm")
    with pytest.raises(VLMLoadError, match=r"holds a 'llama' model, which AutoModelForImageTextToText cannot load"):
        recipes.build_adapter("vlm", {"pretrained": str(tmp_path / "lm")})
    with pytest.raises(ValueError, match="model.audit. must be one of .resize., .drop."):
        recipes.build_adapter("vlm", {"pretrained": str(world["llava"]), "audit": "truncate"})
    with pytest.raises(ValueError, match="model.pretrained must name"):
        recipes.build_adapter("vlm", {})


@pytest.mark.parametrize("family", FAMILIES)
def test_response_mask_is_the_answer_only(world: dict[str, Path], family: str) -> None:
    """On a decoded two-image pair: the masked tokens decode to exactly the answer and the template's end of turn
    (the tokenised answer text TRL's rendering gives); no masked token is an image token, a prompt token or
    padding; everything before the answer is the rendered prompt with its image tokens."""
    adapter = _adapter(world, family)
    records = _records(world)
    two = records[2]  # "Image1: <image>\nImage2: <image>\nWhat colour is Image1?"
    batch = adapter.collate([records[0], two], [0, 1])
    ids, mask = batch["inputs"]["input_ids"], batch["response_mask"]  # (4, T)
    attn = batch["inputs"]["attention_mask"].bool()
    assert ids.shape[0] == 4 and mask.dtype == torch.bool
    assert not (mask & ~attn).any()  # never padding
    assert not (mask & (ids == adapter.image_token_id)).any()  # never an image token
    tok = adapter.tokenizer
    from mm_align.vlm.vlm_records import vlm_example

    for row, side in ((1, "chosen"), (3, "rejected")):
        ex = vlm_example(two)
        prompt_text, answer_text = render_prompt_answer(adapter.processor, ex.messages, getattr(ex, side))
        want = tok(answer_text, add_special_tokens=False)["input_ids"]
        assert ids[row][mask[row]].tolist() == want
        decoded = tok.decode(ids[row][mask[row]])
        assert decoded.split()[0] == getattr(ex, side).split()[0].lower()
        assert decoded.split()[-1] == tok.eos_token
        first = int(mask[row].nonzero()[0])
        assert mask[row, first:first + len(want)].all() and int(mask[row].sum()) == len(want)  # one contiguous span
        n_image = int((ids[row, :first] == adapter.image_token_id).sum())
        assert n_image >= 2 and n_image == int((ids[row] == adapter.image_token_id).sum())  # every image token before
        assert "what colour is image1 ?" in tok.decode(ids[row, :first]).lower()


@pytest.mark.parametrize("family", FAMILIES)
def test_chosen_and_rejected_in_one_forward(world: dict[str, Path], family: str) -> None:
    """scores() runs the model ONCE on the 2B rows [chosen ; rejected]; each row's summed log-prob equals that row
    scored alone (no padding, full logits, by hand), so padding, the concatenation and logits_to_keep change
    nothing; n_tokens are the answers' token counts."""
    adapter = _adapter(world, family)
    records = _records(world)[:3]
    batch = adapter.collate(records, [0, 1, 2])
    calls = []
    hook = adapter.model.register_forward_hook(lambda m, a, kw, out: calls.append(kw["input_ids"].shape),
                                               with_kwargs=True)
    with torch.no_grad():
        s = adapter.scores(batch, adapter.model)
    hook.remove()
    assert calls == [batch["inputs"]["input_ids"].shape] and calls[0][0] == 6
    assert torch.equal(s.n_tokens_chosen, batch["response_mask"][:3].sum(1).float())
    assert torch.equal(s.n_tokens_rejected, batch["response_mask"][3:].sum(1).float())
    for i, record in enumerate(records):
        assert _alone(adapter, record, 0) == pytest.approx(s.chosen[i].item(), abs=1e-4)
        assert _alone(adapter, record, 1) == pytest.approx(s.rejected[i].item(), abs=1e-4)
    again = adapter.collate(records, [7, 8, 9])  # nothing is drawn: any seeds give the same batch
    assert all(torch.equal(again["inputs"][k], v) for k, v in batch["inputs"].items())


@pytest.mark.parametrize("family", FAMILIES)
def test_image_side_rejection_scores_the_answer_under_the_rejected_images(
    world: dict[str, Path], family: str, tmp_path: Path
) -> None:
    """meta["rejected_images"]: the rejected row is the SAME answer under the other image. Its score differs from
    the chosen row's, and equals the chosen score of a plain record whose images are the rejected ones; the
    chosen row is unchanged by the rejected images."""
    adapter = _adapter(world, family)
    adapter.base_dir = tmp_path
    draw_shape(tmp_path / "red.png", "red")
    draw_shape(tmp_path / "blue.png", "blue", "square", (40, 24))
    prompt = "<image>\nWhat colour is the shape?"
    side = PreferencePair(prompt, "red", "red", meta={"images": ["red.png"], "rejected_images": ["blue.png"]})
    under_red = PreferencePair(prompt, "red", "green", meta={"images": ["red.png"]})
    under_blue = PreferencePair(prompt, "red", "green", meta={"images": ["blue.png"]})
    with torch.no_grad():
        s = adapter.scores(adapter.collate([side, under_red, under_blue], [0, 0, 0]), adapter.model)
    assert s.chosen[0].item() != pytest.approx(s.rejected[0].item(), abs=1e-4)
    assert s.chosen[0].item() == pytest.approx(s.chosen[1].item(), abs=1e-5)
    assert s.rejected[0].item() == pytest.approx(s.chosen[2].item(), abs=1e-5)
    assert s.n_tokens_chosen[0] == s.n_tokens_rejected[0]


def test_unpaired_records_score_one_row_each(world: dict[str, Path]) -> None:
    """KTO-style records give one row each: ``chosen`` holds every completion's log-prob, ``desirable`` the
    labels; a batch mixing paired and unpaired records is refused."""
    adapter = _adapter(world, "qwen2vl")
    pair = _records(world)[0]
    records = [UnpairedSample(pair.prompt, pair.chosen, True, meta=dict(pair.meta)),
               UnpairedSample(pair.prompt, pair.rejected, False, meta=dict(pair.meta))]
    batch = adapter.collate(records, [0, 1])
    with torch.no_grad():
        s = adapter.scores(batch, adapter.model)
    assert s.rejected is None and s.chosen.shape == (2,) and s.desirable.tolist() == [True, False]
    paired = adapter.scores(adapter.collate([pair], [0]), adapter.model)
    assert s.chosen[0].item() == pytest.approx(paired.chosen[0].item(), abs=1e-5)
    assert s.chosen[1].item() == pytest.approx(paired.rejected[0].item(), abs=1e-5)
    with pytest.raises(ValueError, match="a batch mixes record types"):
        adapter.collate([records[0], pair], [0, 1])


# ---- training through the trainer ----------------------------------------------------------------------------
def test_dpo_steps_through_mm_align_train(world: dict[str, Path], tmp_path: Path) -> None:
    """The shipped recipe (vlm/configs/vlm_dpo.yaml) through the CLI, ``mm-align train``, on the tiny LLaVA from
    its saved directory: the run ends, step 0's loss is ln 2, final/ is a peft adapter directory."""
    from mm_align.cli import main

    out = tmp_path / "run"
    code = main(["train", "--config", str(RECIPE), f"model.pretrained={world['llava']}", "model.dtype=float32",
                 "model.max_length=256", f"data.train={world['pairs']}", f"train.output_dir={out}",
                 "train.max_steps=2", "train.batch_size=4", "train.gradient_accumulation_steps=1",
                 "train.warmup_steps=0", "train.log_every=1", "train.report_to=[none]", "train.lora.r=4",
                 "train.lora.alpha=8", f"train.cache_dir={tmp_path / 'cache'}"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(math.log(2.0), rel=1e-5)
    assert (out / "final" / "adapter_config.json").is_file()
    assert (out / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_dpo_steps(world: dict[str, Path], tmp_path: Path, family: str) -> None:
    """Three DPO steps through run_training from the saved directory: loss ln 2 at step 0 (policy = reference),
    finite after; every LoRA weight moved; every base weight, the vision tower's included, unchanged."""
    adapter, result, rows = _run(world, family, tmp_path / "run")
    assert result.step == 3 and result.skipped_steps == 0
    assert rows[0]["loss"] == pytest.approx(math.log(2.0), rel=1e-5)
    assert all(math.isfinite(r["loss"]) for r in rows)
    trained = _state(adapter.model)
    fresh = _adapter(world, family)
    torch.manual_seed(0)  # train() seeds (set_seed) before it injects LoRA
    add_lora(fresh.model, LoraSettings(r=4), fresh.lora_target_modules)
    init = _state(fresh.model)
    lora_keys = {k for k in init if "lora_" in k}
    assert lora_keys and lora_keys == {k for k in trained if "lora_" in k}
    assert all(k.startswith("model.language_model.") for k in lora_keys)
    assert [k for k in lora_keys if torch.equal(trained[k], init[k])] == []  # every LoRA weight moved
    base = [k for k in trained if "lora_" not in k]
    assert [k for k in base if not torch.equal(trained[k], init[k])] == []  # the base did not
    assert any("vision" in k or "visual" in k for k in base)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_reference_equals_the_live_pass(world: dict[str, Path], tmp_path: Path, family: str) -> None:
    """train.precompute_reference=true: the reference log-probs cached on disk are the live reference pass's (the
    model with LoRA disabled on the same batch), and a run with them gives the live run's metrics and weights."""
    runs = {}
    for precompute in (False, True):
        out = tmp_path / f"pre{precompute}"
        adapter, _, rows = _run(world, family, out, max_steps=3, precompute_reference=precompute)
        runs[precompute] = (rows, _state(adapter.model), adapter)
    files = list((tmp_path / "preTrue-cache").glob("ref-*.safetensors"))
    assert len(files) == 1 and not (tmp_path / "preFalse-cache").exists()
    (live_rows, live_state, _), (cached_rows, cached_state, adapter) = runs[False], runs[True]
    for a, b in zip(live_rows, cached_rows, strict=True):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/rejected"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
    for k, v in live_state.items():
        assert torch.allclose(cached_state[k], v, atol=1e-5), k

    from safetensors.torch import load_file

    cached = load_file(str(files[0]))
    records = _records(world)
    batch = adapter.collate(records, list(range(len(records))))
    with torch.no_grad(), lora_disabled(adapter.model):
        live = adapter.scores(batch, adapter.model)
    assert torch.allclose(cached["chosen"], live.chosen, atol=1e-5)
    assert torch.allclose(cached["rejected"], live.rejected, atol=1e-5)
    assert torch.equal(cached["n_tokens_chosen"], live.n_tokens_chosen)


def test_full_finetune_keeps_the_vision_tower_frozen(world: dict[str, Path], tmp_path: Path) -> None:
    """finetune=full: the reference is a frozen copy (step-0 loss ln 2); the language model and projector train,
    the vision tower (freeze_vision_tower, the default) does not."""
    adapter, _, rows = _run(world, "qwen2vl", tmp_path / "full", finetune="full", learning_rate=1e-3, max_steps=2)
    assert rows[0]["loss"] == pytest.approx(math.log(2.0), rel=1e-5)
    fresh = _state(_adapter(world, "qwen2vl").model)
    trained = _state(adapter.model)
    vision = [k for k in trained if k.startswith("model.visual.")]
    assert vision and all(torch.equal(trained[k], fresh[k]) for k in vision)
    lm = [k for k in trained if k.startswith("model.language_model.")]
    assert any(not torch.equal(trained[k], fresh[k]) for k in lm)
