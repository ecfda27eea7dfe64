"""Train the shapes world's tiny flow-matching text-to-image model: a real diffusers SD3-type pipeline.

    python -m mm_align.image.toyworld.train_shapes_flow [--out DIR] [--steps N]

Deterministic (seeded, single-threaded data, CPU): the same command writes the same weights. On images
drawn by the world's renderer for the TRAINING prompts only, it trains an ``SD3Transformer2DModel``, two
small ``CLIPTextModelWithProjection`` encoders and a small T5 encoder jointly with the rectified-flow loss of
:mod:`mm_align.image.flow_matching` (the functions the SD3 adapter scores with: one place decides ``x_t``,
the velocity target, the σ density and the timestep), the caption dropped 10% of the time so
classifier-free guidance works. The pipeline (``StableDiffusion3Pipeline`` layout) is saved with
``save_pretrained`` (float32 safetensors, about 5.5 MB, 3.7 of them the VAE) next to a
``training_summary.json`` that holds the world oracle's accuracy on held-out and on training prompts,
sampled as ``benchmarks/image_shapes.py`` samples (20 Euler steps, CFG 5), and on held-out renders passed
through the VAE (the ceiling the VAE leaves).

Decisions (the reasons in full are in the report of issue 14, item 5):

* **The VAE is the shipped shapes VAE** (``weights/shapes-sd/vae``: 32 px → 4×8×8 latents), weights
  unchanged. Nothing in SD3 needs 16 latent channels: ``SD3Transformer2DModel`` takes ``in_channels`` /
  ``out_channels`` from its config and ``StableDiffusion3Pipeline`` draws ``transformer.config.in_channels``
  latent channels and reads the VAE's down-sampling from its ``block_out_channels``. What SD3 does need is a
  numeric ``shift_factor`` (the pipeline decodes ``latents / scaling_factor + shift_factor``; the shipped
  SD1.5-type config has ``null`` there, which would fail) and, for the adapter, ``x_0 = (z − shift) ·
  scaling``. Both are recalibrated as SD3's own were: ``shift_factor`` = the mean and ``scaling_factor`` =
  1 / std of VAE latent samples of training renders, so ``x_0`` has mean 0 and variance 1 like ε.
* **The CLIP tokenizer is the shipped shapes-sd one** (every world word one token), used as both
  ``tokenizer`` and ``tokenizer_2``. The two CLIP encoders are NEW tiny ``CLIPTextModelWithProjection``s,
  trained jointly as the UNet script trains its one: SD3's pooled embedding is the two projections
  concatenated, which the shipped ``CLIPTextModel`` (no projection, tuned to condition a UNet) lacks.
* **A tiny T5** (``text_encoder_3``: one layer, width 64 = ``joint_attention_dim``; a word-level Unigram
  ``T5Tokenizer`` over the world's words), trained jointly too. SD3 allows ``text_encoder_3=None``, but
  diffusers (0.42) cannot reload such a save with a plain ``from_pretrained``: the ``[null, null]`` entry of
  ``model_index.json`` is dropped and the pipeline refuses the missing component unless the caller passes
  ``text_encoder_3=None, tokenizer_3=None``, which ``mm-align generate/bench image`` (``load_pipeline``) do
  not. With a T5 the shipped model loads like any SD3 checkpoint. Its 256 tokens (the pipeline's
  ``max_sequence_length`` default, padded, no attention mask, as the pipeline encodes them) are what the
  transformer is trained on, so training, the adapter and the pipeline condition the transformer alike.
* **Shift 1.0** (no timestep shift). SD3's shift is resolution-dependent (Esser et al. 2024, §5.3.2):
  ``σ' = α·σ/(1 + (α − 1)·σ)`` with ``α = sqrt(m/n)`` for an image of ``m`` latent values against the
  resolution ``n`` the schedule was tuned at; it pushes σ toward noise because a large latent keeps its
  coarse structure under noise that would erase a small one. SD3 trains unshifted at its 256² base
  (32×32×16 latents) and uses 3.0 at 1024². An 8×8×4 latent (256 values) is far below that base, so no
  upward shift is warranted; the paper gives no evidence for shifts below 1, so we stay at the unshifted
  base. σ is drawn logit-normal (m 0, s 1), SD3's default.
* **Patch size 1**: 8×8 latents become 64 image tokens (patch 2 would leave a 4×4 grid, too coarse to tell a
  circle from a diamond); pos_embed_max_size 8. SD3.5's RMS q/k norm (``qk_norm="rms_norm"``) keeps the
  attention logits tame at this learning rate.

Like the UNet model it is deliberately undertrained (1,500 steps of 32 images; each image costs about
twice a UNet step's on a CPU, most of it in the 256 T5 tokens every SD3 pipeline call conditions on): on
held-out prompts it often gets the colour or the shape wrong, which leaves preference methods something to
fix. ``--snapshot-every N`` also saves the weights every N steps; the learning rate depends on the step
alone (warm-up, then constant), so the step-N snapshot equals a run with ``--steps N``.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mm_align.image.flow_matching import (
    FlowMatchingConfig,
    draw_flow_sample,
    flow_error,
    model_timestep,
    noisy_latents,
    scheduler_shift,
)
from mm_align.image.toyworld.shapes import ShapesOracle, render, split_specs
from mm_align.image.toyworld.shapes_flow import SHAPES_FLOW_NAME
from torch import nn

from mm_align.config import option

__all__ = ["ShapesFlowConfig", "TRANSFORMER", "CLIP", "T5", "build_t5_tokenizer", "build_models", "calibrate_vae",
           "tokenize", "encode_prompt", "train", "evaluate", "vae_roundtrip", "main"]

RESOLUTION = 32
T5_TOKENS = 256  # StableDiffusion3Pipeline's max_sequence_length default: T5 tokens per prompt
EVAL_SEED = 10_000  # the seed of held-out prompt i's image is EVAL_SEED + i (train prompts: 2·EVAL_SEED + i)
# SD3Transformer2DModel: 4 joint blocks of width 48 (3 heads × 16), 8×8×4 latents as 64 patch-1 tokens; the
# text side is 16 CLIP + 256 T5 tokens of joint_attention_dim 64 (the T5 block dominates the cost on a CPU)
TRANSFORMER: dict[str, Any] = dict(
    sample_size=RESOLUTION // 4, patch_size=1, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=16,
    num_attention_heads=3, joint_attention_dim=64, caption_projection_dim=48, pooled_projection_dim=64,
    pos_embed_max_size=RESOLUTION // 4, qk_norm="rms_norm",
)
# each CLIP: width 32 (its penultimate layer, concatenated with the other's, fills joint_attention_dim 64),
# projection 32 (the two make pooled_projection_dim 64)
CLIP: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=3,
                            projection_dim=32)
# the T5 encoder: width joint_attention_dim (SD3 pads the CLIP tokens to T5's width), one layer
T5: dict[str, Any] = dict(d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=4, relative_attention_num_buckets=8)


@dataclass
class ShapesFlowConfig:
    """How the flow shapes model is trained and measured."""

    steps: int = option(1500, help="Optimiser steps (deliberately few: the model must stay imperfect).")
    batch: int = option(32, help="Images per step (fresh renders of training prompts).")
    learning_rate: float = option(1e-3, help="AdamW learning rate after the linear warm-up (constant after it).")
    warmup_steps: int = option(200, help="Linear learning-rate warm-up steps.")
    weight_decay: float = option(1e-2, help="AdamW weight decay.")
    caption_dropout: float = option(0.1, help="Fraction of captions replaced by '' (classifier-free guidance).")
    shift: float = option(1.0, help="The scheduler's timestep shift (see the module docstring for why 1.0).")
    seed: int = option(0, help="Seeds the model initialisation, the renders and every (σ, ε) draw.")
    vae_calibration_images: int = option(512, help="Training renders whose VAE latents set shift/scaling_factor.")
    vae_dir: str | None = option(None, help="The VAE to reuse (a diffusers AutoencoderKL directory); None = the "
                                            "shipped shapes-sd/vae.")
    tokenizer_dir: str | None = option(None, help="The CLIP tokenizer to reuse; None = the shipped shapes-sd one.")
    eval_prompts: int | None = option(None, help="Held-out and training prompts sampled for the summary's oracle "
                                                 "figures; None = all of each split, 0 = no evaluation.")
    eval_steps: int = option(20, help="Euler steps of the evaluation sampler (benchmarks/image_shapes.py's).")
    eval_guidance: float = option(5.0, help="CFG weight of the evaluation sampler (benchmarks/image_shapes.py's).")
    snapshot_every: int = option(0, help="Also save <out>-stepN every N steps (0 = never); each equals the run "
                                         "with steps=N.")

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"steps and batch must be >= 1, got {self.steps} and {self.batch}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.eval_prompts is not None and self.eval_prompts < 0:
            raise ValueError(f"eval_prompts must be >= 0 or None, got {self.eval_prompts}")


def _shipped_sd(sub: str) -> Path:
    from mm_align.image.toyworld.shapes import shapes_sd_dir

    return shapes_sd_dir() / sub


def _images(specs: list, n: int, rng: random.Random) -> tuple[torch.Tensor, list[str]]:
    """``n`` renders of prompts drawn from ``specs``: pixels ``(n, 3, 32, 32)`` in [−1, 1] and their prompts."""
    chosen = [rng.choice(specs) for _ in range(n)]
    arrays = [np.asarray(render(s, RESOLUTION, rng.randrange(2**31)), dtype=np.float32) for s in chosen]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0  # (n, 3, R, R)
    return pixels, [s.prompt for s in chosen]


def build_t5_tokenizer() -> Any:
    """A word-level Unigram ``T5Tokenizer``: every world word one piece (``▁red``), letters as a fallback."""
    from mm_align.image.toyworld.train_shapes_sd import WORDS
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in sorted(set(WORDS))] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_models(config: ShapesFlowConfig) -> dict[str, Any]:
    """The pipeline's components: the reused VAE (its factors recalibrated later) and CLIP tokenizer, the new
    T5 tokenizer, new text encoders and transformer (seeded), and the scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_dir or str(_shipped_sd("tokenizer")))
    vae = AutoencoderKL.from_pretrained(config.vae_dir or str(_shipped_sd("vae"))).eval().requires_grad_(False)
    if vae.config.latent_channels != TRANSFORMER["in_channels"]:
        raise ValueError(f"the VAE has {vae.config.latent_channels} latent channels; the transformer takes "
                         f"{TRANSFORMER['in_channels']}")
    vocab = len(tokenizer.get_vocab())

    def clip() -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(CLIPTextConfig(
            **CLIP, vocab_size=vocab, max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ))

    tokenizer_3 = build_t5_tokenizer()
    text_encoder, text_encoder_2 = clip(), clip()
    text_encoder_3 = T5EncoderModel(T5Config(**T5, vocab_size=len(tokenizer_3), decoder_start_token_id=0,
                                             pad_token_id=tokenizer_3.pad_token_id,
                                             eos_token_id=tokenizer_3.eos_token_id))
    return {
        "tokenizer": tokenizer, "tokenizer_3": tokenizer_3, "vae": vae, "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2, "text_encoder_3": text_encoder_3,
        "transformer": SD3Transformer2DModel(**TRANSFORMER),
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=config.shift),
    }


