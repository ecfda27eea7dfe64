"""Token restoration models over the codec's tokens: a masked-token (MaskGIT) and an autoregressive restorer.

Both predict the CLEAN codes ``(B, Q, N)`` of :class:`~mm_align.audio.codec.SpeechCodec` (``Q`` codebooks of
``K`` entries, one column per STFT frame) given the DEGRADED input, fed frame-aligned: the codec encoder's
continuous latents of the degraded wave ``(B, D, N)`` go through a small convolution (``cond_proj``) and are
ADDED to the token embeddings of the same frame. Restoration is frame-synchronous, so this is all the
alignment there is to learn.

- :class:`MaskedTokenRestorer` (MaskGIT, Chang et al. 2022): a bidirectional transformer; input per frame =
  Σ_q emb_q(token or [MASK]_q) + condition; ``Q`` heads give every codebook's distribution at every frame.
  Training masks a share ``r = cos(π/2 · u)``, ``u ~ U[0, 1)`` of the tokens (the paper's cosine mask schedule
  γ(r) = cos(πr/2)) and scores the masked ones (:func:`masked_training_loss`). Sampling
  (:meth:`MaskedTokenRestorer.generate`) starts from all-[MASK] and, at each of ``S`` steps, predicts every
  masked token in parallel, keeps the most confident and re-masks the others so that ``⌊n·cos(π/2·s/S)⌋``
  stay masked after step ``s``. Deviation: the confidence ranking runs within blocks of
  ``decode_block_frames`` frames aligned to the start of the input (``0`` = the whole input, MaskGIT's
  own ranking), so the schedule does not depend on the input's length and chunked restoration is exact
  (below).
- :class:`ARTokenRestorer`: a causal transformer over frames; input at frame ``n`` = Σ_q emb_q(token of
  frame ``n − 1``; [BOS] at ``n = 0``) + condition of frame ``n``; ``Q`` parallel heads give the ``Q`` tokens of
  frame ``n`` (MusicGen's "parallel" codebook pattern: no delay, the codebooks of one frame are predicted
  independently given the past frames). ``logits[:, :, n]`` scores ``tokens[:, :, n]``: the shift is inside
  the model. Sampling with temperature / top-k from a seeded generator, or greedy.

Attention is LOCAL: every layer attends within ``attn_window`` frames (both sides for the masked model, the
past for the AR one) with ALiBi distance biases (Press et al. 2022) and no absolute positions, so a frame's
output depends on the inputs within ``depth · attn_window`` frames only, the same wherever the frame sits.
The AR model generates incrementally with a per-layer key/value cache of the last ``attn_window`` frames.

Long inputs (:func:`restore`) are restored in chunks of ``chunk_seconds`` with ``overlap_seconds`` of overlap
and cross-faded in the waveform domain (raised-cosine over the central half of each overlap; the weights sum
to one), so memory is bounded by the chunk length. The AR model continues each chunk from the previous
chunk's tokens over the first half of the overlap (a teacher-forced prefix), as long-form AR generation does.
With deterministic decoding (greedy AR; ``greedy=True`` masked) chunked equals unchunked restoration, to
floating-point rounding, when a quarter of the overlap covers the receptive field
(:func:`exact_overlap_seconds`); below that the chunks still join smoothly but are not exactly equal.

Model directories (:func:`save_restorer` / :func:`load_restorer`): ``config.json`` (the restorer's config,
with ``"paradigm": "masked" | "ar"``) + ``model.safetensors`` (``PyTorchModelHubMixin``) and the codec in
``codec/``; or a peft LoRA directory (``adapter_config.json`` naming the base model directory). One loader
reads any of them; :func:`restore_file` / :func:`restore_main` restore audio files with it.
"""

# No ``from __future__ import annotations``: PyTorchModelHubMixin reads the ``config`` annotation of
# ``__init__`` at runtime to rebuild the dataclass from config.json.

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from mm_align.audio.codec import SpeechCodec, load_strict
from torch import nn

from mm_align.config import option
from mm_align.scores import multi_codebook_logps

__all__ = [
    "MaskedRestorerConfig",
    "ARRestorerConfig",
    "MaskedTokenRestorer",
    "ARTokenRestorer",
    "RESTORERS",
    "local_attention_bias",
    "valid_frames",
    "cosine_mask",
    "masked_training_loss",
    "ar_training_loss",
    "train_restorer",
    "restore",
    "exact_overlap_seconds",
    "save_restorer",
    "load_restorer",
    "restore_file",
    "restore_main",
    "DEFAULT_LORA_TARGETS",
]

DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out"]
PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
CODEC_SUBFOLDER = "codec"


