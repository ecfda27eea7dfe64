"""Train the shapes world's learned scorer: a tiny open_clip model, contrastive on the training prompts.

    python -m mm_align.image.toyworld.train_shapes_clip [--out DIR] [--steps N]

The model is a real open_clip ``CLIP`` (ViT image tower, transformer text tower, open_clip's own BPE
tokenizer), saved in open_clip's local-directory layout (``open_clip_config.json`` +
``open_clip_model.safetensors``), so the CLIP-score evaluator loads it as any user's model:
``clip_score:model=local-dir:<DIR>``. Training images are the renderer's true images for the
TRAINING prompts, blurred and noised at random so the scorer also reads the blurry images a small
diffusion model draws; each batch adds, for every image, a caption with one attribute changed, so the
scorer must bind colour, shape and background. It never sees held-out prompts nor the oracle: it is
the imperfect learned judge whose gains the benchmark reports beside the oracle's. Deterministic.
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
from mm_align.image.toyworld.shapes import BACKGROUNDS, COLOURS, SHAPES, ShapeSpec, render, split_specs
from PIL import Image, ImageFilter

__all__ = ["MODEL_CFG", "hard_negative", "train"]

RESOLUTION = 32
MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": RESOLUTION, "layers": 3, "width": 96, "head_width": 32, "patch_size": 4},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _corrupt(image: Image.Image, rng: random.Random) -> Image.Image:
    if rng.random() < 0.6:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    if rng.random() < 0.5:
        a = np.asarray(image, dtype=np.float32) + np.random.default_rng(rng.randrange(2**31)).normal(
            0, rng.uniform(2, 20), (RESOLUTION, RESOLUTION, 3))
        image = Image.fromarray(a.clip(0, 255).astype(np.uint8))
    return image


def hard_negative(spec: ShapeSpec, rng: random.Random) -> ShapeSpec:
    """The same prompt with one attribute changed (a hard negative)."""
    while True:
        which = rng.choice(("colour", "shape", "background"))
        if which == "colour":
            cand = ShapeSpec(rng.choice([c for c in COLOURS if c != spec.colour]), spec.shape, spec.background)
        elif which == "shape":
            cand = ShapeSpec(spec.colour, rng.choice([s for s in SHAPES if s != spec.shape]), spec.background)
        else:
            cand = ShapeSpec(spec.colour, spec.shape, rng.choice([b for b in BACKGROUNDS if b != spec.background]))
        if cand.background != cand.colour:
            return cand


def train(out: Path, steps: int = 1500, batch: int = 96, seed: int = 0, log=print) -> dict:
    """Train and save the scorer to ``out`` (open_clip local-dir layout); returns a summary."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = open_clip.CLIP(**MODEL_CFG)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=MODEL_CFG["text_cfg"]["context_length"])
    specs = split_specs("train")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + np.cos(np.pi * s
                                                                                                     / steps)))
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    started, losses = time.time(), []
    for step in range(steps):
        chosen = [rng.choice(specs) for _ in range(batch)]
        images = [_corrupt(render(s, RESOLUTION, rng.randrange(2**31)), rng) for s in chosen]
        pixels = torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) / 255 for i in images]))
        pixels = (pixels.permute(0, 3, 1, 2) - mean) / std
        texts = [s.prompt for s in chosen] + [hard_negative(s, rng).prompt for s in chosen]  # B positives, B negatives
        img = F.normalize(model.encode_image(pixels), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T  # (B, 2B): the hard negatives sit in the image→text rows
        labels = torch.arange(batch)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits[:, :batch].T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"clip step {step}: loss {np.mean(losses[-100:]):.4f} ({time.time() - started:.0f} s)")
    model.eval()
    tmp = out.parent / f".{out.name}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": MODEL_CFG, "preprocess_cfg": {"mean": list(MEAN), "std": list(STD),
                                                          "interpolation": "bicubic", "resize_mode": "shortest"}}
    (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "open_clip_model.safetensors"))
    summary = {"final_loss": float(np.mean(losses[-100:])), "steps": steps, "batch": batch, "seed": seed,
               "seconds": round(time.time() - started, 1)}
    (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "weights" / "shapes-clip"))
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(json.dumps(train(Path(args.out), args.steps, args.batch, args.seed), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