@torch.no_grad()
def calibrate_vae(vae: nn.Module, n: int, rng: random.Random, seed: int) -> tuple[float, float]:
    """``(shift_factor, scaling_factor)``: the mean and 1/std of VAE latent samples of ``n`` training renders."""
    pixels, _ = _images(split_specs("train"), n, rng)
    g = torch.Generator().manual_seed(seed)
    z = torch.cat([vae.encode(chunk).latent_dist.sample(generator=g) for chunk in pixels.split(64)])  # (n, 4, 8, 8)
    mean = float(z.mean())
    return mean, float(1.0 / (z - mean).std())


def tokenize(models: dict[str, Any], prompts: list[str], t5_tokens: int = T5_TOKENS) -> dict[str, torch.Tensor]:
    """CLIP ids ``(B, L)`` (one tokenizer serves as ``tokenizer`` and ``tokenizer_2``) and T5 ids
    ``(B, t5_tokens)``, padded and truncated as ``StableDiffusion3Pipeline`` pads them."""
    tok, tok_3 = models["tokenizer"], models["tokenizer_3"]
    clip = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    t5 = tok_3(prompts, padding="max_length", max_length=t5_tokens, truncation=True, add_special_tokens=True,
               return_tensors="pt")
    return {"input_ids": clip.input_ids, "input_ids_3": t5.input_ids}


