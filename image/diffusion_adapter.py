"""The text-to-image diffusion adapter (SD1.5 and SDXL types): denoising errors for Diffusion-DPO, MaPO, NPO, KTO.

Components are loaded from a diffusers model directory or hub id with ``from_pretrained``: the
UNet (what is trained), the VAE and the CLIP text encoder (frozen), the tokenizer and the
training noise scheduler. For each pair the chosen and the rejected image share ONE noise draw
and ONE timestep, drawn in ``collate`` from the trainer's per-sample seed; the policy and the
reference pass see the same draw, so cached and live reference errors agree exactly.

The VAE latents and text embeddings of a batch are computed once and kept in the batch, so the
reference pass (LoRA disabled) costs one UNet forward and nothing else.

SDXL-type models (a ``text_encoder_2`` folder) add the second text encoder: prompt embeddings
are both encoders' penultimate hidden states concatenated, the pooled embedding comes from the
second, and ``add_time_ids`` = (original size, crop top-left, target size) of each image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from mm_align.config import from_dict, option
from mm_align.data import UnpairedSample
from mm_align.reference_cache import model_fingerprint
from mm_align.scores import denoising_error
from mm_align.types import Scores

__all__ = ["DiffusionModelConfig", "StableDiffusionAdapter", "load_image", "image_to_tensor"]


@dataclass
class DiffusionModelConfig:
    """Which diffusers model to align, and how to feed it."""

    pretrained: str = option("", help="A diffusers model directory or hub id (SD1.5 layout: unet/ vae/ ...).")
    resolution: int = option(512, help="Images are resized (shorter side) and centre-cropped to this size.")
    gradient_checkpointing: bool = option(False, help="Recompute UNet activations in backward to save memory.")
    revision: str | None = option(None, help="Hub revision of the model.")

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")


def load_image(value: Any, base_dir: Path | None = None) -> Image.Image:
    """An RGB PIL image from a path, raw bytes (e.g. a Pick-a-Pic ``jpg_0`` cell) or a PIL image."""
    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value)).convert("RGB")
    if isinstance(value, dict) and "bytes" in value:  # HF datasets Image feature, undecoded
        return Image.open(io.BytesIO(value["bytes"])).convert("RGB")
    if isinstance(value, str):
        path = Path(value)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return Image.open(path).convert("RGB")
    raise ValueError(f"cannot read an image from a {type(value).__name__}")


def image_to_tensor(image: Image.Image, resolution: int) -> tuple[torch.Tensor, tuple[int, int, int, int, int, int]]:
    """Resize the shorter side to ``resolution``, centre-crop, scale to [−1, 1]: ``(3, R, R)``.

    Also returns SDXL's micro-conditioning ``(orig_h, orig_w, crop_top, crop_left, R, R)``.
    """
    orig_w, orig_h = image.size
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (R, R, 3)
    return torch.from_numpy(array).permute(2, 0, 1), (orig_h, orig_w, top, left, resolution, resolution)


class StableDiffusionAdapter:
    """:class:`~mm_align.types.PreferenceAdapter` for SD1.5-type and SDXL-type diffusers pipelines."""

    score_kind = "error"
    stochastic_scores = True
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
    Config = DiffusionModelConfig
    # data.format values this modality reads itself (paired data): name -> "module:reader(path, strict=...)"
    dataset_formats = {"pickapic": "mm_align.image.pickapic:read_pickapic"}

    def __init__(self, config: DiffusionModelConfig) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        if not config.pretrained:
            raise ValueError("model.pretrained must name a diffusers model directory or hub id")
        self.config = config
        kw = {"revision": config.revision} if config.revision else {}
        src = config.pretrained
        self.model: nn.Module = UNet2DConditionModel.from_pretrained(src, subfolder="unet", **kw)
        self.vae = AutoencoderKL.from_pretrained(src, subfolder="vae", **kw).requires_grad_(False).eval()
        self.text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", **kw)
        self.text_encoder.requires_grad_(False).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
        self.scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", **kw)
        self.is_sdxl = (Path(src) / "text_encoder_2").is_dir() or getattr(
            self.model.config, "addition_embed_type", None
        ) == "text_time"
        self.text_encoder_2 = self.tokenizer_2 = None
        if self.is_sdxl:
            from transformers import CLIPTextModelWithProjection

            self.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(src, subfolder="text_encoder_2", **kw)
            self.text_encoder_2.requires_grad_(False).eval()
            self.tokenizer_2 = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2", **kw)
        if self.scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {self.scheduler.config.prediction_type!r}")
        if config.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.latent_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.base_dir: Path | None = None
        self._fingerprint = model_fingerprint(config, self.model)  # the base weights, before LoRA

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> StableDiffusionAdapter:
        return cls(from_dict(DiffusionModelConfig, data, path="model"))

    def fingerprint(self) -> str:
        return self._fingerprint

    # ---- batches --------------------------------------------------------------------------
    def _pixels(self, value: Any, record: Any) -> tuple[torch.Tensor, tuple[int, ...]]:
        try:
            return image_to_tensor(load_image(value, self.base_dir), self.config.resolution)
        except (OSError, ValueError) as exc:
            raise ValueError(f"record {getattr(record, 'id', None)!r}: cannot read image: {exc}") from exc

    def collate(self, records: list[Any], seeds: list[int]) -> dict[str, torch.Tensor]:
        unpaired = isinstance(records[0], UnpairedSample)
        if unpaired:
            images = [[self._pixels(r.completion, r)] for r in records]
        else:
            images = [[self._pixels(r.chosen, r), self._pixels(r.rejected, r)] for r in records]
        size = self.config.resolution // self.latent_factor
        channels = self.model.config.in_channels
        time_ids = [[t for _, t in imgs] for imgs in images]
        images = [[p for p, _ in imgs] for imgs in images]
        noise, vae_noise, timesteps = [], [], []
        for s, imgs in zip(seeds, images):
            g = torch.Generator().manual_seed(s)
            noise.append(torch.randn(channels, size, size, generator=g))  # shared by chosen, rejected, reference
            timesteps.append(int(torch.randint(0, self.scheduler.config.num_train_timesteps, (1,), generator=g)))
            vae_noise.append(torch.randn(len(imgs), channels, size, size, generator=g))  # latent_dist sample
        prompts = [r.prompt if isinstance(r.prompt, str) else str(r.prompt) for r in records]

        def tokenize(tokenizer: Any) -> torch.Tensor:
            return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids

        tokens = tokenize(self.tokenizer)
        batch = {
            "input_ids": tokens,  # (B, L)
            "noise": torch.stack(noise),  # (B, C, h, w)
            "timesteps": torch.tensor(timesteps, dtype=torch.long),  # (B,)
        }
        if self.is_sdxl:
            batch["input_ids_2"] = tokenize(self.tokenizer_2)
            order = [ids[0] for ids in time_ids] + ([] if unpaired else [ids[1] for ids in time_ids])
            batch["time_ids"] = torch.tensor(order, dtype=torch.float32)  # (N, 6), same order as pixels
        if unpaired:
            batch["pixels"] = torch.stack([i[0] for i in images])  # (B, 3, R, R)
            batch["vae_noise"] = torch.stack([v[0] for v in vae_noise])
            batch["desirable"] = torch.tensor([bool(r.desirable) for r in records])
        else:
            # (2B, 3, R, R): [all chosen ; all rejected], the layout of the Diffusion-DPO reference code
            batch["pixels"] = torch.cat([torch.stack([i[0] for i in images]), torch.stack([i[1] for i in images])])
            batch["vae_noise"] = torch.cat(
                [torch.stack([v[0] for v in vae_noise]), torch.stack([v[1] for v in vae_noise])]
            )
        return batch

    @torch.no_grad()
    def _encode(self, batch: dict[str, torch.Tensor]) -> None:
        """VAE latents and text embeddings, computed once per batch and kept in it."""
        if "_latents" in batch:
            return
        device = batch["pixels"].device
        self.vae.to(device)
        self.text_encoder.to(device)
        dist = self.vae.encode(batch["pixels"].to(self.vae.dtype)).latent_dist
        latents = (dist.mean + dist.std * batch["vae_noise"].to(dist.mean.dtype)) * self.vae.config.scaling_factor
        batch["_latents"] = latents.float()  # (N, C, h, w)
        if not self.is_sdxl:
            batch["_text"] = self.text_encoder(batch["input_ids"])[0]  # (B, L, D)
            return
        assert self.text_encoder_2 is not None
        self.text_encoder_2.to(device)
        out1 = self.text_encoder(batch["input_ids"], output_hidden_states=True)
        out2 = self.text_encoder_2(batch["input_ids_2"], output_hidden_states=True)
        batch["_text"] = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)  # (B, L, D1 + D2)
        batch["_pooled"] = out2.text_embeds  # (B, D2)

    def scores(self, batch: dict[str, torch.Tensor], model: nn.Module) -> Scores:
        self._encode(batch)
        latents = batch["_latents"]
        repeat = latents.shape[0] // batch["noise"].shape[0]  # 2 for pairs, 1 for unpaired
        noise = batch["noise"].repeat(repeat, 1, 1, 1)  # the same ε for chosen and rejected
        t = batch["timesteps"].repeat(repeat)  # the same t
        text = batch["_text"].repeat(repeat, 1, 1)
        noisy = self.scheduler.add_noise(latents, noise, t)
        if self.scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = self.scheduler.get_velocity(latents, noise, t)
        extra = {}
        if self.is_sdxl:
            pooled = batch["_pooled"].repeat(repeat, 1)
            extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": batch["time_ids"].to(pooled.dtype)}
        pred = model(noisy, t, encoder_hidden_states=text, **extra).sample  # (N, C, h, w)
        err = denoising_error(pred, target)  # (N,)
        if repeat == 1:
            return Scores("error", err, desirable=batch["desirable"])
        b = batch["noise"].shape[0]
        return Scores("error", err[:b], err[b:])

    def save(self, model: nn.Module, output_dir: str, lora: bool) -> None:
        """LoRA in the diffusers format (``pipeline.load_lora_weights(dir)`` loads it), or the full UNet."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if lora:
            state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
            pipeline = StableDiffusionXLPipeline if self.is_sdxl else StableDiffusionPipeline
            pipeline.save_lora_weights(out, unet_lora_layers=state, safe_serialization=True)
        else:
            model.save_pretrained(out / "unet")  # type: ignore[operator]
