"""Preference adapters for the token restorers: DPO (and every log-prob loss) on speech restoration pairs.

GenSR-Pref (ALGORITHMS.md §7): the degraded input is the prompt, the chosen and rejected restorations are
responses, and DPO (Rafailov et al. 2023, eq. 7) compares their log-probabilities under the policy and the
reference. The tokens are the FROZEN codec's (:class:`~mm_align.audio.codec.SpeechCodec`, never trained here):
``collate`` loads the time-aligned degraded / chosen / rejected crops (one shared offset per record,
:func:`~mm_align.audio.speech_records.load_pair_waves`) and encodes them once per batch under ``no_grad`` —
chosen and rejected to codes, the degraded input to the codec latents the restorer is conditioned on — so
the policy and the reference pass share the batch and cost one restorer forward each.

- :class:`MaskedTokenSpeechAdapter` (a :class:`~mm_align.audio.token_models.MaskedTokenRestorer`):
  ``log π(y | x)`` is the sum of ``log p(true token)`` over ONE random mask per pair, drawn in ``collate``
  from the pair's seed with MaskGIT's cosine schedule (ratio ``cos(π/2·u)``); the chosen and the rejected
  restoration of a pair, and the reference pass, are scored on the same masked positions, the rest of each
  response visible. ``n_tokens`` = the number of masked tokens. ``stochastic_scores = True``.
- :class:`ARSpeechAdapter` (an :class:`~mm_align.audio.token_models.ARTokenRestorer`): ``log π(y | x)`` is the
  sum of every response token's teacher-forced log-probability (all codebooks, every real frame);
  ``n_tokens`` = codebooks × real frames. ``stochastic_scores = False``: nothing is drawn, and each record's
  crop is placed by a hash of the record (the same every epoch), so cached reference scores are exact.

Both use :func:`mm_align.scores.multi_codebook_logps` (``shift=False``: the AR model shifts internally).
Pairs are laid out ``[all chosen ; all rejected]`` (2B rows); unpaired (KTO) records give one row each.
Frames past a clip's end (padding) are never scored and never attended to.

``save``: with LoRA a peft adapter directory (``adapter_config.json`` naming the base restorer directory,
``adapter_model.safetensors``) that :func:`~mm_align.audio.token_models.load_restorer` (and
``peft.PeftModel.from_pretrained`` on the base) applies back; fully fine-tuned, a restorer directory
(``save_pretrained``, the codec in ``codec/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from mm_align.audio.codec import SpeechCodec
from mm_align.audio.speech_records import load_pair_waves
from mm_align.audio.token_models import (
    DEFAULT_LORA_TARGETS,
    PEFT_WEIGHTS_FILE,
    cosine_mask,
    load_restorer,
    save_restorer,
    valid_frames,
)
from safetensors.torch import save_file
from torch import nn

from mm_align.config import from_dict, option
from mm_align.data import PreferencePair, UnpairedSample
from mm_align.fingerprint import pretrained_fingerprint
from mm_align.lora import ADAPTER_NAME, lora_state_dict
from mm_align.reference_cache import records_fingerprint
from mm_align.scores import multi_codebook_logps
from mm_align.types import Scores

__all__ = [
    "MaskedSpeechConfig",
    "ARSpeechConfig",
    "MaskedTokenSpeechAdapter",
    "ARSpeechAdapter",
    "load_token_model",
    "encode_speech_batch",
    "save_token_model",
    "SPEECH_FORMATS",
]

SPEECH_FORMATS = {"speech_pairs": "mm_align.audio.speech_records:read_speech_pairs"}


def _check_common(config: Any) -> None:
    if not config.pretrained:
        raise ValueError("model.pretrained must name a restorer directory (config.json, model.safetensors, codec/)")
    if config.crop_seconds is not None and not config.crop_seconds > 0:
        raise ValueError(f"crop_seconds must be > 0 or null, got {config.crop_seconds}")


@dataclass
class _TokenSpeechConfig:
    """The fields both token paradigms' configs have."""

    pretrained: str = option("", help="A restorer directory (config.json, model.safetensors, codec/), as "
                                      "save_restorer writes it.")
    sample_rate: int | None = option(None, help="Rate the waves are loaded at; None = the codec's (another value is "
                                                "an error: the codec runs at its own rate).")
    crop_seconds: float | None = option(2.0, help="One random crop per pair (the same offset for degraded, chosen "
                                                  "and rejected); null = whole clips, padded to the longest.")
    lora_target_modules: list[str] | None = option(
        None, help="LoRA targets; None = the attention projections (to_q, to_k, to_v, to_out)."
    )

    def __post_init__(self) -> None:
        from mm_align.audio.toyworld.world_models import resolve_restorer

        self.pretrained = resolve_restorer(self.pretrained)  # "speech_masked" / "speech_ar" = the world's bases
        _check_common(self)


