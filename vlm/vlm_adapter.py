"""The preference adapter over transformers image-text-to-text models: DPO (and every log-prob loss) for VLMs.

Any model ``AutoModelForImageTextToText`` and ``AutoProcessor`` load (LLaVA, Qwen2-VL, ...;
:func:`~mm_align.vlm.vlm_loading.load_vlm`) is scored the same way:

- **Rendering** (as TRL's ``apply_chat_template`` does it): the prompt messages through the model's own chat
  template with ``add_generation_prompt=True`` (``continue_final_message`` when the prompt ends with an assistant
  turn), prompt + answer (one assistant message) through it again; the prompt is their common prefix and the
  answer text is the rest (so the template's end-of-turn tokens belong to the answer).
- **Tokenising**: the prompt with the processor and its images (any number per sample; the processor expands each
  placeholder into the model's image tokens), the answer with the tokenizer (``add_special_tokens=False`` both, as
  TRL: the template already holds BOS), then ``[prompt ; answer ; padding]`` per row. The **response mask** is
  True exactly on the answer's tokens: never the prompt, never an image token, never padding.
- **One forward**: pairs are laid out ``[all chosen ; all rejected]`` (2B rows, TRL's concatenated forward) and
  scored by one forward; ``log π(y | x) = Σ_t mask_t · log p(y_t | y_<t, x)`` (:func:`mm_align.scores.sequence_logps`,
  DPO, Rafailov et al. 2023, eq. 7), ``n_tokens`` = the answer's token count (IPO's length normalisation).
  Only the logits the answers need are computed (``logits_to_keep``).
- **Image-side rejection** (mDPO's conditional preference, and the general "rejected input"): when a record has
  ``meta["rejected_images"]``, its rejected row is the (usually same) answer under those images instead; the same
  code path scores it, so ``log π(y | x_w) − log π(y | x_l)`` enters the loss.
- **Reference**: the trainer's (adapters disabled, a frozen copy, or the on-disk cache; scores are
  deterministic, ``stochastic_scores = False``).
- **Length audit** (:mod:`mm_align.vlm.length_audit`): :meth:`VLMAdapter.prepare` measures every record before
  training; one that does not fit ``max_length`` is resized (fewer image pixels) or dropped, and reported.
  Nothing is ever truncated: :meth:`VLMAdapter.collate` fits an unaudited record the same way, and a record that
  cannot fit is an error naming it.

``save``: with LoRA a peft adapter directory (``PeftModel.from_pretrained(AutoModelForImageTextToText
.from_pretrained(base), dir)`` loads it; the processor is saved beside it), plus with ``save_merged`` the merged
model and processor under ``merged/`` (``AutoModelForImageTextToText.from_pretrained(dir/merged)``); fully
fine-tuned, the model and processor (``save_pretrained``).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import shutil
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path
from typing import Any, Literal

import torch
from mm_align.vlm.length_audit import AUDIT_POLICIES, MAX_PIXELS_KEY, Length, LengthAudit, audit_records, fit_record
from mm_align.vlm.vlm_loading import load_vlm
from mm_align.vlm.vlm_records import VLMExample, load_image, vlm_example
from safetensors.torch import save_file
from torch import nn

from mm_align.config import from_dict, option
from mm_align.data.records import DataError, PreferencePair, UnpairedSample
from mm_align.fingerprint import pretrained_fingerprint
from mm_align.lora import ADAPTER_NAME, lora_state_dict
from mm_align.scores import sequence_logps
from mm_align.types import Scores

logger = logging.getLogger(__name__)

__all__ = ["VLMAdapterConfig", "VLMAdapter", "VLM_FORMATS", "LM_PROJECTIONS", "render_prompt_answer",
           "language_model_name", "vision_tower_names", "default_lora_targets"]

VLM_FORMATS = {"trl_vision": "mm_align.vlm.formats:read_trl_vision",
               "llamafactory": "mm_align.vlm.formats:read_llamafactory",
               "vlm_jsonl": "mm_align.vlm.formats:read_vlm_jsonl"}  # the normalised form, images checked at read time
# the attention and MLP projections of the Llama / Qwen / Mistral / Gemma decoder families
LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# where transformers' VLMs keep the vision encoder (on the model or its inner base model)
_VISION_ATTRS = ("vision_tower", "visual", "vision_model", "vision_encoder")
# processor outputs laid out per token (B, T): extended over the answer and the padding; the rest (pixel values,
# grid sizes, ...) are per image and pass through
_PER_TOKEN = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass
class VLMAdapterConfig:
    """An image-text-to-text model and how its preference batches are made."""

    pretrained: str = option("", help="A model directory (save_pretrained of model + processor) or a hub id that "
                                      "AutoModelForImageTextToText and AutoProcessor load.")
    dtype: str | None = option(None, help="Weights dtype: float32, bfloat16, float16; None = float32.")
    attn_implementation: str | None = option(None, help="eager, sdpa, ...; None = transformers' default.")
    lora_target_modules: list[str] | None = option(
        None, help="LoRA targets; None = the language model's attention/MLP projections (q/k/v/o, gate/up/down), "
                   "plus the vision tower's linear layers when freeze_vision_tower is false.")
    freeze_vision_tower: bool = option(True, help="Keep the vision encoder frozen (full fine-tuning too; with LoRA "
                                                  "it gets no adapters).")
    max_length: int | None = option(None, help="Token limit of prompt + answer; None = the language model's "
                                               "max_position_embeddings. Longer records are resized or dropped by "
                                               "the length audit, never truncated.")
    max_image_pixels: int | None = option(None, help="Downscale every image larger than this area (pixels, aspect "
                                                     "kept) before the processor; None = as stored.")
    audit: Literal["resize", "drop"] = option("resize", help="What the length audit does with a record longer than "
                                                             "max_length: resize (fewer image pixels, down to "
                                                             "min_image_pixels; dropped if that fails) or drop.")
    min_image_pixels: int = option(3136, help="The length audit's floor for the largest image's area when resizing.")
    resize_step: float = option(0.5, help="The length audit multiplies the image pixel budget by this per retry.")
    save_merged: bool = option(False, help="With LoRA, also write the merged model and processor under "
                                           "final/merged (save_pretrained).")

    def __post_init__(self) -> None:
        if not self.pretrained:
            raise ValueError("model.pretrained must name an image-text-to-text model directory or hub id")
        if self.audit not in AUDIT_POLICIES:
            raise ValueError(f"model.audit must be one of {', '.join(AUDIT_POLICIES)}, got {self.audit!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"model.max_length must be >= 2 or null, got {self.max_length}")
        for name in ("max_image_pixels", "min_image_pixels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"model.{name} must be >= 1, got {value}")
        if not 0.0 < self.resize_step < 1.0:
            raise ValueError(f"model.resize_step must be in (0, 1), got {self.resize_step}")


# ---- model structure ---------------------------------------------------------------------------------------
def _qualified_name(model: nn.Module, module: nn.Module) -> str | None:
    return next((n for n, m in model.named_modules() if m is module), None)


def language_model_name(model: nn.Module) -> str:
    """The qualified name of the VLM's language model (``model.get_decoder()``), e.g. ``model.language_model``.

    Raises:
        ValueError: the model exposes no decoder.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    name = _qualified_name(model, decoder) if decoder is not None else None
    if not name:
        raise ValueError(f"{type(model).__name__} exposes no language model (get_decoder); set "
                         "model.lora_target_modules explicitly")
    return name