def encode_prompt(models: dict[str, Any], ids: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The conditioning ``StableDiffusion3Pipeline.encode_prompt`` builds, with gradients.

    Returns ``text`` ``(B, L + L5, D5)``: both CLIPs' penultimate hidden states concatenated, zero-padded to
    T5's width ``D5``, then T5's last hidden state; and ``pooled`` ``(B, P1 + P2)``, the two CLIP projections
    concatenated.
    """
    out1 = models["text_encoder"](ids["input_ids"], output_hidden_states=True)
    out2 = models["text_encoder_2"](ids["input_ids"], output_hidden_states=True)
    t5 = models["text_encoder_3"](ids["input_ids_3"])[0]  # (B, L5, D5)
    clip = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)  # (B, L, D1 + D2)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # (B, L, D5)
    return torch.cat([clip, t5], dim=1), torch.cat([out1.text_embeds, out2.text_embeds], dim=-1)


TRAINED = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def _save(out: Path, models: dict[str, Any]) -> None:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=models["transformer"].eval(), scheduler=models["scheduler"], vae=models["vae"],
        text_encoder=models["text_encoder"].eval(), tokenizer=models["tokenizer"],
        text_encoder_2=models["text_encoder_2"].eval(), tokenizer_2=models["tokenizer"],
        text_encoder_3=models["text_encoder_3"].eval(), tokenizer_3=models["tokenizer_3"],
    )
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    for key in TRAINED:
        models[key].train()


def train(out: Path, config: ShapesFlowConfig | None = None, log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Train and save the pipeline to ``out``; returns the summary also written to ``out/training_summary.json``."""
    config = config or ShapesFlowConfig()
    started = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(config.seed)
    models = build_models(config)
    vae, transformer, scheduler = models["vae"], models["transformer"], models["scheduler"]
    shift_factor, scaling_factor = calibrate_vae(vae, config.vae_calibration_images, rng, config.seed)
    vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)

    specs = split_specs("train")
    flow = FlowMatchingConfig()  # logit-normal σ; the shift is the scheduler's, read back as the adapter reads it
    shift = scheduler_shift(scheduler.config)
    shape = (vae.config.latent_channels, RESOLUTION // 4, RESOLUTION // 4)
    params = [p for key in TRAINED for p in models[key].parameters()]
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps)))
    for key in TRAINED:
        models[key].train()
    losses: list[float] = []
    for step in range(config.steps):
        pixels, prompts = _images(specs, config.batch, rng)  # (B, 3, R, R)
        prompts = ["" if rng.random() < config.caption_dropout else p for p in prompts]  # caption dropout → CFG
        ids = tokenize(models, prompts)  # (B, L) CLIP, (B, 256) T5
        draws = [draw_flow_sample(rng.randrange(2**31), shape, flow, shift) for _ in range(config.batch)]
        sigma = torch.tensor([d[0] for d in draws], dtype=torch.float32)  # (B,)
        noise = torch.stack([d[1] for d in draws])  # (B, C, h, w)
        z = torch.stack([torch.randn(shape, generator=d[2]) for d in draws])  # the latent_dist sample, as collate
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
            x0 = (dist.mean + dist.std * z - shift_factor) * scaling_factor  # (B, C, h, w), the adapter's x_0
        text, pooled = encode_prompt(models, ids)  # (B, L + 256, 64), (B, 64)
        x_t = noisy_latents(x0, noise, sigma)
        pred = transformer(hidden_states=x_t, timestep=model_timestep(sigma, scheduler.config.num_train_timesteps,
                                                                      "sd3"),
                           encoder_hidden_states=text, pooled_projections=pooled, return_dict=False)[0]
        loss = flow_error(pred, x0, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == config.steps - 1:
            log(f"step {step}: loss {np.mean(losses[-100:]):.4f} ({time.time() - started:.0f} s)")
        if config.snapshot_every and (step + 1) % config.snapshot_every == 0 and step + 1 < config.steps:
            _save(out.parent / f"{out.name}-step{step + 1}", models)

    _save(out, models)
    train_seconds = time.time() - started
    summary: dict[str, Any] = {
        "final_loss": float(np.mean(losses[-100:])),
        "first_loss": losses[0],
        "vae": {"reused_from": config.vae_dir or "shapes-sd/vae", "shift_factor": shift_factor,
                "scaling_factor": scaling_factor},
        "config": asdict(config),
        "transformer": TRANSFORMER, "clip": CLIP, "t5": T5,
        "train_seconds": round(train_seconds, 1),
        "megabytes": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, 2),
        "threads": torch.get_num_threads(),
    }
    if config.eval_prompts != 0:
        summary["oracle"] = {
            "heldout": evaluate(out, "heldout", config),
            "train": evaluate(out, "train", config),
            "vae_roundtrip_heldout": vae_roundtrip(vae, config),
            "sampler": {"steps": config.eval_steps, "guidance_scale": config.eval_guidance,
                        "seeds": f"{EVAL_SEED} + i (held-out), {2 * EVAL_SEED} + i (train)"},
        }
    summary["seconds"] = round(time.time() - started, 1)
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _oracle_figures(images: list, prompts: list[str]) -> dict[str, float]:
    details = ShapesOracle().details(images, prompts)
    n = len(details)
    return {
        "prompts": n,
        "oracle_accuracy": sum(d.all_correct for d in details) / n,
        "oracle_colour_accuracy": sum(d.correct["colour"] for d in details) / n,
        "oracle_shape_accuracy": sum(d.correct["shape"] for d in details) / n,
        "oracle_background_accuracy": sum(d.correct["background"] for d in details) / n,
        "oracle_mean": float(np.mean([d.mean for d in details])),
    }