@dataclass
class MaskedSpeechConfig(_TokenSpeechConfig):
    """A masked-token restorer directory and how its preference batches are made."""

    pretrained: str = option("", help="A restorer directory with paradigm 'masked' (config.json, model.safetensors, "
                                      "codec/), as save_restorer writes it.")


@dataclass
class ARSpeechConfig(_TokenSpeechConfig):
    """An autoregressive token restorer directory and how its preference batches are made."""

    pretrained: str = option("", help="A restorer directory with paradigm 'ar' (config.json, model.safetensors, "
                                      "codec/), as save_restorer writes it.")


# ---- what both adapters share (functions, not a base class) ------------------------------------------------
def load_token_model(config: Any, paradigm: str) -> tuple[nn.Module, SpeechCodec, int, str]:
    """``(restorer, frozen codec, sample rate, fingerprint)`` from a config's ``pretrained`` directory.

    Raises:
        ValueError: the directory holds another paradigm, is a LoRA directory, or ``sample_rate`` is not the
            codec's.
    """
    src = Path(config.pretrained)
    if (src / "adapter_config.json").is_file():
        raise ValueError(f"model.pretrained={src} is a LoRA directory; point it at a full restorer directory "
                         "(its adapter_config.json names the base in base_model_name_or_path)")
    model, codec = load_restorer(src)
    if model.config.paradigm != paradigm:
        raise ValueError(f"model.pretrained={src} holds a {model.config.paradigm!r} restorer; this adapter needs "
                         f"{paradigm!r}")
    codec.requires_grad_(False).eval()
    sr = codec.sample_rate
    if config.sample_rate is not None and config.sample_rate != sr:
        raise ValueError(f"model.sample_rate={config.sample_rate} but the codec runs at {sr} Hz; leave it null")
    fingerprint = pretrained_fingerprint(config, src, [None, "codec"], modules={"": model, "codec": codec},
                                         extra={"paradigm": paradigm})
    return model, codec, sr, fingerprint


@torch.no_grad()
def encode_speech_batch(
    codec: SpeechCodec, records: list[Any], seeds: list[int], base_dir: Path | None, sample_rate: int,
    crop_seconds: float | None,
) -> dict[str, torch.Tensor]:
    """Load and encode a batch with the frozen codec.

    Returns:
        ``codes`` ``(S·B, Q, N)`` int64 (``[chosen ; rejected]``, S = 2, or the completions, S = 1), ``cond``
        ``(B, D, N)`` the degraded inputs' codec latents, ``frame_mask`` ``(B, N)`` frames on real audio, and
        ``desirable`` ``(B,)`` for unpaired records.
    """
    unpaired = isinstance(records[0], UnpairedSample)
    kind = UnpairedSample if unpaired else PreferencePair
    for r in records:
        if not isinstance(r, kind):
            raise ValueError(f"a batch mixes record types: {type(r).__name__} next to {kind.__name__}")
    crop = None if crop_seconds is None else int(round(crop_seconds * sample_rate))
    waves = [load_pair_waves(r, base_dir, sample_rate, crop, s) for r, s in zip(records, seeds)]
    width = max(w.degraded.numel() for w in waves)

    def fit(x: torch.Tensor) -> torch.Tensor:  # whole clips (crop=None) differ in length across records
        return F.pad(x, (0, width - x.numel()))

    sides = 1 if unpaired else 2
    outputs = torch.stack([fit(w.outputs[k]) for k in range(sides) for w in waves])  # (S·B, T), side-major
    degraded = torch.stack([fit(w.degraded) for w in waves])  # (B, T)
    device = next(codec.parameters()).device
    codes = codec.encode(outputs.to(device)).cpu()  # (S·B, Q, N)
    cond = codec.features(degraded.to(device)).cpu()  # (B, D, N)
    lengths = torch.tensor([w.length for w in waves])
    batch = {"codes": codes, "cond": cond, "frame_mask": valid_frames(lengths, codes.shape[-1], codec.hop_length)}
    if unpaired:
        batch["desirable"] = torch.tensor([bool(r.desirable) for r in records])
    return batch


