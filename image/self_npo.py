"""Self-NPO: data-free negative-preference optimisation by truncated diffusion fine-tuning.

Self-NPO (Wang et al. 2025; ALGORITHMS.md §2) makes an NPO model, the negative branch of
negative-preference guidance (:mod:`mm_align.image.npo_guidance`), without preference data: the
model learns from its own NEGATIVELY guided outputs. RECONSTRUCTED: no public code could be read,
so this implements the summary in ALGORITHMS.md as follows, per training image x₀ with caption c:

1. Take the 25-step DDIM schedule ``τ_0 > … > τ_24`` and draw a start index ``j`` uniformly in
   ``[0, 25 − k]`` (``k = rollout_steps ≤ 5``); noise x₀ to ``x_{τ_j}``.
2. The TEACHER, an EMA (rate 0.999) of the student's trainable weights, rolls out k DDIM steps
   (η = 0) from ``x_{τ_j}`` with guidance weight ``w`` (−1 for SD1.5, −5 for SDXL; negative, so the
   sample is pushed AWAY from c): ``ε̂ = ε_u + w·(ε_c − ε_u)``; ``x̂₀_T`` is its x₀ prediction at the
   last rollout step. Two UNet evaluations per rollout step, under ``no_grad``.
3. The STUDENT sees ``x̂₀_T`` re-noised to the higher timestep ``τ_j`` with fresh noise, conditioned on
   c (no guidance), and regresses it: per sample, the pseudo-Huber loss
   ``sqrt(mean((x̂₀_S − x̂₀_T)²) + c_h²) − c_h`` with ``c_h = 1e-3``, the mean over every non-batch dim.

With ``sft`` as the loss, the trainer minimises the mean of that per-sample value. The teacher is
updated after every optimiser step (:meth:`SelfNPOAdapter.after_optimizer_step`) and saved in
checkpoints (``state_dict``), so a resumed run is exact. Defaults: lr 1e-6 (SD1.5) / 1e-7 (SDXL),
about 1000 steps (the shipped ``sd15_self_npo`` / ``sdxl_self_npo`` recipes).

The teacher is diffusers' :class:`~diffusers.training_utils.EMAModel` over the student's trainable weights,
held at the constant rate ``ema_decay`` from the first step: ``min_decay = decay`` turns off its warm-up
``(1 + n) / (10 + n)``, and ``update_after_step = -1`` its plain copy at the first step. Its state
(shadow weights under the parameter names, its counters as 0-dim tensors under ``ema.``) is the
adapter's ``state_dict``, a flat dict of tensors for the checkpoint's safetensors file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from mm_align.image.diffusion_adapter import DiffusionModelConfig, StableDiffusionAdapter
from torch import nn

from mm_align.config import from_dict, option
from mm_align.types import Scores

__all__ = ["SelfNPOConfig", "SelfNPOAdapter", "pseudo_huber"]

_EMA_PREFIX = "ema."  # state_dict keys of the EMAModel counters; no UNet parameter name starts with it


@dataclass
class SelfNPOConfig(DiffusionModelConfig):
    """The diffusion model, plus the Self-NPO teacher and rollout."""

    ema_decay: float = option(0.999, help="EMA rate of the teacher (the student's trainable weights).")
    sampler_steps: int = option(25, help="DDIM steps of the full schedule the rollout is cut from.")
    rollout_steps: int = option(5, help="DDIM steps the teacher rolls out (at most 5 in the paper).")
    guidance_scale: float | None = option(None, help="Negative guidance weight w; None = −1 (SD1.5) / −5 (SDXL).")
    huber_c: float = option(1e-3, help="The pseudo-Huber constant c.")
    negative_prompt: str = option("", help="The unconditional prompt of the guided rollout.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.rollout_steps <= self.sampler_steps:
            raise ValueError(
                f"rollout_steps must be in [1, sampler_steps={self.sampler_steps}], got {self.rollout_steps}"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """Per-sample pseudo-Huber distance ``sqrt(mean((a − b)²) + c²) − c`` (Song & Dhariwal 2023, consistency models).

    The mean runs over every non-batch dimension; returns ``(B,)`` in float32.
    """
    sq = (a.float() - b.float()).pow(2).flatten(1).mean(dim=1)
    return (sq + c * c).sqrt() - c


class SelfNPOAdapter(StableDiffusionAdapter):
    """Self-NPO on an SD1.5/SDXL-type diffusers model: records are captioned images (``UnpairedSample``)."""

    Config = SelfNPOConfig

    def __init__(self, config: SelfNPOConfig) -> None:
        from diffusers import DDIMScheduler

        super().__init__(config)
        self.config: SelfNPOConfig = config
        self.ddim = DDIMScheduler.from_config(self.scheduler.config)
        self.ddim.set_timesteps(config.sampler_steps)
        default = -5.0 if self.is_sdxl else -1.0
        self.guidance = config.guidance_scale if config.guidance_scale is not None else default
        self._ema: Any = None  # diffusers EMAModel, made on first use (it needs the model's parameters)
        self._ema_names: list[str] = []
        self._pending: dict[str, torch.Tensor] | None = None  # a loaded state, waiting for the model

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> SelfNPOAdapter:
        return cls(from_dict(SelfNPOConfig, data, path="model"))

    # ---- the EMA teacher ----------------------------------------------------------------------
    @staticmethod
    def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def _ensure_ema(self, model: nn.Module) -> Any:
        """The teacher (an ``EMAModel`` over ``model``'s trainable weights), made on first use.

        A state loaded by :meth:`load_state_dict` before the model was known is applied here.
        """
        if self._ema is not None:
            return self._ema
        from diffusers.training_utils import EMAModel

        params = self._trainable(model)
        decay = self.config.ema_decay
        self._ema = EMAModel(params.values(), decay=decay, min_decay=decay, update_after_step=-1)
        self._ema_names = list(params)
        if self._pending is not None:
            state, self._pending = self._pending, None
            shadow = {k: v for k, v in state.items() if not k.startswith(_EMA_PREFIX)}
            missing, unexpected = sorted(set(params) - set(shadow)), sorted(set(shadow) - set(params))
            if missing or unexpected:
                raise ValueError(f"the Self-NPO teacher state does not fit the model: missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]} ({len(missing)} / {len(unexpected)} in all)")
            scalars = {k.removeprefix(_EMA_PREFIX): v.item() for k, v in state.items() if k.startswith(_EMA_PREFIX)}
            if scalars.get("decay", decay) != decay:
                raise ValueError(f"the checkpoint's teacher has ema_decay {scalars['decay']}, this run {decay}")
            scalars["shadow_params"] = [shadow[n].to(p.device, p.dtype) for n, p in params.items()]
            self._ema.load_state_dict(scalars)
        return self._ema

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module) -> None:
        """``θ_T ← d·θ_T + (1 − d)·θ_S`` over the trainable weights (LoRA, or all with finetune=full)."""
        self._ensure_ema(model).step(self._trainable(model).values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The teacher as a flat dict of tensors: shadow weights by parameter name, ``ema.*`` counters (0-dim)."""
        if self._ema is None:
            return dict(self._pending or {})
        state = self._ema.state_dict()
        out = {n: t.detach().clone() for n, t in zip(self._ema_names, state.pop("shadow_params"))}
        for k, v in state.items():
            dtype = torch.bool if isinstance(v, bool) else torch.int64 if isinstance(v, int) else torch.float64
            out[_EMA_PREFIX + k] = torch.tensor(v, dtype=dtype)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`'s output; applied to the teacher when the model is known."""
        self._ema, self._pending = None, {k: v.clone() for k, v in state.items()}

    @torch.no_grad()
    def _as_teacher(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Swap the EMA weights into ``model``; returns the student's weights to swap back."""
        ema = self._ensure_ema(model)
        params = self._trainable(model)
        saved = {n: p.detach().clone() for n, p in params.items()}  # on the device, unlike EMAModel.store
        ema.copy_to(params.values())
        return saved

    @torch.no_grad()
    def _restore(self, model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
        for n, p in self._trainable(model).items():
            p.copy_(saved[n])

    # ---- batches --------------------------------------------------------------------------------
    def collate(self, records: list[Any], seeds: list[int]) -> dict[str, torch.Tensor]:
        batch = super().collate(records, seeds)
        if "desirable" not in batch:
            raise ValueError(
                "Self-NPO trains on captioned images (data.format: captions, data.options.perturber: none)"
            )
        starts, renoise = [], []
        last = self.config.sampler_steps - self.config.rollout_steps
        for s in seeds:
            g = torch.Generator().manual_seed(s ^ 0x5E1F)  # independent of the draws made by the parent collate
            starts.append(int(torch.randint(0, last + 1, (1,), generator=g)))
            renoise.append(torch.randn(batch["noise"].shape[1:], generator=g))
        batch["start_index"] = torch.tensor(starts, dtype=torch.long)  # (B,)
        batch["renoise"] = torch.stack(renoise)  # (B, C, h, w)
        batch["uncond_ids"] = self.tokenizer([self.config.negative_prompt], padding="max_length", truncation=True,
                                             max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids
        if self.is_sdxl:
            tok = self.tokenizer_2
            batch["uncond_ids_2"] = tok([self.config.negative_prompt], padding="max_length", truncation=True,
                                        max_length=tok.model_max_length, return_tensors="pt").input_ids
        return batch

    def _alpha(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """ᾱ_t per sample, ``(B, 1, 1, 1)``; t = −1 means the clean end of the schedule."""
        table = self.ddim.alphas_cumprod.to(device)
        final = torch.as_tensor(self.ddim.final_alpha_cumprod, device=device, dtype=table.dtype)
        a = torch.where(t >= 0, table[t.clamp(min=0)], final)
        return a.float().view(-1, 1, 1, 1)

    def _x0_eps(self, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂₀, ε̂) from the UNet output at ᾱ, for epsilon or v prediction."""
        if self.scheduler.config.prediction_type == "epsilon":
            return (x - (1 - a).sqrt() * out) / a.sqrt(), out
        return a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x

    def _unet(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor,
              pooled: torch.Tensor | None, time_ids: torch.Tensor | None) -> torch.Tensor:
        kw = {}
        if self.is_sdxl:
            kw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.to(pooled.dtype)}
        return model(x, t, encoder_hidden_states=text, **kw).sample

    @torch.no_grad()
    def teacher_rollout(self, model: nn.Module, x: torch.Tensor, start: torch.Tensor, text: torch.Tensor,
                        u_text: torch.Tensor, pooled: torch.Tensor | None = None, u_pooled: torch.Tensor | None = None,
                        time_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The EMA teacher's x̂₀ after ``rollout_steps`` guided DDIM steps (η = 0) from ``x`` at ``τ[start]``."""
        device = x.device
        schedule = self.ddim.timesteps.to(device)  # (S,), descending
        saved = self._as_teacher(model)
        try:
            for step in range(self.config.rollout_steps):
                idx = start + step
                t = schedule[idx]
                nxt = schedule[(idx + 1).clamp(max=len(schedule) - 1)]
                t_prev = torch.where(idx + 1 < len(schedule), nxt, torch.full_like(t, -1))  # −1: the clean end
                both = self._unet(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([u_text, text]),
                                  None if pooled is None else torch.cat([u_pooled, pooled]),
                                  None if time_ids is None else torch.cat([time_ids, time_ids]))
                out_u, out_c = both.float().chunk(2)
                guided = out_u + self.guidance * (out_c - out_u)  # w < 0: away from the caption
                x0_teacher, eps = self._x0_eps(guided, x, self._alpha(t, device))
                if self.ddim.config.clip_sample:  # as diffusers' DDIM step (real SD configs set it off)
                    r = self.ddim.config.clip_sample_range
                    x0_teacher = x0_teacher.clamp(-r, r)
                a_prev = self._alpha(t_prev, device)
                x = a_prev.sqrt() * x0_teacher + (1 - a_prev).sqrt() * eps  # DDIM, η = 0
        finally:
            self._restore(model, saved)
        return x0_teacher

    def scores(self, batch: dict[str, torch.Tensor], model: nn.Module) -> Scores:
        """Per-sample pseudo-Huber distance of the student's x̂₀ to the teacher's negatively guided x̂₀."""
        self._encode(batch)
        x0, text = batch["_latents"], batch["_text"]
        pooled, time_ids = batch.get("_pooled"), batch.get("time_ids")
        device, b = x0.device, x0.shape[0]
        uncond = self.encode_text(batch["uncond_ids"].to(device), batch.get("uncond_ids_2"))
        u_text = uncond["_text"].expand(b, -1, -1)
        u_pooled = uncond["_pooled"].expand(b, -1) if self.is_sdxl else None
        start = batch["start_index"].to(device)
        t_start = self.ddim.timesteps.to(device)[start]
        x = self.scheduler.add_noise(x0, batch["noise"], t_start)  # x_{τ_j}
        x0_teacher = self.teacher_rollout(model, x, start, text, u_text, pooled, u_pooled, time_ids)
        noisy = self.scheduler.add_noise(x0_teacher, batch["renoise"].to(device), t_start)  # back up to τ_j
        out = self._unet(model, noisy, t_start, text, pooled, time_ids)
        x0_student, _ = self._x0_eps(out.float(), noisy, self._alpha(t_start, device))
        loss = pseudo_huber(x0_student, x0_teacher.detach(), self.config.huber_c)
        return Scores("error", loss, desirable=torch.ones(b, dtype=torch.bool, device=device))
