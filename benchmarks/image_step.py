"""Cost of a Diffusion-DPO / MaPO training step against its floor, on the image adapters' own code.

The floor of a Diffusion-DPO step is a plain LoRA denoising step on the same 2B images (chosen and
rejected) plus ONE no-grad forward of the base backbone (the reference pass: LoRA disabled, no second copy
in memory). Five variants run on the same batch, the same LoRA and the same optimizer, through the adapter's
``scores`` + ``compute_loss`` exactly as the trainer calls them (the loss names, β and loss parameters read
from the family's shipped recipes, e.g. ``sd3_diffusion_dpo`` / ``sd3_mapo``):

- ``plain``: policy forward on the 2B rows, mean denoising error, backward, AdamW step;
- ``ref_forward``: the reference pass alone (``no_grad``, ``lora_disabled``);
- ``dpo``: policy + reference pass + the Diffusion-DPO loss (Flow-DPO on velocity errors), backward, step;
- ``dpo_cached_ref``: Diffusion-DPO with the reference errors given (cached), no reference pass;
- ``mapo``: MaPO (reference-free), backward, step.

Two backbone families, one :class:`Bench` (the variants) fed by one set-up per family (:data:`SETUPS`):
``StableDiffusionAdapter`` with a ``UNet2DConditionModel`` (sizes ``small``, ``sd15``, ``sdxl``), and
``FlowMatchingAdapter`` (adapters ``sd3`` / ``flux``) with an ``SD3Transformer2DModel`` or a
``FluxTransformer2DModel`` (sizes ``sd3_small``, ``flux_small``, ``sd3``, ``flux``). The adapter is loaded
from a tiny saved pipeline of the family; the benchmarked backbone (random weights) is the model passed to
``scores``. Latents and text embeddings are precomputed (as with ``model.precompute``) and the flow draws
(σ, ε) come from the adapter's own ``draw_flow_sample``, so every variant touches only the backbone.

Times: per-step medians over repetitions interleaved in one process (after warm-up). Memory: each variant
in a fresh subprocess; on CPU the step's own peak = peak RSS − RSS after set-up (model, LoRA, optimizer and
batch resident), on CUDA ``max_memory_allocated``.

    python benchmarks/run.py image_step          # CPU: UNet small + tiny SD3-type and FLUX-type (committed)
    python benchmarks/image_step.py --size sdxl --device cuda --warmup 6 --out benchmarks/results  # SDXL UNet
    python benchmarks/image_step.py --size sd15 --device cuda --warmup 6 --out benchmarks/results  # SD1.5 UNet
    python benchmarks/image_step.py --size sd3 --device cuda --warmup 6 --out benchmarks/results   # SD3-medium
    python benchmarks/image_step.py --size flux --device cuda --warmup 6 --out benchmarks/results  # FLUX.1-dev

The ``sd3`` and ``flux`` GPU commands are UNTESTED on a GPU (none was available when they were added): their
transformers are built at full size on the ``meta`` device and LoRA'd by ``tests/image/test_image_step_flow.py``
(the configs are valid, the parameter counts are SD3-medium's and FLUX.1-dev's), and the same code path runs
end to end at the tiny sizes on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from timing import format_times, medians, time_rounds, warm_up
from torch import nn

VARIANTS = ("plain", "ref_forward", "dpo", "dpo_cached_ref", "mapo")
Family = Literal["unet", "sd3", "flux"]
LATENT_CHANNELS = {"unet": 4, "sd3": 16, "flux": 16}
BACKBONE = {"unet": "UNet", "sd3": "SD3-type transformer", "flux": "FLUX-type transformer"}


@dataclass
class Size:
    """One benchmarked backbone: its family and diffusers config, the latent side, pairs per step, the recipes whose
    losses the ``dpo`` and ``mapo`` variants run, and precision settings."""

    family: Family
    config: dict[str, Any]
    latent: int
    pairs: int
    text_len: int = 77
    recipes: tuple[str, str] = ("sd15_diffusion_dpo", "sd15_mapo")
    bf16: bool = False
    gradient_checkpointing: bool = False
    lora_r: int = 8
    notes: str = ""


_SDXL_RECIPES = ("sdxl_diffusion_dpo", "sdxl_mapo")
_SD3_RECIPES = ("sd3_diffusion_dpo", "sd3_mapo")
_FLUX_RECIPES = ("flux_diffusion_dpo", "sd3_mapo")  # no FLUX MaPO recipe is shipped: SD3's (β 0.1, the loss default)
_FLOW_GPU = dict(pairs=1, bf16=True, gradient_checkpointing=True, lora_r=64)

SIZES: dict[str, Size] = {
    # an SD1.5-shaped UNet, scaled down to run on 2 CPU cores: 3 resolutions, cross-attention in two of them
    "small": Size(
        "unet", dict(block_out_channels=(64, 128, 256), layers_per_block=1, sample_size=16, in_channels=4,
                     out_channels=4, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                     cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32),
        latent=16, pairs=2, text_len=16,
        notes="SD1.5-type UNet (64/128/256 channels, 1 layer per block), 16×16 latents (128 px), 2 pairs per step",
    ),
    # SD1.5's UNet config (runwayml/stable-diffusion-v1-5), random weights, 512 px
    "sd15": Size(
        "unet", dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
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
        "unet", dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
                     layers_per_block=2,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                     cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                     addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
        latent=128, pairs=1, recipes=_SDXL_RECIPES, bf16=True, gradient_checkpointing=True, lora_r=64,
        notes="SDXL UNet (2.6 B parameters, random weights), 128×128 latents (1024 px), 1 pair per step, bf16 "
              "autocast, gradient checkpointing, LoRA r=64 on attention",
    ),
    # an SD3-shaped MMDiT scaled down for 2 CPU cores: 4 joint blocks, 256 hidden, patch 2 → 64 image tokens
    "sd3_small": Size(
        "sd3", dict(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=64,
                    num_attention_heads=4, caption_projection_dim=256, joint_attention_dim=256,
                    pooled_projection_dim=256, pos_embed_max_size=32),
        latent=16, pairs=2, text_len=32, recipes=_SD3_RECIPES,
        notes="SD3-type transformer (4 joint blocks, 256 hidden, patch 2), 16×16×16 latents (128 px, 64 image "
              "tokens), 32 text tokens, 2 pairs per step, LoRA r=8 on attention",
    ),
    # a FLUX-shaped transformer scaled down for 2 CPU cores: 2 double + 4 single blocks, 256 hidden, 2×2 packing
    "flux_small": Size(
        "flux", dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
                     num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=256, guidance_embeds=True,
                     axes_dims_rope=(16, 24, 24)),
        latent=16, pairs=2, text_len=32, recipes=_FLUX_RECIPES,
        notes="FLUX-type transformer (2 double + 4 single blocks, 256 hidden, guidance embedding), 16×16×16 latents "
              "packed 2×2 (128 px, 64 image tokens), 32 text tokens, 2 pairs per step, LoRA r=8 on attention",
    ),
    # SD3-medium's transformer config (stabilityai/stable-diffusion-3-medium-diffusers), random weights, 1024 px;
    # text = 77 CLIP tokens + 256 T5 tokens (StableDiffusion3Pipeline's max_sequence_length)
    "sd3": Size(
        "sd3", dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                    attention_head_dim=64, num_attention_heads=24, caption_projection_dim=1536,
                    joint_attention_dim=4096, pooled_projection_dim=2048, pos_embed_max_size=192),
        latent=128, text_len=77 + 256, recipes=_SD3_RECIPES, **_FLOW_GPU,
        notes="SD3-medium transformer (2.0 B parameters, 24 joint blocks, 1536 hidden, random weights), 128×128×16 "
              "latents (1024 px, 4096 image tokens), 333 text tokens, 1 pair per step, bf16 autocast, gradient "
              "checkpointing, LoRA r=64 on attention",
    ),
    # FLUX.1-dev's transformer config (black-forest-labs/FLUX.1-dev), random weights, 1024 px; 512 T5 tokens
    "flux": Size(
        "flux", dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                     guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        latent=128, text_len=512, recipes=_FLUX_RECIPES, **_FLOW_GPU,
        notes="FLUX.1-dev transformer (11.9 B parameters, 19 double + 38 single blocks, 3072 hidden, guidance "
              "embedding, random weights), 128×128×16 latents packed 2×2 (1024 px, 4096 image tokens), 512 text "
              "tokens, 1 pair per step, bf16 autocast, gradient checkpointing, LoRA r=64 on attention",
    ),
}
CPU_SIZES = ("small", "sd3_small", "flux_small")  # what run() measures; the first one's keys are the JSON's top level


# ---- the tiny saved pipelines the adapters load --------------------------------------------------------------
_TEXT_CFG = dict(hidden_size=16, intermediate_size=16, num_attention_heads=2, num_hidden_layers=1, vocab_size=8,
                 bos_token_id=0, eos_token_id=1, pad_token_id=2, max_position_embeddings=16, projection_dim=16)


def _tiny_tokenizer(root: Path) -> Any:
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2, **{c: 3 + i for i, c in enumerate("abc")}}
    (root / "tok").mkdir(parents=True)
    (root / "tok" / "vocab.json").write_text(json.dumps(vocab))
    (root / "tok" / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(root / "tok" / "vocab.json"), str(root / "tok" / "merges.txt"), pad_token="!",
                         model_max_length=16)


def _tiny_unet_pipeline(root: Path, size: Size) -> Path:
    """A small saved SD1.5- or SDXL-type pipeline for the adapter to load (its UNet is not the benchmarked one)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = _tiny_tokenizer(root)
    vae = AutoencoderKL(block_out_channels=[8], norm_num_groups=8, latent_channels=4)
    unet = UNet2DConditionModel(block_out_channels=(8, 8), layers_per_block=1, sample_size=8, norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=size.config["cross_attention_dim"], attention_head_dim=2)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    if _is_sdxl(size):
        from diffusers import StableDiffusionXLPipeline
        from transformers import CLIPTextModelWithProjection

        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**_TEXT_CFG)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**_TEXT_CFG)), tokenizer=tok, tokenizer_2=tok,
            unet=unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**_TEXT_CFG)), tokenizer=tok,
                                       unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