def _eval_prompts(split: str, config: ShapesFlowConfig) -> tuple[list[str], list[int]]:
    prompts = [s.prompt for s in split_specs(split)][: config.eval_prompts]
    base = EVAL_SEED if split == "heldout" else 2 * EVAL_SEED
    return prompts, [base + i for i in range(len(prompts))]


@torch.no_grad()
def evaluate(model_dir: Path, split: str, config: ShapesFlowConfig) -> dict[str, float]:
    """The oracle's figures on one image per prompt of ``split``, sampled from the SAVED pipeline by
    :func:`mm_align.image.flow_sampling.sample_flow_images` (the bench's sampler)."""
    from diffusers import StableDiffusion3Pipeline
    from mm_align.image.flow_sampling import sample_flow_images
    from mm_align.image.sampling import SamplerConfig

    pipe = StableDiffusion3Pipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = _eval_prompts(split, config)
    sampler = SamplerConfig(steps=config.eval_steps, guidance_scale=config.eval_guidance, batch_size=50)
    return _oracle_figures(sample_flow_images(pipe, prompts, seeds, sampler), prompts)


@torch.no_grad()
def vae_roundtrip(vae: nn.Module, config: ShapesFlowConfig) -> dict[str, float]:
    """The oracle on held-out renders passed through the VAE (encode mean → decode): the ceiling a perfect
    transformer could reach with this VAE."""
    from PIL import Image

    prompts, seeds = _eval_prompts("heldout", config)
    arrays = [np.asarray(render(p, RESOLUTION, s), dtype=np.float32) for p, s in zip(prompts, seeds)]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0  # (N, 3, R, R)
    decoded = torch.cat([vae.decode(vae.encode(c).latent_dist.mean).sample for c in pixels.split(64)])
    images = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return _oracle_figures([Image.fromarray(a) for a in images], prompts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "weights" / SHAPES_FLOW_NAME))
    p.add_argument("--steps", type=int, default=ShapesFlowConfig.steps)
    p.add_argument("--batch", type=int, default=ShapesFlowConfig.batch)
    p.add_argument("--seed", type=int, default=ShapesFlowConfig.seed)
    p.add_argument("--eval-prompts", type=int, default=None, help="prompts per split for the oracle figures "
                                                                  "(default: all; 0: none)")
    p.add_argument("--snapshot-every", type=int, default=0, help="also save <out>-stepN every N steps")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = ShapesFlowConfig(steps=args.steps, batch=args.batch, seed=args.seed, eval_prompts=args.eval_prompts,
                              snapshot_every=args.snapshot_every)
    summary = train(Path(args.out), config)
    summary["command"] = " ".join(["python -m mm_align.image.toyworld.train_shapes_flow",
                                   *(argv if argv is not None else sys.argv[1:])])
    (Path(args.out) / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
