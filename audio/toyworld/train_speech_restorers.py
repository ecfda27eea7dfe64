"""Train the speech world's base restorers: a flow-matching enhancer, the codec, a masked and an AR token model.

    python -m mm_align.audio.toyworld.train_speech_restorers [--only flow|tokens] [--threads 2] [--out DIR]
    python -m mm_align.audio.toyworld.train_speech_restorers --evaluate   # dev metrics of the shipped models

These are the speech world's embedded defaults (ALGORITHMS.md §7: the three paradigms GenSR-Pref aligns), shipped
under ``weights/`` and loaded like any user's restorer directory:

- ``speech_flow``: a :class:`~mm_align.audio.flow_enhancer.FlowEnhancer` (conditional flow matching on the
  compressed complex STFT, Lipman et al. 2023, the FlowSE/SGMSE family), ``FlowEnhancer.save_pretrained``;
- ``speech_masked`` and ``speech_ar``: a :class:`~mm_align.audio.token_models.MaskedTokenRestorer` (MaskGIT,
  Chang et al. 2022) and an :class:`~mm_align.audio.token_models.ARTokenRestorer` over the tokens of one
  :class:`~mm_align.audio.codec.SpeechCodec` (residual VQ over STFT frames, SoundStream/EnCodec-style), each
  directory with its ``codec/`` (``save_restorer``).

Training data is the world's TRAIN split only: each of its 200 clean utterances with :data:`TRAIN_VERSIONS`
degraded versions drawn by :func:`~mm_align.audio.toyworld.speech_world.degrade` at seeds ``1..TRAIN_VERSIONS``
(seed 0 — what ``world:train`` inputs use — is left for preference data, so DPO pairs are sampled on degradations
the base model never saw). The codec learns from the clean utterances alone.

The budgets (:data:`RECIPES`) are deliberately small — minutes on 2 CPU cores — so the bases are IMPERFECT
(audible artefacts, residual noise): alignment needs room to improve them. Deterministic on a CPU: every draw
comes from the recipe's seed and the thread count is fixed (``--threads``; a different count can change float
summation order, so the shipped weights are made with the default).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from mm_align.audio.codec import CodecConfig, SpeechCodec, train_codec
from mm_align.audio.flow_enhancer import FlowEnhancer, train_supervised
from mm_align.audio.token_models import (
    ARRestorerConfig,
    ARTokenRestorer,
    MaskedRestorerConfig,
    MaskedTokenRestorer,
    save_restorer,
    train_restorer,
)
from mm_align.audio.toyworld.asr_weights import WEIGHTS_DIR
from mm_align.audio.toyworld.speech_world import degrade, read_split
from mm_align.audio.toyworld.world_models import WORLD_RESTORERS, restorer_dir

__all__ = ["TRAIN_VERSIONS", "Recipe", "RECIPES", "MODEL_DIRS", "training_pairs", "train_flow",
           "train_tokens", "evaluate_dev", "main"]

TRAIN_VERSIONS = 4
MODEL_DIRS = {paradigm: name for name, paradigm in WORLD_RESTORERS.items()}  # paradigm -> directory name


@dataclass(frozen=True)
class Recipe:
    """One model's training budget."""

    steps: int
    batch_size: int
    crop_seconds: float
    lr: float
    seed: int
    history_noise: float = 0.0  # AR only: corrupted-history rate (token_models.ar_training_loss)


RECIPES: dict[str, Recipe] = {
    "flow": Recipe(steps=3000, batch_size=4, crop_seconds=1.0, lr=2e-3, seed=11),
    "codec": Recipe(steps=2500, batch_size=8, crop_seconds=1.0, lr=1e-3, seed=12),
    "masked": Recipe(steps=2500, batch_size=8, crop_seconds=1.5, lr=1e-3, seed=13),
    "ar": Recipe(steps=2500, batch_size=8, crop_seconds=1.5, lr=1e-3, seed=14, history_noise=0.3),
}
# FlowSE's start at the degraded spectrogram (flow_source) with a small σ: clean speech here has a mean square
# of about 0.01 in the compressed STFT domain, so σ = 0.5 (SGMSE+'s) buried it under 25× its power of noise
# and this small U-Net came out worse than its input; σ = 0.1 still leaves the samples diverse enough to pair.
FLOW_CONFIG = dict(channels=(16, 32, 64), num_res_blocks=1, source="condition", sigma=0.1)
CODEC_CONFIG = CodecConfig(hidden=192, latent_dim=64, num_quantizers=4, codebook_size=256)