def _tiny_flow_pipeline(root: Path, size: Size) -> Path:
    """A small saved SD3- or FLUX-type pipeline for the adapter to load. Its transformer is not the benchmarked one
    but has its family, patch size and guidance embedding (what the adapter reads from it); its VAE has the real
    8× latent factor and 16 channels; its scheduler is the family's (SD3: shift 3; FLUX.1-dev: dynamic shifting)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    tok = _tiny_tokenizer(root)
    blocks = 4  # 2^(4 − 1) = 8: the latent factor of SD3's and FLUX's VAEs
    vae = AutoencoderKL(block_out_channels=[8] * blocks, norm_num_groups=8, latent_channels=16,
                        down_block_types=["DownEncoderBlock2D"] * blocks, up_block_types=["UpDecoderBlock2D"] * blocks,
                        use_quant_conv=False, use_post_quant_conv=False)
    if size.family == "sd3":
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=size.config["patch_size"], in_channels=16, out_channels=16, num_layers=1,
            attention_head_dim=8, num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32,
            pooled_projection_dim=32, pos_embed_max_size=16)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**_TEXT_CFG)), tokenizer=tok,
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**_TEXT_CFG)), tokenizer_2=tok,
            text_encoder_3=None, tokenizer_3=None)  # SD3 without T5: the text embeddings are precomputed anyway
    else:
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
            guidance_embeds=size.config.get("guidance_embeds", False), axes_dims_rope=[4, 6, 6])
        t5 = T5EncoderModel(T5Config(vocab_size=8, d_model=32, d_kv=8, d_ff=16, num_layers=1, num_heads=2,
                                     decoder_start_token_id=0, pad_token_id=2, eos_token_id=1))
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**_TEXT_CFG)),
                            tokenizer=tok, text_encoder_2=t5, tokenizer_2=tok, transformer=transformer)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


# ---- one set-up per backbone family: (adapter, backbone with random weights, the fixed batch) -------------------
def _is_sdxl(size: Size) -> bool:
    return size.config.get("addition_embed_type") == "text_time"


def build_backbone(size: Size, device: torch.device) -> nn.Module:
    """The benchmarked backbone with random weights, initialised where it will run (CPU init of billions is slow;
    ``meta`` builds it without memory)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    cls = {"unet": UNet2DConditionModel, "sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}[size.family]
    with torch.device(device):
        return cls(**size.config)


Setup = tuple[Any, nn.Module, dict[str, torch.Tensor]]


def _unet_setup(size: Size, device: torch.device, workdir: Path, g: torch.Generator) -> Setup:
    from mm_align.image.diffusion_adapter import DiffusionModelConfig, StableDiffusionAdapter

    pipe = _tiny_unet_pipeline(workdir, size)
    adapter = StableDiffusionAdapter(DiffusionModelConfig(pretrained=str(pipe), resolution=8 * size.latent))
    adapter.scheduler.alphas_cumprod = adapter.scheduler.alphas_cumprod.to(device)
    b, n, lat = size.pairs, 2 * size.pairs, size.latent
    batch = {
        "noise": torch.randn(b, 4, lat, lat, generator=g),
        "timesteps": torch.randint(0, 1000, (b,), generator=g),
        "_latents": torch.randn(n, 4, lat, lat, generator=g),  # [chosen ; rejected], precomputed
        "_text": torch.randn(b, size.text_len, size.config["cross_attention_dim"], generator=g),  # one per pair
    }
    if _is_sdxl(size):
        batch["_pooled"] = torch.randn(b, 1280, generator=g)
        batch["time_ids"] = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * n)
    return adapter, build_backbone(size, device), batch