def vision_tower_names(model: nn.Module) -> list[str]:
    """The qualified names of the vision encoder module(s) (``vision_tower``, ``visual``, ... on the model or its
    base model); the multi-modal projector is not part of it."""
    names = []
    for holder_name in ("", "model"):
        holder = model.get_submodule(holder_name) if holder_name else model
        for attr in _VISION_ATTRS:
            sub = getattr(holder, attr, None)
            if isinstance(sub, nn.Module):
                name = _qualified_name(model, sub)
                if name and name not in names:
                    names.append(name)
    return names


def default_lora_targets(model: nn.Module, include_vision: bool = False) -> list[str]:
    """Fully qualified names of the linear layers LoRA adapts by default: the language model's attention and MLP
    projections (:data:`LM_PROJECTIONS`; every linear layer of the language model when it names them otherwise),
    plus every linear layer of the vision tower with ``include_vision``. Full names, so peft's suffix matching can
    never reach a vision-tower layer that shares a projection's name (CLIP's ``q_proj``)."""
    lm = language_model_name(model)
    linears = [(n, m) for n, m in model.get_submodule(lm).named_modules() if isinstance(m, nn.Linear)]
    targets = [f"{lm}.{n}" for n, _ in linears if n.rsplit(".", 1)[-1] in LM_PROJECTIONS] or [
        f"{lm}.{n}" for n, _ in linears]
    if include_vision:
        for tower in vision_tower_names(model):
            targets += [f"{tower}.{n}" for n, m in model.get_submodule(tower).named_modules()
                        if isinstance(m, nn.Linear)]
    return targets


