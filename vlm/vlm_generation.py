"""Batched greedy generation from a transformers image-text-to-text model, with the attention share on each image.

One path for every component that asks a VLM for answers: the bench runners (``mm-align bench vlm``) and the
MIA-DPO data builder (ALGORITHMS.md §5), which needs the model's own greedy answers and how much those answers
attended to each image.

- **Rendering**: each prompt's chat messages (the normalised form of :mod:`mm_align.vlm.vlm_records`, one
  ``{"type": "image"}`` part per image) through the model's own chat template with ``add_generation_prompt=True``;
  tokenised by the processor with its images (``add_special_tokens=False``: the template holds BOS), **left
  padded** so every row's prompt ends at the same column and generation appends after it.
- **Greedy**: ``do_sample=False``, one beam, ``max_new_tokens``; no randomness, so the same model, prompts and
  batch size give the same answers. A row's answer is its generated tokens up to (not including) the first
  end-of-sequence token; the text is those tokens decoded with special tokens skipped, stripped.
- **Attention share** (``attention_layer=L``; the model must run eager attention, which is switched on when it is
  not): ``generate(output_attentions=True)`` returns, for every generation step, the attention of each layer
  ``(B, heads, queries, keys)``. The query that produces answer token ``k`` is the last query of step ``k`` (the
  last prompt position for ``k = 0``, answer token ``k − 1`` after). For each answer token, the layer-``L``
  attention of that query is averaged over heads and summed over each image's token positions; the **mass** of
  image ``i`` is the mean of that sum over the answer's tokens, and its **share** is ``mass_i / Σ_j mass_j``
  (MIA-DPO's ``attn(target) / Σ attn(all images)``). An image's positions are the prompt's image tokens (the
  processor's ``image_token_id``) split in order into per-image runs: for Qwen2-VL-type processors by
  ``image_grid_thw`` (``t·h·w / merge_size²`` tokens an image), else into equal parts (LLaVA: a fixed count per
  image), else by contiguous runs when there are as many runs as images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mm_align.vlm.vlm_records import count_image_placeholders, load_image
from torch import nn

__all__ = ["Generation", "render_prompt", "image_token_counts", "image_positions", "greedy_generate",
           "greedy_answers"]

Prompt = tuple[list[dict[str, Any]], Sequence[Any]]


@dataclass
class Generation:
    """One prompt's greedy answer.

    Args:
        text: the answer decoded (special tokens skipped, stripped).
        token_ids: the answer's token ids, up to (not including) the first end-of-sequence token.
        image_attention: with ``attention_layer``: each image's share of the answer's attention to images (sums to
            1), in image order; None without it, or when the answer has no tokens.
        image_attention_mass: with ``attention_layer``: each image's mean attention mass per answer token (the
            fraction of all attention that went to the image's tokens).
    """

    text: str
    token_ids: list[int]
    image_attention: list[float] | None = None
    image_attention_mass: list[float] | None = None


def render_prompt(processor: Any, messages: list[dict[str, Any]]) -> str:
    """The prompt text through the processor's chat template, ready for the assistant's answer."""
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _image_token_id(model: nn.Module, processor: Any) -> int | None:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        token_id = getattr(getattr(model, "config", None), "image_token_id", None)
    return None if token_id is None else int(token_id)


def image_token_counts(enc: dict[str, Any], processor: Any, images_per_row: Sequence[int]) -> list[list[int]] | None:
    """Per row, the number of image tokens of each of its images, when the processor says (``image_grid_thw``:
    ``t·h·w / merge_size²`` per image, rows' images in batch order); None otherwise."""
    grid = enc.get("image_grid_thw")
    if grid is None:
        return None
    merge = int(getattr(getattr(processor, "image_processor", None), "merge_size", 1) or 1)
    sizes = [int(t * h * w) // (merge * merge) for t, h, w in grid.tolist()]
    out, start = [], 0
    for n in images_per_row:
        out.append(sizes[start:start + n])
        start += n
    return out


def image_positions(row_ids: torch.Tensor, image_token_id: int, n_images: int,
                    counts: Sequence[int] | None = None) -> list[list[int]]:
    """The token positions of each image in one row of ``input_ids`` (module docstring).

    Args:
        row_ids: ``(T,)`` token ids of one (padded) row.
        image_token_id: the processor's image token.
        n_images: how many images the row holds.
        counts: the image token count of each image, when known (``image_grid_thw``).

    Raises:
        ValueError: the image tokens cannot be split into ``n_images`` images.
    """
    positions = (row_ids == image_token_id).nonzero().flatten().tolist()
    if n_images == 0:
        return []
    if counts is not None:
        if sum(counts) != len(positions):
            raise ValueError(f"the row has {len(positions)} image tokens but its images account for {sum(counts)}")
        out, start = [], 0
        for c in counts:
            out.append(positions[start:start + c])
            start += c
        return out
    if positions and len(positions) % n_images == 0:
        size = len(positions) // n_images
        return [positions[i * size:(i + 1) * size] for i in range(n_images)]
    runs: list[list[int]] = []
    for p in positions:
        if runs and p == runs[-1][-1] + 1:
            runs[-1].append(p)
        else:
            runs.append([p])
    if len(runs) == n_images:
        return runs
    raise ValueError(f"cannot split {len(positions)} image tokens ({len(runs)} runs) into {n_images} images")


def _eos_ids(model: nn.Module, processor: Any) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    tok = getattr(processor, "tokenizer", processor)
    if getattr(tok, "eos_token_id", None) is not None:
        ids.add(int(tok.eos_token_id))
    return {int(i) for i in ids}


def _use_eager(model: nn.Module) -> None:
    config = model.config
    if getattr(config, "_attn_implementation", None) != "eager":
        model.set_attn_implementation("eager")


def _batches(has_images: list[bool], batch_size: int) -> list[list[int]]:
    """Consecutive index batches of at most ``batch_size``, each all with images or all without."""
    out: list[list[int]] = []
    for i, flag in enumerate(has_images):
        if out and len(out[-1]) < batch_size and has_images[out[-1][0]] == flag:
            out[-1].append(i)
        else:
            out.append([i])
    return out


@torch.inference_mode()
def greedy_generate(
    model: nn.Module,
    processor: Any,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    attention_layer: int | None = None,
    base_dir: str | Path | None = None,
    origins: Sequence[str | None] | None = None,
    progress: Callable[[int], Any] | None = None,
) -> list[Generation]:
    """Greedy answers to ``prompts``, batched, with optionally the attention share on each image (module docstring).

    Args:
        model: an image-text-to-text model (``AutoModelForImageTextToText``; a peft model over one works too).
        processor: its processor (chat template, tokenizer, image processor).
        prompts: ``(messages, images)`` pairs: normalised chat messages and one image per ``{"type": "image"}``
            part (as stored: paths, bytes, datasets image dicts or PIL images).
        max_new_tokens: the longest answer, in tokens.
        batch_size: prompts per ``generate`` call.
        attention_layer: the decoder layer whose attention gives the image shares (negative counts from the last);
            None: no attention (cheaper).
        base_dir: where relative image paths are resolved.
        origins: per prompt, where it came from (for error messages).
        progress: called with the number of prompts done after each batch.

    Returns:
        One :class:`Generation` per prompt, in order.

    Raises:
        ValueError: ``max_new_tokens`` or ``batch_size`` below 1, a prompt whose image placeholders and images differ
            in number, an ``attention_layer`` out of range, or image tokens that cannot be split per image.
        DataError: an image that cannot be read (naming the prompt's origin).
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens} and {batch_size}")
    origins = list(origins) if origins is not None else [None] * len(prompts)
    for i, (messages, images) in enumerate(prompts):
        n = count_image_placeholders(messages)
        if n != len(images):
            where = origins[i] or f"prompt {i}"
            raise ValueError(f"{where}: the messages hold {n} image placeholder(s) but {len(images)} image(s) came")
    image_token_id = _image_token_id(model, processor)
    if attention_layer is not None:
        if image_token_id is None:
            raise ValueError("attention shares need the processor's image_token_id, which this processor lacks")
        _use_eager(model)
    tokenizer = getattr(processor, "tokenizer", processor)
    pad_id = model.generation_config.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(model, processor)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    results: list[Generation | None] = [None] * len(prompts)
    for batch in _batches([len(prompts[i][1]) > 0 for i in range(len(prompts))], batch_size):
        texts = [render_prompt(processor, prompts[i][0]) for i in batch]
        images = [[load_image(v, Path(base_dir) if base_dir else None, origins[i]) for v in prompts[i][1]]
                  for i in batch]
        kwargs: dict[str, Any] = {"images": images} if images[0] else {}
        enc = processor(text=texts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt",
                        **kwargs)
        inputs = {k: (v.to(device, dtype) if torch.is_floating_point(v) else v.to(device))
                  for k, v in enc.items() if isinstance(v, torch.Tensor)}
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad_id, return_dict_in_generate=True,
                             output_attentions=attention_layer is not None)
        prompt_len = inputs["input_ids"].shape[1]
        new = out.sequences[:, prompt_len:].cpu()  # (B, steps)
        counts = image_token_counts(enc, processor, [len(x) for x in images]) if attention_layer is not None else None
        for row, i in enumerate(batch):
            ids = new[row].tolist()
            stop = next((k for k, t in enumerate(ids) if t in eos), len(ids))
            ids = ids[:stop]
            gen = Generation(tokenizer.decode(ids, skip_special_tokens=True).strip(), ids)
            if attention_layer is not None:
                spans = image_positions(enc["input_ids"][row], image_token_id, len(images[row]),
                                        counts[row] if counts is not None else None)
                gen.image_attention_mass, gen.image_attention = _image_attention(
                    out.attentions, attention_layer, row, spans, len(ids))
            results[i] = gen
        if progress is not None:
            progress(len(batch))
    return [r for r in results if r is not None]


def _image_attention(attentions: tuple, layer: int, row: int, spans: list[list[int]], n_tokens: int
                     ) -> tuple[list[float] | None, list[float] | None]:
    """``(mass, share)`` of each image for one row's answer (module docstring); ``(None, None)`` for no tokens."""
    if n_tokens == 0 or not spans:
        return None, None
    n_layers = len(attentions[0])
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"attention_layer {layer} is out of range for a model with {n_layers} layers")
    mass = torch.zeros(len(spans), dtype=torch.float64)
    for step in range(n_tokens):
        attn = attentions[step][layer][row, :, -1, :].double().mean(0).cpu()  # (keys,): the producing query
        mass += torch.stack([attn[s].sum() for s in spans])
    mass /= n_tokens
    total = float(mass.sum())
    share = (mass / total).tolist() if total > 0 else [0.0] * len(spans)
    return mass.tolist(), share


def greedy_answers(
    model: nn.Module,
    processor: Any,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    base_dir: str | Path | None = None,
    origins: Sequence[str | None] | None = None,
    progress: Callable[[int], Any] | None = None,
) -> list[str]:
    """The greedy answers' texts (:func:`greedy_generate` without attention)."""
    return [g.text for g in greedy_generate(model, processor, prompts, max_new_tokens, batch_size, None, base_dir,
                                            origins, progress)]