def _flow_setup(size: Size, device: torch.device, workdir: Path, g: torch.Generator) -> Setup:
    from mm_align.image.flow_adapter import FlowModelConfig, FluxAdapter, SD3Adapter
    from mm_align.image.flow_matching import draw_flow_sample

    pipe = _tiny_flow_pipeline(workdir, size)
    adapter_class = SD3Adapter if size.family == "sd3" else FluxAdapter
    adapter = adapter_class(FlowModelConfig(pretrained=str(pipe), resolution=8 * size.latent))
    b, n, lat = size.pairs, 2 * size.pairs, size.latent
    # (σ, ε) per pair as the adapter's collate draws them (the family's σ density and scheduler shift)
    draws = [draw_flow_sample(seed, (16, lat, lat), adapter.config.flow, adapter.shift) for seed in range(b)]
    batch = {
        "noise": torch.stack([eps for _, eps, _ in draws]),  # (B, 16, h, w)
        "sigmas": torch.tensor([sigma for sigma, _, _ in draws]),  # (B,)
        "_latents": torch.randn(n, 16, lat, lat, generator=g),  # [chosen ; rejected], precomputed
        "_text": torch.randn(b, size.text_len, size.config["joint_attention_dim"], generator=g),  # one per pair
        "_pooled": torch.randn(b, size.config["pooled_projection_dim"], generator=g),
    }
    return adapter, build_backbone(size, device), batch