def training_pairs(versions: int = TRAIN_VERSIONS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(degraded, clean)`` pairs of the train split: ``versions`` degradations per utterance (seeds 1..versions)."""
    return [degrade(utt, seed) for seed in range(1, versions + 1) for utt in read_split("train")]


def _scaled(recipe: Recipe, scale: float) -> Recipe:
    return Recipe(**{**asdict(recipe), "steps": max(1, round(recipe.steps * scale))})


def train_flow(pairs: list[tuple[torch.Tensor, torch.Tensor]], out: Path, scale: float = 1.0) -> dict:
    """Train and save the flow enhancer (supervised conditional flow matching); returns its training log."""
    r = _scaled(RECIPES["flow"], scale)
    torch.manual_seed(r.seed)
    model = FlowEnhancer(**FLOW_CONFIG)
    losses = train_supervised(model, pairs, steps=r.steps, lr=r.lr, batch_size=r.batch_size,
                              crop_seconds=r.crop_seconds, seed=r.seed)
    model.save_pretrained(out)
    return {"recipe": asdict(r), "first_loss": losses[0], "last_loss": sum(losses[-50:]) / len(losses[-50:])}


def train_tokens(pairs: list[tuple[torch.Tensor, torch.Tensor]], out_masked: Path, out_ar: Path,
                 scale: float = 1.0) -> dict:
    """Train the codec on the clean utterances, then the masked and AR restorers over its tokens; save both."""
    log: dict = {}
    rc = _scaled(RECIPES["codec"], scale)
    torch.manual_seed(rc.seed)
    codec = SpeechCodec(CODEC_CONFIG)
    clean = [c for _, c in pairs[: len(read_split("train"))]]  # each clean utterance once
    losses = train_codec(codec, clean, steps=rc.steps, batch_size=rc.batch_size, segment_seconds=rc.crop_seconds,
                         lr=rc.lr, seed=rc.seed)
    log["codec"] = {"recipe": asdict(rc), "first_loss": losses[0], "last_loss": sum(losses[-50:]) / 50}
    for paradigm, cls, cfg, out in (("masked", MaskedTokenRestorer, MaskedRestorerConfig, out_masked),
                                    ("ar", ARTokenRestorer, ARRestorerConfig, out_ar)):
        r = _scaled(RECIPES[paradigm], scale)
        torch.manual_seed(r.seed)
        model = cls(cfg(num_quantizers=CODEC_CONFIG.num_quantizers, codebook_size=CODEC_CONFIG.codebook_size,
                        cond_dim=CODEC_CONFIG.latent_dim))
        losses = train_restorer(model, codec, [d for d, _ in pairs], [c for _, c in pairs], steps=r.steps,
                                batch_size=r.batch_size, crop_seconds=r.crop_seconds, lr=r.lr, seed=r.seed,
                                history_noise=r.history_noise)
        save_restorer(model, codec, out)
        log[paradigm] = {"recipe": asdict(r), "first_loss": losses[0], "last_loss": sum(losses[-50:]) / 50}
    return log


def evaluate_dev(limit: int | None = 20, metrics: tuple[str, ...] = ("pesq_wb", "estoi", "si_sdr", "dnsmos_ovrl"),
                 num_workers: int = 2) -> dict:
    """Mean dev-split metrics of the degraded inputs and of each shipped restorer (one sample, seed 0)."""
    from mm_align.audio.generate import load_restorer_any, sample_seed
    from mm_align.audio.metric_suite import MetricSuite, SpeechClip

    utts = read_split("dev", limit)
    inputs = [degrade(u, 0) for u in utts]
    suite = MetricSuite(list(metrics), num_workers=num_workers)
    rows: dict[str, list[torch.Tensor]] = {"degraded": [d for d, _ in inputs]}
    for paradigm in MODEL_DIRS:
        sampler = load_restorer_any(restorer_dir(paradigm))
        with torch.no_grad():
            rows[paradigm] = [sampler(d, 16000, sample_seed(0, u.id, 0)) for u, (d, _) in zip(utts, inputs)]
    result = {}
    for name, waves in rows.items():
        clips = [SpeechClip(f"{u.id}", w.numpy(), sample_rate=16000, reference=c.numpy(), text=u.text)
                 for u, w, (_, c) in zip(utts, waves, inputs)]
        result[name] = suite.evaluate(clips).means()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("flow", "tokens"), default=None, help="train one family (default: both)")
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="where the model directories go")
    p.add_argument("--threads", type=int, default=2, help="torch threads (fixed: part of determinism)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every step budget (a quick check)")
    p.add_argument("--evaluate", action="store_true", help="print the dev metrics of the shipped models and exit")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.evaluate:
        print(json.dumps(evaluate_dev(), indent=2))
        return 0
    t0 = time.perf_counter()
    pairs = training_pairs()
    log: dict = {"train_pairs": len(pairs), "versions": TRAIN_VERSIONS, "threads": args.threads}
    with tempfile.TemporaryDirectory(dir=args.out.parent if args.out.exists() else None) as tmp:
        staged = Path(tmp)
        if args.only in (None, "flow"):
            log["flow"] = train_flow(pairs, staged / MODEL_DIRS["flow"], args.scale)
        if args.only in (None, "tokens"):
            log.update(train_tokens(pairs, staged / MODEL_DIRS["masked"], staged / MODEL_DIRS["ar"], args.scale))
        args.out.mkdir(parents=True, exist_ok=True)
        for child in staged.iterdir():  # replace each model directory whole, only after every model trained
            target = args.out / child.name
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(child), str(target))
    log["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(log, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
