"""Cost of a Diffusion-DPO / MaPO training step against its floor, on the image adapter's own code.

The floor of a Diffusion-DPO step is a plain LoRA denoising step on the same 2B images (chosen and
rejected) plus ONE no-grad forward of the base UNet (the reference pass: LoRA disabled, no second UNet
in memory). Five variants run on the same batch, the same LoRA and the same optimizer, through
``StableDiffusionAdapter.scores`` + ``compute_loss`` exactly as the trainer calls them:

- ``plain``: policy forward on the 2B rows, mean denoising error, backward, AdamW step;
- ``ref_forward``: the reference pass alone (``no_grad``, ``lora_disabled``);
- ``dpo``: policy + reference pass + the Diffusion-DPO loss, backward, step;
- ``dpo_cached_ref``: Diffusion-DPO with the reference errors given (cached), no reference pass;
- ``mapo``: MaPO (reference-free), backward, step.

Latents and text embeddings are precomputed (as with ``model.precompute``), so every variant touches
only the UNet. Times: per-step medians over repetitions interleaved in one process (after warm-up).
Memory: each variant in a fresh subprocess; on CPU the step's own peak = peak RSS − RSS after set-up
(model, LoRA, optimizer and batch resident), on CUDA ``max_memory_allocated``.

    python benchmarks/run.py image_step                                  # CPU, small UNet (committed)
    python benchmarks/image_step.py --size sdxl --device cuda --warmup 6 --out benchmarks/results  # SDXL UNet, GPU
    python benchmarks/image_step.py --size sd15 --device cuda --warmup 6 --out benchmarks/results  # SD1.5 UNet, GPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timing import format_times, medians, time_rounds, warm_up

VARIANTS = ("plain", "ref_forward", "dpo", "dpo_cached_ref", "mapo")


@dataclass
class Size:
    """A UNet size: its diffusers config, the latent side, pairs per step and precision settings."""

    unet: dict[str, Any]
    latent: int
    pairs: int
    text_len: int = 77
    bf16: bool = False
    gradient_checkpointing: bool = False
    lora_r: int = 8
    notes: str = ""


SIZES: dict[str, Size] = {
    # an SD1.5-shaped UNet, scaled down to run on 2 CPU cores: 3 resolutions, cross-attention in two of them
    "small": Size(
        unet=dict(block_out_channels=(64, 128, 256), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32),
        latent=16, pairs=2, text_len=16,
        notes="SD1.5-type UNet (64/128/256 channels, 1 layer per block), 16×16 latents (128 px), 2 pairs per step",
    ),
    # SD1.5's UNet config (runwayml/stable-diffusion-v1-5), random weights, 512 px
    "sd15": Size(
        unet=dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                  layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                        "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=768, attention_head_dim=8),
        latent=64, pairs=4, bf16=True, lora_r=8,
        notes="SD1.5 UNet (0.86 B parameters, random weights), 64×64 latents (512 px), 4 pairs per step, bf16 "
              "autocast, LoRA r=8 on attention",
    ),
    # SDXL's UNet config (stabilityai/stable-diffusion-xl-base-1.0), random weights, 1024 px
    "sdxl": Size(
        unet=dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
                  layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816),
        latent=128, pairs=1, bf16=True, gradient_checkpointing=True, lora_r=64,
        notes="SDXL UNet (2.6 B parameters, random weights), 128×128 latents (1024 px), 1 pair per step, bf16 "
              "autocast, gradient checkpointing, LoRA r=64 on attention",
    ),
}


def _tiny_pipeline(root: Path, sdxl: bool, cross_dim: int) -> Path:
    """A small saved pipeline for the adapter to load (its UNet is replaced by the benchmarked one)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, **{c: 3 + i for i, c in enumerate("abc")}}
    (root / "tok").mkdir(parents=True)
    (root / "tok" / "vocab.json").write_text(json.dumps(vocab))
    (root / "tok" / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(root / "tok" / "vocab.json"), str(root / "tok" / "merges.txt"), pad_token="!",
                        model_max_length=16)
    vae = AutoencoderKL(block_out_channels=[8], norm_num_groups=8, latent_channels=4)
    text_cfg = dict(hidden_size=16, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1, vocab_size=8,
                    bos_token_id=0, eos_token_id=1, pad_token_id=2, max_position_embeddings=16, projection_dim=16)
    unet = UNet2DConditionModel(block_out_channels=(8, 8), layers_per_block=1, sample_size=8, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=cross_dim, attention_head_dim=2)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    if sdxl:
        from diffusers import StableDiffusionXLPipeline
        from transformers import CLIPTextModelWithProjection

        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text_cfg)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg)), tokenizer=tok, tokenizer_2=tok,
            unet=unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text_cfg)), tokenizer=tok,
                                       unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