SETUPS: dict[Family, Callable[[Size, torch.device, Path, torch.Generator], Setup]] = {
    "unet": _unet_setup, "sd3": _flow_setup, "flux": _flow_setup,
}


def recipe_loss(name: str) -> tuple[list[str], float | None, dict[str, Any]]:
    """(loss names, β, loss parameters) of a shipped recipe's ``train`` section, as the trainer passes them."""
    import yaml

    from mm_align.recipes import resolve_config_path

    train = yaml.safe_load(resolve_config_path(name).read_text())["train"]
    return list(train["loss"]), train.get("beta"), dict(train.get("loss_params") or {})


class Bench:
    """The adapter, the LoRA'd backbone, one optimizer and one fixed batch; one method per variant (each returns
    the step's loss, the mean error for ``plain`` and ``ref_forward``)."""

    def __init__(self, size: Size, device: torch.device, workdir: Path):
        from mm_align.lora import LoraSettings, add_lora

        torch.manual_seed(0)
        self.size, self.device = size, device
        self.adapter, backbone, batch = SETUPS[size.family](size, device, workdir, torch.Generator().manual_seed(0))
        if size.gradient_checkpointing:
            backbone.enable_gradient_checkpointing()
        self.params = sum(p.numel() for p in backbone.parameters())
        self.model = add_lora(backbone, LoraSettings(r=size.lora_r), self.adapter.lora_target_modules).to(device)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.trainable, lr=1e-5)
        self.batch = {k: v.to(device) for k, v in batch.items()}
        self.losses = dict(zip(("dpo", "mapo"), (recipe_loss(r) for r in size.recipes)))
        with torch.no_grad():
            self.cached_ref = self._reference()

    def _autocast(self):
        if self.device.type == "meta":  # a shape check (the tests' meta build of the GPU sizes): no autocast there
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.size.bf16)

    def _policy(self):
        with self._autocast():
            return self.adapter.scores(self.batch, self.model)

    def _reference(self):
        from mm_align.lora import lora_disabled

        with torch.no_grad(), lora_disabled(self.model), self._autocast():
            return self.adapter.scores(self.batch, self.model)

    def _loss(self, kind: str, policy, reference) -> torch.Tensor:
        from mm_align.losses.registry import compute_loss

        names, beta, params = self.losses[kind]
        return compute_loss(names, None, policy, reference, beta, params).loss

    def _update(self, loss: torch.Tensor) -> float:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def plain(self) -> float:
        s = self._policy()
        return self._update(torch.cat([s.chosen, s.rejected]).mean())

    def ref_forward(self) -> float:
        s = self._reference()
        return torch.cat([s.chosen, s.rejected]).mean().item()

    def dpo(self) -> float:
        reference = self._reference()  # first, as the trainer does: its activations are gone before the policy's
        return self._update(self._loss("dpo", self._policy(), reference))

    def dpo_cached_ref(self) -> float:
        return self._update(self._loss("dpo", self._policy(), self.cached_ref))

    def mapo(self) -> float:
        return self._update(self._loss("mapo", self._policy(), None))

    def step(self, variant: str) -> float:
        out = getattr(self, variant)()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return out


