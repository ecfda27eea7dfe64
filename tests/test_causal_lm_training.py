"""The log-prob path on a REAL transformers causal LM: a tiny Llama built from a config, saved and loaded back
through ``AutoModelForCausalLM.from_pretrained``, a word-level tokenizer built in process and loaded through
``AutoTokenizer``, trained with LoRA through :func:`mm_align.trainer.train` for every log-prob loss.

The learnable preference: prompts are random ``p*`` words; chosen responses are ``g*`` words, rejected ones
``b*`` words. Held-out pairs (new prompts, new word draws) measure whether training moved the policy's
chosen-minus-rejected log-prob margin above the reference's.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed
from text_lm import PEFT_WEIGHTS_FILE, TextLMAdapter, TextLMConfig, build_word_tokenizer

from mm_align.data import PreferencePair, UnpairedSample
from mm_align.lora import LoraSettings, add_lora, lora_disabled
from mm_align.losses import LOSSES
from mm_align.run_config import TrainConfig
from mm_align.trainer import train

PROMPT_WORDS = [f"p{i}" for i in range(150)]
GOOD = [f"g{i}" for i in range(20)]
BAD = [f"b{i}" for i in range(20)]
BETA = 0.1

PAIRED_LOGP = sorted(n for n, s in LOSSES.items() if s.score_kind == "logp" and s.paired)
UNPAIRED_LOGP = sorted(n for n, s in LOSSES.items() if s.score_kind == "logp" and not s.paired)

# The loss at policy = reference (LoRA B = 0 at step 0), β = 0.1 — ALGORITHMS.md §4 and the loss docstrings.
STEP0 = {
    "sigmoid": math.log(2.0),  # −logσ(0)
    "hinge": 1.0,  # max(0, 1 − 0)
    "ipo": (1 / (2 * BETA)) ** 2,  # (0 − 1/(2β))² = 25
    "robust": math.log(2.0),
    "bco_pair": 2 * math.log(2.0),  # −logσ(0) − logσ(0)
    "sppo_hard": 2 * (1 / (2 * BETA)) ** 2,  # 50
    "kto": 0.5,  # λ(1 − σ(0)) for every sample
}
# robust at ε = 0 is sigmoid itself: train it with label noise assumed
LOSS_PARAMS = {"robust": {"label_smoothing": 0.1}}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """A model this small runs ~50× faster on one thread than on two contended ones (OpenMP spin-waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (hidden 32, 2 layers, vocab 194) and its tokenizer, written with save_pretrained."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = build_word_tokenizer(PROMPT_WORDS + GOOD + BAD)
    tokenizer.save_pretrained(out)
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded("p3 g7 b19 zz")["input_ids"] == [4 + 3, 154 + 7, 174 + 19, 1]  # zz is <unk>
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def _adapter(base_dir: Path) -> TextLMAdapter:
    return TextLMAdapter.from_config({"pretrained": str(base_dir)})  # AutoModelForCausalLM.from_pretrained


def _pairs(n: int, seed: int) -> list[PreferencePair]:
    r = random.Random(seed)
    return [
        PreferencePair(
            prompt=" ".join(r.choices(PROMPT_WORDS, k=r.randint(2, 5))),
            chosen=" ".join(r.choices(GOOD, k=4)),
            rejected=" ".join(r.choices(BAD, k=4)),
            id=f"{seed}-{i}",
        )
        for i in range(n)
    ]


def _unpaired(n: int, seed: int) -> list[UnpairedSample]:
    r = random.Random(seed)
    out = []
    for i in range(n):
        good = i % 2 == 0
        words = r.choices(GOOD if good else BAD, k=4)
        prompt = " ".join(r.choices(PROMPT_WORDS, k=r.randint(2, 5)))
        out.append(UnpairedSample(prompt=prompt, completion=" ".join(words), desirable=good, id=f"{seed}-{i}"))
    return out


def _cfg(tmp_path: Path, loss: str, **kw) -> TrainConfig:
    base = dict(
        output_dir=str(tmp_path / loss),
        loss=[loss],
        beta=BETA,
        learning_rate=1e-2,
        weight_decay=0.0,  # so a changed LoRA weight means it got a gradient
        lr_scheduler="constant",
        max_steps=10,
        batch_size=8,
        lora=LoraSettings(r=4),
        log_every=1,
        checkpointing_steps=1000,
        report_to=["none"],
        cache_dir=str(tmp_path / "cache"),
    )
    base.update(kw)
    return TrainConfig(**base)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@torch.no_grad()
def _heldout_margin(adapter: TextLMAdapter, pairs: list[PreferencePair]) -> tuple[float, float]:
    """Mean ``logπ(w) − logπ(l)`` of the policy and of the reference (LoRA disabled) on ``pairs``."""
    batch = adapter.collate(pairs, [0] * len(pairs))
    adapter.model.eval()
    policy = adapter.scores(batch, adapter.model)
    with lora_disabled(adapter.model):
        reference = adapter.scores(batch, adapter.model)
    return (policy.chosen - policy.rejected).mean().item(), (reference.chosen - reference.rejected).mean().item()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _lora_init(base_dir: Path, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The LoRA weights train() starts from: it seeds (``set_seed(cfg.seed)``), then injects LoRA."""
    fresh = _adapter(base_dir)
    set_seed(cfg.seed)
    add_lora(fresh.model, cfg.lora, fresh.lora_target_modules)
    return {k: v for k, v in _state(fresh.model).items() if "lora_" in k}


def _check_lora_moved_base_kept(adapter: TextLMAdapter, base_dir: Path, cfg: TrainConfig) -> None:
    trained = _state(adapter.model)
    init = _lora_init(base_dir, cfg)
    assert init and set(init) == {k for k in trained if "lora_" in k}
    moved = [k for k, v in init.items() if not torch.equal(trained[k], v)]
    assert moved == sorted(init), f"LoRA weights that did not change: {sorted(set(init) - set(moved))}"
    fresh = _adapter(base_dir).model.state_dict()  # the saved base, loaded again
    base = {k.replace(".base_layer", ""): v for k, v in trained.items() if "lora_" not in k}
    assert set(base) == set(fresh)
    changed = [k for k in fresh if not torch.equal(base[k], fresh[k])]
    assert not changed, f"base weights changed: {changed}"


# ---- the adapter on its own ---------------------------------------------------------------------------


def test_collate_masks_only_the_response(base_dir: Path) -> None:
    """``[bos] p1 p2 | g0 g1 </s>`` and ``[bos] p1 p2 | b0 </s> <pad> <pad>``: the mask is 1 on the response and
    eos only; the chosen row first. Scores equal the hand-summed log_softmax of the response tokens."""
    adapter = _adapter(base_dir)
    pair = PreferencePair(prompt="p1 p2", chosen="g0 g1", rejected="b0", id="x")
    batch = adapter.collate([pair], [0])
    tok = adapter.tokenizer
    assert batch["input_ids"].tolist() == [
        [tok.bos_token_id, 5, 6, 154, 155, tok.eos_token_id],
        [tok.bos_token_id, 5, 6, 174, tok.eos_token_id, tok.pad_token_id],
    ]
    assert batch["response_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]
    with torch.no_grad():
        s = adapter.scores(batch, adapter.model)
        logits = adapter.model(input_ids=batch["input_ids"][:1]).logits[0].log_softmax(-1)  # (T, V)
    by_hand = sum(logits[t - 1, batch["input_ids"][0, t]].item() for t in (3, 4, 5))  # token t predicted at t − 1
    assert s.chosen.item() == pytest.approx(by_hand, abs=1e-5)
    assert s.n_tokens_chosen.tolist() == [3.0] and s.n_tokens_rejected.tolist() == [2.0]
    assert adapter.score_kind == "logp" and adapter.stochastic_scores is False
    assert adapter.lora_target_modules == ["q_proj", "v_proj"]


def test_bad_records_are_named(base_dir: Path) -> None:
    adapter = _adapter(base_dir)
    with pytest.raises(ValueError, match="record 'r7': response must be a string"):
        adapter.collate([PreferencePair(prompt="p1", chosen=3, rejected="b0", id="r7")], [0])
    long = PreferencePair(prompt=" ".join(["p1"] * 200), chosen="g0", rejected="b0", id="long")
    with pytest.raises(ValueError, match="record 'long': 203 tokens > max_length 128"):
        adapter.collate([long], [0])


def test_fingerprint_names_the_base_weights(base_dir: Path, tmp_path: Path) -> None:
    """The reference-cache key: the same for the same saved model; different for other weights or settings."""
    a, b = _adapter(base_dir), _adapter(base_dir)
    assert a.fingerprint() == b.fingerprint()
    with torch.no_grad():
        b.model.model.layers[0].self_attn.q_proj.weight[0, 0] += 1e-3
    b.model.save_pretrained(tmp_path / "other")
    b.tokenizer.save_pretrained(tmp_path / "other")
    assert _adapter(tmp_path / "other").fingerprint() != a.fingerprint()
    assert TextLMAdapter(TextLMConfig(pretrained=str(base_dir), max_length=64)).fingerprint() != a.fingerprint()


# ---- training -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", PAIRED_LOGP)
def test_paired_logp_loss_trains_a_real_causal_lm(base_dir: Path, tmp_path: Path, loss: str) -> None:
    """Step-0 loss at policy = reference, every LoRA weight moved, the base untouched, and the held-out
    chosen-minus-rejected margin above the reference's after 10 steps."""
    if loss not in STEP0:
        pytest.fail(f"log-prob loss '{loss}' has no step-0 value in STEP0: add it (its value at policy = reference)")
    adapter = _adapter(base_dir)
    heldout = _pairs(32, seed=2)
    cfg = _cfg(tmp_path, loss, save_final=False, loss_params=LOSS_PARAMS.get(loss, {}))
    result = train(adapter, _pairs(64, seed=1), cfg)
    assert result.step == 10 and result.skipped_steps == 0
    rows = _metrics(tmp_path / loss)
    assert rows[0]["loss"] == pytest.approx(STEP0[loss], rel=1e-5)
    assert all(math.isfinite(r["loss"]) for r in rows)
    _check_lora_moved_base_kept(adapter, base_dir, cfg)
    policy, reference = _heldout_margin(adapter, heldout)
    assert policy - reference > 0.3, (loss, policy, reference)


def test_lora_init_is_what_train_starts_from(base_dir: Path, tmp_path: Path) -> None:
    """Validates :func:`_lora_init`: after ONE step, lora_A is still exactly its init (its gradient is 0 while
    lora_B = 0, and Adam with no weight decay does not move a weight with zero gradient) and lora_B moved."""
    adapter = _adapter(base_dir)
    cfg = _cfg(tmp_path, "sigmoid", max_steps=1, save_final=False)
    train(adapter, _pairs(16, seed=1), cfg)
    init, trained = _lora_init(base_dir, cfg), _state(adapter.model)
    assert all(torch.equal(trained[k], v) for k, v in init.items() if "lora_A" in k)
    assert all(not torch.equal(trained[k], v) for k, v in init.items() if "lora_B" in k)
    assert all(not v.any() for k, v in init.items() if "lora_B" in k)


@pytest.mark.parametrize("loss", UNPAIRED_LOGP)
def test_unpaired_logp_loss_trains_on_single_samples(base_dir: Path, tmp_path: Path, loss: str) -> None:
    """KTO on unpaired samples (half desirable g* completions, half undesirable b* ones): step-0 loss λ/2, LoRA
    moved, base kept, and the held-out PAIR margin above the reference's."""
    if loss not in STEP0:
        pytest.fail(f"log-prob loss '{loss}' has no step-0 value in STEP0: add it (its value at policy = reference)")
    adapter = _adapter(base_dir)
    cfg = _cfg(tmp_path, loss, save_final=False)
    train(adapter, _unpaired(64, seed=1), cfg)
    rows = _metrics(tmp_path / loss)
    assert rows[0]["loss"] == pytest.approx(STEP0[loss], rel=1e-5)
    assert all(math.isfinite(r["loss"]) for r in rows)
    _check_lora_moved_base_kept(adapter, base_dir, cfg)
    policy, reference = _heldout_margin(adapter, _pairs(32, seed=2))
    assert policy - reference > 0.3, (loss, policy, reference)


@pytest.mark.parametrize("loss", ["sigmoid", "kto"])
def test_precomputed_reference_gives_the_live_numbers(base_dir: Path, tmp_path: Path, loss: str) -> None:
    """precompute_reference=True (reference log-probs scored once, cached on disk, looked up per step) trains
    exactly as the live reference pass does: same per-step metrics, same LoRA weights."""
    records = _unpaired(48, seed=1) if loss == "kto" else _pairs(48, seed=1)
    runs = {}
    for precompute in (False, True):
        adapter = _adapter(base_dir)
        cfg = _cfg(tmp_path / str(precompute), loss, max_steps=6, save_final=False, precompute_reference=precompute)
        train(adapter, records, cfg)
        runs[precompute] = (_metrics(tmp_path / str(precompute) / loss), _state(adapter.model))
    assert list((tmp_path / "True" / "cache").glob("ref-*.safetensors"))  # the cache was written
    assert not (tmp_path / "False" / "cache").exists()
    (live_rows, live_state), (cached_rows, cached_state) = runs[False], runs[True]
    assert len(live_rows) == len(cached_rows) == 6
    for a, b in zip(live_rows, cached_rows):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
    for k, v in live_state.items():
        assert torch.allclose(cached_state[k], v, atol=1e-5), k


def test_lora_output_reloads_through_peft(base_dir: Path, tmp_path: Path) -> None:
    """The final LoRA directory is a peft adapter: PeftModel.from_pretrained on the base loaded by
    AutoModelForCausalLM gives the trained policy's logits; the tokenizer reloads from it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = _adapter(base_dir)
    result = train(adapter, _pairs(32, seed=1), _cfg(tmp_path, "sigmoid", max_steps=4))
    final = result.final_dir
    assert final is not None and (final / "adapter_config.json").is_file() and (final / PEFT_WEIGHTS_FILE).is_file()
    batch = adapter.collate(_pairs(4, seed=2), [0] * 4)
    adapter.model.eval()
    with torch.no_grad():
        trained = adapter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        with lora_disabled(adapter.model):
            base_logits = adapter.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), final).eval()
        again = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(trained, base_logits, atol=1e-4)  # the LoRA does something
    assert torch.allclose(again, trained, atol=1e-6)
    assert AutoTokenizer.from_pretrained(final)("p1 g2")["input_ids"] == adapter.tokenizer("p1 g2")["input_ids"]


def test_full_finetune_uses_a_frozen_copy_and_saves_pretrained(base_dir: Path, tmp_path: Path) -> None:
    """finetune=full: the reference is a frozen deep copy (step-0 loss ln 2); the output is a save_pretrained
    directory that AutoModelForCausalLM loads to the trained weights."""
    from transformers import AutoModelForCausalLM

    adapter = _adapter(base_dir)
    cfg = _cfg(tmp_path, "sigmoid", finetune="full", learning_rate=1e-3, max_steps=4)
    result = train(adapter, _pairs(32, seed=1), cfg)
    assert _metrics(tmp_path / "sigmoid")[0]["loss"] == pytest.approx(math.log(2.0), rel=1e-5)
    reloaded = AutoModelForCausalLM.from_pretrained(result.final_dir)
    trained, fresh = adapter.model.state_dict(), _adapter(base_dir).model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in reloaded.state_dict().items())
    assert all(not torch.equal(fresh[k], trained[k]) for k in trained if k.endswith("q_proj.weight"))
