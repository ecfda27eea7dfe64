"""The rectified-flow text-to-image adapter (SD3/SD3.5- and FLUX.1-type): velocity errors for Flow-DPO, MaPO,
NPO, KTO, SmPO and TDPO/TKTO.

Components are loaded with ``from_pretrained`` from a diffusers model directory or hub id: the
transformer (what is trained), the VAE and the text encoders (frozen), the tokenizers and the
``FlowMatchEulerDiscreteScheduler``. The family is read from ``model_index.json`` (the transformer's
class): ``SD3Transformer2DModel`` → SD3-type (CLIP-L and CLIP-G with projection, T5 optional; the
prompt embedding is both CLIPs' penultimate hidden states concatenated, zero-padded to T5's width and
stacked before T5's tokens; the pooled embedding is the two CLIP projections concatenated), or
``FluxTransformer2DModel`` → FLUX-type (T5 tokens, CLIP's pooled output, 2×2-packed latents with
``img_ids``/``txt_ids``, and for guidance-distilled models the guidance embedding fed ``model.guidance``).
The text encodings are those of ``StableDiffusion3Pipeline.encode_prompt`` / ``FluxPipeline.encode_prompt``
(a test checks equality), so training conditions the transformer as sampling does.

The flow form (what ``x_t`` is, what the target is, how σ is drawn and what timestep the transformer
sees) is decided in :mod:`mm_align.image.flow_matching` alone. For each pair the chosen and the
rejected image share ONE ε and ONE σ, drawn in ``collate`` from the trainer's per-sample seed; the
policy and the reference pass see the same draw. The score is the squared velocity error averaged
over every non-batch dim (``Scores(kind="error")``), so every diffusion loss runs unchanged on it
(Flow-DPO is Diffusion-DPO on velocity errors).

Shared with the UNet adapter: image decoding (:mod:`~mm_align.image.image_io`), text-preference
pairs (``meta["rejected_prompt"]``: one image, one latent, two captions), SmPO rewards
(:mod:`~mm_align.image.pair_rewards`) and ``precompute`` (:mod:`~mm_align.image.latent_cache`).

Registered twice, as ``sd3`` and ``flux``: the name states the family a recipe expects, and a model
of the other family is refused with a message naming both (one class does the work).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from mm_align.image.diffusion_adapter import StableDiffusionAdapter
from mm_align.image.flow_matching import (
    FlowMatchingConfig,
    draw_flow_sample,
    flow_error,
    model_timestep,
    noisy_latents,
    scheduler_shift,
)
from mm_align.image.image_io import image_to_tensor, load_image
from mm_align.image.loading import quiet_loading
from mm_align.image.pair_rewards import batch_rewards, dataset_reward_range, reward_keys
from torch import nn

from mm_align.config import from_dict, option
from mm_align.data import UnpairedSample
from mm_align.fingerprint import pretrained_fingerprint
from mm_align.types import Scores

__all__ = ["FlowModelConfig", "FlowMatchingAdapter", "SD3Adapter", "FluxAdapter", "flow_family", "model_index",
           "FLOW_LORA_TARGETS"]

Family = Literal["sd3", "flux"]
_FAMILIES: dict[str, Family] = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
# The attention projections diffusers' SD3/FLUX LoRA scripts adapt (train_dreambooth_lora_sd3.py's default; the
# FLUX script adds the feed-forwards, ff.net.* / ff_context.net.*: set train.lora.target_modules for those).
FLOW_LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                     "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
_T5_LENGTH: dict[Family, int] = {"sd3": 256, "flux": 512}  # the pipelines' max_sequence_length defaults
FLUX_TRAIN_GUIDANCE = 3.5  # --guidance_scale of diffusers' train_dreambooth_lora_flux.py (FLUX.1-dev's default)


def model_index(src: str, revision: str | None = None) -> tuple[dict[str, Any], str]:
    """The ``model_index.json`` of the diffusers pipeline at ``src`` (a directory, or a hub id in the local hub
    cache) and where it was read.

    Raises:
        ValueError: the file is not valid JSON (the message names it).
    """
    from diffusers import DiffusionPipeline

    index_file = Path(src) / "model_index.json"
    if index_file.is_file():
        try:
            return json.loads(index_file.read_text()), str(index_file)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{index_file}: not valid JSON: {exc}") from exc
    kw = {"revision": revision} if revision else {}
    return DiffusionPipeline.load_config(src, **kw), f"{src}/model_index.json"


def flow_family(index: dict[str, Any], where: str) -> Family:
    """``"sd3"`` or ``"flux"``: the family of a pipeline by its transformer's class in ``model_index.json``.

    Raises:
        ValueError: the index names no SD3- or FLUX-type transformer (the message names ``where`` and what it holds).
    """
    entry = index.get("transformer")
    name = entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None
    if name not in _FAMILIES:
        raise ValueError(
            f"{where}: transformer is {name or 'absent'} (pipeline {index.get('_class_name')}); the flow "
            f"adapters load {' or '.join(_FAMILIES)} pipelines (SD1.5/SDXL UNets: adapter 'sd')"
        )
    return _FAMILIES[name]


@dataclass
class FlowModelConfig:
    """Which diffusers rectified-flow model to align (SD3-type or FLUX-type), and how to feed it."""

    pretrained: str = option("", help="A diffusers model directory or hub id of an SD3/SD3.5- or FLUX.1-type "
                                      "pipeline (model_index.json, transformer/, vae/, text_encoder*/ ...).")
    resolution: int = option(1024, help="Images are resized (shorter side) and centre-cropped to this size.")
    gradient_checkpointing: bool = option(False, help="Recompute transformer activations in backward.")
    revision: str | None = option(None, help="Hub revision of the model.")
    encoder_dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32", help="Weights dtype of the frozen VAE and text encoders (bfloat16 halves their memory)."
    )
    max_sequence_length: int | None = option(
        None, help="T5 tokens per prompt; None = the pipeline's default (SD3 256, FLUX 512)."
    )
    guidance: float | None = option(
        None, help="FLUX guidance-distilled models only: the guidance value fed to the guidance embedding while "
                   "training; None = 3.5 (diffusers' FLUX LoRA script)."
    )
    flow: FlowMatchingConfig = option(default_factory=FlowMatchingConfig,
                                      help="How σ is drawn (logit-normal by default, the scheduler's shift).")
    precompute: bool = option(
        False, help="Encode VAE latents and text embeddings once per dataset, on disk: training runs the "
                    "transformer only."
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
        if self.max_sequence_length is not None and self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {self.max_sequence_length}")


class FlowMatchingAdapter:
    """:class:`~mm_align.types.PreferenceAdapter` for SD3-type and FLUX-type diffusers pipelines (rectified flow)."""

    score_kind = "error"
    stochastic_scores = True
    lora_target_modules = FLOW_LORA_TARGETS
    Config = FlowModelConfig
    dataset_formats = StableDiffusionAdapter.dataset_formats  # the same image-pair and caption readers
    expected_family: Family | None = None  # set by the registered subclasses
    rejected_prompt = staticmethod(StableDiffusionAdapter.rejected_prompt)

    def __init__(self, config: FlowModelConfig) -> None:
        if not config.pretrained:
            raise ValueError("model.pretrained must name a diffusers model directory or hub id")
        self.config = config
        from mm_align.image.toyworld.shapes import resolve_model

        src = resolve_model(config.pretrained)
        self.index, where = model_index(src, config.revision)
        self.family: Family = flow_family(self.index, where)
        if self.expected_family is not None and self.family != self.expected_family:
            raise ValueError(
                f"model.pretrained {config.pretrained!r} is a {self.family.upper()}-type pipeline but the adapter is "
                f"'{self.expected_family}': use adapter '{self.family}'"
            )
        with quiet_loading():
            self._load(src, config)

    def _load(self, src: str, config: FlowModelConfig) -> None:
        """Every component from ``src``: the training transformer, the frozen VAE and text encoders, tokenizers,
        the scheduler."""
        from diffusers import (
            AutoencoderKL,
            FlowMatchEulerDiscreteScheduler,
            FluxTransformer2DModel,
            SD3Transformer2DModel,
        )
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

        kw: dict[str, Any] = {"revision": config.revision} if config.revision else {}
        dtype = getattr(torch, config.encoder_dtype)  # the frozen encoders only; the transformer stays float32
        sd3 = self.family == "sd3"
        transformer_class = SD3Transformer2DModel if sd3 else FluxTransformer2DModel
        self.model: nn.Module = transformer_class.from_pretrained(src, subfolder="transformer", **kw)
        self.vae = AutoencoderKL.from_pretrained(src, subfolder="vae", dtype=dtype, **kw)
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(src, subfolder="scheduler", **kw)

        def encoder(cls: Any, folder: str) -> nn.Module:
            return cls.from_pretrained(src, subfolder=folder, dtype=dtype, **kw).requires_grad_(False).eval()

        # SD3: CLIP-L, CLIP-G (both with projection), T5 (may be absent: SD3 runs without it, on zeros)
        # FLUX: CLIP (pooled output), T5
        self.text_encoder = encoder(CLIPTextModelWithProjection if sd3 else CLIPTextModel, "text_encoder")
        self.tokenizer = AutoTokenizer.from_pretrained(src, subfolder="tokenizer", **kw)
        self.text_encoder_3 = self.tokenizer_3 = None
        if sd3:
            self.text_encoder_2 = encoder(CLIPTextModelWithProjection, "text_encoder_2")
            self.tokenizer_2 = AutoTokenizer.from_pretrained(src, subfolder="tokenizer_2", **kw)
            entry = self.index.get("text_encoder_3")  # SD3 may ship without T5 ([null, null])
            if isinstance(entry, (list, tuple)) and entry and entry[0] is not None:
                self.text_encoder_3 = encoder(T5EncoderModel, "text_encoder_3")
                self.tokenizer_3 = AutoTokenizer.from_pretrained(src, subfolder="tokenizer_3", **kw)
        else:
            self.text_encoder_2 = encoder(T5EncoderModel, "text_encoder_2")
            self.tokenizer_2 = AutoTokenizer.from_pretrained(src, subfolder="tokenizer_2", **kw)
        self.vae.requires_grad_(False).eval()
        if config.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.latent_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        step = self.latent_factor * (2 if not sd3 else self.model.config.patch_size)  # FLUX packs 2×2
        if config.resolution % step:
            raise ValueError(f"resolution {config.resolution} is not a multiple of {step} (VAE factor "
                             f"{self.latent_factor} × {'2×2 packing' if not sd3 else 'patch size'}) for {src}")
        self.guidance: float | None = None
        if not sd3 and self.model.config.guidance_embeds:
            self.guidance = FLUX_TRAIN_GUIDANCE if config.guidance is None else config.guidance
        elif config.guidance is not None:
            raise ValueError(f"model.guidance is set but {src} has no guidance embedding (FLUX guidance-distilled "
                             "models only)")
        self.max_sequence_length = config.max_sequence_length or _T5_LENGTH[self.family]
        self.shift = scheduler_shift(self.scheduler.config)
        self.base_dir: Path | None = None
        folders = ["transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler"]
        if self.text_encoder_3 is not None:
            folders += ["text_encoder_3", "tokenizer_3"]
        self._fingerprint = pretrained_fingerprint(  # the files of every component that shapes a score, by content
            config, src, folders, revision=config.revision,
            modules={"transformer": self.model, "vae": self.vae, "text_encoder": self.text_encoder,
                     "text_encoder_2": self.text_encoder_2, "text_encoder_3": self.text_encoder_3},
        )

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> FlowMatchingAdapter:
        return cls(from_dict(FlowModelConfig, data, path="model"))

    def fingerprint(self) -> str:
        return self._fingerprint

    # ---- the dataset -----------------------------------------------------------------------
    def prepare(self, records: list[Any]) -> None:
        """Once per training set, before training: normalise SmPO rewards, precompute latents if asked."""
        reward_range = dataset_reward_range(records, reward_keys(self.config.reward_keys))
        if reward_range is not None:
            self.reward_range = reward_range
        if self.config.precompute:
            from mm_align.image.latent_cache import LatentCache

            self.latent_cache = LatentCache.load_or_build(self, records)

    # ---- batches --------------------------------------------------------------------------
    def _pixels(self, value: Any, record: Any) -> tuple[torch.Tensor, tuple[int, ...]]:
        try:
            return image_to_tensor(load_image(value, self.base_dir), self.config.resolution)
        except (OSError, ValueError) as exc:
            raise ValueError(f"record {getattr(record, 'id', None)!r}: cannot read image: {exc}") from exc

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids of every text encoder, padded as the pipeline pads them: ``input_ids`` (CLIP(-L)),
        ``input_ids_2`` (CLIP-G for SD3, T5 for FLUX), ``input_ids_3`` (SD3's T5, when present)."""

        def ids(tokenizer: Any, length: int) -> torch.Tensor:
            return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                             return_tensors="pt").input_ids

        clip_length = self.tokenizer.model_max_length  # the pipelines' tokenizer_max_length
        out = {"input_ids": ids(self.tokenizer, clip_length)}
        if self.family == "sd3":
            out["input_ids_2"] = ids(self.tokenizer_2, clip_length)
            if self.tokenizer_3 is not None:
                out["input_ids_3"] = ids(self.tokenizer_3, self.max_sequence_length)
        else:
            out["input_ids_2"] = ids(self.tokenizer_2, self.max_sequence_length)
        return out

    def collate(self, records: list[Any], seeds: list[int]) -> dict[str, torch.Tensor]:
        """Tokens, the per-sample draws (ε, σ, VAE sample noise) and either pixels or cached latents.

        Pairs are laid out ``[all chosen ; all rejected]`` (2B rows); ε ``(B, C, h, w)`` and σ ``(B,)`` are one
        per pair, shared by its chosen and rejected sides and by the reference pass.
        """
        unpaired = isinstance(records[0], UnpairedSample)
        sides = 1 if unpaired else 2
        size = self.config.resolution // self.latent_factor
        shape = (self.vae.config.latent_channels, size, size)
        text_pairs = not unpaired and any(self.rejected_prompt(r) is not None for r in records)
        noise, sigmas, vae_noise = [], [], [[] for _ in range(sides)]
        for s, r in zip(seeds, records):
            sigma, eps, g = draw_flow_sample(s, shape, self.config.flow, self.shift)
            noise.append(eps)
            sigmas.append(sigma)
            draw = torch.randn(sides, *shape, generator=g)  # the latent_dist sample of each side
            if not unpaired and self.rejected_prompt(r) is not None:
                draw[1] = draw[0]  # one image under two captions: the same latent, so the same x_t
            for k in range(sides):
                vae_noise[k].append(draw[k])
        prompts = [r.prompt if isinstance(r.prompt, str) else str(r.prompt) for r in records]
        if text_pairs:
            prompts = prompts + [self.rejected_prompt(r) or p for r, p in zip(records, prompts)]
        batch: dict[str, torch.Tensor] = {
            **self.tokenize(prompts),  # (B, L) each, or (2B, L) for text-preference pairs
            "noise": torch.stack(noise),  # (B, C, h, w)
            "sigmas": torch.tensor(sigmas, dtype=torch.float32),  # (B,)
            "vae_noise": torch.cat([torch.stack(v) for v in vae_noise]),  # (sides·B, C, h, w)
        }
        if unpaired:
            batch["desirable"] = torch.tensor([bool(r.desirable) for r in records])
        else:
            batch.update(batch_rewards(records, reward_keys(self.config.reward_keys),
                                       getattr(self, "reward_range", None)))
        cache = getattr(self, "latent_cache", None)
        if cache is not None:
            batch.update(cache.lookup(records, sides, text_pairs))  # _lat_mean, _lat_std, _text, _pooled
            return batch
        values = [[r.completion] if unpaired else [r.chosen, r.rejected] for r in records]
        pixels = [[self._pixels(v, r)[0] for v in vs] for vs, r in zip(values, records)]
        batch["pixels"] = torch.cat([torch.stack([p[k] for p in pixels]) for k in range(sides)])  # (sides·B,3,R,R)
        return batch

    def _latents(self, mean: torch.Tensor, std: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``x_0 = (mean + std·z − shift_factor) · scaling_factor``, the latent the flow transformer sees."""
        shift = self.vae.config.shift_factor or 0.0
        return (mean + std * z.to(mean.dtype) - shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def _encode(self, batch: dict[str, torch.Tensor]) -> None:
        """VAE latents and text embeddings, computed once per batch and kept in it."""
        if "_latents" in batch:
            return
        if "_lat_mean" in batch:  # precomputed once per dataset
            batch["_latents"] = self._latents(batch["_lat_mean"], batch["_lat_std"], batch["vae_noise"])
            return
        mean, std = self.encode_images(batch["pixels"])
        batch["_latents"] = self._latents(mean, std, batch["vae_noise"])  # (N, C, h, w)
        batch.update(self.encode_text(batch))

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE latent distribution of ``(N, 3, R, R)`` pixels in [−1, 1]: (mean, std), float32, unscaled."""
        self.vae.to(pixels.device)
        dist = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    @torch.no_grad()
    def encode_text(self, ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``_text`` (N, L, D) and ``_pooled`` (N, P), float32, as the family's pipeline ``encode_prompt`` makes them.

        SD3: ``[pad(CLIP-L ⊕ CLIP-G penultimate hidden states, T5 width) ; T5 last hidden state]`` along the
        sequence (T5 zeros when the model has none), pooled = CLIP-L ⊕ CLIP-G projections. FLUX: T5's last
        hidden state, pooled = CLIP's pooler output.
        """
        device = ids["input_ids"].device
        for module in (self.text_encoder, self.text_encoder_2, self.text_encoder_3):
            if module is not None:
                module.to(device)
        if self.family == "flux":
            pooled = self.text_encoder(ids["input_ids"], output_hidden_states=False).pooler_output
            text = self.text_encoder_2(ids["input_ids_2"], output_hidden_states=False)[0]
            return {"_text": text.float(), "_pooled": pooled.float()}
        out1 = self.text_encoder(ids["input_ids"], output_hidden_states=True)
        out2 = self.text_encoder_2(ids["input_ids_2"], output_hidden_states=True)
        clip = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1).float()  # (N, 77, D1 + D2)
        n = clip.shape[0]
        if self.text_encoder_3 is not None:
            t5 = self.text_encoder_3(ids["input_ids_3"])[0].float()  # (N, L5, D5)
        else:
            t5 = torch.zeros(n, self.max_sequence_length, self.model.config.joint_attention_dim, device=device)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # (N, 77, D5)
        pooled = torch.cat([out1[0], out2[0]], dim=-1).float()  # (N, P1 + P2), the text_embeds
        return {"_text": torch.cat([clip, t5], dim=-2), "_pooled": pooled}  # (N, 77 + L5, D5)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device | str) -> dict[str, torch.Tensor]:
        """:meth:`encode_text` of raw prompts (the latent cache's hook)."""
        return self.encode_text({k: v.to(device) for k, v in self.tokenize(prompts).items()})

    def predict(self, model: nn.Module, x_t: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor,
                pooled: torch.Tensor) -> torch.Tensor:
        """The transformer's velocity ``(N, C, h, w)`` at ``x_t`` ``(N, C, h, w)``, noise level ``sigma`` ``(N,)``."""
        timestep = model_timestep(sigma, self.scheduler.config.num_train_timesteps, self.family)
        if self.family == "sd3":
            return model(hidden_states=x_t, timestep=timestep, encoder_hidden_states=text,
                         pooled_projections=pooled, return_dict=False)[0]
        from diffusers import FluxPipeline

        n, c, h, w = x_t.shape
        packed = FluxPipeline._pack_latents(x_t, n, c, h, w)  # (N, h/2·w/2, 4C)
        img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, x_t.device, x_t.dtype)  # (h/2·w/2, 3)
        txt_ids = torch.zeros(text.shape[1], 3, device=x_t.device, dtype=x_t.dtype)  # (L, 3)
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((n,), self.guidance, device=x_t.device, dtype=torch.float32)
        out = model(hidden_states=packed, timestep=timestep, guidance=guidance, pooled_projections=pooled,
                    encoder_hidden_states=text, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        f = self.latent_factor
        return FluxPipeline._unpack_latents(out, height=h * f, width=w * f, vae_scale_factor=f)  # (N, C, h, w)

    def scores(self, batch: dict[str, torch.Tensor], model: nn.Module) -> Scores:
        self._encode(batch)
        x0 = batch["_latents"]
        n = x0.shape[0]
        b = batch["noise"].shape[0]
        repeat = n // b  # 2 for pairs, 1 for unpaired
        noise = batch["noise"].to(x0.device).repeat(repeat, 1, 1, 1)  # the same ε for chosen and rejected
        sigma = batch["sigmas"].to(x0.device).repeat(repeat)  # the same σ
        text, pooled = batch["_text"], batch["_pooled"]
        if text.shape[0] != n:  # one caption per pair (image pairs), or one per side (text-preference pairs)
            text, pooled = text.repeat(repeat, 1, 1), pooled.repeat(repeat, 1)
        x_t = noisy_latents(x0, noise, sigma)
        pred = self.predict(model, x_t, sigma, text, pooled)
        err = flow_error(pred, x0, noise)  # (N,)
        if repeat == 1:
            return Scores("error", err, desirable=batch["desirable"])
        extra = {k: batch[k] for k in ("reward_chosen", "reward_rejected") if k in batch}
        return Scores("error", err[:b], err[b:], extra=extra)

    def save(self, model: nn.Module, output_dir: str, lora: bool, state_dict: dict[str, Any] | None = None) -> None:
        """LoRA in the diffusers format (``pipeline.load_lora_weights(dir)`` loads it), or the full transformer.

        Written by ``StableDiffusion3Pipeline.save_lora_weights`` / ``FluxPipeline.save_lora_weights`` from peft's
        ``get_peft_model_state_dict`` (keys ``transformer.…lora_A/B.weight``), with peft's adapter config as the
        LoRA adapter metadata, so plain diffusers loads it at its trained scale ``alpha / r``. ``state_dict``:
        the transformer's whole state dict gathered by the trainer from a sharded engine (FSDP2, ZeRO).

        With ``save_merged``, also the whole pipeline with the LoRA fused by diffusers itself, under ``merged/``
        (``DiffusionPipeline.from_pretrained(dir/merged)``); the base pipeline is loaded before anything is
        written, so a model that cannot be merged leaves ``output_dir`` untouched.

        Raises:
            ValueError: ``lora`` is set but ``model`` holds no peft LoRA adapter.
        """
        from diffusers import FluxPipeline, StableDiffusion3Pipeline
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
            save_full_component(model, out, "transformer", state_dict)
            return
        peft_config = peft_lora_config(model)
        base = load_base_pipeline(self.config.pretrained, self.config.revision) if self.config.save_merged else None
        lora_state = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=ADAPTER_NAME)
        state = {k: v.detach().cpu().contiguous() for k, v in lora_state.items()}
        pipeline = StableDiffusion3Pipeline if self.family == "sd3" else FluxPipeline
        out.mkdir(parents=True, exist_ok=True)
        pipeline.save_lora_weights(out, transformer_lora_layers=state, safe_serialization=True,
                                   transformer_lora_adapter_metadata=peft_config.to_dict())
        if base is not None:
            write_merged_pipeline(base, out)


class SD3Adapter(FlowMatchingAdapter):
    """The flow adapter for SD3/SD3.5-type pipelines (adapter name ``sd3``); refuses a FLUX-type model."""

    expected_family = "sd3"


class FluxAdapter(FlowMatchingAdapter):
    """The flow adapter for FLUX.1-type pipelines (adapter name ``flux``); refuses an SD3-type model."""

    expected_family = "flux"