# ---- rendering and tokenising ------------------------------------------------------------------------------
def render_prompt_answer(processor: Any, messages: list[dict[str, Any]], answer: str) -> tuple[str, str]:
    """``(prompt_text, answer_text)`` through the processor's chat template, as TRL renders a preference example.

    The prompt is rendered with the generation prompt (or continuing a final assistant message), prompt + answer
    as one conversation; the prompt text is their common prefix and the answer text the rest, so the template's
    end-of-turn tokens are part of the answer.
    """
    ends_with_assistant = messages[-1]["role"] == "assistant"
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=not ends_with_assistant,
                                           continue_final_message=ends_with_assistant)
    full = processor.apply_chat_template(
        messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}], tokenize=False)
    prefix = "".join(a for a, _ in takewhile(lambda ab: ab[0] == ab[1], zip(prompt, full)))
    return prefix, full[len(prefix):]


def _fit_pixels(image: Any, max_pixels: int | None) -> Any:
    """``image`` downscaled (aspect kept, bicubic) so that its area is at most ``max_pixels``."""
    if max_pixels is None or image.width * image.height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (image.width * image.height))
    w, h = max(1, int(image.width * scale)), max(1, int(image.height * scale))
    while w * h > max_pixels and (w > 1 or h > 1):  # the floor may still leave one row or column too many
        w, h = (w - 1, h) if w >= h and w > 1 else (w, max(1, h - 1))
    from PIL import Image

    return image.resize((w, h), Image.Resampling.BICUBIC)


def _log(level: int, message: str) -> None:
    """Log on the main process only (every process audits its data; one report is enough)."""
    from accelerate.state import PartialState

    if PartialState._shared_state and not PartialState().is_main_process:
        return
    logger.log(level, message)


@dataclass
class _Row:
    """One sequence of the batch: a prompt, its images and the answer scored after it."""

    messages: list[dict[str, Any]]
    images: list[Any]
    answer: str
    origin: str | None


