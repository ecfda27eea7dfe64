"""The on-disk reference cache stores the REFERENCE's own scores, every field of them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mm_align.reference_cache import CACHE_FORMAT, ReferenceCache
from mm_align.run_config import TrainConfig
from mm_align.synthetic import SyntheticAdapter, SyntheticWorld
from mm_align.trainer import train
from mm_align.types import Scores


def _reference_scores(idx: list[int]) -> Scores:
    i = torch.tensor(idx, dtype=torch.float32)
    return Scores(
        "logp",
        chosen=-i,
        desirable=torch.tensor([k % 2 == 0 for k in idx]),
        n_tokens_chosen=torch.ones(len(idx)),
        extra={"kl": -10.0 - i},
    )


def test_lookup_returns_the_references_extra_and_desirable_not_the_policys(tmp_path):
    cache = ReferenceCache.load_or_build(tmp_path / "c.safetensors", 6, _reference_scores, batch_size=4, is_main=True)
    policy = Scores("logp", chosen=torch.zeros(2), desirable=torch.tensor([False, False]),
                    n_tokens_chosen=torch.ones(2), extra={"kl": torch.full((2,), 99.0)})
    got = cache.lookup([4, 1], policy, torch.device("cpu"))
    assert got.chosen.tolist() == [-4.0, -1.0]
    assert got.extra["kl"].tolist() == [-14.0, -11.0]  # the reference's KL estimate, not the policy's 99
    assert got.desirable.tolist() == [True, False]
    # and the same from the file, in a fresh object
    again = ReferenceCache.load(tmp_path / "c.safetensors")
    assert again.lookup([4, 1], policy, torch.device("cpu")).extra["kl"].tolist() == [-14.0, -11.0]


def test_kind_and_format_live_in_the_safetensors_metadata(tmp_path):
    path = tmp_path / "c.safetensors"
    ReferenceCache.load_or_build(path, 3, _reference_scores, batch_size=2, is_main=True)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"kind": "logp", "format": CACHE_FORMAT}
        assert sorted(f.keys()) == ["chosen", "desirable", "extra.kl", "n_tokens_chosen"]  # no sentinel tensors


def test_a_file_of_another_format_is_named(tmp_path):
    path = tmp_path / "old.safetensors"
    save_file({"chosen": torch.zeros(3), "kind_logp": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match="old.safetensors is not a reference cache"):
        ReferenceCache.load(path)


def test_a_cache_without_a_field_the_policy_has_is_an_error(tmp_path):
    cache = ReferenceCache.load_or_build(tmp_path / "c.safetensors", 3, _reference_scores, batch_size=3, is_main=True)
    policy = Scores("logp", chosen=torch.zeros(1), rejected=torch.zeros(1))
    with pytest.raises(ValueError, match=r"lacks \['rejected'\]"):
        cache.lookup([0], policy, torch.device("cpu"))


class _KLAdapter(SyntheticAdapter):
    """Synthetic KTO scores plus a KL estimate on mismatched (context, outcome) pairs, as TRL's KTO does.

    The mismatched context is a function of the sample alone (its negation), not of its batch-mates, so
    the reference's value per sample is well defined and cacheable."""

    def scores(self, batch, model):
        s = super().scores(batch, model)
        logp = torch.log_softmax(model(-batch["x"]).float(), dim=-1)  # (B, K): mismatched contexts
        s.extra["kl"] = logp.gather(1, batch["completion"][:, None])[:, 0]
        return s


def test_kto_kl_estimate_trains_the_same_from_the_cache_as_live(tmp_path):
    """With the bug the cache handed the policy's ``extra['kl']`` to the loss as the reference's, so the
    KL term was 0 and the two runs differed from the first step on."""
    samples = SyntheticWorld(seed=1234).unpaired(64, seed=3)

    def run(name: str, precompute: bool) -> list[float]:
        cfg = TrainConfig(output_dir=str(tmp_path / name), loss=["kto"], beta=0.5, learning_rate=5e-2,
                          lr_scheduler="constant", max_steps=6, batch_size=16, log_every=1, report_to=["none"],
                          checkpointing_steps=100, precompute_reference=precompute, cache_dir=str(tmp_path / "cache"),
                          save_final=False)
        train(_KLAdapter(), samples, cfg)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows]

    live, cached = run("live", False), run("cached", True)
    assert all(math.isfinite(v) for v in live)
    assert cached == pytest.approx(live, abs=1e-6)