class Bench:
    """The adapter, the LoRA'd UNet, one optimizer and one fixed batch; one method per variant."""

    def __init__(self, size: Size, device: torch.device, workdir: Path):
        from diffusers import UNet2DConditionModel
        from mm_align.image.diffusion_adapter import DiffusionModelConfig, StableDiffusionAdapter

        from mm_align.lora import LoraSettings, add_lora

        torch.manual_seed(0)
        self.size, self.device = size, device
        sdxl = size.unet.get("addition_embed_type") == "text_time"
        cross = size.unet["cross_attention_dim"]
        pipe = _tiny_pipeline(workdir, sdxl, cross)
        self.adapter = StableDiffusionAdapter(DiffusionModelConfig(pretrained=str(pipe), resolution=8 * size.latent))
        with torch.device(device):  # random weights: initialise them where they will run (CPU init of 2.6 B is slow)
            unet = UNet2DConditionModel(**size.unet)
        if size.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.params = sum(p.numel() for p in unet.parameters())
        self.model = add_lora(unet, LoraSettings(r=size.lora_r), self.adapter.lora_target_modules).to(device)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.trainable, lr=1e-5)
        b, n, lat = size.pairs, 2 * size.pairs, size.latent
        g = torch.Generator().manual_seed(0)
        batch = {
            "noise": torch.randn(b, 4, lat, lat, generator=g),
            "timesteps": torch.randint(0, 1000, (b,), generator=g),
            "_latents": torch.randn(n, 4, lat, lat, generator=g),  # [chosen ; rejected], precomputed
            "_text": torch.randn(b, size.text_len, cross, generator=g),  # one caption per pair
        }
        if sdxl:
            batch["_pooled"] = torch.randn(b, 1280, generator=g)
            batch["time_ids"] = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * n)
        self.batch = {k: v.to(device) for k, v in batch.items()}
        self.adapter.scheduler.alphas_cumprod = self.adapter.scheduler.alphas_cumprod.to(device)
        with torch.no_grad():
            self.cached_ref = self._reference()

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.size.bf16)

    def _policy(self):
        with self._autocast():
            return self.adapter.scores(self.batch, self.model)

    def _reference(self):
        from mm_align.lora import lora_disabled

        with torch.no_grad(), lora_disabled(self.model), self._autocast():
            return self.adapter.scores(self.batch, self.model)

    def _update(self, loss: torch.Tensor) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss.item()

    def plain(self) -> None:
        s = self._policy()
        self._update(torch.cat([s.chosen, s.rejected]).mean())

    def ref_forward(self) -> None:
        self._reference().chosen.sum().item()

    def dpo(self) -> None:
        from mm_align.losses.registry import compute_loss

        reference = self._reference()  # first, as the trainer does: its activations are gone before the policy's
        self._update(compute_loss(["diffusion_dpo"], None, self._policy(), reference).loss)

    def dpo_cached_ref(self) -> None:
        from mm_align.losses.registry import compute_loss

        self._update(compute_loss(["diffusion_dpo"], None, self._policy(), self.cached_ref).loss)

    def mapo(self) -> None:
        from mm_align.losses.registry import compute_loss

        self._update(compute_loss(["mapo"], None, self._policy(), None).loss)

    def step(self, variant: str) -> None:
        getattr(self, variant)()
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def _rss_kb(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def measure_memory(size_name: str, variant: str, device: str, steps: int = 3) -> dict[str, float]:
    """Peak memory of ``steps`` steps of one variant, in this (fresh) process."""
    dev = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(SIZES[size_name], dev, Path(tmp))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(steps):
                bench.step(variant)
            peak = torch.cuda.max_memory_allocated()
            return {"resident_mib": base / 2**20, "peak_mib": peak / 2**20, "step_peak_mib": (peak - base) / 2**20}
        base = _rss_kb("VmRSS")
        for _ in range(steps):
            bench.step(variant)
        peak = _rss_kb("VmHWM")
        return {"resident_mib": base / 1024, "peak_mib": peak / 1024, "step_peak_mib": (peak - base) / 1024}


def _memory_in_subprocess(size_name: str, variant: str, device: str) -> dict[str, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory", variant, "--size", size_name, "--device", device]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(size_name: str = "small", device: str = "cpu", reps: int = 7, steps_per_rep: int = 3,
            warmup: int = 2, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Times (interleaved, one process) and memory (fresh processes) of every variant; targets judged."""
    size, dev = SIZES[size_name], torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(size, dev, Path(tmp))
        warm_up(bench.step, VARIANTS, warmup)
        # each round: steps_per_rep steps of each variant, the order alternating between rounds
        times = time_rounds(bench.step, VARIANTS, reps, repeat=steps_per_rep,
                            after_round=lambda r, t: log(f"rep {r + 1}/{reps}: " + format_times(medians(t))))
        params = bench.params
    med = medians(times)
    memory = {v: _memory_in_subprocess(size_name, v, device) for v in ("plain", "dpo", "dpo_cached_ref", "mapo")}
    floor = med["plain"] + med["ref_forward"]
    ratios = {
        "dpo / (plain + ref_forward)": med["dpo"] / floor,
        "dpo_cached_ref / plain": med["dpo_cached_ref"] / med["plain"],
        "mapo / plain": med["mapo"] / med["plain"],
        "dpo step memory / plain step memory": memory["dpo"]["step_peak_mib"] / memory["plain"]["step_peak_mib"],
    }
    targets = {"dpo / (plain + ref_forward)": 1.05, "dpo_cached_ref / plain": 1.05, "mapo / plain": 1.05,
               "dpo step memory / plain step memory": 1.10}
    return {
        "size": size_name, "notes": size.notes, "unet_parameters": params, "reps": reps,
        "steps_per_rep": steps_per_rep, "samples_per_variant": reps * steps_per_rep,
        "median_s_per_step": med, "all_s_per_step": times, "memory_mib": memory,
        "ratios": ratios, "targets": targets,
        "pass": {k: ratios[k] <= targets[k] for k in ratios},
    }


def markdown(result: dict[str, Any], device_name: str) -> str:
    med, mem = result["median_s_per_step"], result["memory_mib"]
    lines = [f"{result['notes']}; {result['unet_parameters'] / 1e6:.1f} M UNet parameters; device: {device_name}. "
             f"Medians of {result['samples_per_variant']} steps per variant ({result['reps']} interleaved "
             f"repetitions × {result['steps_per_rep']}), one process; memory from a fresh process per variant.",
             "", "| variant | median s/step | step peak memory MiB | process peak MiB |", "|---|---|---|---|"]
    for v in VARIANTS:
        m = mem.get(v)
        lines.append(f"| {v} | {med[v]:.4f} | {m['step_peak_mib']:.1f} | {m['peak_mib']:.1f} |" if m
                     else f"| {v} | {med[v]:.4f} | – | – |")
    lines += ["", "| ratio | measured | target | |", "|---|---|---|---|"]
    for k, r in result["ratios"].items():
        lines.append(f"| {k} | {r:.3f} | ≤ {result['targets'][k]:.2f} | {'PASS' if result['pass'][k] else 'FAIL'} |")
    return "\n".join(lines)


def run(quick: bool = False) -> dict[str, Any]:
    """The committed CPU benchmark (``benchmarks/run.py image_step``)."""
    result = measure("small", "cpu", reps=2 if quick else 7, steps_per_rep=2 if quick else 3,
                     warmup=1 if quick else 2)
    result["markdown"] = markdown(result, "cpu")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--memory", choices=VARIANTS, help="(internal) print one variant's peak memory as JSON")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing")
    p.add_argument("--out", help="write image_step_<size>.{json,md} here")
    args = p.parse_args(argv)
    if args.memory:
        print(json.dumps(measure_memory(args.size, args.memory, args.device)))
        return 0
    result = measure(args.size, args.device, reps=args.reps, warmup=args.warmup)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result["device"] = device_name
    result["command"] = "python benchmarks/image_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = f"# image_step ({args.size})\n\n`{result['command']}` — torch {torch.__version__}\n\n" + markdown(
        result, device_name) + "\n"
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"image_step_{args.size}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / f"image_step_{args.size}.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
