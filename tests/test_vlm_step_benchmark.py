"""benchmarks/vlm_step.py helpers: the ratios and their targets, the token-equality check, the tokenizer's coverage
of the benchmark's text and the resident-memory probe.

Imported the way ``benchmarks/run.py`` imports a benchmark: ``benchmarks/`` on ``sys.path`` (appended), then by
name. No timing is asserted.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.append(str(BENCHMARKS))

vlm_step = importlib.import_module("vlm_step")


def test_ratios_and_targets():
    t = {"sft": 2.0, "ref_forward": 1.0, "dpo": 3.0, "dpo_cached_ref": 2.1, "trl_dpo": 6.0}
    r = vlm_step.judged(t)
    assert r == pytest.approx({"dpo / (sft + ref_forward)": 1.0, "dpo_cached_ref / sft": 1.05,
                               "pairs/s ours / TRL (= trl_dpo / dpo)": 2.0})
    assert set(r) == set(vlm_step.TARGETS)
    assert vlm_step._passes(1.05, ("<=", 1.05)) and not vlm_step._passes(1.06, ("<=", 1.05))
    assert vlm_step._passes(1.0, (">=", 1.0)) and not vlm_step._passes(0.99, (">=", 1.0))


def _batch(ids: list[list[int]], answer: list[list[bool]]) -> dict:
    ids_t = torch.tensor(ids)
    return {"inputs": {"input_ids": ids_t, "attention_mask": (ids_t != 0).long()},
            "response_mask": torch.tensor(answer)}


def test_same_tokens_ignores_padding_side_and_names_the_row():
    ours = _batch([[5, 6, 7, 0], [5, 8, 0, 0]], [[False, True, True, False], [False, True, False, False]])
    # TRL's layout: the same tokens, padded differently (flush_left then right padding of another width)
    trl = {"input_ids": torch.tensor([[5, 6, 7], [5, 8, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
           "completion_mask": torch.tensor([[0, 1, 1], [0, 1, 0]])}
    vlm_step.same_tokens(ours, trl)
    trl["input_ids"][1, 1] = 9
    with pytest.raises(AssertionError, match="row 1: different tokens"):
        vlm_step.same_tokens(ours, trl)
    trl["input_ids"][1, 1] = 8
    trl["completion_mask"][0, 1] = 0
    with pytest.raises(AssertionError, match="row 0: a different answer mask"):
        vlm_step.same_tokens(ours, trl)


def test_the_tokenizer_knows_every_word_of_the_benchmark_text():
    """No prompt or answer word falls back to <unk> (the batch would score unknown tokens)."""
    tok = vlm_step._tokenizer()
    unk = tok.unk_token_id
    for e in vlm_step.examples(8):
        texts = [p["text"] for p in e["prompt"][0]["content"] if p["type"] == "text"]
        texts += [e["chosen"][0]["content"][0]["text"], e["rejected"][0]["content"][0]["text"], "USER: ASSISTANT:"]
        for text in texts:
            assert unk not in tok(text, add_special_tokens=False)["input_ids"], text


def _probe(conn) -> None:
    vlm_step.return_freed_memory()

    def step() -> None:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        x.sum().item()

    step()
    conn.send(vlm_step.peak_rss_delta(step))
    conn.close()


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux /proc only")
def test_peak_rss_delta_sees_the_step_allocation():
    """A step that allocates and frees a 64 MiB tensor peaks about 64 MiB above the resident set before it, and the
    second step does not hide behind memory the first one left resident."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_probe, args=(child,))
    p.start()
    child.close()
    out = parent.recv()
    p.join()
    assert 56 <= out["step_peak_mib"] <= 80, out
