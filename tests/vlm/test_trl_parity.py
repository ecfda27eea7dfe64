"""Parity with TRL's DPOTrainer (trl, test extra): on the same tiny VLM, processor and batch, our per-pair chosen and
rejected log-probs and the sigmoid, ipo and hinge losses equal TRL's to 1e-5.

TRL's side is TRL's own code on its own trainer: a ``DPOTrainer`` (CPU, ``DPOConfig(loss_type=[...], beta=0.1)``)
built on the policy and a separate reference model; its ``data_collator`` (``DataCollatorForVisionPreference``:
the chat template through ``trl.data_utils.apply_chat_template``, prompts with the images through the processor,
completions after them, ``flush_left``) makes the batch; ``compute_ref_log_probs(model, batch)`` gives the per-pair
summed completion log-probs of any model it is handed (the policy's and the reference's), and ``_compute_loss``
the loss of a training step. Our side: ``VLMAdapter.collate`` + ``scores`` on the same records (TRL's
conversational records, images as PIL images), and ``mm_align.losses.compute_loss``.

The token layouts are asserted equal first (the same ids, and our response mask = TRL's completion mask), so the
log-probs compare the same tokens. IPO's length normalisation: TRL's ``ipo`` divides each side's log-ratio by the
number of completion tokens, ``completion_mask.sum(1)`` (the answer and the template's end-of-turn tokens); ours
divides by ``Scores.n_tokens_chosen`` / ``n_tokens_rejected``, the count of the same tokens (our response mask), so
both compute ``((r⁺/n_w − r⁻/n_l) − 1/(2β))²`` (Azar et al. 2023, eq. 17, with TRL's per-token averaging).

The policy is the tiny model with seeded noise added to its language model's weights, so policy ≠ reference and
the losses are not at their policy = reference values.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from mm_align import recipes
from mm_align.data import PreferencePair
from mm_align.losses import compute_loss

from .tiny_vlms import TINY_VLM_BUILDERS, draw_shape

trl = pytest.importorskip("trl", reason="TRL is in the test extra (pip install -e .[test])")
datasets = pytest.importorskip("datasets")

BETA = 0.1


def _examples(root: Path) -> list[dict]:
    """Two TRL vision-preference examples: one image, and two images interleaved with text."""
    red = Image.open(draw_shape(root / "red.png", "red")).convert("RGB")
    blue = Image.open(draw_shape(root / "blue.png", "blue", "square", (40, 24))).convert("RGB")

    def say(text: str) -> list[dict]:
        return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]

    return [
        {"images": [red], "prompt": [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}],
         "chosen": say("red"), "rejected": say("blue shape")},
        {"images": [red, blue], "prompt": [{"role": "user", "content": [
            {"type": "text", "text": "Image1:"}, {"type": "image"}, {"type": "text", "text": "Image2:"},
            {"type": "image"}, {"type": "text", "text": "What colour is Image2?"}]}],
         "chosen": say("blue"), "rejected": say("it is a red square")},
    ]


@pytest.fixture(scope="module", params=list(TINY_VLM_BUILDERS))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The base model directory, a policy directory (base + seeded noise on the language model) and the examples."""
    root = tmp_path_factory.mktemp(f"trl_{request.param}")
    base = TINY_VLM_BUILDERS[request.param](root / "base")
    policy = AutoModelForImageTextToText.from_pretrained(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.get_decoder().parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    policy.save_pretrained(root / "policy")
    AutoProcessor.from_pretrained(base).save_pretrained(root / "policy")
    return {"name": request.param, "base": base, "policy": root / "policy", "examples": _examples(root),
            "root": root}


def _trl_trainer(family: dict, loss_type: str):
    """TRL's DPOTrainer on CPU over fresh copies of the policy and the reference."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(family["root"] / f"trl_{loss_type}"), per_device_train_batch_size=2,
                     report_to=[], use_cpu=True, beta=BETA, loss_type=[loss_type], max_length=None,
                     gradient_checkpointing=False, bf16=False)
    policy = AutoModelForImageTextToText.from_pretrained(family["policy"])
    ref = AutoModelForImageTextToText.from_pretrained(family["base"])
    dataset = datasets.Dataset.from_list(copy.deepcopy(family["examples"]))
    processor = AutoProcessor.from_pretrained(family["policy"])
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=dataset, processing_class=processor)
    batch = trainer.data_collator(copy.deepcopy(family["examples"]))
    return trainer, policy, ref, batch


def _ours(family: dict):
    adapter = recipes.build_adapter("vlm", {"pretrained": str(family["policy"])})
    ref = AutoModelForImageTextToText.from_pretrained(family["base"]).eval()
    records = [PreferencePair(e["prompt"], e["chosen"], e["rejected"], meta={"images": e["images"]})
               for e in family["examples"]]
    batch = adapter.collate(records, [0, 1])
    with torch.no_grad():
        policy = adapter.scores(batch, adapter.model.eval())
        reference = adapter.scores(batch, ref)
    return batch, policy, reference


def test_same_tokens_and_log_probs(family: dict) -> None:
    """The same token ids and answer mask as TRL's collator; per-pair chosen / rejected log-probs of the policy
    and of the reference equal TRL's compute_ref_log_probs on each model to 1e-5."""
    trainer, trl_policy, trl_ref, trl_batch = _trl_trainer(family, "sigmoid")
    batch, policy, reference = _ours(family)
    ids, attn = batch["inputs"]["input_ids"], batch["inputs"]["attention_mask"].bool()
    t_ids, t_attn = trl_batch["input_ids"], trl_batch["attention_mask"].bool()
    assert ids.shape[0] == t_ids.shape[0] == 4
    for row in range(4):
        assert ids[row][attn[row]].tolist() == t_ids[row][t_attn[row]].tolist()
        assert batch["response_mask"][row][attn[row]].tolist() == trl_batch["completion_mask"][row][
            t_attn[row]].bool().tolist()
    with torch.no_grad():
        trl_pc, trl_pr = trainer.compute_ref_log_probs(trl_policy.eval(), trl_batch)
        trl_rc, trl_rr = trainer.compute_ref_log_probs(trl_ref, trl_batch)
    assert not torch.allclose(trl_pc, trl_rc, atol=1e-3)  # policy ≠ reference
    torch.testing.assert_close(policy.chosen, trl_pc.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(policy.rejected, trl_pr.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(reference.chosen, trl_rc.float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(reference.rejected, trl_rr.float(), atol=1e-5, rtol=0)
    counts = trl_batch["completion_mask"].sum(1).float()
    assert policy.n_tokens_chosen.tolist() == counts[:2].tolist()
    assert policy.n_tokens_rejected.tolist() == counts[2:].tolist()


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_losses_equal_trl(family: dict, loss_type: str) -> None:
    """The loss of one training step: TRL's DPOTrainer._compute_loss (policy and reference forwards, its loss
    formula) = ours (compute_loss on our policy and reference scores) to 1e-5."""
    trainer, _, _, trl_batch = _trl_trainer(family, loss_type)
    trainer.model.eval()  # no dropout in the tiny models; eval keeps TRL's metric bookkeeping under "eval"
    with torch.no_grad():
        want = trainer._compute_loss(trainer.model, trl_batch, return_outputs=False)
    _, policy, reference = _ours(family)
    got = compute_loss([loss_type], None, policy, reference, BETA, {}).loss
    at_reference = {"sigmoid": torch.log(torch.tensor(2.0)), "ipo": torch.tensor(1 / (4 * BETA**2)),
                    "hinge": torch.tensor(1.0)}[loss_type]
    assert abs(float(want) - float(at_reference)) > 1e-4  # not the policy = reference value
    torch.testing.assert_close(got, want.float().reshape(got.shape), atol=1e-5, rtol=0)