def _repeat(batch: dict[str, torch.Tensor]) -> tuple[int, torch.Tensor, torch.Tensor]:
    """How many sides the batch has, and the condition and frame mask repeated to the ``codes`` rows."""
    rep = batch["codes"].shape[0] // batch["cond"].shape[0]
    return rep, batch["cond"].repeat(rep, 1, 1), batch["frame_mask"].repeat(rep, 1)


def _scores(batch: dict[str, torch.Tensor], logp: torch.Tensor, n: torch.Tensor, rep: int) -> Scores:
    if rep == 1:
        return Scores("logp", logp, desirable=batch["desirable"], n_tokens_chosen=n)
    b = logp.shape[0] // 2
    return Scores("logp", logp[:b], logp[b:], n_tokens_chosen=n[:b], n_tokens_rejected=n[b:])


def save_token_model(
    model: nn.Module, codec: SpeechCodec, pretrained: str, output_dir: str, lora: bool,
    state_dict: dict[str, Any] | None = None,
) -> None:
    """A peft LoRA directory naming ``pretrained`` as its base, or a full restorer directory (codec in ``codec/``).

    ``state_dict``: the whole state dict gathered by the trainer from a sharded engine; written instead of
    ``model``'s (with LoRA, only its LoRA entries are kept).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not lora:
        save_restorer(model, codec, out, state_dict)
        return
    peft_config = getattr(model, "peft_config", {}).get(ADAPTER_NAME)
    if peft_config is None:
        raise ValueError(f"cannot save a LoRA: {type(model).__name__} holds no peft adapter {ADAPTER_NAME!r}")
    peft_config.base_model_name_or_path = str(Path(pretrained).resolve())
    peft_config.save_pretrained(str(out))
    # PeftModel wraps the base as base_model.model: its saved keys carry that prefix
    state = {f"base_model.model.{k}": v for k, v in lora_state_dict(model, state_dict).items()}
    save_file(state, str(out / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})


# ---- the adapters ------------------------------------------------------------------------------------------
class MaskedTokenSpeechAdapter:
    """Masked-token restorer (MaskGIT) scores for DPO: log-probs summed over ONE shared random mask per pair."""

    score_kind = "logp"
    stochastic_scores = True
    dataset_formats = SPEECH_FORMATS
    Config = MaskedSpeechConfig
    paradigm = "masked"

    def __init__(self, config: MaskedSpeechConfig) -> None:
        self.config = config
        self.base_dir: Path | None = None
        self.model, self.codec, self.sample_rate, self._fingerprint = load_token_model(config, self.paradigm)
        self.lora_target_modules = list(config.lora_target_modules or DEFAULT_LORA_TARGETS)
        self.mask_id = self.model.config.codebook_size  # kept here: `model` in scores may be a DDP wrapper

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> MaskedTokenSpeechAdapter:
        return cls(from_dict(MaskedSpeechConfig, data, path="model"))

    def fingerprint(self) -> str:
        return self._fingerprint

    def collate(self, records: list[Any], seeds: list[int]) -> dict[str, torch.Tensor]:
        """Encoded crops plus ``score_mask`` ``(B, Q, N)``: one cosine-schedule mask per pair from ``seeds[i]``.

        The mask is drawn over the pair's real frames with ``torch.Generator().manual_seed(seeds[i])``, so it
        is the same for the chosen and the rejected side, for the reference pass (which re-uses the batch),
        for the cached reference of that (sample, epoch), and after a resume.
        """
        batch = encode_speech_batch(self.codec, records, seeds, self.base_dir, self.sample_rate,
                                    self.config.crop_seconds)
        q = batch["codes"].shape[1]
        batch["score_mask"] = torch.stack([
            cosine_mask(fm[None].expand(q, -1), torch.Generator().manual_seed(s))
            for s, fm in zip(seeds, batch["frame_mask"])
        ])  # (B, Q, N)
        return batch

    def scores(self, batch: dict[str, torch.Tensor], model: nn.Module) -> Scores:
        """``log π(y | x) = Σ_{masked (q, n)} log p(y_qn | y visible, x)``, one forward over the 2B rows."""
        rep, cond, frame_mask = _repeat(batch)
        codes, mask = batch["codes"], batch["score_mask"].repeat(rep, 1, 1)  # the SAME mask for every side
        logits = model(torch.where(mask, self.mask_id, codes), cond, frame_mask)  # (S·B, Q, N, K)
        logp, n = multi_codebook_logps(logits, codes, mask, shift=False)
        return _scores(batch, logp, n, rep)

    def save(self, model: nn.Module, output_dir: str, lora: bool, state_dict: dict[str, Any] | None = None) -> None:
        """A peft LoRA directory over ``pretrained``, or a full restorer directory (see :func:`save_token_model`)."""
        save_token_model(model, self.codec, self.config.pretrained, output_dir, lora, state_dict)


class ARSpeechAdapter:
    """Autoregressive token restorer scores for DPO: teacher-forced log-probs summed over every response token."""

    score_kind = "logp"
    stochastic_scores = False
    dataset_formats = SPEECH_FORMATS
    Config = ARSpeechConfig
    paradigm = "ar"

    def __init__(self, config: ARSpeechConfig) -> None:
        self.config = config
        self.base_dir: Path | None = None
        self.model, self.codec, self.sample_rate, self._fingerprint = load_token_model(config, self.paradigm)
        self.lora_target_modules = list(config.lora_target_modules or DEFAULT_LORA_TARGETS)

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> ARSpeechAdapter:
        return cls(from_dict(ARSpeechConfig, data, path="model"))

    def fingerprint(self) -> str:
        return self._fingerprint

    def collate(self, records: list[Any], seeds: list[int]) -> dict[str, torch.Tensor]:
        """Encoded crops. ``seeds`` are unused: the scores are deterministic (``stochastic_scores = False``), so
        each record's crop is placed by a hash of the record itself, the same in every epoch; a per-epoch crop
        would make a cached reference score another crop than the live pass."""
        fixed = [int(records_fingerprint([r])[:15], 16) for r in records]
        return encode_speech_batch(self.codec, records, fixed, self.base_dir, self.sample_rate,
                                   self.config.crop_seconds)

    def scores(self, batch: dict[str, torch.Tensor], model: nn.Module) -> Scores:
        """``log π(y | x) = Σ_n Σ_q log p(y_qn | y_<n, x)`` over the real frames, one forward over the 2B rows."""
        rep, cond, frame_mask = _repeat(batch)
        logits = model(batch["codes"], cond, frame_mask)  # (S·B, Q, N, K), logits[:, :, n] scores frame n
        logp, n = multi_codebook_logps(logits, batch["codes"], frame_mask, shift=False)
        return _scores(batch, logp, n, rep)

    def save(self, model: nn.Module, output_dir: str, lora: bool, state_dict: dict[str, Any] | None = None) -> None:
        """A peft LoRA directory over ``pretrained``, or a full restorer directory (see :func:`save_token_model`)."""
        save_token_model(model, self.codec, self.config.pretrained, output_dir, lora, state_dict)
