"""A small :class:`~mm_align.types.PreferenceAdapter` for a transformers causal LM over text pairs.

The log-prob path of the core (``mm_align.scores.sequence_logps`` and the sequence losses) on a real
transformers model instead of the synthetic MLP. Records are :class:`~mm_align.data.PreferencePair`
(``prompt``, ``chosen``, ``rejected`` strings) or :class:`~mm_align.data.UnpairedSample` (KTO). A
sequence is ``[bos] + prompt + response + [eos]``; the response mask covers the response tokens and
``eos`` (the prompt and ``bos`` are excluded, as DPO's ``logπ(y | x)`` requires).

Also a helper that builds a word-level tokenizer in process (no download): :func:`build_word_tokenizer`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from mm_align.config import from_dict, option
from mm_align.data import PreferencePair, UnpairedSample
from mm_align.fingerprint import state_dict_fingerprint
from mm_align.lora import ADAPTER_NAME, lora_state_dict
from mm_align.scores import sequence_logps
from mm_align.types import Scores

__all__ = ["TextLMConfig", "TextLMAdapter", "build_word_tokenizer", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}

# peft's own file names: PeftModel.from_pretrained(base, dir) reads these
PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"

# default LoRA targets by transformers model_type (attention query and value projections)
_DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``words`` plus ``<pad> <unk> <s> </s>`` (ids 0–3), built offline.

    Args:
        words: the vocabulary, in id order after the four special tokens; duplicates are an error.

    Returns:
        A ``PreTrainedTokenizerFast``; ``save_pretrained`` + ``AutoTokenizer.from_pretrained`` round-trip it.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = list(SPECIAL_TOKENS.values())
    vocab = specials + list(words)
    if len(set(vocab)) != len(vocab):
        raise ValueError("build_word_tokenizer: duplicate words (or a word equal to a special token)")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        padding_side="right",
    )


@dataclass
class TextLMConfig:
    """A causal LM and its tokenizer from local directories (``save_pretrained`` layout)."""

    pretrained: str = option(help="Directory (or hub id) of an AutoModelForCausalLM.")
    tokenizer: str | None = option(None, help="Tokenizer directory; None = the model's directory.")
    max_length: int = option(128, help="Longest prompt + response in tokens; a longer record is an error.")
    lora_target_modules: list[str] | None = option(
        None, help="LoRA targets; None = the attention q/v projections of the model type."
    )
    disable_dropout: bool = option(
        True, help="Set every dropout to 0 (as TRL): the trainer runs both passes in train mode."
    )


class TextLMAdapter:
    """Summed response log-probs of a transformers causal LM on text preference records."""

    score_kind = "logp"
    stochastic_scores = False
    dataset_formats: dict[str, str] = {}
    Config = TextLMConfig

    def __init__(self, config: TextLMConfig) -> None:
        self.config = config
        self.base_dir: Path | None = None
        self.model: nn.Module = AutoModelForCausalLM.from_pretrained(config.pretrained)
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.pretrained)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if getattr(self.tokenizer, name) is None:
                raise ValueError(f"the tokenizer of {config.tokenizer or config.pretrained} has no {name[:-3]}")
        if config.disable_dropout:
            for m in self.model.modules():
                if isinstance(m, nn.Dropout):
                    m.p = 0.0
        model_type = self.model.config.model_type
        targets = config.lora_target_modules or _DEFAULT_TARGETS.get(model_type)
        if not targets:
            raise ValueError(
                f"no default LoRA targets for model_type '{model_type}' "
                f"(known: {', '.join(sorted(_DEFAULT_TARGETS))}); set lora_target_modules"
            )
        self.lora_target_modules = list(targets)
        settings = {
            "adapter": asdict(config),
            "model_config": self.model.config.to_json_string(use_diff=False),
            "vocab": sorted(self.tokenizer.get_vocab().items()),
        }
        self._fingerprint = state_dict_fingerprint(settings, self.model)  # the base weights, before LoRA

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> TextLMAdapter:
        return cls(from_dict(TextLMConfig, data, path="model"))

    def fingerprint(self) -> str:
        return self._fingerprint

    # ---- batches ------------------------------------------------------------------------------
    def _encode(self, record: Any, prompt: Any, response: Any) -> tuple[list[int], list[int]]:
        """``(ids, response_mask)`` of ``[bos] + prompt + response + [eos]``."""
        for name, text in (("prompt", prompt), ("response", response)):
            if not isinstance(text, str):
                raise ValueError(f"record {record.id!r}: {name} must be a string, got {type(text).__name__}")
        tok = self.tokenizer
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = [tok.bos_token_id] + p + r
        if len(ids) > self.config.max_length:
            raise ValueError(f"record {record.id!r}: {len(ids)} tokens > max_length {self.config.max_length}")
        return ids, [0] * (1 + len(p)) + [1] * len(r)

    def _pad(self, rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in rows])  # (N, T), right-padded
        attention = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in rows])  # (N, T)
        response = torch.tensor([m + [0] * (width - len(m)) for _, m in rows])  # (N, T)
        return {"input_ids": ids, "attention_mask": attention, "response_mask": response}

    def collate(self, records: list[Any], seeds: list[int]) -> dict[str, torch.Tensor]:
        """Paired: rows ``[all chosen ; all rejected]`` (2B); unpaired: one row per sample and ``desirable``.

        ``seeds`` are unused: the scores are deterministic (``stochastic_scores`` is False).
        """
        if isinstance(records[0], UnpairedSample):
            batch = self._pad([self._encode(r, r.prompt, r.completion) for r in records])
            batch["desirable"] = torch.tensor([bool(r.desirable) for r in records])
            return batch
        for r in records:
            if not isinstance(r, PreferencePair):
                raise ValueError(f"a batch mixes record types: {type(r).__name__} next to PreferencePair")
        rows = [self._encode(r, r.prompt, r.chosen) for r in records]
        rows += [self._encode(r, r.prompt, r.rejected) for r in records]
        return self._pad(rows)

    def scores(self, batch: dict[str, torch.Tensor], model: nn.Module) -> Scores:
        """One forward over every row; ``log π(y | x)`` summed over the response (:func:`sequence_logps`)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (N, T, V)
        logp, n = sequence_logps(logits, batch["input_ids"], batch["response_mask"], shift=True)  # (N,), (N,)
        if "desirable" in batch:
            return Scores("logp", logp, desirable=batch["desirable"], n_tokens_chosen=n)
        b = logp.shape[0] // 2
        return Scores("logp", logp[:b], logp[b:], n_tokens_chosen=n[:b], n_tokens_rejected=n[b:])

    # ---- output -------------------------------------------------------------------------------
    def save(self, model: nn.Module, output_dir: str, lora: bool) -> None:
        """A peft adapter directory (``PeftModel.from_pretrained(base, dir)``), or the full model.

        The tokenizer is saved beside it either way.
        """
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if lora:
            peft_config = model.peft_config[ADAPTER_NAME]  # type: ignore[index]
            peft_config.base_model_name_or_path = self.config.pretrained
            peft_config.save_pretrained(str(out))
            # PeftModel wraps the base as base_model.model: its saved keys carry that prefix
            state = {f"base_model.model.{k}": v for k, v in lora_state_dict(model).items()}
            save_file(state, str(out / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        else:
            model.save_pretrained(str(out))  # type: ignore[operator]
        self.tokenizer.save_pretrained(str(out))