# ---- measuring ------------------------------------------------------------------------------------------------
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
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory", variant, "--size", size_name, "--device", device,
           "--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _parameters_key(size: Size) -> str:
    return "unet_parameters" if size.family == "unet" else "transformer_parameters"


def measure(size_name: str = "small", device: str = "cpu", reps: int = 7, steps_per_rep: int = 3,
            warmup: int = 2, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Times (interleaved, one process) and memory (fresh processes) of every variant; targets judged."""
    size, dev = SIZES[size_name], torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(size, dev, Path(tmp))
        warm_up(bench.step, VARIANTS, warmup)
        # each round: steps_per_rep steps of each variant, the order alternating between rounds
        times = time_rounds(bench.step, VARIANTS, reps, repeat=steps_per_rep, after_round=lambda r, t: log(
            f"{size_name} rep {r + 1}/{reps}: " + format_times(medians(t))))
        params, losses = bench.params, bench.losses
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
        "size": size_name, "notes": size.notes, _parameters_key(size): params, "family": size.family,
        "losses": {k: {"recipe": r, "loss": v[0], "beta": v[1], "loss_params": v[2]}
                   for (k, v), r in zip(losses.items(), size.recipes)},
        "reps": reps, "steps_per_rep": steps_per_rep, "samples_per_variant": reps * steps_per_rep,
        "median_s_per_step": med, "all_s_per_step": times, "memory_mib": memory,
        "ratios": ratios, "targets": targets,
        "pass": {k: ratios[k] <= targets[k] for k in ratios},
    }


def markdown(result: dict[str, Any], device_name: str) -> str:
    size = SIZES[result["size"]]
    med, mem = result["median_s_per_step"], result["memory_mib"]
    params = result[_parameters_key(size)]
    dpo, mapo = result.get("losses", {}).get("dpo"), result.get("losses", {}).get("mapo")
    losses = (f" Losses as the recipes {dpo['recipe']} ({'+'.join(dpo['loss'])}, β {dpo['beta']:g}) and "
              f"{mapo['recipe']} ({'+'.join(mapo['loss'])}, β {mapo['beta']:g}).") if dpo and mapo else ""
    lines = [f"{result['notes']}; {params / 1e6:.1f} M {BACKBONE[size.family]} parameters; device: {device_name}. "
             f"Medians of {result['samples_per_variant']} steps per variant ({result['reps']} interleaved "
             f"repetitions × {result['steps_per_rep']}), one process; memory from a fresh process per variant."
             + losses,
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
    """The committed CPU benchmark (``benchmarks/run.py image_step``): the UNet ``small`` size (its result is the
    JSON's top level, as before) and the tiny flow sizes (``sd3_small``, ``flux_small``: one top-level key each)."""
    load_before = os.getloadavg()
    results = {name: measure(name, "cpu", reps=2 if quick else 7, steps_per_rep=2 if quick else 3,
                             warmup=1 if quick else 2) for name in CPU_SIZES}
    load_after = os.getloadavg()
    payload = results.pop(CPU_SIZES[0])
    payload.update(results)
    payload["cpu"] = {"cores": os.cpu_count(), "load_average_1min": {"before": load_before[0], "after": load_after[0]}}
    sections = [f"Timings taken on a shared {os.cpu_count()}-core CPU under load from other jobs (1-minute load "
                f"average {load_before[0]:.1f} before, {load_after[0]:.1f} after, this run included): absolute times "
                "are inflated and noisy; the variants of a size are interleaved, so their ratios are what this "
                "measures."]
    for name in CPU_SIZES:
        result = payload if name == CPU_SIZES[0] else payload[name]
        sections.append(f"## {name}\n\n" + markdown(result, "cpu"))
    payload["markdown"] = "\n\n".join(sections)
    return payload


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--memory", choices=VARIANTS, help="(internal) print one variant's peak memory as JSON")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant before timing")
    p.add_argument("--out", help="write image_step_<size>.{json,md} here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
