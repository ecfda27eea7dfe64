"""The speech adapter protocol, and the flow-matching speech adapter (Diffusion-DPO form, ALGORITHMS.md §7).

What a user's restoration model must provide
============================================

Any ``torch.nn.Module`` can be aligned; what it must provide depends on its paradigm. In every
paradigm the degraded waveform is the prompt (:func:`~mm_align.audio.speech_records.read_speech_pairs`),
and the chosen and rejected restorations are scored against it at one shared crop
(:func:`~mm_align.audio.speech_records.load_pair_waves`).

**Flow matching** (:class:`FlowSpeechAdapter`, this module). The model is a velocity field
(:class:`FlowSpeechModel`)::

    forward(x_t: (B, *S), t: (B,) in [0, 1], cond: (B, *S)) -> v: (B, *S)

on a representation of the waveform whose LAST dim is time. Either

- the model works on the SGMSE+ compressed complex STFT (:class:`~mm_align.audio.stft.CompressedStft`,
  ``S = (2, F, N)``), whose settings (``n_fft``, ``hop_length``, ``alpha``, ``beta``) the adapter's config
  gives; or
- the model brings its own representation (:class:`SpeechRepresentation`): ``encode(wave (B, T)) ->
  (B, *S)``, ``decode(spec, length) -> (B, T)`` and, optionally, ``num_frames(length) -> int`` (the time
  frames that ``length`` samples fill, so padding frames are left out of the error).

Optional attributes the adapter reads when present: ``sample_rate`` (Hz), ``sigma`` (the std of the
flow's source noise the model was trained with), ``source`` (``"condition"``: the path starts at the
degraded spectrogram plus noise, FlowSE; :func:`~mm_align.audio.flow_enhancer.flow_source`), ``normalize``
(scale by the degraded peak),
``lora_target_modules`` (default LoRA targets), ``save_pretrained(dir)`` / ``from_pretrained(dir)``
(used for full saves and loads; otherwise the adapter writes ``model.safetensors`` and a
``mm_align_speech_model.json`` naming the class and its init kwargs). The score is the flow-matching
error at ONE ``(t, ε)`` per pair, shared by the chosen sample, the rejected one and the reference pass:

    x_t = (1 − t)·ε + t·y,    err(y) = mean over every valid non-batch element of (v(x_t, t, c) − (y − ε))²

**Codec-token models** (autoregressive and masked generative; their adapters are
``mm_align.audio.token_adapters``, over the models of ``mm_align.audio.token_models``, whose docstrings
give the exact contract). The model maps the clean codec tokens ``(B, Q, N)`` (``Q`` codebooks, ``N``
frames) and the frame-aligned condition of the degraded input to logits ``(B, Q, N, K)`` over each
codebook's ``K`` entries. The score is ``log π(y | x)``, summed over every codebook and frame
(:func:`~mm_align.scores.multi_codebook_logps`): over every response frame for an autoregressive model
(teacher-forced), over ONE shared random mask of positions for a masked model — the same mask for the
chosen sample, the rejected one and the reference pass.

The flow adapter
================

:class:`FlowSpeechAdapter` implements :class:`~mm_align.types.PreferenceAdapter` with
``score_kind="error"``: Diffusion-DPO (Wallace et al., "Diffusion Model Alignment Using Direct
Preference Optimization", CVPR 2024, eq. 14) on a flow model, with the flow-matching error of Lipman
et al. (ICLR 2023) in place of the ε-prediction error, as GenSR-Pref does for its flow model
(ALGORITHMS.md §7). ``collate`` draws one ``t ~ U(0, 1)`` and one ``ε ~ N(0, σ²I)`` per pair from the
trainer's per-sample seed; the policy and the reference pass (LoRA disabled, or a frozen copy) score
the same batch, so they see the same draws, and cached reference scores equal live ones exactly
(per epoch, or for all epochs with ``train.sample_seeds=fixed``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from mm_align.audio.flow_enhancer import USER_MODEL_FILE, flow_path, flow_source, load_speech_model, peak_gain
from mm_align.audio.speech_records import load_pair_waves
from mm_align.audio.stft import CompressedStft
from safetensors.torch import save_file
from torch import nn

from mm_align.config import from_dict, option
from mm_align.data import UnpairedSample
from mm_align.fingerprint import pretrained_fingerprint, state_dict_fingerprint
from mm_align.lora import ADAPTER_NAME, lora_state_dict
from mm_align.scores import masked_denoising_error
from mm_align.types import Scores

__all__ = ["FlowSpeechModel", "SpeechRepresentation", "FlowSpeechConfig", "FlowSpeechAdapter"]


@runtime_checkable
class SpeechRepresentation(Protocol):
    """A waveform representation a user model may bring (time = the last dim of ``encode``'s output)."""

    def encode(self, wave: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` waveform -> ``(B, *S)``."""

    def decode(self, spec: torch.Tensor, length: int) -> torch.Tensor:
        """``(B, *S)`` -> ``(B, length)`` waveform."""


@runtime_checkable
class FlowSpeechModel(Protocol):
    """What a flow-matching speech model provides: the velocity field on its representation."""

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``v_θ(x_t, t, c)``: ``(B, *S)``, ``(B,)`` in [0, 1], ``(B, *S)`` -> ``(B, *S)``."""


@dataclass
class FlowSpeechConfig:
    """Which flow-matching speech model to align, and how its batches are made (the ``model:`` section)."""

    pretrained: str = option(
        "", help="A FlowEnhancer directory (save_pretrained) or hub id, a PEFT LoRA directory of one (merged into "
                 "the base), or a user model's directory; '' = build model_class from model_kwargs."
    )
    model_class: str | None = option(
        None, help="A user model, 'module:Class' (or a factory); loaded with Class.from_pretrained(pretrained) when "
                   "it has one, else Class(**model_kwargs) with pretrained/model.safetensors."
    )
    model_kwargs: dict[str, Any] = option(default_factory=dict, help="Init kwargs of model_class.")
    revision: str | None = option(None, help="Hub revision of pretrained.")
    sample_rate: int | None = option(None, help="Rate the model works at; None = the model's sample_rate or 16000.")
    crop_seconds: float | None = option(
        2.0, help="One random crop per pair, shared by degraded, chosen and rejected; None = whole clips."
    )
    sigma: float | None = option(None, help="Std of the flow's source noise ε; None = the model's sigma or 0.5.")
    normalize: bool | None = option(
        None, help="Scale each pair by its degraded crop's peak (SGMSE+); None = the model's normalize or true."
    )
    n_fft: int = option(510, help="STFT size, for a model without its own encode/decode (SGMSE+: 510).")
    hop_length: int = option(128, help="STFT hop, for a model without its own encode/decode (SGMSE+: 128).")
    alpha: float = option(0.5, help="Amplitude compression exponent α (SGMSE+: 0.5), for a model without encode.")
    beta: float = option(0.15, help="Amplitude scale β (SGMSE+: 0.15), for a model without encode.")
    lora_target_modules: list[str] | None = option(
        None, help="LoRA targets; None = the model's lora_target_modules, else every Linear/Conv layer."
    )

    def __post_init__(self) -> None:
        from mm_align.audio.toyworld.world_models import resolve_restorer

        self.pretrained = resolve_restorer(self.pretrained)  # "speech_flow" = the speech world's shipped base
        if self.crop_seconds is not None and self.crop_seconds <= 0:
            raise ValueError(f"crop_seconds must be > 0 or null, got {self.crop_seconds}")
        if self.sigma is not None and self.sigma <= 0:
            raise ValueError(f"sigma must be > 0 or null, got {self.sigma}")
        if self.sample_rate is not None and self.sample_rate <= 0:
            raise ValueError(f"sample_rate must be > 0, got {self.sample_rate}")


def _class_path(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def _default_targets(model: nn.Module) -> list[str]:
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d)
    return [name for name, m in model.named_modules() if name and isinstance(m, kinds)]  # full names: exact


class FlowSpeechAdapter:
    """:class:`~mm_align.types.PreferenceAdapter` for flow-matching speech restoration models (Diffusion-DPO form).

    Args:
        config: the settings (:class:`FlowSpeechConfig`).
        model: a module already built (any :class:`FlowSpeechModel`); None loads ``config.pretrained`` /
            ``config.model_class`` with :func:`~mm_align.audio.flow_enhancer.load_speech_model`.
    """

    score_kind = "error"
    stochastic_scores = True  # (t, ε) drawn per pair in collate
    Config = FlowSpeechConfig
    dataset_formats = {"speech_pairs": "mm_align.audio.speech_records:read_speech_pairs"}

    def __init__(self, config: FlowSpeechConfig | None = None, model: nn.Module | None = None) -> None:
        self.config = config = config or FlowSpeechConfig()
        if model is None:
            if not config.pretrained and not config.model_class:
                raise ValueError("name the model: model.pretrained (a FlowEnhancer directory or hub id) or "
                                 "model.model_class")
            model = load_speech_model(config.pretrained or None, config.model_class, config.model_kwargs,
                                      merge_lora=True, revision=config.revision)
        if not isinstance(model, nn.Module):
            raise TypeError(f"the speech model must be a torch.nn.Module, got {type(model).__name__}")
        self.model: nn.Module = model
        self.base_dir: Path | None = None
        self.sample_rate = int(config.sample_rate or getattr(model, "sample_rate", 16_000))
        self.sigma = float(config.sigma or getattr(model, "sigma", 0.5))
        self.normalize = bool(config.normalize if config.normalize is not None else getattr(model, "normalize", True))
        own = callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None))
        if isinstance(getattr(model, "stft", None), CompressedStft):
            self.representation: Any = model.stft  # a FlowEnhancer: its STFT has no weights, it runs on the CPU
        elif own:
            self.representation = model
        else:
            self.representation = CompressedStft(config.n_fft, config.hop_length, config.alpha, config.beta)
        self.lora_target_modules = list(
            config.lora_target_modules or getattr(model, "lora_target_modules", None) or _default_targets(model)
        )
        crop = config.crop_seconds
        self.crop_samples = None if crop is None else max(1, round(crop * self.sample_rate))
        self._fingerprint = self._compute_fingerprint()  # the base weights, before LoRA is injected

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> FlowSpeechAdapter:
        return cls(from_dict(FlowSpeechConfig, data, path="model"))

    def _scoring_settings(self) -> dict[str, Any]:
        rep = self.representation
        return {"sample_rate": self.sample_rate, "sigma": self.sigma, "normalize": self.normalize,
                "source": getattr(self.model, "source", "noise"),
                "crop_samples": self.crop_samples, "class": _class_path(self.model),
                "representation": asdict(rep) if isinstance(rep, CompressedStft) else _class_path(rep)}

    def _compute_fingerprint(self) -> str:
        """Content-addressed from the model's files (:func:`~mm_align.fingerprint.pretrained_fingerprint`) when it
        was loaded from a directory or hub id; else (a module built in memory, or a LoRA directory merged into its
        base) from its weights, :func:`~mm_align.fingerprint.state_dict_fingerprint`. Both add the scoring settings.
        """
        src = self.config.pretrained
        lora_dir = bool(src) and (Path(src) / "adapter_config.json").is_file()
        if src and not lora_dir:
            return pretrained_fingerprint(self.config, src, [None], revision=self.config.revision,
                                          modules={"": self.model}, extra=self._scoring_settings())
        settings = {k: v for k, v in asdict(self.config).items() if k != "pretrained"}
        return state_dict_fingerprint({"config": settings, **self._scoring_settings()}, self.model)

    def fingerprint(self) -> str:
        return self._fingerprint

    # ---- batches ---------------------------------------------------------------------------
    def _num_frames(self, length: int, n_frames: int) -> int:
        fn = getattr(self.representation, "num_frames", None)
        return min(n_frames, int(fn(length))) if callable(fn) else n_frames

    @torch.no_grad()
    def _encode(self, waves: torch.Tensor) -> torch.Tensor:
        p = next(self.model.parameters())
        if self.representation is self.model:
            return self.model.encode(waves.to(p.device)).float().cpu()
        return self.representation.encode(waves)

    def collate(self, records: list[Any], seeds: list[int]) -> dict[str, torch.Tensor]:
        """Waves at one shared crop per record, their spectrograms, and ONE (t, ε) per record.

        Layout: ``cond (B, *S)`` the degraded condition; ``y (sides·B, *S)`` the clean targets
        ``[all chosen ; all rejected]`` (or the completions, unpaired); ``t (B,)`` and ``eps (B, *S)`` drawn
        from ``torch.Generator().manual_seed(seeds[i])`` (``t`` first, then ``ε``, at the record's own
        frame count, so a draw never depends on the rest of the batch); ``mask (B, 1, …, 1, N)`` valid
        frames; ``frames (B,)`` each record's frame count.
        """
        unpaired = isinstance(records[0], UnpairedSample)
        if any(isinstance(r, UnpairedSample) != unpaired for r in records):
            raise ValueError("a batch mixes paired and unpaired records")
        sides = 1 if unpaired else 2
        loaded = [load_pair_waves(r, self.base_dir, self.sample_rate, self.crop_samples, s) for r, s in
                  zip(records, seeds)]
        conds, outs, draws, valid, frames = [], [[] for _ in range(sides)], [], [], []
        for pw, seed in zip(loaded, seeds):
            gain = peak_gain(pw.degraded) if self.normalize else 1.0
            waves = torch.stack([pw.degraded, *pw.outputs]) * gain  # (1 + sides, T_i)
            specs = self._encode(waves)  # (1 + sides, *S_i)
            conds.append(specs[0])
            for k in range(sides):
                outs[k].append(specs[1 + k])
            g = torch.Generator().manual_seed(seed)
            t = torch.rand((), generator=g)
            eps = torch.randn(specs.shape[1:], generator=g) * self.sigma  # shared by chosen, rejected, reference
            eps = flow_source(self.model, specs[0], eps)  # + the condition when the model's path starts there
            draws.append((t, eps))
            frames.append(specs.shape[-1])
            valid.append(self._num_frames(pw.length, specs.shape[-1]))
        n = max(frames)

        def pad(x: torch.Tensor) -> torch.Tensor:
            return F.pad(x, (0, n - x.shape[-1]))

        cond = torch.stack([pad(c) for c in conds])  # (B, *S)
        mask = torch.zeros(len(records), *([1] * (cond.dim() - 2)), n)  # (B, 1, ..., 1, N)
        for i, v in enumerate(valid):
            mask[i, ..., :v] = 1.0
        batch = {
            "cond": cond,
            "y": torch.cat([torch.stack([pad(x) for x in side]) for side in outs]),  # (sides·B, *S)
            "t": torch.stack([t for t, _ in draws]),  # (B,)
            "eps": torch.stack([pad(e) for _, e in draws]),  # (B, *S)
            "mask": mask,
            "frames": torch.tensor(frames),  # (B,)
        }
        if unpaired:
            batch["desirable"] = torch.tensor([bool(r.desirable) for r in records])
        return batch

    def _errors(self, model: nn.Module, y: torch.Tensor, cond: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        x_t, target = flow_path(y, eps, t)
        return masked_denoising_error(model(x_t, t, cond), target, mask)  # (N,)

    def scores(self, batch: dict[str, torch.Tensor], model: nn.Module) -> Scores:
        """Per-sample flow-matching errors ``mean (v(x_t, t, c) − (y − ε))²`` at the record's one ``(t, ε)``.

        Chosen and rejected rows repeat the pair's ``t``, ``ε`` and condition, and run as one ``2B`` batch.
        Records of different lengths (``crop_seconds: null``) run one record at a time at their own
        length, so no record's score depends on another's padding.
        """
        cond, y, eps, t, mask = batch["cond"], batch["y"], batch["eps"], batch["t"], batch["mask"]
        b = cond.shape[0]
        sides = y.shape[0] // b
        frames = batch["frames"].tolist()

        def rep(x: torch.Tensor) -> torch.Tensor:
            return x.repeat(sides, *([1] * (x.dim() - 1)))  # (B, ...) -> (sides·B, ...): [chosen ; rejected]

        if len(set(frames)) == 1:
            err = self._errors(model, y, rep(cond), rep(eps), rep(t), rep(mask))
        else:
            per_record = []  # (sides,) each: record i's [chosen, rejected] errors
            for i, n in enumerate(frames):
                rows, same = [i + k * b for k in range(sides)], [i] * sides
                per_record.append(self._errors(model, y[rows, ..., :n], cond[same, ..., :n], eps[same, ..., :n],
                                               t[same], mask[same, ..., :n]))
            err = torch.stack(per_record, dim=1).reshape(-1)  # (sides, B) -> (sides·B,): [chosen ; rejected]
        if sides == 1:
            return Scores("error", err, desirable=batch["desirable"])
        return Scores("error", err[:b], err[b:])

    # ---- saving ----------------------------------------------------------------------------
    def _user_model_file(self, model: nn.Module) -> dict[str, Any]:
        kwargs = self.config.model_kwargs or dict(getattr(model, "_hub_mixin_config", None)
                                                  or getattr(model, "config", None) or {})
        return {"model_class": self.config.model_class or _class_path(model), "model_kwargs": kwargs}

    def _save_full(self, model: nn.Module, out: Path, state: dict[str, torch.Tensor] | None) -> None:
        """``config.json`` + ``model.safetensors`` (hub mixin), the model's own ``save_pretrained``, or the
        weights with :data:`~mm_align.audio.flow_enhancer.USER_MODEL_FILE` for a plain module."""
        out.mkdir(parents=True, exist_ok=True)
        if hasattr(model, "_hub_mixin_config"):
            if state is None:
                model.save_pretrained(out)  # type: ignore[operator]
                return
            (out / "config.json").write_text(json.dumps(model._hub_mixin_config, indent=2, sort_keys=True) + "\n")
        elif callable(getattr(model, "save_pretrained", None)) and state is None:
            model.save_pretrained(out)  # type: ignore[operator]
            return
        else:
            (out / USER_MODEL_FILE).write_text(json.dumps(self._user_model_file(model), indent=2) + "\n")
        weights = {k: v.detach().contiguous().cpu() for k, v in (state or model.state_dict()).items()}
        save_file(weights, str(out / "model.safetensors"))

    def save(self, model: nn.Module, output_dir: str, lora: bool, state_dict: dict[str, Any] | None = None) -> None:
        """A PEFT LoRA directory (``lora``) or the full model in ``save_pretrained`` form.

        LoRA: ``adapter_config.json`` (peft's ``LoraConfig``) and ``adapter_model.safetensors`` in peft's
        ``PeftModel`` naming, so both ``peft.PeftModel.from_pretrained(FlowEnhancer.from_pretrained(base), dir)``
        and :func:`~mm_align.audio.flow_enhancer.load_speech_model` (``mm-align restore speech --model dir``)
        load it. ``base_model_name_or_path`` is ``model.pretrained`` (a local directory made absolute); a model
        that came from no directory (built in memory) gets its base weights written into ``dir/base`` and
        ``base_model_name_or_path = "base"`` (resolved against the LoRA directory). A user module's class and
        init kwargs go into ``mm_align_speech_model.json``.

        Full: ``config.json`` + ``model.safetensors`` (:class:`huggingface_hub.PyTorchModelHubMixin`:
        ``FlowEnhancer.from_pretrained(dir)``), the model's own ``save_pretrained``, or for a plain user module
        ``model.safetensors`` with ``mm_align_speech_model.json``.

        ``state_dict``: the whole state dict gathered by the trainer from a sharded engine; written from it.

        Raises:
            ValueError: ``lora`` is set but ``model`` holds no peft LoRA adapter.
        """
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if not lora:
            self._save_full(model, out, state_dict)
            return
        peft_config = getattr(model, "peft_config", {}).get(ADAPTER_NAME)
        if peft_config is None:
            raise ValueError(f"cannot save a LoRA: {type(model).__name__} holds no peft adapter {ADAPTER_NAME!r}")
        state = lora_state_dict(model, state_dict)
        save_file({f"base_model.model.{k}": v for k, v in state.items()}, str(out / "adapter_model.safetensors"))
        config = copy.deepcopy(peft_config)
        src = self.config.pretrained
        lora_src = bool(src) and (Path(src) / "adapter_config.json").is_file()  # merged at load: not a base
        if src and not lora_src:
            config.base_model_name_or_path = str(Path(src).resolve()) if Path(src).exists() else src
        else:
            full = state_dict if state_dict is not None else model.state_dict()
            base = {k.replace(".base_layer", ""): v for k, v in full.items() if "lora_" not in k}
            self._save_full_base(model, out / "base", base)
            config.base_model_name_or_path = "base"
        config.save_pretrained(str(out))
        if not hasattr(model, "_hub_mixin_config"):
            (out / USER_MODEL_FILE).write_text(json.dumps(self._user_model_file(model), indent=2) + "\n")

    def _save_full_base(self, model: nn.Module, out: Path, base: dict[str, torch.Tensor]) -> None:
        """The base weights (LoRA layers stripped) as a full save; a class's own ``save_pretrained`` cannot be
        given them, so such a model is written in the plain-module form."""
        out.mkdir(parents=True, exist_ok=True)
        if hasattr(model, "_hub_mixin_config"):
            self._save_full(model, out, base)
            return
        (out / USER_MODEL_FILE).write_text(json.dumps(self._user_model_file(model), indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in base.items()}, str(out / "model.safetensors"))