class VLMAdapter:
    """Summed answer log-probs of an image-text-to-text model, chosen and rejected in one forward."""

    score_kind = "logp"
    stochastic_scores = False
    dataset_formats = VLM_FORMATS
    Config = VLMAdapterConfig

    def __init__(self, config: VLMAdapterConfig) -> None:
        self.config = config
        self.base_dir: Path | None = None
        self.model, self.processor = load_vlm(config.pretrained, dtype=config.dtype,
                                              attn_implementation=config.attn_implementation)
        self.tokenizer = self.processor.tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if getattr(self.processor, "chat_template", None) is None:
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise ValueError(f"{config.pretrained}: neither the processor nor its tokenizer has a chat template; "
                                 "save one with the processor (processor.chat_template = ...; save_pretrained)")
            self.processor.chat_template = self.tokenizer.chat_template  # older repos keep it on the tokenizer only
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.image_token_id = getattr(self.processor, "image_token_id", None)
        if self.image_token_id is None:
            self.image_token_id = getattr(self.model.config, "image_token_id", None)
        self.dtype = next(self.model.parameters()).dtype
        # compute only the logits the answers need, where the model's forward can (transformers' logits_to_keep)
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self.vision_towers = vision_tower_names(self.model)
        if config.freeze_vision_tower:
            if not self.vision_towers:
                raise ValueError(f"{type(self.model).__name__}: no vision tower found (looked for "
                                 f"{', '.join(_VISION_ATTRS)}); set model.freeze_vision_tower=false")
            for name in self.vision_towers:
                self.model.get_submodule(name).requires_grad_(False)
        self.lora_target_modules = list(config.lora_target_modules or default_lora_targets(
            self.model, include_vision=not config.freeze_vision_tower))
        text_config = self.model.config.get_text_config()
        self.max_length = config.max_length or int(getattr(text_config, "max_position_embeddings", 0) or 0) or None
        if self.max_length is None:
            raise ValueError(f"{config.pretrained}: the model names no max_position_embeddings; set model.max_length")
        self.length_audit: LengthAudit | None = None
        self._fingerprint = pretrained_fingerprint(
            config, config.pretrained, [None], modules={"": self.model},
            extra={"model_type": self.model.config.model_type, "max_length": self.max_length},
            ignore=("pretrained", "lora_target_modules", "freeze_vision_tower", "save_merged"),
        )

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> VLMAdapter:
        return cls(from_dict(VLMAdapterConfig, data, path="model"))

    def fingerprint(self) -> str:
        return self._fingerprint

    # ---- records -> rows -------------------------------------------------------------------------------
    def _rows(self, record: Any, max_pixels: int | None) -> tuple[list[_Row], VLMExample]:
        """The record's rows: ``[chosen, rejected]`` (paired; the rejected one under ``rejected_images`` for an
        image-side rejection) or ``[completion]`` (unpaired); every image loaded and fitted to the pixel budget."""
        ex = vlm_example(record)
        budgets = [p for p in (self.config.max_image_pixels, max_pixels) if p is not None]
        budget = min(budgets) if budgets else None

        def load(values: list[Any]) -> list[Any]:
            return [_fit_pixels(load_image(v, self.base_dir, ex.origin), budget) for v in values]

        images = load(ex.images)
        rows = [_Row(ex.messages, images, ex.chosen, ex.origin)]
        if ex.rejected is not None:
            rows.append(_Row(ex.messages, load(ex.rejected_images) if ex.image_side else images, ex.rejected,
                             ex.origin))
        return rows, ex

    def _encode(self, rows: list[_Row]) -> dict[str, Any]:
        """Tokenise rows into ``[prompt ; answer ; padding]`` sequences.

        Returns:
            ``inputs``: the model's keyword arguments (``input_ids`` ``(N, T)``, ``attention_mask``, the image
            tensors the processor makes, per-token type ids); ``response_mask`` ``(N, T)`` bool, True on answer
            tokens only; ``prompt_lengths`` and ``image_tokens`` ``(N,)``.
        """
        prompts, answers = zip(*(render_prompt_answer(self.processor, r.messages, r.answer) for r in rows))
        images = [r.images for r in rows]
        kwargs = {"images": images} if any(images) else {}
        enc = self.processor(text=list(prompts), padding=True, padding_side="right", return_tensors="pt",
                             add_special_tokens=False, **kwargs)
        answer_ids = self.tokenizer(list(answers), add_special_tokens=False)["input_ids"]
        prompt_lengths = enc["attention_mask"].sum(1)  # (N,): right-padded, so the real prompt is a prefix
        for r, ids in zip(rows, answer_ids):
            if not ids:
                raise DataError(f"{r.origin + ': ' if r.origin else ''}the answer {r.answer!r:.60} renders to no "
                                "tokens")
            if self.image_token_id is not None and self.image_token_id in ids:
                raise DataError(f"{r.origin + ': ' if r.origin else ''}the answer {r.answer!r:.60} holds the image "
                                "token; images belong to the prompt")
        width = max(int(p) + len(a) for p, a in zip(prompt_lengths, answer_ids))
        n = len(rows)
        per_token = {k: enc[k] for k in _PER_TOKEN if k in enc}
        out = {k: torch.full((n, width), self.pad_id if k == "input_ids" else 0, dtype=v.dtype)
               for k, v in per_token.items()}
        response = torch.zeros((n, width), dtype=torch.bool)
        for i, (p, ids) in enumerate(zip(prompt_lengths.tolist(), answer_ids)):
            for k, v in per_token.items():
                out[k][i, :p] = v[i, :p]
            out["input_ids"][i, p:p + len(ids)] = torch.tensor(ids, dtype=out["input_ids"].dtype)
            out["attention_mask"][i, :p + len(ids)] = 1  # answers are text: token types stay 0
            response[i, p:p + len(ids)] = True
        inputs = {k: v for k, v in enc.items() if k not in per_token}
        inputs.update(out)
        image_tokens = ((out["input_ids"] == self.image_token_id).sum(1) if self.image_token_id is not None
                        else torch.zeros(n, dtype=torch.long))
        return {"inputs": inputs, "response_mask": response, "prompt_lengths": prompt_lengths,
                "image_tokens": image_tokens}

    def measure(self, record: Any, max_image_pixels: int | None = None) -> Length:
        """The record's :class:`~mm_align.vlm.length_audit.Length` at a pixel budget (the length audit's probe):
        its rows tokenised exactly as :meth:`collate` does."""
        rows, _ = self._rows(record, max_image_pixels)
        enc = self._encode(rows)
        totals = enc["inputs"]["attention_mask"].sum(1)
        longest = int(torch.argmax(enc["prompt_lengths"]))
        pixels = max((im.width * im.height for r in rows for im in r.images), default=0)
        return Length(int(totals.max()), int(enc["prompt_lengths"][longest]), int(enc["image_tokens"][longest]),
                      pixels)

    def _fit(self, index: int, record: Any) -> tuple[Length, Any]:
        return fit_record(record, self.measure, self.max_length, self.config.audit, self.config.min_image_pixels,
                          self.config.resize_step, index=index, start_pixels=record.meta.get(MAX_PIXELS_KEY))

    # ---- the dataset -------------------------------------------------------------------------------------
    def prepare(self, records: list[Any]) -> list[Any]:
        """The length audit, once per training set before the first step (:func:`~mm_align.vlm.length_audit
        .audit_records`): a record longer than ``max_length`` is resized (its pixel budget stored in
        ``meta["max_image_pixels"]``) or dropped; the table of both is logged and kept in :attr:`length_audit`.

        Returns:
            The records to train on (dropped ones left out): the trainer trains on this list, so a dropped record
            never reaches :meth:`collate` (which would refuse it by name).
        """
        audit = audit_records(records, self.measure, self.max_length, self.config.audit,
                              self.config.min_image_pixels, self.config.resize_step)
        self.length_audit = audit
        _log(logging.WARNING if audit.rows else logging.INFO, audit.table())
        return audit.kept

    def collate(self, records: list[Any], seeds: list[int]) -> dict[str, Any]:
        """Rows ``[all chosen ; all rejected]`` (or the completions, unpaired) tokenised into one padded batch.

        ``seeds`` are unused: nothing is drawn (``stochastic_scores = False``), so cached reference scores are
        exact. Each record is scored at the pixel budget the length audit chose for it; a record the audit has not
        seen (eval data, a direct :func:`~mm_align.trainer.train` call) is fitted here the same way.

        Raises:
            DataError: naming the record, when it cannot fit ``max_length`` (the audit drops such records), when
                the batch mixes paired and unpaired records, or for a bad image or answer.
        """
        unpaired = isinstance(records[0], UnpairedSample)
        kind = UnpairedSample if unpaired else PreferencePair
        for r in records:
            if not isinstance(r, kind):
                raise DataError(f"a batch mixes record types: {type(r).__name__} next to {kind.__name__}")
        per_record = [self._rows(r, r.meta.get(MAX_PIXELS_KEY))[0] for r in records]
        batch = self._batch(per_record)
        lengths = batch["inputs"]["attention_mask"].sum(1).view(-1, len(records)).amax(0)  # (B,) longest side
        too_long = [i for i, t in enumerate(lengths.tolist()) if t > self.max_length]
        if too_long:
            for i in too_long:
                _, row = self._fit(i, records[i])
                if row is None or row.action == "dropped":
                    where = records[i].origin or f"batch position {i}"
                    raise DataError(f"{where}: does not fit max_length {self.max_length} "
                                    f"({row.why if row else 'longer than max_length'}); the length audit "
                                    "(VLMAdapter.prepare) drops such records before training, and nothing is "
                                    "ever truncated. Audit the data first, raise model.max_length or lower "
                                    "model.max_image_pixels.")
                _log(logging.WARNING, f"{records[i].origin or f'batch position {i}'}: {row.why} (fitted at collate)")
                per_record[i] = self._rows(records[i], row.max_image_pixels)[0]
            batch = self._batch(per_record)
        if unpaired:
            batch["desirable"] = torch.tensor([bool(r.desirable) for r in records])
        return batch

    def _batch(self, per_record: list[list[_Row]]) -> dict[str, Any]:
        sides = len(per_record[0])
        rows = [rs[s] for s in range(sides) for rs in per_record]  # side-major: [all chosen ; all rejected]
        enc = self._encode(rows)
        return {"inputs": enc["inputs"], "response_mask": enc["response_mask"]}

    # ---- scores ------------------------------------------------------------------------------------------
    def scores(self, batch: dict[str, Any], model: nn.Module) -> Scores:
        """``log π(y | x) = Σ_t mask_t · log p(y_t | y_<t, x)`` over each row's answer tokens, one forward over the
        2B rows ``[chosen ; rejected]`` (or B completions).

        Only the logits of positions that predict an answer token are computed: from the first answer token of the
        batch on (``logits_to_keep``), so the image and prompt positions never build a ``(T, V)`` row.
        """
        inputs = {k: (v.to(self.dtype) if torch.is_floating_point(v) else v) for k, v in batch["inputs"].items()}
        ids, mask = inputs["input_ids"], batch["response_mask"]  # (N, T)
        keep = ids.shape[1]
        kwargs: dict[str, Any] = {}
        if self._keeps_logits:
            first = int(mask.float().argmax(1).min())  # the batch's earliest answer token
            keep = kwargs["logits_to_keep"] = ids.shape[1] - first + 1  # logits of positions first-1 .. T-1
        logits = model(**inputs, use_cache=False, **kwargs).logits  # (N, keep, V)
        logp, n = sequence_logps(logits, ids[:, -keep:], mask[:, -keep:], shift=True)  # (N,), (N,)
        if "desirable" in batch:
            return Scores("logp", logp, desirable=batch["desirable"], n_tokens_chosen=n)
        b = logp.shape[0] // 2
        return Scores("logp", logp[:b], logp[b:], n_tokens_chosen=n[:b], n_tokens_rejected=n[b:])

    # ---- export ------------------------------------------------------------------------------------------
    def save(self, model: nn.Module, output_dir: str, lora: bool, state_dict: dict[str, Any] | None = None) -> None:
        """The trained weights in transformers / peft formats, with the processor beside them.

        - LoRA: a peft adapter directory (``adapter_config.json`` naming ``pretrained`` as its base,
          ``adapter_model.safetensors``): ``PeftModel.from_pretrained(AutoModelForImageTextToText
          .from_pretrained(base), output_dir)``. With ``save_merged``, also ``merged/``: the base loaded afresh,
          the saved adapter applied and merged by peft itself (``merge_and_unload``), ``save_pretrained`` of the
          model and processor; the base is loaded before anything is written.
        - Full fine-tuning: ``save_pretrained`` of the model (from ``state_dict`` when the trainer gathered one
          from a sharded engine) and of the processor.

        Raises:
            ValueError: ``lora`` is set but ``model`` holds no peft adapter.
        """
        out = Path(output_dir)
        if not lora:
            out.mkdir(parents=True, exist_ok=True)
            kw = {} if state_dict is None else {"state_dict": state_dict}
            model.save_pretrained(out, **kw)
            self.processor.save_pretrained(out)
            return
        peft_config = getattr(model, "peft_config", {}).get(ADAPTER_NAME)
        if peft_config is None:
            raise ValueError(f"cannot save a LoRA: {type(model).__name__} holds no peft adapter {ADAPTER_NAME!r}")
        base = None
        if self.config.save_merged:  # a base that cannot be loaded fails before any file is written
            base, _ = load_vlm(self.config.pretrained, dtype=self.config.dtype)
        src = Path(self.config.pretrained)
        peft_config.base_model_name_or_path = str(src.resolve()) if src.is_dir() else self.config.pretrained
        out.mkdir(parents=True, exist_ok=True)
        peft_config.save_pretrained(str(out))
        # a PeftModel wraps the base as base_model.model: its saved keys carry that prefix
        state = {f"base_model.model.{k}": v for k, v in lora_state_dict(model, state_dict).items()}
        save_file(state, str(out / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        self.processor.save_pretrained(out)
        if base is not None:
            from peft import PeftModel

            merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
            tmp = out / ".merged.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            merged.save_pretrained(tmp)
            self.processor.save_pretrained(tmp)
            if (out / "merged").exists():
                shutil.rmtree(out / "merged")
            os.replace(tmp, out / "merged")
