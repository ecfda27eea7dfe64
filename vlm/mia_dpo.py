"""MIA-DPO's attention-aware selection of rejected answers (Liu et al. 2024, "MIA-DPO", arXiv 2410.17637, §3.3;
ALGORITHMS.md §5), over the augmented prompts of :mod:`mm_align.vlm.mia_augment`.

The model answers every augmented prompt greedily (:func:`~mm_align.vlm.vlm_generation.greedy_generate`), with the
attention of one decoder layer (``attention_layer``; default the middle one, ``n_layers // 2``, as layer 16 of 32 in
LLaVA-1.5, where the paper reads it). The **ratio** is how much of the answer's attention to the image(s) went to the
target, per answer token the producing query's attention averaged over heads, then averaged over the answer's tokens:

- ``sequence``: the target image's share of the attention to all images,
  ``ratio = attn(target) / Σ attn(all images)`` (the :class:`~mm_align.vlm.vlm_generation.Generation`'s
  ``image_attention`` of the target);
- ``grid`` and ``pic_in_pic`` (one image): the share of the image's tokens whose patch lies in the target's region
  (``meta["augmentation"]["region_box"]``: the target tile grown by half a margin; the pasted centre) in the
  attention to all of the image's tokens, as the authors' code reads a collage's block and the central region of
  the patch grid. The patch layout comes from the processor: Qwen2-VL-type processors give it (``image_grid_thw``:
  ``h / merge × w / merge`` tokens, row-major, covering the whole resized image); otherwise the image's token count
  must be a square ``g × g`` (LLaVA's CLIP patch grid, CLS dropped) laid over the image as the image processor
  sees it (shortest-edge resize or fixed resize, then the centre crop when ``do_center_crop``). A token belongs to
  the region when its patch's centre, mapped back to the image, lies in it. Per-token attention comes from one
  forward over prompt + answer with ``output_attentions`` (the same numbers ``generate`` produced; tested there).
  Where no layout can be read (a token count that is no square and no ``image_grid_thw``: tiled or anyres
  processors such as Idefics3 or LLaVA-NeXT), the ratio is not computed and the sample is discarded as
  ``region_unavailable`` (counted): no guessed layout.

**Rule** (``rejection="attention"``): the model's answer becomes the rejected answer when it is not empty, differs
from the ground truth (:func:`normalise_answer`: case-folded, whitespace collapsed, leading / trailing whitespace
and punctuation ``.,;:!?'"`` stripped, so "Red." equals "red") and ``ratio < threshold`` (:data:`THRESHOLDS`:
sequence 2→0.8, 3→0.7, 4–5→0.6; grid 2→0.7, 3→0.6, 4→0.5, 6→0.4, 9→0.3; pic-in-pic 0.8). The chosen answer is the
ground truth. Discards are counted by reason (:data:`REASONS`).

``rejection="random"`` is the ablation: the model's answer is the rejected one whatever its attention (still not
empty and differing from the ground truth); the ratio is still computed and recorded, so the data says which pairs
the attention rule would have kept. ``random_pairs="matched"`` keeps instead a seeded random subset of those, of
the size the attention rule keeps per format, so the two runs differ only in WHICH pairs they hold. (The paper's
own ablations are "w/o post-selection" (Table 3) and GPT-4o-mini selection (Table 5); it reports no random
baseline, so this mode follows the definition above.)

Not implemented: the authors' post-selection filters after the attention rule (perplexity of the answer, length
ratio, edit distance), and the noise their scripts add to the target before generating to provoke errors; this
module implements the attention rule of §3.3 only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from mm_align.vlm.mia_augment import FORMATS, AugmentedSample
from mm_align.vlm.vlm_generation import (
    Generation,
    greedy_generate,
    image_positions,
    image_token_counts,
    render_prompt,
)
from mm_align.vlm.vlm_records import load_image, prompt_messages
from torch import nn

from mm_align.data import PreferencePair

__all__ = ["THRESHOLDS", "REASONS", "MIASelection", "threshold", "normalise_answer", "same_answer", "decide",
           "default_attention_layer", "region_share", "target_ratio", "select_rejections", "selection", "match_random",
           "preference_pairs"]

THRESHOLDS: dict[str, dict[int, float]] = {
    "sequence": {2: 0.8, 3: 0.7, 4: 0.6, 5: 0.6},
    "grid": {2: 0.7, 3: 0.6, 4: 0.5, 6: 0.4, 9: 0.3},
    "pic_in_pic": {2: 0.8},
}
"""Format -> number of source images -> the ratio under which a wrong answer is rejected (the paper's)."""

REASONS: dict[str, str] = {
    "empty_answer": "the model's answer is empty",
    "matches_ground_truth": "the model's answer equals the ground truth (normalised)",
    "attention_above_threshold": "the attention ratio on the target is at or above the format's threshold",
    "region_unavailable": "no patch layout to read the target region's attention from",
    "not_drawn": "random mode, matched size: not among the pairs drawn",
}
"""Why a sample gives no pair."""

_PUNCT = " \t\n.,;:!?'\""


@dataclass
class MIASelection:
    """What the selection decided for one augmented sample.

    Args:
        id: the sample's id.
        format: its format.
        n_images: its number of source images.
        answer: the model's greedy answer.
        ratio: the attention ratio on the target (None: empty answer, or not computable).
        threshold: the format's threshold.
        kept: whether the answer is the rejected answer of a pair.
        reason: why not (a key of :data:`REASONS`), None when kept.
        attention_rule: whether the attention rule keeps it (the same as ``kept`` in attention mode; recorded in
            random mode too).
    """

    id: str
    format: str
    n_images: int
    answer: str
    ratio: float | None
    threshold: float
    kept: bool
    reason: str | None
    attention_rule: bool


def threshold(fmt: str, n: int) -> float:
    """The MIA-DPO threshold of a format and image count (:data:`THRESHOLDS`).

    Raises:
        ValueError: naming the valid formats or counts.
    """
    if fmt not in THRESHOLDS:
        raise ValueError(f"unknown MIA-DPO format {fmt!r}; valid: {', '.join(THRESHOLDS)}")
    if n not in THRESHOLDS[fmt]:
        raise ValueError(f"format {fmt!r} has thresholds for {sorted(THRESHOLDS[fmt])} images, not {n}")
    return THRESHOLDS[fmt][n]


def normalise_answer(text: str) -> str:
    """The comparison form of an answer (module docstring): case-folded, whitespace collapsed, outer whitespace and
    punctuation stripped."""
    return " ".join(text.casefold().split()).strip(_PUNCT)


def same_answer(a: str, b: str) -> bool:
    """Whether two answers are the same after :func:`normalise_answer`."""
    return normalise_answer(a) == normalise_answer(b)


def decide(fmt: str, n: int, answer: str, ground_truth: str, ratio: float | None,
           rejection: Literal["attention", "random"] = "attention") -> str | None:
    """The rule for one sample (module docstring): None when ``answer`` becomes the rejected answer, else the reason.

    Args:
        fmt: the sample's format.
        n: its number of source images.
        answer: the model's greedy answer.
        ground_truth: the item's answer (the chosen one).
        ratio: the attention ratio on the target; None when it could not be computed.
        rejection: ``"attention"`` (the paper's rule) or ``"random"`` (attention ignored).

    Raises:
        ValueError: an unknown rejection mode, format or image count.
    """
    if rejection not in ("attention", "random"):
        raise ValueError(f"rejection must be 'attention' or 'random', got {rejection!r}")
    limit = threshold(fmt, n)
    if not normalise_answer(answer):
        return "empty_answer"
    if same_answer(answer, ground_truth):
        return "matches_ground_truth"
    if rejection == "random":
        return None
    if ratio is None or (isinstance(ratio, float) and math.isnan(ratio)):
        return "region_unavailable"
    return None if ratio < limit else "attention_above_threshold"


def default_attention_layer(model: nn.Module) -> int:
    """The middle decoder layer, ``n_layers // 2`` (layer 16 of LLaVA-1.5's 32)."""
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    n = getattr(text, "num_hidden_layers", None)
    if n is None:
        raise ValueError("the model's config names no num_hidden_layers; pass attention_layer")
    return int(n) // 2


# ---- the region share of a one-image prompt ------------------------------------------------------------------------
def _size_field(size: Any, key: str) -> Any:
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def _token_centres(canvas: tuple[int, int], grid: tuple[int, int], image_processor: Any, fixed_grid: bool
                   ) -> list[tuple[float, float]]:
    """The centre of each token's patch in canvas pixels, row-major over ``grid = (rows, cols)``.

    ``fixed_grid`` (a square ``g × g`` grid without ``image_grid_thw``): the grid covers the image as the processor
    crops it (shortest-edge or fixed resize, then the centre crop when ``do_center_crop``); otherwise it covers the
    whole (resized) image.
    """
    W, H = canvas
    rows, cols = grid
    rw, rh, cw, ch = float(W), float(H), float(W), float(H)
    if fixed_grid and image_processor is not None and getattr(image_processor, "do_resize", True):
        size = getattr(image_processor, "size", None)
        short = _size_field(size, "shortest_edge")
        if short:
            s = float(short) / min(W, H)
            rw, rh = W * s, H * s
        elif _size_field(size, "height") and _size_field(size, "width"):
            rw, rh = float(_size_field(size, "width")), float(_size_field(size, "height"))
        cw, ch = rw, rh
    if fixed_grid and image_processor is not None and getattr(image_processor, "do_center_crop", False):
        crop = getattr(image_processor, "crop_size", None)
        if _size_field(crop, "height") and _size_field(crop, "width"):
            cw, ch = float(_size_field(crop, "width")), float(_size_field(crop, "height"))
    ox, oy = (rw - cw) / 2, (rh - ch) / 2
    return [(((c + 0.5) / cols * cw + ox) * W / rw, ((r + 0.5) / rows * ch + oy) * H / rh)
            for r in range(rows) for c in range(cols)]


@torch.inference_mode()
def region_share(model: nn.Module, processor: Any, sample: AugmentedSample, answer_ids: Sequence[int], layer: int
                 ) -> float | None:
    """The attention share of the target region of a one-image sample (``grid`` / ``pic_in_pic``; module docstring):
    one forward over prompt + answer, the layer's attention of each answer token's producing query averaged over
    heads and tokens, summed over the region's image tokens, over the sum over all of the image's tokens.

    Returns:
        The share, or None when the answer is empty or the processor gives no patch layout.
    """
    if not answer_ids:
        return None
    aug = sample.augmentation
    messages = prompt_messages(sample.prompt)
    images = [load_image(v) for v in sample.images]
    if len(images) != 1:
        raise ValueError(f"{sample.id}: a region share needs a one-image sample, got {len(images)} images")
    enc = processor(text=[render_prompt(processor, messages)], images=[images], add_special_tokens=False,
                    return_tensors="pt")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    answer = torch.tensor([list(answer_ids)], dtype=enc["input_ids"].dtype)
    inputs: dict[str, Any] = {}
    for k, v in enc.items():
        if not isinstance(v, torch.Tensor):
            continue
        if k in ("input_ids", "mm_token_type_ids", "token_type_ids"):
            v = torch.cat([v, answer if k == "input_ids" else torch.zeros_like(answer)], 1)
        elif k == "attention_mask":
            v = torch.cat([v, torch.ones_like(answer)], 1)
        inputs[k] = v.to(device, dtype) if torch.is_floating_point(v) else v.to(device)
    image_token_id = getattr(processor, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(model.config, "image_token_id", None)
    if image_token_id is None:
        return None
    counts = image_token_counts(enc, processor, [1])
    span = image_positions(enc["input_ids"][0], int(image_token_id), 1, counts[0] if counts else None)[0]
    grid = enc.get("image_grid_thw")
    if grid is not None:
        t, h, w = (int(x) for x in grid[0].tolist())
        merge = int(getattr(processor.image_processor, "merge_size", 1) or 1)
        rows, cols, frames, fixed = h // merge, w // merge, t, False
    else:
        g = math.isqrt(len(span))
        if g * g != len(span) or g == 0:
            return None
        rows, cols, frames, fixed = g, g, 1, True
    if rows * cols * frames != len(span):
        return None
    config = model.config
    if getattr(config, "_attn_implementation", None) != "eager":
        model.set_attn_implementation("eager")
    attentions = model(**inputs, output_attentions=True).attentions
    n_layers = len(attentions)
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"attention_layer {layer} is out of range for a model with {n_layers} layers")
    prompt_len = enc["input_ids"].shape[1]
    queries = torch.arange(prompt_len - 1, prompt_len - 1 + len(answer_ids))
    attn = attentions[layer][0].double().mean(0)[queries]  # (answer tokens, keys): heads averaged
    per_token = attn[:, span].mean(0).cpu().reshape(frames, rows * cols).sum(0)  # (rows·cols,) row-major
    total = float(per_token.sum())
    if total <= 0:
        return None
    centres = _token_centres(tuple(aug["canvas_size"]), (rows, cols), getattr(processor, "image_processor", None),
                             fixed)
    x0, y0, x1, y1 = aug["region_box"]
    inside = torch.tensor([x0 <= x < x1 and y0 <= y < y1 for x, y in centres])
    if not bool(inside.any()):
        return None  # no patch centre inside the region: the layout is too coarse to read it
    return float(per_token[inside].sum()) / total


def target_ratio(model: nn.Module, processor: Any, sample: AugmentedSample, generation: Generation, layer: int
                 ) -> float | None:
    """The attention ratio on the target (module docstring): the target image's share for ``sequence``, the target
    region's share for ``grid`` / ``pic_in_pic``; None for an empty answer or no layout."""
    aug = sample.augmentation
    if aug["format"] == "sequence":
        if generation.image_attention is None:
            return None
        return float(generation.image_attention[int(aug["target"]) - 1])
    return region_share(model, processor, sample, generation.token_ids, layer)


# ---- selection -----------------------------------------------------------------------------------------------------
def select_rejections(
    model: nn.Module,
    processor: Any,
    samples: Sequence[AugmentedSample],
    rejection: Literal["attention", "random"] = "attention",
    attention_layer: int | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    progress: Callable[[int], Any] | None = None,
) -> list[MIASelection]:
    """Greedy answers to ``samples`` with their attention ratios, and the rule's decision for each (module docstring).

    Args:
        model: the image-text-to-text model whose own answers become the rejected ones (eager attention is
            switched on).
        processor: its processor.
        samples: augmented samples (:func:`~mm_align.vlm.mia_augment.augment`).
        rejection: ``"attention"`` or ``"random"``.
        attention_layer: the decoder layer read; None = :func:`default_attention_layer`.
        max_new_tokens: the longest answer.
        batch_size: prompts per ``generate`` call.
        progress: called with the number of samples done after each batch.

    Returns:
        One :class:`MIASelection` per sample, in order (``random_pairs="matched"`` is :func:`match_random`, applied
        after).
    """
    if rejection not in ("attention", "random"):
        raise ValueError(f"rejection must be 'attention' or 'random', got {rejection!r}")
    layer = default_attention_layer(model) if attention_layer is None else attention_layer
    prompts = [(prompt_messages(s.prompt), s.images) for s in samples]
    gens = greedy_generate(model, processor, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           attention_layer=layer, origins=[s.id for s in samples], progress=progress)
    return [selection(model, processor, s, g, layer, rejection) for s, g in zip(samples, gens)]


def selection(model: nn.Module, processor: Any, sample: AugmentedSample, generation: Generation, layer: int,
              rejection: Literal["attention", "random"] = "attention") -> MIASelection:
    """The decision for one sample and its greedy answer (the ratio is computed only for a wrong, non-empty answer:
    the others are discarded whatever it is)."""
    aug = sample.augmentation
    fmt, n = aug["format"], int(aug["n_images"])
    ratio = None
    pre = decide(fmt, n, generation.text, sample.answer, 0.0, "random")  # empty / equal to the ground truth?
    if pre is None:
        ratio = target_ratio(model, processor, sample, generation, layer)
    attention_reason = decide(fmt, n, generation.text, sample.answer, ratio, "attention")
    reason = attention_reason if rejection == "attention" else pre
    return MIASelection(sample.id, fmt, n, generation.text, ratio, threshold(fmt, n), reason is None, reason,
                        attention_reason is None)


def match_random(selections: Sequence[MIASelection], seed: int = 0) -> list[MIASelection]:
    """Random mode, matched size: per format, a seeded random subset of the random-mode pairs as large as the
    attention rule's pairs of that format; the others get the reason ``"not_drawn"``.

    Returns:
        New selections, in order.
    """
    out = list(selections)
    for fmt in FORMATS:
        idx = [i for i, s in enumerate(out) if s.format == fmt and s.kept]
        size = sum(1 for s in out if s.format == fmt and s.attention_rule)
        keep = set(random.Random(f"{seed}:match:{fmt}").sample(idx, min(size, len(idx))))
        for i in idx:
            if i not in keep:
                s = out[i]
                out[i] = MIASelection(s.id, s.format, s.n_images, s.answer, s.ratio, s.threshold, False, "not_drawn",
                                      s.attention_rule)
    return out


def preference_pairs(samples: Sequence[AugmentedSample], selections: Sequence[MIASelection],
                     rejection: str = "attention") -> list[PreferencePair]:
    """The kept samples as pairs: chosen = the ground truth, rejected = the model's answer; ``meta`` holds the images,
    ``augmentation`` and ``mia`` (``{"ratio", "threshold", "rejection", "attention_rule"}``)."""
    pairs = []
    for s, sel in zip(samples, selections, strict=True):
        if sel.id != s.id:
            raise ValueError(f"selection {sel.id!r} does not belong to sample {s.id!r}")
        if sel.kept:
            mia = {"ratio": None if sel.ratio is None else round(sel.ratio, 6), "threshold": sel.threshold,
                   "rejection": rejection, "attention_rule": sel.attention_rule}
            pairs.append(s.to_pair(sel.answer, mia=mia))
    return pairs

