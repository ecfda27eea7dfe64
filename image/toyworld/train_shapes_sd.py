"""Train the shapes world's tiny text-to-image model: a real diffusers SD1.5-type pipeline.

    python -m mm_align.image.toyworld.train_shapes_sd [--out DIR] [--unet-steps N] [--vae-steps N]

Deterministic (seeded, single-threaded data, CPU): the same command writes the same weights.
Three stages, all on images drawn by the world's renderer for the TRAINING prompts only:

1. a CLIP tokenizer whose BPE merges spell the world's words (a real ``CLIPTokenizer``, saved);
2. an ``AutoencoderKL`` (32 px → 4×8×8 latents) trained on reconstruction + a small KL term; its
   ``scaling_factor`` is set to 1/std of the training latents, as SD's is;
3. a ``UNet2DConditionModel`` and a small ``CLIPTextModel`` trained jointly with the DDPM ε-loss,
   the caption dropped 10% of the time so classifier-free guidance works.

The model is deliberately undertrained (1,500 UNet steps, about 40 minutes on 2 CPU cores): on
held-out prompts it often gets the colour or the shape wrong, which leaves preference methods
something to fix. The pipeline is saved with ``save_pretrained`` (float32 safetensors, about 17 MB).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from mm_align.image.toyworld.shapes import BACKGROUNDS, COLOURS, SHAPES, render, split_specs

__all__ = ["build_tokenizer", "train", "WORDS"]

WORDS = ["a", "on", "background", *COLOURS, *SHAPES, *(b for b in BACKGROUNDS if b not in COLOURS)]
RESOLUTION = 32
MAX_LENGTH = 16


def build_tokenizer(directory: Path):
    """A CLIP BPE tokenizer: characters plus merges that spell every world word as ONE token."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[str] = []
    for word in sorted(set(WORDS)):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: ((a b) c)…
            merged = parts[0] + parts[1]
            rule = f"{parts[0]} {parts[1]}"
            if rule not in merges:
                merges.append(rule)
            vocab.setdefault(merged, len(vocab))
            parts = [merged] + parts[2:]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), pad_token="!",
                         model_max_length=MAX_LENGTH)


def _images(specs, n: int, rng: random.Random) -> tuple[torch.Tensor, list[str]]:
    chosen = [rng.choice(specs) for _ in range(n)]
    arrays = [np.asarray(render(s, RESOLUTION, rng.randrange(2**31)), dtype=np.float32) for s in chosen]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
    return pixels, [s.prompt for s in chosen]


def train(out: Path, unet_steps: int = 1500, vae_steps: int = 1200, batch: int = 64, seed: int = 0,
          log=print, snapshot_every: int = 0) -> dict:
    """Train and save the pipeline to ``out``; returns a summary (losses, times, sizes)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    rng = random.Random(seed)
    specs = split_specs("train")
    started = time.time()
    work = out.parent / f".{out.name}.build"
    tokenizer = build_tokenizer(work / "tokenizer_src")

    # ---- 1. the VAE -------------------------------------------------------------------------
    vae = AutoencoderKL(
        block_out_channels=[32, 64, 64], in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3, norm_num_groups=16,
        sample_size=RESOLUTION,
    )
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, vae_steps)
    vae_losses = []
    for step in range(vae_steps):
        pixels, _ = _images(specs, 32, rng)
        dist = vae.encode(pixels).latent_dist
        recon = vae.decode(dist.sample()).sample
        loss = F.mse_loss(recon, pixels) + 1e-6 * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        vae_losses.append(loss.item())
        if step % 100 == 0 or step == vae_steps - 1:
            log(f"vae step {step}: loss {np.mean(vae_losses[-100:]):.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        pixels, _ = _images(specs, 256, rng)
        std = float(vae.encode(pixels).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / std)

    # ---- 2. UNet + text encoder ----------------------------------------------------------------
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tokenizer.get_vocab()), max_position_embeddings=MAX_LENGTH, bos_token_id=0, eos_token_id=1,
        pad_token_id=2,
    ))
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, steps_offset=1, prediction_type="epsilon")
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200))
    unet_losses = []
    for step in range(unet_steps):
        pixels, prompts = _images(specs, batch, rng)
        prompts = ["" if rng.random() < 0.1 else p for p in prompts]  # caption dropout → CFG
        ids = tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                        return_tensors="pt").input_ids
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,))
        pred = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        unet_losses.append(loss.item())
        if step % 100 == 0 or step == unet_steps - 1:
            log(f"unet step {step}: loss {np.mean(unet_losses[-100:]):.4f} ({time.time() - started:.0f} s)")
        if snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < unet_steps:
            # the schedule is constant after warm-up, so a run with --unet-steps step+1 writes these weights
            _save(out.parent / f"{out.name}-step{step + 1}", vae, text_encoder, tokenizer, unet, scheduler)
            unet.train()
            text_encoder.train()

    _save(out, vae, text_encoder, tokenizer, unet, scheduler)
    summary = {
        "vae_final_loss": float(np.mean(vae_losses[-100:])),
        "unet_final_loss": float(np.mean(unet_losses[-100:])),
        "vae_steps": vae_steps, "unet_steps": unet_steps, "batch": batch, "seed": seed,
        "seconds": round(time.time() - started, 1),
        "megabytes": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, 2),
    }
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    return summary


def _save(out: Path, vae, text_encoder, tokenizer, unet, scheduler) -> None:
    import shutil

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "weights" / "shapes-sd"))
    p.add_argument("--unet-steps", type=int, default=1500)
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--snapshot-every", type=int, default=0, help="also save <out>-stepN every N UNet steps")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(train(Path(args.out), args.unet_steps, args.vae_steps, args.batch, args.seed,
                                snapshot_every=args.snapshot_every), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
