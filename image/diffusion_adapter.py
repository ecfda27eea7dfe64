"""The text-to-image diffusion adapter (SD1.5 and SDXL types): denoising errors for Diffusion-DPO, MaPO, NPO, KTO.

Components are loaded from a diffusers model directory or hub id with ``from_pretrained``: the
UNet (what is trained), the VAE and the CLIP text encoder (frozen), the tokenizer and the
training noise scheduler. For each pair the chosen and the rejected image share ONE noise draw
and ONE timestep, drawn in ``collate`` from the trainer's per-sample seed; the policy and the
reference pass see the same draw, so cached and live reference errors agree exactly.

The VAE latents and text embeddings of a batch are computed once and kept in the batch, so the
reference pass (LoRA disabled) costs one UNet forward and nothing else. With ``precompute: true``
they are computed once per DATASET instead (:mod:`mm_align.image.latent_cache`): the VAE latent
distribution (mean, std) and the text embeddings are cached on disk, and training touches only the
UNet. The latent is still sampled per step from the cached distribution with the per-sample seed,
so precomputed and live training give the same numbers.

Text-preference pairs (TDPO, ALGORITHMS.md §3) are pairs whose ``meta["rejected_prompt"]`` holds
the mismatched caption: the chosen and rejected sides are the SAME image with the same latent
sample, noise and timestep, under the true and the mismatched caption.

SmPO (per-pair β from reward scores): records carrying reward scores (``meta["reward_chosen"]``,
``meta["reward_rejected"]``, or the keys named by ``reward_keys``) get them min-max normalised over
the training set in :meth:`StableDiffusionAdapter.prepare` and passed to the loss in ``Scores.extra``.

SDXL-type models (a ``text_encoder_2`` folder) add the second text encoder: prompt embeddings
are both encoders' penultimate hidden states concatenated, the pooled embedding comes from the
second, and ``add_time_ids`` = (original size, crop top-left, target size) of each image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from mm_align.image.image_io import image_to_tensor, load_image
from mm_align.image.loading import quiet_loading
from mm_align.image.pair_rewards import batch_rewards, dataset_reward_range, record_rewards, reward_keys
from torch import nn

from mm_align.config import from_dict, option
from mm_align.data import UnpairedSample
from mm_align.fingerprint import pretrained_fingerprint
from mm_align.scores import denoising_error
from mm_align.types import Scores

__all__ = ["DiffusionModelConfig", "StableDiffusionAdapter", "load_image", "image_to_tensor"]


@dataclass
class DiffusionModelConfig:
    """Which diffusers model to align, and how to feed it."""

    pretrained: str = option("", help="A diffusers model directory or hub id (SD1.5 layout: unet/ vae/ ...); "
                                      "'shapes' = the shipped shapes-world model.")
    resolution: int = option(512, help="Images are resized (shorter side) and centre-cropped to this size.")
    gradient_checkpointing: bool = option(False, help="Recompute UNet activations in backward to save memory.")
    revision: str | None = option(None, help="Hub revision of the model.")
    encoder_dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32", help="Weights dtype of the frozen VAE and text encoder(s) (bfloat16 halves their memory)."
    )
    precompute: bool = option(
        False, help="Encode VAE latents and text embeddings once per dataset, on disk: training runs the UNet only."
    )
    precompute_dir: str | None = option(None, help="Where precomputed latents go; None = $MM_ALIGN_CACHE/latents.")
    reward_keys: list[str] | None = option(
        None, help="Record meta keys of the chosen and rejected rewards (SmPO); None = reward_chosen, reward_rejected."
    )
    save_merged: bool = option(
        False, help="Also write the full pipeline with the LoRA merged (save_pretrained) under final/merged."
    )

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if self.reward_keys is not None and len(self.reward_keys) != 2:
            raise ValueError(f"reward_keys must name two meta keys (chosen, rejected), got {self.reward_keys}")


class StableDiffusionAdapter:
    """:class:`~mm_align.types.PreferenceAdapter` for SD1.5-type and SDXL-type diffusers pipelines."""

    score_kind = "error"
    stochastic_scores = True
    lora_target_modules = ["to_q", "to_k", "to_v", "to_out.0"]
    Config = DiffusionModelConfig
    # data.format values this modality reads itself: name -> "module:reader(path, strict=, kind=, **data.options)"
    dataset_formats = {
        "pickapic": "mm_align.image.pickapic:read_pickapic",
        "pair_folders": "mm_align.image.pair_readers:read_pair_folders",
        "captions": "mm_align.image.text_preference:read_captions",  # TDPO / TKTO: captioned images, perturbed
    }

    def __init__(self, config: DiffusionModelConfig) -> None:
        if not config.pretrained:
            raise ValueError("model.pretrained must name a diffusers model directory or hub id")
        self.config = config
        kw = {"revision": config.revision} if config.revision else {}
        from mm_align.image.toyworld.shapes import resolve_model

        src = resolve_model(config.pretrained)  # "shapes" = the shipped shapes-world model
        with quiet_loading():
            self._load(src, config, kw)

    def _load(self, src: str, config: DiffusionModelConfig, kw: dict[str, Any]) -> None:
        """Every component from ``src`` (the training UNet, frozen VAE and text encoder(s), tokenizers, scheduler)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.model: nn.Module = UNet2DConditionModel.from_pretrained(src, subfolder="unet", **kw)
        dtype = getattr(torch, config.encoder_dtype)  # the frozen encoders only; the UNet stays float32 (autocast)
        self.vae = AutoencoderKL.from_pretrained(src, subfolder="vae", dtype=dtype, **kw)
        self.vae.requires_grad_(False).eval()
        self.text_encoder = CLIPTextModel.from_pretrained(src, subfolder="text_encoder", dtype=dtype, **kw)
        self.text_encoder.requires_grad_(False).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
        self.scheduler = DDPMScheduler.from_pretrained(src, subfolder="scheduler", **kw)
        self.is_sdxl = (Path(src) / "text_encoder_2").is_dir() or getattr(
            self.model.config, "addition_embed_type", None
        ) == "text_time"
        self.text_encoder_2 = self.tokenizer_2 = None
        if self.is_sdxl:
            from transformers import CLIPTextModelWithProjection

            self.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
                src, subfolder="text_encoder_2", dtype=dtype, **kw
            )
            self.text_encoder_2.requires_grad_(False).eval()
            self.tokenizer_2 = CLIPTokenizer.from_pretrained(src, subfolder="tokenizer_2", **kw)
        if self.scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {self.scheduler.config.prediction_type!r}")
        if config.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.latent_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.base_dir: Path | None = None
        self._fingerprint = pretrained_fingerprint(  # the files of every component that shapes a score, by content
            config, src, ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
            + (["text_encoder_2", "tokenizer_2"] if self.is_sdxl else []), revision=config.revision,
            modules={"unet": self.model, "vae": self.vae, "text_encoder": self.text_encoder,
                     "text_encoder_2": self.text_encoder_2},  # hashed only when no weights files are found
        )

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> StableDiffusionAdapter:
        return cls(from_dict(DiffusionModelConfig, data, path="model"))

    def fingerprint(self) -> str:
        return self._fingerprint

    # ---- the dataset -----------------------------------------------------------------------
    def prepare(self, records: list[Any]) -> None:
        """Once per training set, before training: normalise SmPO rewards, precompute latents if asked.

        Rewards are min-max normalised over every chosen and rejected reward of the training set
        (ALGORITHMS.md §1, SmPO weight); the same range is applied to eval records. The trainer calls
        this on the main process first, so other processes find the latent cache already written.
        """
        reward_range = dataset_reward_range(records, self._reward_keys())
        if reward_range is not None:
            self.reward_range = reward_range
        if self.config.precompute:
            from mm_align.image.latent_cache import LatentCache

            self.latent_cache = LatentCache.load_or_build(self, records)

    def _reward_keys(self) -> tuple[str, str]:
        return reward_keys(self.config.reward_keys)

    def _rewards(self, record: Any) -> tuple[float, float] | None:
        return record_rewards(record, self._reward_keys())

    # ---- batches --------------------------------------------------------------------------
    def _pixels(self, value: Any, record: Any) -> tuple[torch.Tensor, tuple[int, ...]]:
        try:
            return image_to_tensor(load_image(value, self.base_dir), self.config.resolution)
        except (OSError, ValueError) as exc:
            raise ValueError(f"record {getattr(record, 'id', None)!r}: cannot read image: {exc}") from exc

    @staticmethod
    def rejected_prompt(record: Any) -> str | None:
        """The mismatched caption of a text-preference (TDPO) pair, or None for an image pair."""
        value = (getattr(record, "meta", None) or {}).get("rejected_prompt")
        return None if value is None else str(value)

    def collate(self, records: list[Any], seeds: list[int]) -> dict[str, torch.Tensor]:
        """Tokens, the per-sample draws (noise, t, VAE sample noise) and either pixels or cached latents.

        Pairs are laid out ``[all chosen ; all rejected]`` (2B rows), as the Diffusion-DPO reference code.
        """
        unpaired = isinstance(records[0], UnpairedSample)
        sides = 1 if unpaired else 2
        size = self.config.resolution // self.latent_factor
        channels = self.model.config.in_channels
        text_pairs = not unpaired and any(self.rejected_prompt(r) is not None for r in records)
        noise, timesteps, vae_noise = [], [], [[] for _ in range(sides)]
        for s, r in zip(seeds, records):
            g = torch.Generator().manual_seed(s)
            noise.append(torch.randn(channels, size, size, generator=g))  # shared by chosen, rejected, reference
            timesteps.append(int(torch.randint(0, self.scheduler.config.num_train_timesteps, (1,), generator=g)))
            draw = torch.randn(sides, channels, size, size, generator=g)  # the latent_dist sample of each side
            if not unpaired and self.rejected_prompt(r) is not None:
                draw[1] = draw[0]  # one image under two captions: the same latent, so the same x_t
            for k in range(sides):
                vae_noise[k].append(draw[k])
        prompts = [r.prompt if isinstance(r.prompt, str) else str(r.prompt) for r in records]
        if text_pairs:
            prompts = prompts + [self.rejected_prompt(r) or p for r, p in zip(records, prompts)]

        def tokenize(tokenizer: Any) -> torch.Tensor:
            return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                             return_tensors="pt").input_ids

        batch: dict[str, torch.Tensor] = {
            "input_ids": tokenize(self.tokenizer),  # (B, L), or (2B, L) for text-preference pairs
            "noise": torch.stack(noise),  # (B, C, h, w)
            "timesteps": torch.tensor(timesteps, dtype=torch.long),  # (B,)
            "vae_noise": torch.cat([torch.stack(v) for v in vae_noise]),  # (sides·B, C, h, w)
        }
        if self.is_sdxl:
            batch["input_ids_2"] = tokenize(self.tokenizer_2)
        if unpaired:
            batch["desirable"] = torch.tensor([bool(r.desirable) for r in records])
        else:
            rewards = [self._rewards(r) for r in records]
            if any(x is not None for x in rewards):
                batch.update(self._normalised_rewards(rewards, records))
        cache = getattr(self, "latent_cache", None)
        if cache is not None:
            batch.update(cache.lookup(records, sides, text_pairs))  # _lat_mean, _lat_std, _text (+ SDXL)
            return batch
        values = [[r.completion] if unpaired else [r.chosen, r.rejected] for r in records]
        pixels = [[self._pixels(v, r) for v in vs] for vs, r in zip(values, records)]
        batch["pixels"] = torch.cat([torch.stack([p[k][0] for p in pixels]) for k in range(sides)])  # (sides·B,3,R,R)
        if self.is_sdxl:
            time_ids = [p[k][1] for k in range(sides) for p in pixels]
            batch["time_ids"] = torch.tensor(time_ids, dtype=torch.float32)  # (sides·B, 6), the order of pixels
        return batch

    def _normalised_rewards(self, rewards: list[Any], records: list[Any]) -> dict[str, torch.Tensor]:
        return batch_rewards(records, self._reward_keys(), getattr(self, "reward_range", None))

    @torch.no_grad()
    def _encode(self, batch: dict[str, torch.Tensor]) -> None:
        """VAE latents and text embeddings, computed once per batch and kept in it."""
        if "_latents" in batch:
            return
        scaling = self.vae.config.scaling_factor
        if "_lat_mean" in batch:  # precomputed once per dataset
            batch["_latents"] = (batch["_lat_mean"] + batch["_lat_std"] * batch["vae_noise"]) * scaling
            return
        device = batch["pixels"].device
        mean, std = self.encode_images(batch["pixels"].to(device))
        batch["_latents"] = (mean + std * batch["vae_noise"].to(mean.dtype)) * scaling  # (N, C, h, w)
        batch.update(self.encode_text(batch["input_ids"], batch.get("input_ids_2")))

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE latent distribution of ``(N, 3, R, R)`` pixels in [−1, 1]: (mean, std), float32, unscaled."""
        self.vae.to(pixels.device)
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``_text`` (N, L, D) and, for SDXL, ``_pooled`` (N, D2): the UNet's conditioning, float32."""
        self.text_encoder.to(input_ids.device)
        if not self.is_sdxl:
            return {"_text": self.text_encoder(input_ids)[0].float()}
        assert self.text_encoder_2 is not None and input_ids_2 is not None
        self.text_encoder_2.to(input_ids.device)
        out1 = self.text_encoder(input_ids, output_hidden_states=True)
        out2 = self.text_encoder_2(input_ids_2, output_hidden_states=True)
        return {
            "_text": torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1).float(),  # (N, L, D1 + D2)
            "_pooled": out2.text_embeds.float(),  # (N, D2)
        }

    def scores(self, batch: dict[str, torch.Tensor], model: nn.Module) -> Scores:
        self._encode(batch)
        latents = batch["_latents"]
        n = latents.shape[0]
        repeat = n // batch["noise"].shape[0]  # 2 for pairs, 1 for unpaired
        noise = batch["noise"].repeat(repeat, 1, 1, 1)  # the same ε for chosen and rejected
        t = batch["timesteps"].repeat(repeat)  # the same t
        text = batch["_text"]
        text = text if text.shape[0] == n else text.repeat(repeat, 1, 1)  # one caption per pair, or one per side
        noisy = self.scheduler.add_noise(latents, noise, t)
        if self.scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            target = self.scheduler.get_velocity(latents, noise, t)
        cond = {}
        if self.is_sdxl:
            pooled = batch["_pooled"]
            pooled = pooled if pooled.shape[0] == n else pooled.repeat(repeat, 1)
            time_ids = batch["time_ids"]
            time_ids = time_ids if time_ids.shape[0] == n else time_ids.repeat(repeat, 1)
            cond["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.to(pooled.dtype)}
        pred = model(noisy, t, encoder_hidden_states=text, **cond).sample  # (N, C, h, w)
        err = denoising_error(pred, target)  # (N,)
        if repeat == 1:
            return Scores("error", err, desirable=batch["desirable"])
        b = batch["noise"].shape[0]
        extra = {k: batch[k] for k in ("reward_chosen", "reward_rejected") if k in batch}
        return Scores("error", err[:b], err[b:], extra=extra)

    def save(self, model: nn.Module, output_dir: str, lora: bool, state_dict: dict[str, Any] | None = None) -> None:
        """LoRA in the diffusers format (``pipeline.load_lora_weights(dir)`` loads it), or the full UNet.

        ``state_dict``: the UNet's whole state dict gathered by the trainer from a sharded engine (FSDP2,
        ZeRO); the weights are written from it. None reads them from ``model``.

        The LoRA file carries peft's adapter config (rank, alpha, targets) as diffusers' LoRA adapter
        metadata, so plain diffusers loads it at its trained scale ``alpha / r``; without it diffusers
        assumes ``alpha = r``.

        With ``save_merged``, also the whole pipeline with the LoRA fused into the UNet
        (``DiffusionPipeline.from_pretrained(dir/merged)``): loaded, fused and unloaded by diffusers itself,
        so the merged weights are exactly what plain diffusers makes of the saved LoRA. The base pipeline
        (``model.pretrained``, ``shapes`` resolved) is loaded before anything is written, so a model that
        cannot be merged leaves ``output_dir`` untouched.

        Raises:
            ValueError: ``lora`` is set but ``model`` holds no peft LoRA adapter.
        """
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from mm_align.image.lora_export import (
            load_base_pipeline,
            peft_lora_config,
            save_full_component,
            write_merged_pipeline,
        )
        from peft.utils import get_peft_model_state_dict

        from mm_align.lora import ADAPTER_NAME

        out = Path(output_dir)
        if not lora:
            save_full_component(model, out, "unet", state_dict)
            return
        peft_config = peft_lora_config(model)
        base = load_base_pipeline(self.config.pretrained, self.config.revision) if self.config.save_merged else None
        lora_state = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=ADAPTER_NAME)
        state = convert_state_dict_to_diffusers({k: v.detach().cpu() for k, v in lora_state.items()})
        pipeline = StableDiffusionXLPipeline if self.is_sdxl else StableDiffusionPipeline
        out.mkdir(parents=True, exist_ok=True)
        pipeline.save_lora_weights(out, unet_lora_layers=state, safe_serialization=True,
                                   unet_lora_adapter_metadata=peft_config.to_dict())
        if base is not None:
            write_merged_pipeline(base, out)