def _check_shape(cfg: Any) -> None:
    if cfg.dim % cfg.heads:
        raise ValueError(f"dim ({cfg.dim}) must be a multiple of heads ({cfg.heads})")
    if cfg.cond_kernel < 1 or cfg.cond_kernel % 2 == 0:
        raise ValueError(f"cond_kernel must be odd and positive, got {cfg.cond_kernel}")
    for name in ("num_quantizers", "codebook_size", "cond_dim", "dim", "depth", "heads", "ff_mult", "attn_window"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")


@dataclass
class MaskedRestorerConfig:
    """A bidirectional token transformer (MaskGIT) over ``Q`` codebooks of ``K`` entries."""

    paradigm: str = option("masked", help="Always 'masked': how a model directory says what it holds.")
    num_quantizers: int = option(4, help="Q: codebooks per frame (the codec's).")
    codebook_size: int = option(256, help="K: entries per codebook (the codec's); id K is [MASK].")
    cond_dim: int = option(64, help="Channels of the conditioning features: the codec's latent_dim.")
    dim: int = option(128, help="Transformer width.")
    depth: int = option(4, help="Transformer layers.")
    heads: int = option(4, help="Attention heads.")
    ff_mult: int = option(4, help="Feed-forward width as a multiple of dim.")
    attn_window: int = option(32, help="Each layer attends to frames within this distance (both sides).")
    cond_kernel: int = option(5, help="Temporal kernel of the conditioning convolution (odd).")
    decode_block_frames: int = option(
        16, help="Sampling ranks confidences within blocks of this many frames; 0 = over the whole input (MaskGIT)."
    )

    def __post_init__(self) -> None:
        if self.paradigm != "masked":
            raise ValueError(f"MaskedRestorerConfig.paradigm must be 'masked', got {self.paradigm!r}")
        if self.decode_block_frames < 0:
            raise ValueError(f"decode_block_frames must be >= 0, got {self.decode_block_frames}")
        _check_shape(self)


@dataclass
class ARRestorerConfig:
    """A causal frame transformer with ``Q`` parallel heads over ``Q`` codebooks of ``K`` entries."""

    paradigm: str = option("ar", help="Always 'ar': how a model directory says what it holds.")
    num_quantizers: int = option(4, help="Q: codebooks per frame (the codec's).")
    codebook_size: int = option(256, help="K: entries per codebook (the codec's); id K is [BOS].")
    cond_dim: int = option(64, help="Channels of the conditioning features: the codec's latent_dim.")
    dim: int = option(128, help="Transformer width.")
    depth: int = option(4, help="Transformer layers.")
    heads: int = option(4, help="Attention heads.")
    ff_mult: int = option(4, help="Feed-forward width as a multiple of dim.")
    attn_window: int = option(32, help="Each layer attends to this many past frames (and the current one).")
    cond_kernel: int = option(5, help="Temporal kernel of the conditioning convolution (odd; it looks ahead too).")

    def __post_init__(self) -> None:
        if self.paradigm != "ar":
            raise ValueError(f"ARRestorerConfig.paradigm must be 'ar', got {self.paradigm!r}")
        _check_shape(self)


# ---- the transformer ---------------------------------------------------------------------------------------
def local_attention_bias(
    n: int, heads: int, window: int, causal: bool, key_mask: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Additive attention bias: ALiBi ``−m_h·|i − j|`` inside ``|i − j| ≤ window`` (and ``j ≤ i`` if causal), −inf out.

    ALiBi slopes ``m_h = 2^(−8h/H)`` (Press et al. 2022). ``key_mask`` ``(B, N)`` (True = a real frame) also
    hides padded keys; a query always sees itself, so no row is all −inf.

    Returns:
        ``(1, H, N, N)``, or ``(B, H, N, N)`` with ``key_mask``; float32.
    """
    pos = torch.arange(n, device=device)
    rel = pos[None, :] - pos[:, None]  # (N, N): j − i
    slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1, device=device, dtype=torch.float32) / heads)  # (H,)
    bias = -slopes[:, None, None] * rel.abs().float()  # (H, N, N)
    allowed = rel.abs() <= window
    if causal:
        allowed = allowed & (rel <= 0)
    allowed = allowed[None]  # (1, N, N)
    if key_mask is not None:
        allowed = (allowed & key_mask.bool()[:, None, :]) | torch.eye(n, dtype=torch.bool, device=device)[None]
    return bias[None].masked_fill(~allowed[:, None], float("-inf"))  # (1 or B, H, N, N)


class Attention(nn.Module):
    """Multi-head self-attention with an additive bias (``to_q``, ``to_k``, ``to_v``, ``to_out``: LoRA targets)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (f(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
                   for f in (self.to_q, self.to_k, self.to_v))  # (B, H, N, d) each
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # (B, H, N, d)
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))

    def step(
        self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None, window: int, slopes: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One new causal position ``x`` ``(B, 1, C)`` against the cached keys/values of the last ``window``
        positions: the same output as the full causal pass gives at that position (ALiBi depends on distances
        only). Returns the output and the cache with this position added (and the oldest one dropped)."""
        b, _, c = x.shape
        q, k, v = (f(x).view(b, 1, self.heads, c // self.heads).transpose(1, 2)
                   for f in (self.to_q, self.to_k, self.to_v))  # (B, H, 1, d) each
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)  # (B, H, L + 1, d)
        dist = torch.arange(k.shape[2] - 1, -1, -1, device=x.device, dtype=torch.float32)  # i − j, oldest first
        bias = (-slopes[:, None] * dist[None])[None, :, None, :]  # (1, H, 1, L + 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # (B, H, 1, d)
        return self.to_out(out.transpose(1, 2).reshape(b, 1, c)), (k[:, :, -window:], v[:, :, -window:])


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN x)``, then ``x + ff(LN x)``."""

    def __init__(self, dim: int, heads: int, ff_mult: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), bias)
        return x + self.ff(self.norm2(x))

    def step(
        self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None, window: int, slopes: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`forward` for one new causal position with a key/value cache (see :meth:`Attention.step`)."""
        h, cache = self.attn.step(self.norm1(x), cache, window, slopes)
        x = x + h
        return x + self.ff(self.norm2(x)), cache


class _TokenTransformer(nn.Module):
    """What both restorers share: per-codebook embeddings (K + 1 ids: the codes and [MASK]/[BOS]), the
    frame-aligned conditioning convolution, the local-attention trunk and the ``Q`` output heads."""

    causal = False
    config_class: type = object  # the subclass's config dataclass

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self._build(config)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, **kwargs: Any) -> Any:
        if os.path.isdir(model_id):  # strict: a missing weight is an error, not a fresh init
            config = kwargs["config"]
            config = cls.config_class(**config) if isinstance(config, dict) else config
            return load_strict(cls, model_id, {"config": config})
        return super()._from_pretrained(model_id=model_id, strict=True, **kwargs)

    def _build(self, cfg: Any) -> None:
        q, k = cfg.num_quantizers, cfg.codebook_size
        self.token_emb = nn.Embedding(q * (k + 1), cfg.dim)  # codebook q's id t is row q·(K+1) + t
        self.register_buffer("offsets", torch.arange(q) * (k + 1), persistent=False)
        self.cond_proj = nn.Sequential(
            nn.Conv1d(cfg.cond_dim, cfg.dim, cfg.cond_kernel, padding=cfg.cond_kernel // 2), nn.GELU(),
            nn.Conv1d(cfg.dim, cfg.dim, 1),
        )
        self.blocks = nn.ModuleList([Block(cfg.dim, cfg.heads, cfg.ff_mult) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim)
        self.to_logits = nn.Linear(cfg.dim, q * k)

    @property
    def special_id(self) -> int:
        """The id past the codebook: [MASK] (masked model) or [BOS] (AR model)."""
        return self.config.codebook_size

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, Q, N)`` ids in ``[0, K]`` → ``(B, N, dim)``, the sum over codebooks."""
        return self.token_emb(tokens + self.offsets[None, :, None]).sum(1)

    def embed_condition(self, cond: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, D, N)`` codec latents of the degraded input → ``(B, N, dim)``.

        Padded frames (``frame_mask`` False) are zeroed first: the convolution then sees past a clip's end
        exactly the zeros it pads an unpadded clip with, so padding changes no real frame's output.
        """
        if frame_mask is not None:
            cond = cond * frame_mask[:, None, :].to(cond.dtype)
        return self.cond_proj(cond).transpose(1, 2)

    def trunk(self, x: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, N, dim)`` → logits ``(B, Q, N, K)``."""
        b, n, _ = x.shape
        cfg = self.config
        bias = local_attention_bias(n, cfg.heads, cfg.attn_window, self.causal, frame_mask, x.device)
        for block in self.blocks:
            x = block(x, bias)
        return self.to_logits(self.norm(x)).view(b, n, cfg.num_quantizers, cfg.codebook_size).permute(0, 2, 1, 3)

    def _check(self, tokens: torch.Tensor, cond: torch.Tensor) -> None:
        cfg = self.config
        if tokens.dim() != 3 or tokens.shape[1] != cfg.num_quantizers:
            raise ValueError(f"tokens must be (B, Q={cfg.num_quantizers}, N), got {tuple(tokens.shape)}")
        if cond.dim() != 3 or cond.shape[1] != cfg.cond_dim or cond.shape[2] != tokens.shape[2] \
                or cond.shape[0] != tokens.shape[0]:
            raise ValueError(f"cond must be (B, D={cfg.cond_dim}, N) with the tokens' B and N; got tokens "
                             f"{tuple(tokens.shape)}, cond {tuple(cond.shape)}")

    @property
    def receptive_field_frames(self) -> int:
        """Frames on either side that can change one forward's output at a frame."""
        return self.config.depth * self.config.attn_window + self.config.cond_kernel // 2


class MaskedTokenRestorer(_TokenTransformer, PyTorchModelHubMixin, library_name="mm-align",
                          tags=["speech-restoration", "maskgit"]):
    """MaskGIT-style masked-token restorer (Chang et al. 2022), conditioned frame by frame on the degraded input.

    Args:
        config: the :class:`MaskedRestorerConfig`.
    """

    causal = False

    config_class = MaskedRestorerConfig

    def __init__(self, config: MaskedRestorerConfig) -> None:  # the signature PyTorchModelHubMixin reads
        super().__init__(config)

    @property
    def mask_id(self) -> int:
        return self.config.codebook_size

    def forward(
        self, tokens: torch.Tensor, cond: torch.Tensor, frame_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``(B, Q, N, K)`` of every codebook at every frame.

        Args:
            tokens: ``(B, Q, N)`` ids, ``mask_id`` (= K) at masked positions.
            cond: ``(B, D, N)`` codec latents of the degraded input.
            frame_mask: ``(B, N)``, True on real frames (padding is not attended to); None = all real.
        """
        self._check(tokens, cond)
        return self.trunk(self.embed_tokens(tokens) + self.embed_condition(cond, frame_mask), frame_mask)

    @torch.no_grad()
    def generate(
        self, cond: torch.Tensor, steps: int = 8, seed: int = 0, greedy: bool = False, temperature: float = 1.0,
        choice_temperature: float = 4.5, frame_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MaskGIT iterative parallel decoding: ``(B, D, N)`` condition → clean codes ``(B, Q, N)``.

        At step ``s = 1..S`` every masked token gets a candidate (sampled at ``temperature``, or the argmax when
        ``greedy``) with confidence ``log p(candidate)`` (+ Gumbel noise × ``choice_temperature·(1 − s/S)``
        when sampling, as MaskGIT's reference code); within each block of ``decode_block_frames`` frames the
        ``c − ⌊c·cos(π/2·s/S)⌋`` most confident tokens (``c`` = the block's tokens, the already-decoded ones
        first) are kept, the rest re-masked. After step ``S`` nothing is masked.

        Args:
            cond: ``(B, D, N)`` codec latents of the degraded input.
            steps: decoding steps ``S``.
            seed: seeds every draw (a ``torch.Generator`` on ``cond``'s device).
            greedy: argmax candidates and noise-free ranking: a deterministic function of ``cond``.
            temperature: sampling temperature of the candidates.
            choice_temperature: scale of the ranking noise (MaskGIT's default 4.5).
            frame_mask: ``(B, N)`` real frames; padded frames come back as code 0.
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        cfg = self.config
        b, _, n = cond.shape
        q, k = cfg.num_quantizers, cfg.codebook_size
        device = cond.device
        g = torch.Generator(device=device).manual_seed(seed)
        valid = (torch.ones(b, n, dtype=torch.bool, device=device) if frame_mask is None
                 else frame_mask.bool())[:, None, :].expand(b, q, n)  # (B, Q, N)
        blk = cfg.decode_block_frames or n
        nb = math.ceil(n / blk)
        pad = nb * blk - n

        def blocked(t: torch.Tensor, value: Any) -> torch.Tensor:  # (B, Q, N) -> (B, nb, Q·blk)
            t = F.pad(t, (0, pad), value=value)
            return t.view(b, q, nb, blk).permute(0, 2, 1, 3).reshape(b, nb, q * blk)

        count = blocked(valid.long(), 0).sum(-1)  # (B, nb): tokens to decode per block
        tokens = torch.full((b, q, n), self.mask_id, dtype=torch.long, device=device)
        known = torch.zeros(b, q, n, dtype=torch.bool, device=device)
        cond_emb = self.embed_condition(cond, frame_mask)  # (B, N, dim): once, not per step
        ranks = torch.arange(q * blk, device=device)
        for s in range(1, steps + 1):
            logits = self.trunk(self.embed_tokens(tokens) + cond_emb, frame_mask).float()  # (B, Q, N, K)
            logp = logits.log_softmax(-1)
            if greedy:
                cand = logp.argmax(-1)  # (B, Q, N)
            else:
                probs = (logits / max(temperature, 1e-6)).softmax(-1).reshape(-1, k)
                cand = torch.multinomial(probs, 1, generator=g).view(b, q, n)
            conf = logp.gather(-1, cand[..., None]).squeeze(-1)  # (B, Q, N)
            if not greedy and choice_temperature > 0:
                u = torch.rand(conf.shape, generator=g, device=device).clamp(1e-10, 1 - 1e-10)
                conf = conf + choice_temperature * (1.0 - s / steps) * -torch.log(-torch.log(u))
            conf = torch.where(known, torch.full_like(conf, float("inf")), conf)
            conf = torch.where(valid, conf, torch.full_like(conf, float("-inf")))
            still_masked = torch.floor(count.double() * math.cos(math.pi / 2 * s / steps)).long()  # (B, nb)
            if s == steps:
                still_masked = torch.zeros_like(count)
            order = blocked(conf, float("-inf")).argsort(dim=-1, descending=True, stable=True)  # (B, nb, Q·blk)
            rank = torch.empty_like(order).scatter_(-1, order, ranks.expand_as(order))
            keep = rank < (count - still_masked)[..., None]  # (B, nb, Q·blk)
            keep = keep.view(b, nb, q, blk).permute(0, 2, 1, 3).reshape(b, q, nb * blk)[..., :n] & valid
            tokens = torch.where(keep & ~known, cand, tokens)
            known = known | keep
        return torch.where(valid, tokens, torch.zeros_like(tokens))

    def generation_receptive_field_frames(self, steps: int) -> int:
        """Frames on either side of a frame that can change its decoded tokens (``S`` steps, block ranking)."""
        blk = self.config.decode_block_frames
        if blk == 0:
            raise ValueError("decode_block_frames=0 ranks over the whole input: the receptive field is unbounded")
        # each step: attention reach plus the coupling within a ranking block; plus one block for a partial
        # block at an edge, and the conditioning convolution
        per_step = self.config.depth * self.config.attn_window + blk - 1
        return steps * per_step + blk + self.config.cond_kernel // 2


class ARTokenRestorer(_TokenTransformer, PyTorchModelHubMixin, library_name="mm-align",
                     tags=["speech-restoration", "autoregressive"]):
    """Autoregressive token restorer: a causal transformer over frames with ``Q`` parallel heads.

    Args:
        config: the :class:`ARRestorerConfig`.
    """

    causal = True

    config_class = ARRestorerConfig

    def __init__(self, config: ARRestorerConfig) -> None:  # the signature PyTorchModelHubMixin reads
        super().__init__(config)

    @property
    def bos_id(self) -> int:
        return self.config.codebook_size

    def _previous(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, Q, N)`` → the ids each frame's input carries: [BOS], then frames ``0 … N−2``."""
        bos = torch.full_like(tokens[:, :, :1], self.bos_id)
        return torch.cat([bos, tokens[:, :, :-1]], dim=2)

    def forward(
        self, tokens: torch.Tensor, cond: torch.Tensor, frame_mask: torch.Tensor | None = None,
        inputs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits ``(B, Q, N, K)``: ``logits[:, :, n]`` is ``p(tokens[:, :, n] | frames < n, cond)``.

        Args:
            tokens: ``(B, Q, N)`` clean codes.
            cond: ``(B, D, N)`` codec latents of the degraded input.
            frame_mask: ``(B, N)``, True on real frames; None = all real.
            inputs: ``(B, Q, N)`` the past frames the model is fed, when they differ from ``tokens`` (training
                with corrupted history, :func:`ar_training_loss`); None = ``tokens``.
        """
        self._check(tokens, cond)
        fed = tokens if inputs is None else inputs
        x = self.embed_tokens(self._previous(fed)) + self.embed_condition(cond, frame_mask)
        return self.trunk(x, frame_mask)

    @property
    def context_frames(self) -> int:
        """Past frames the last position's output depends on: ``depth · attn_window``."""
        return self.config.depth * self.config.attn_window

    @torch.no_grad()
    def generate(
        self, cond: torch.Tensor, prefix: torch.Tensor | None = None, seed: int = 0, greedy: bool = False,
        temperature: float = 1.0, top_k: int | None = None,
    ) -> torch.Tensor:
        """Frame-by-frame sampling: ``(B, D, N)`` condition → clean codes ``(B, Q, N)``.

        Incremental: each frame runs the trunk on its one new position, attending to a cache of the last
        ``attn_window`` positions' keys and values per layer; with causal local attention and ALiBi this is the
        full teacher-forced pass's computation at that frame (O(window) per frame, memory O(window)).

        Args:
            cond: ``(B, D, N)`` codec latents of the degraded input.
            prefix: ``(B, Q, P)`` known tokens of the first ``P`` frames (teacher-forced), or None.
            seed: seeds the sampling generator.
            greedy: argmax tokens (deterministic).
            temperature: sampling temperature.
            top_k: sample among the ``top_k`` most likely tokens only; None = all.
        """
        cfg = self.config
        b, _, n = cond.shape
        q, k = cfg.num_quantizers, cfg.codebook_size
        g = torch.Generator(device=cond.device).manual_seed(seed)
        tokens = torch.zeros(b, q, n, dtype=torch.long, device=cond.device)
        start = 0
        if prefix is not None:
            start = min(prefix.shape[-1], n)
            tokens[:, :, :start] = prefix[:, :, :start]
        cond_emb = self.embed_condition(cond)  # (B, N, dim)
        heads = cfg.heads
        slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1, device=cond.device, dtype=torch.float32) / heads)
        caches: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * cfg.depth
        previous = torch.full_like(tokens[:, :, :1], self.bos_id)  # (B, Q, 1): frame i's input carries frame i − 1
        for i in range(n):
            x = self.embed_tokens(previous) + cond_emb[:, i: i + 1]  # (B, 1, dim)
            for j, block in enumerate(self.blocks):
                x, caches[j] = block.step(x, caches[j], cfg.attn_window, slopes)
            if i >= start:  # the prefix frames only fill the caches
                logits = self.to_logits(self.norm(x[:, 0])).view(b, q, k).float()  # (B, Q, K)
                if greedy:
                    tokens[:, :, i] = logits.argmax(-1)
                else:
                    logits = logits / max(temperature, 1e-6)
                    if top_k is not None and top_k < k:
                        kth = logits.topk(top_k, dim=-1).values[..., -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    tokens[:, :, i] = torch.multinomial(logits.softmax(-1).reshape(-1, k), 1, generator=g).view(b, q)
            previous = tokens[:, :, i: i + 1]
        return tokens


RESTORERS: dict[str, type[nn.Module]] = {"masked": MaskedTokenRestorer, "ar": ARTokenRestorer}


# ---- supervised training -----------------------------------------------------------------------------------
def valid_frames(lengths: torch.Tensor, num_frames: int, hop_length: int) -> torch.Tensor:
    """``(B, N)`` True for the frames the codec gives for the real audio alone: ``n ≤ length // hop``
    (``length // hop + 1`` frames, the last centred on the clip's end, as for an unpadded clip)."""
    return torch.arange(num_frames, device=lengths.device)[None, :] * hop_length <= lengths[:, None]


def cosine_mask(valid: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One MaskGIT training mask over the ``True`` entries of ``valid`` (any shape, e.g. ``(Q, N)``).

    The masking ratio follows MaskGIT's cosine schedule (Chang et al. 2022), ``r = cos(π/2 · u)`` with
    ``u ~ U[0, 1)``, and ``max(1, ⌈r · n⌉)`` of the ``n`` valid entries are masked, uniformly at random. Both
    draws come from ``generator``: the same seed gives the same mask.
    """
    flat = valid.flatten().bool().cpu()
    n = int(flat.sum())
    if n == 0:
        raise ValueError("cosine_mask: no valid token to mask")
    r = math.cos(math.pi / 2 * float(torch.rand((), generator=generator)))
    m = min(n, max(1, math.ceil(r * n)))
    key = torch.rand(flat.shape, generator=generator).masked_fill(~flat, 2.0)  # invalid entries sort last
    mask = torch.zeros_like(flat)
    mask[key.argsort()[:m]] = True
    return mask.view(valid.shape).to(valid.device)


def masked_training_loss(
    model: MaskedTokenRestorer, codes: torch.Tensor, cond: torch.Tensor, frame_mask: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """MaskGIT's objective: cross-entropy of the true tokens at the masked positions (cosine-schedule masks).

    Args:
        codes: ``(B, Q, N)`` clean codes; cond: ``(B, D, N)``; frame_mask: ``(B, N)`` real frames.
        generator: draws one :func:`cosine_mask` per row.
    """
    q = codes.shape[1]
    mask = torch.stack([cosine_mask(fm[None].expand(q, -1), generator) for fm in frame_mask])  # (B, Q, N)
    logits = model(torch.where(mask, model.mask_id, codes), cond, frame_mask)
    logp, n = multi_codebook_logps(logits, codes, mask, shift=False)
    return -logp.sum() / n.sum()


def ar_training_loss(model: ARTokenRestorer, codes: torch.Tensor, cond: torch.Tensor,
                     frame_mask: torch.Tensor, history_noise: float = 0.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Teacher-forced next-frame cross-entropy over every real frame and codebook.

    ``history_noise = p`` replaces each token of the FED history by a uniform random id with probability
    ``p`` (the targets stay clean): codec frames 16 ms apart are so alike that a model fed clean history
    learns to copy the previous frame and ignore the degraded input, then drifts once it is fed its own
    samples (exposure bias, Bengio et al. 2015); corrupted history makes it read the condition. 0 = plain
    teacher forcing.
    """
    inputs = None
    if history_noise > 0:
        u = torch.rand(codes.shape, generator=generator).to(codes.device)
        rand = torch.randint(model.config.codebook_size, codes.shape, generator=generator).to(codes.device)
        inputs = torch.where(u < history_noise, rand, codes)
    logp, n = multi_codebook_logps(model(codes, cond, frame_mask, inputs), codes, frame_mask, shift=False)
    return -logp.sum() / n.sum()


def train_restorer(
    model: nn.Module,
    codec: SpeechCodec,
    degraded: Sequence[torch.Tensor],
    clean: Sequence[torch.Tensor],
    steps: int = 1000,
    batch_size: int = 8,
    crop_seconds: float = 1.0,
    lr: float = 1e-3,
    seed: int = 0,
    history_noise: float = 0.0,
) -> list[float]:
    """Supervised training of a restorer on (degraded, clean) utterance pairs; returns every step's loss.

    The FROZEN codec encodes each whole utterance once (clean codes, degraded latents); each step takes
    ``batch_size`` random crops of ``crop_seconds`` in the frame domain, one offset per pair, and applies
    :func:`masked_training_loss` or :func:`ar_training_loss`. AdamW; every draw from ``seed``.

    Args:
        model: a :class:`MaskedTokenRestorer` or :class:`ARTokenRestorer` (trained in place, left in eval mode).
        codec: the codec whose tokens the model predicts.
        degraded: ``(T_i,)`` degraded waves at ``codec.sample_rate``.
        clean: ``(T_i,)`` clean waves, time-aligned with ``degraded``.
        history_noise: the AR model's corrupted-history rate (:func:`ar_training_loss`); ignored when masked.
    """
    if len(degraded) != len(clean) or not clean:
        raise ValueError(f"train_restorer needs as many degraded as clean waves (> 0), got {len(degraded)}, "
                         f"{len(clean)}")
    device = next(model.parameters()).device
    codec.eval()
    items = []
    for d, c in zip(degraded, clean):
        n = min(d.numel(), c.numel())
        items.append((codec.encode(c[:n].to(device))[0], codec.features(d[:n].to(device))[0]))  # (Q, N), (D, N)
    crop = max(1, int(round(crop_seconds * codec.config.frame_rate)))
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        codes, conds, masks = [], [], []
        for _ in range(batch_size):
            c, d = items[int(torch.randint(len(items), (1,), generator=g))]
            off = int(torch.randint(max(1, c.shape[-1] - crop + 1), (1,), generator=g))
            c, d = c[:, off: off + crop], d[:, off: off + crop]
            fill = crop - c.shape[-1]
            codes.append(F.pad(c, (0, fill)))
            conds.append(F.pad(d, (0, fill)))
            masks.append(torch.arange(crop, device=device) < c.shape[-1])
        codes_t, cond_t, mask_t = torch.stack(codes), torch.stack(conds), torch.stack(masks)
        if isinstance(model, MaskedTokenRestorer):
            loss = masked_training_loss(model, codes_t, cond_t, mask_t, g)
        else:
            loss = ar_training_loss(model, codes_t, cond_t, mask_t, history_noise, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


# ---- restoration ------------------------------------------------------------------------------------------
def _paradigm(model: nn.Module) -> str:
    for name, cls in RESTORERS.items():
        if isinstance(model, cls):
            return name
    names = ", ".join(c.__name__ for c in RESTORERS.values())
    raise TypeError(f"{type(model).__name__} is not a token restorer ({names})")


def exact_overlap_seconds(model: nn.Module, codec: SpeechCodec, steps: int = 8) -> float:
    """The overlap above which chunked and unchunked deterministic restoration agree (to rounding).

    An output sample is taken from a chunk only at least a quarter overlap away from that chunk's edges, so
    the overlap must be 4× the receptive field ``R`` (frames: the codec encoder's, the restorer's — for the
    masked model over ``steps`` decoding steps — and the codec decoder's); the AR model's teacher-forced
    prefix (half the overlap) must also cover its context. On the grid :func:`restore` places chunks on.
    """
    codec_rf = codec.receptive_field_frames
    if isinstance(model, MaskedTokenRestorer):
        frames = 4 * (2 * codec_rf + model.generation_receptive_field_frames(steps))
        blk = model.config.decode_block_frames
        frames = -(-frames // blk) * blk  # up to the chunk grid (restore places chunks on ranking blocks)
    else:
        cond_rf = codec_rf + model.config.cond_kernel // 2
        frames = max(4 * (codec_rf + cond_rf), 2 * (model.context_frames + cond_rf))
        frames += frames % 2  # an even number of frames: the prefix is half of it
    return frames * codec.hop_length / codec.sample_rate


def _chunk_spans(total: int, chunk: int, overlap: int) -> list[tuple[int, int]]:
    """``[(start, end))`` sample spans: starts every ``chunk − overlap``; the last one ends at ``total``."""
    spans, start = [], 0
    while True:
        if start + chunk >= total:
            spans.append((start, total))
            return spans
        spans.append((start, start + chunk))
        start += chunk - overlap


def _rise(t: torch.Tensor, start: int, overlap: int) -> torch.Tensor:
    """The incoming chunk's weight across the overlap beginning at ``start``: 0, a sin² ramp over the central
    half, 1 (the outgoing chunk gets ``1 −`` this, so the two sum to one)."""
    f0, f1 = start + overlap // 4, start + overlap - overlap // 4
    x = ((t - f0).float() / max(1, f1 - f0)).clamp(0.0, 1.0)
    return torch.sin(math.pi / 2 * x).pow(2)


def _decode_tokens(model: nn.Module, cond: torch.Tensor, prefix: torch.Tensor | None, steps: int, seed: int,
                   greedy: bool, temperature: float, top_k: int | None, choice_temperature: float) -> torch.Tensor:
    if isinstance(model, MaskedTokenRestorer):
        return model.generate(cond, steps=steps, seed=seed, greedy=greedy, temperature=temperature,
                              choice_temperature=choice_temperature)
    return model.generate(cond, prefix=prefix, seed=seed, greedy=greedy, temperature=temperature, top_k=top_k)


@torch.no_grad()
def restore(
    model: nn.Module,
    codec: SpeechCodec,
    wave: torch.Tensor,
    sr: int,
    steps: int = 8,
    seed: int = 0,
    chunk_seconds: float | None = 8.0,
    overlap_seconds: float = 1.0,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    choice_temperature: float = 4.5,
) -> torch.Tensor:
    """Restore a degraded ``(T,)`` wave with a token restorer; returns ``(T',)`` at ``codec.sample_rate``.

    The wave is resampled to the codec's rate, encoded (codec latents = the condition), decoded to clean codes
    (:meth:`MaskedTokenRestorer.generate` / :meth:`ARTokenRestorer.generate`) and decoded to a waveform. Longer
    than ``chunk_seconds``, it is cut into chunks (starts on the frame grid, and for the masked model on its
    ranking-block grid) overlapping by ``overlap_seconds``, each restored on its own (chunk ``c`` with seed
    ``seed + c``; the AR model continues from the previous chunk's tokens over the first half of the overlap)
    and cross-faded over the central half of each overlap. Memory is bounded by the chunk length.

    Args:
        model: a :class:`MaskedTokenRestorer` or :class:`ARTokenRestorer`.
        codec: its codec.
        wave: ``(T,)`` degraded waveform (float, any scale the codec was trained on).
        sr: ``wave``'s sample rate.
        steps: masked model's decoding steps (ignored by the AR model).
        seed: seeds the sampling.
        chunk_seconds: chunk length; None = the whole input at once.
        overlap_seconds: overlap of consecutive chunks (at most half a chunk);
            :func:`exact_overlap_seconds` says how much makes deterministic decoding chunk-invariant.
        greedy: deterministic decoding (argmax; no ranking noise for the masked model).
        temperature, top_k, choice_temperature: sampling settings (top_k: AR only; choice_temperature: masked).
    """
    from mm_align.audio.io import resample

    masked = _paradigm(model) == "masked"
    model.eval()
    device = next(model.parameters()).device
    wave = resample(wave.float().flatten(), sr, codec.sample_rate).to(device)
    total = wave.numel()
    hop = codec.hop_length
    knobs = dict(steps=steps, greedy=greedy, temperature=temperature, top_k=top_k,
                 choice_temperature=choice_temperature)

    def run(piece: torch.Tensor, prefix: torch.Tensor | None, chunk_seed: int) -> torch.Tensor:
        cond = codec.features(piece[None])  # (1, D, N)
        return _decode_tokens(model, cond, prefix, seed=chunk_seed, **knobs)  # (1, Q, N)

    unit = hop * ((model.config.decode_block_frames or 1) if masked else 1)  # chunk starts on the block grid
    chunk = None if chunk_seconds is None else max(unit, round(chunk_seconds * codec.sample_rate / unit) * unit)
    if chunk is None or total <= chunk:
        return codec.decode(run(wave, None, seed), total)[0]
    overlap = round(overlap_seconds * codec.sample_rate / unit) * unit
    if not 0 < overlap <= chunk // 2:
        raise ValueError(f"overlap_seconds={overlap_seconds} gives {overlap} samples on the chunk grid ({unit}); "
                         f"it must be > 0 and at most half the chunk ({chunk} samples)")
    spans = _chunk_spans(total, chunk, overlap)
    out = torch.zeros(total, device=device)
    t_all = torch.arange(total, device=device)
    prev: tuple[int, torch.Tensor] | None = None
    for c, (s, e) in enumerate(spans):
        prefix = None
        if not masked and prev is not None:  # continue from the previous chunk's tokens (first half of the overlap)
            off = (s - prev[0]) // hop
            prefix = prev[1][:, :, off: off + (overlap // hop) // 2]
        tokens = run(wave[s:e], prefix, seed + c)
        prev = (s, tokens)
        t = t_all[s:e]
        weight = torch.ones(e - s, device=device)
        if c > 0:
            weight = weight * _rise(t, s, overlap)
        if c + 1 < len(spans):
            weight = weight * (1.0 - _rise(t, spans[c + 1][0], overlap))
        out[s:e] += weight * codec.decode(tokens, e - s)[0]
    return out


# ---- model directories ------------------------------------------------------------------------------------
def save_restorer(model: nn.Module, codec: SpeechCodec, output_dir: str | os.PathLike,
                  state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a restorer directory: ``config.json`` (with ``paradigm``) + ``model.safetensors``, and ``codec/``.

    ``state_dict``: weights to write instead of ``model``'s own (e.g. gathered from a sharded engine).
    """
    from dataclasses import asdict

    from safetensors.torch import save_file

    _paradigm(model)
    out = Path(output_dir)
    if state_dict is None:
        model.save_pretrained(out)  # type: ignore[attr-defined]
    else:  # sharded parameters: write the gathered weights and the config, never touch the shards
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(model.config), sort_keys=True, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
    codec.save_pretrained(out / CODEC_SUBFOLDER)
    return out


def load_restorer(model_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, SpeechCodec]:
    """Load ``(restorer, codec)`` from a restorer directory, whatever its paradigm, or from a peft LoRA directory.

    A LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``, as the speech adapters' ``save``
    writes) names its base restorer directory in ``base_model_name_or_path``; the base is loaded and the LoRA
    applied (unmerged). Both come back in eval mode.

    Raises:
        FileNotFoundError: the directory is not a restorer directory (the message says what is missing).
        ValueError: an unknown paradigm, or a codec that does not fit the restorer.
    """
    d = Path(model_dir)
    if (d / PEFT_CONFIG_FILE).is_file():
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
        from safetensors.torch import load_file

        lora = LoraConfig.from_pretrained(str(d))
        if not lora.base_model_name_or_path:
            raise ValueError(f"{d / PEFT_CONFIG_FILE} names no base_model_name_or_path")
        model, codec = load_restorer(lora.base_model_name_or_path, device)
        inject_adapter_in_model(lora, model)
        prefix = "base_model.model."
        state = {k.removeprefix(prefix): v for k, v in load_file(str(d / PEFT_WEIGHTS_FILE)).items()}
        result = set_peft_model_state_dict(model, state)
        if [k for k in result.unexpected_keys if "lora_" in k]:
            raise ValueError(f"{d}: LoRA weights the restorer lacks: {result.unexpected_keys[:5]}")
        return model.to(device).eval(), codec
    config_file = d / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{d}: not a restorer directory (no config.json or {PEFT_CONFIG_FILE})")
    paradigm = json.loads(config_file.read_text()).get("paradigm")
    if paradigm not in RESTORERS:
        raise ValueError(f"{config_file}: paradigm {paradigm!r}; valid: {', '.join(RESTORERS)}")
    if not (d / CODEC_SUBFOLDER / "config.json").is_file():
        raise FileNotFoundError(f"{d}: no {CODEC_SUBFOLDER}/ folder with the codec (save_restorer writes one)")
    model = RESTORERS[paradigm].from_pretrained(str(d))  # type: ignore[attr-defined]
    codec = SpeechCodec.from_pretrained(str(d / CODEC_SUBFOLDER))
    mc, cc = model.config, codec.config
    if (mc.num_quantizers, mc.codebook_size, mc.cond_dim) != (cc.num_quantizers, cc.codebook_size, cc.latent_dim):
        raise ValueError(
            f"{d}: the restorer expects Q={mc.num_quantizers}, K={mc.codebook_size}, D={mc.cond_dim}; its codec has "
            f"Q={cc.num_quantizers}, K={cc.codebook_size}, D={cc.latent_dim}"
        )
    return model.to(device).eval(), codec.to(device).eval()


def restore_file(
    model_dir: str | os.PathLike,
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    steps: int = 8,
    seed: int = 0,
    chunk_seconds: float | None = 8.0,
    overlap_seconds: float = 1.0,
    greedy: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    device: str = "cpu",
    loaded: tuple[nn.Module, SpeechCodec] | None = None,
) -> Path:
    """Restore one audio file with the restorer in ``model_dir`` (any paradigm); ``out_path`` is at the codec's rate.

    ``loaded``: a ``(model, codec)`` pair already loaded by :func:`load_restorer`, to restore many files.
    """
    from mm_align.audio.io import load_audio, save_audio

    model, codec = loaded if loaded is not None else load_restorer(model_dir, device)
    wave, sr = load_audio(in_path)
    out = restore(model, codec, wave, sr, steps=steps, seed=seed, chunk_seconds=chunk_seconds,
                  overlap_seconds=overlap_seconds, greedy=greedy, temperature=temperature, top_k=top_k)
    return save_audio(out_path, out.cpu(), codec.sample_rate)


def restore_main(argv: list[str] | None = None) -> int:
    """``mm-align restore speech MODEL_DIR INPUT OUTPUT``: a file to a file, or every audio file of a directory."""
    from mm_align.audio.io import AUDIO_SUFFIXES

    p = argparse.ArgumentParser(prog="mm-align restore speech", description=restore_main.__doc__)
    p.add_argument("model_dir", help="A restorer directory (masked or ar; or a LoRA directory over one).")
    p.add_argument("input", help="A degraded audio file, or a directory of them.")
    p.add_argument("output", help="The restored file, or a directory (same file names) when INPUT is one.")
    p.add_argument("--steps", type=int, default=8, help="Masked model: decoding steps.")
    p.add_argument("--seed", type=int, default=0, help="Seeds the sampling.")
    p.add_argument("--chunk-seconds", type=float, default=8.0, help="Chunk length; 0 = the whole input at once.")
    p.add_argument("--overlap-seconds", type=float, default=1.0, help="Overlap of consecutive chunks.")
    p.add_argument("--greedy", action="store_true", help="Deterministic decoding (argmax).")
    p.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature.")
    p.add_argument("--top-k", type=int, default=None, help="AR model: sample among the top k tokens.")
    p.add_argument("--device", default="cpu", help="Torch device.")
    args = p.parse_args(argv)
    loaded = load_restorer(args.model_dir, args.device)
    src, dst = Path(args.input), Path(args.output)
    pairs = ([(f, dst / f.name) for f in sorted(src.iterdir()) if f.suffix.lower() in AUDIO_SUFFIXES]
             if src.is_dir() else [(src, dst)])
    if not pairs:
        p.error(f"{src}: no audio files ({', '.join(AUDIO_SUFFIXES)})")
    for a, b in pairs:
        restore_file(args.model_dir, a, b, steps=args.steps, seed=args.seed,
                     chunk_seconds=args.chunk_seconds or None, overlap_seconds=args.overlap_seconds,
                     greedy=args.greedy, temperature=args.temperature, top_k=args.top_k, loaded=loaded)
        print(f"{a} -> {b}")
    return 0
