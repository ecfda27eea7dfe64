"""Cost of a VLM DPO step against its floor, and pairs/s against TRL's DPOTrainer, with the peak memory of both.

The model: a LLaVA-type ``LlavaForConditionalGeneration`` built from transformers' own classes at a small size
(random weights, seeded), saved with ``save_pretrained`` next to its ``LlavaProcessor`` and loaded back through
the VLM adapter exactly as ``mm-align train`` loads a checkpoint. The tokenizer is built offline (a word-level
vocabulary in a ``PreTrainedTokenizerFast``, LLaVA-1.5 chat template); the language model's embedding and LM head
keep a real vocabulary size (32000, Llama-2 / LLaVA-1.5), so the LM head costs what it costs in a real model.

The floor of a DPO step (Rafailov et al. 2023) is a supervised LoRA step on the same 2B answers (chosen and
rejected) plus ONE no-grad forward (the reference pass: LoRA disabled, no second model). Variants on ONE collated
batch of B pairs with images, the same LoRA and the same optimizer, through the adapter's own ``scores`` and
``mm_align.losses.compute_loss`` exactly as the trainer calls them:

- ``sft``: policy forward over the 2B rows ``[chosen ; rejected]``, NLL ``−Σ log π / Σ n_tokens``, backward,
  gradient clipping at 1, AdamW step;
- ``ref_forward``: the reference pass alone (``no_grad``, ``lora_disabled``);
- ``dpo``: reference pass (first, as the trainer does) + policy pass + the sigmoid DPO loss, backward, step;
- ``dpo_cached_ref``: DPO with the reference log-probs given (``precompute_reference``), no reference pass;
- ``trl_dpo``: TRL's ``DPOTrainer`` (``loss_type=["sigmoid"]``, the same β) on its own copy of the same saved
  model, with the same LoRA given as a peft ``LoraConfig`` (so its reference is the policy with the adapter
  disabled, as ours), on the same rows collated by its own ``DataCollatorForVisionPreference``. One step is what
  ``Trainer._inner_training_loop`` does per optimizer step with no gradient accumulation: ``training_step``
  (forward, loss, backward), ``_clip_grad_norm`` (``max_grad_norm`` 1), ``optimizer.step()``,
  ``lr_scheduler.step()``, ``model.zero_grad()``, the loss read back (``optim="adamw_torch"``: the same
  ``torch.optim.AdamW`` as ours, at the same learning rate). TRL refuses ``precompute_ref_log_probs`` for vision
  datasets, so it has no cached-reference variant.

The two collated batches are asserted to hold the same tokens and the same answer masks (per row, padding
aside), so the two DPO steps score the same thing. pairs/s = B / (median step time) for ours and for TRL.

Times: per-step medians over rounds of one step per variant, interleaved in one process after warm-up, in a
rotating order (``timing.rotating``), so drift and bursts of load on this shared machine hit every variant alike.
The verdict is the median over rounds of each round's own ratio; the ratios of medians and of the fastest steps
are reported beside it. Steps run on 1 torch thread: on cores shared with other jobs, OpenMP spin-waits of a
second thread make step times swing far more than the differences the ratios look for.

Peak memory (CPU): each variant in a child process of its own (forked, so nothing is imported twice) that loads
its own model, runs one untimed step (optimizer state, lazily built buffers), then resets the kernel's resident
high-water mark (``/proc/self/clear_refs``), runs two steps and reads ``VmHWM``: the step's peak is ``VmHWM`` minus
the resident set just before the steps. The child sets glibc's mmap threshold to 128 KiB (``mallopt``) so that
every tensor larger than that is its own mapping, returned to the kernel when freed: without it, glibc's heap
keeps freed activations resident, and the second step would reuse memory the first one left mapped (the delta
would undercount). ``tracemalloc`` sees no tensor memory, and torch's CPU allocator has no peak counter. On CUDA
the same children read ``torch.cuda.max_memory_allocated``.

    python benchmarks/vlm_step.py --out benchmarks/results
    python benchmarks/run.py vlm_step [--quick]
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from timing import (
    fastest,
    format_times,
    median_of_ratios,
    medians,
    per_round_ratios,
    rotating,
    time_rounds,
    warm_up,
)

OURS = ("sft", "ref_forward", "dpo", "dpo_cached_ref")
VARIANTS = OURS + ("trl_dpo",)
BETA = 0.1
LR = 1e-5

LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set head = '' %}{% else %}{% set head = message['role'].upper() + ': ' %}"
    "{% endif %}{{ head }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% endif %}{{ ' ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
WORDS = """a the is it this there what which where of in on at to and or no yes image shape colour background
position left right top bottom centre middle upper lower corner red green blue yellow orange purple black white
circle square triangle star one two three small large i see think looks like user assistant
. , ? ! :""".split()
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 40)}


@dataclass
class Size:
    """Model and batch sizes."""

    vision: dict[str, Any] = field(default_factory=lambda: dict(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, image_size=112,
        patch_size=14))
    text: dict[str, Any] = field(default_factory=lambda: dict(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=2048))
    pairs: int = 4
    lora_r: int = 8
    notes: str = ""


SIZES = {
    "small": Size(notes="LLaVA-type: CLIP vision tower (4 layers, width 256, 112 px, patch 14: 64 image tokens per "
                        "image) + 2-layer MLP projector + Llama LM (6 layers, width 512, MLP 1408, 8 heads, "
                        "vocabulary 32000, untied LM head); 4 pairs, one image each; LoRA r = 8 (alpha 8) on the "
                        "LM's q/k/v/o/gate/up/down projections, vision tower frozen; float32"),
    "tiny": Size(vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=28, patch_size=7),
                 text=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
                 pairs=2, lora_r=2, notes="a smoke-test size (not a measurement)"),
}


# ---- the model and the data ------------------------------------------------------------------------------
def _tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.padding_side = "right"
    return fast


def build_model(size: Size, path: Path) -> Path:
    """A seeded LLaVA (``LlavaForConditionalGeneration`` + ``LlavaProcessor``) saved to ``path``."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _tokenizer()
    if size.text["vocab_size"] < len(tokenizer):
        raise ValueError(f"vocab_size {size.text['vocab_size']} < the tokenizer's {len(tokenizer)} tokens")
    torch.manual_seed(0)
    vision = CLIPVisionConfig(projection_dim=size.vision["hidden_size"], **size.vision)
    text = LlamaConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, **size.text)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config).eval()
    px = size.vision["image_size"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": px}, crop_size={"height": px, "width": px}),
        tokenizer=tokenizer, patch_size=size.vision["patch_size"], vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def examples(n: int) -> list[dict[str, Any]]:
    """``n`` TRL vision-preference examples (conversational, one PIL image each), deterministic."""
    from PIL import Image, ImageDraw

    names, shapes = list(COLOURS), ["circle", "square"]
    places = ["upper left corner", "centre", "bottom right corner", "top"]
    out = []
    for i in range(n):
        colour, other = names[i % len(names)], names[(i + 1) % len(names)]
        shape, wrong = shapes[i % 2], shapes[(i + 1) % 2]
        im = Image.new("RGB", (128, 128), (255, 255, 255))
        box = (16 + 8 * i % 48, 20, 80 + 8 * i % 48, 96)
        (ImageDraw.Draw(im).ellipse if shape == "circle" else ImageDraw.Draw(im).rectangle)(box, fill=COLOURS[colour])

        def say(text: str) -> list[dict[str, Any]]:
            return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]

        out.append({"images": [im],
                    "prompt": [{"role": "user", "content": [
                        {"type": "image"}, {"type": "text", "text": "what colour is the shape in the image ? "
                                                                    "where is it ?"}]}],
                    "chosen": say(f"the shape is a {colour} {shape} . it is in the {places[i % 4]} of the image ."),
                    "rejected": say(f"i see a {other} {wrong} at the {places[(i + 1) % 4]} .")})
    return out


# ---- our step ------------------------------------------------------------------------------------------
class Ours:
    """The VLM adapter on the saved model, our LoRA, one AdamW and one fixed collated batch."""

    def __init__(self, model_dir: Path, size: Size) -> None:
        from mm_align import recipes
        from mm_align.data import PreferencePair
        from mm_align.lora import LoraSettings, add_lora

        self.adapter = recipes.build_adapter("vlm", {"pretrained": str(model_dir)})
        self.params = sum(p.numel() for p in self.adapter.model.parameters())
        torch.manual_seed(0)
        self.model = add_lora(self.adapter.model, LoraSettings(r=size.lora_r), self.adapter.lora_target_modules)
        self.model.train()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.trainable, lr=LR)
        rows = examples(size.pairs)
        self.records = [PreferencePair(e["prompt"], e["chosen"], e["rejected"], meta={"images": e["images"]})
                        for e in rows]
        self.batch = self.collate()
        self.cached_ref = self._reference()

    def collate(self) -> dict[str, Any]:
        return self.adapter.collate(self.records, list(range(len(self.records))))

    def _reference(self):
        from mm_align.lora import lora_disabled

        with torch.no_grad(), lora_disabled(self.model):
            return self.adapter.scores(self.batch, self.model).detach()

    def _update(self, loss: torch.Tensor) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        loss.item()

    def sft(self) -> None:
        s = self.adapter.scores(self.batch, self.model)
        logp = torch.cat([s.chosen, s.rejected])
        n = torch.cat([s.n_tokens_chosen, s.n_tokens_rejected])
        self._update(-logp.sum() / n.sum())

    def ref_forward(self) -> None:
        self._reference().chosen.sum().item()

    def dpo(self) -> None:
        from mm_align.losses import compute_loss

        reference = self._reference()  # first, as the trainer does: its activations are gone before the policy's
        policy = self.adapter.scores(self.batch, self.model)
        self._update(compute_loss(["sigmoid"], None, policy, reference, BETA).loss)

    def dpo_cached_ref(self) -> None:
        from mm_align.losses import compute_loss

        policy = self.adapter.scores(self.batch, self.model)
        self._update(compute_loss(["sigmoid"], None, policy, self.cached_ref, BETA).loss)


# ---- TRL's step ----------------------------------------------------------------------------------------
class TRL:
    """TRL's DPOTrainer on its own copy of the saved model, the same LoRA as a peft config, its own collator."""

    def __init__(self, model_dir: Path, size: Size, lora_targets: list[str], work: Path) -> None:
        import datasets
        from peft import LoraConfig
        from transformers import AutoModelForImageTextToText, AutoProcessor
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=size.pairs, report_to=[],
                         use_cpu=not torch.cuda.is_available(), beta=BETA, loss_type=["sigmoid"], max_length=None,
                         gradient_checkpointing=False, bf16=False, learning_rate=LR, optim="adamw_torch",
                         max_grad_norm=1.0, logging_steps=10**9, save_strategy="no")
        model = AutoModelForImageTextToText.from_pretrained(model_dir)
        processor = AutoProcessor.from_pretrained(model_dir)
        peft_config = LoraConfig(r=size.lora_r, lora_alpha=size.lora_r, lora_dropout=0.0, target_modules=lora_targets)
        rows = examples(size.pairs)
        dataset = datasets.Dataset.from_list(copy.deepcopy(rows))
        self.trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor,
                                  peft_config=peft_config)
        self.model = self.trainer.model
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.trainer.create_optimizer_and_scheduler(num_training_steps=10**6)
        self.trainer.current_gradient_accumulation_steps = 1
        self.rows = rows
        self.batch = self.trainer._prepare_inputs(self.trainer.data_collator(copy.deepcopy(rows)))

    def trl_dpo(self) -> None:
        t = self.trainer
        loss = t.training_step(self.model, self.batch)
        t._clip_grad_norm(self.model)
        t.optimizer.step()
        t.lr_scheduler.step()
        self.model.zero_grad()
        loss.item()


def same_tokens(ours: dict[str, Any], trl_batch: dict[str, Any]) -> None:
    """Assert that two collated batches hold, row by row, the same tokens (padding aside) and the same answer mask.

    Raises:
        AssertionError: naming the first row that differs.
    """
    ids, attn = ours["inputs"]["input_ids"], ours["inputs"]["attention_mask"].bool()
    t_ids, t_attn = trl_batch["input_ids"].cpu(), trl_batch["attention_mask"].cpu().bool()
    t_mask = trl_batch["completion_mask"].cpu().bool()
    if ids.shape[0] != t_ids.shape[0]:
        raise AssertionError(f"{ids.shape[0]} rows here, {t_ids.shape[0]} in TRL's batch")
    for row in range(ids.shape[0]):
        if ids[row][attn[row]].tolist() != t_ids[row][t_attn[row]].tolist():
            raise AssertionError(f"row {row}: different tokens from TRL's collator")
        if ours["response_mask"][row][attn[row]].tolist() != t_mask[row][t_attn[row]].tolist():
            raise AssertionError(f"row {row}: a different answer mask from TRL's completion mask")


# ---- peak memory ---------------------------------------------------------------------------------------
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def return_freed_memory(threshold: int = 128 * 1024) -> bool:
    """Make glibc map every allocation above ``threshold`` bytes on its own and unmap it when freed (``mallopt``:
    a fixed mmap threshold, no dynamic raise; trim the heap top above ``threshold``), so the resident set follows
    the live tensors. Returns False where glibc's ``mallopt`` is not available."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(M_TRIM_THRESHOLD, threshold))


def peak_rss_delta(step: Callable[[], None], steps: int = 2) -> dict[str, float]:
    """Peak resident memory of ``steps`` calls of ``step`` above the resident set just before them (MiB), from the
    kernel's high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``; Linux)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    before = _status_kb("VmRSS")
    for _ in range(steps):
        step()
    peak = _status_kb("VmHWM")
    return {"step_peak_mib": (peak - before) / 1024, "resident_before_mib": before / 1024, "peak_mib": peak / 1024}


def _memory_child(variant: str, model_dir: str, size_name: str, lora_targets: list[str], work: str,
                  conn: Any) -> None:
    try:
        cuda = torch.cuda.is_available()
        freed = return_freed_memory() if not cuda else None
        size = SIZES[size_name]
        if variant == "trl_dpo":
            side = TRL(Path(model_dir), size, lora_targets, Path(work))
        else:
            side = Ours(Path(model_dir), size)
        step = getattr(side, variant)
        step()  # optimizer state and lazily built buffers exist from here on, as in training
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            for _ in range(2):
                step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            out = {"step_peak_mib": (peak - before) / 2**20, "resident_before_mib": before / 2**20,
                   "peak_mib": peak / 2**20, "measure": "torch.cuda.max_memory_allocated"}
        else:
            out = peak_rss_delta(step)
            out["measure"] = "VmHWM - VmRSS before the steps" + ("" if freed else " (mallopt unavailable)")
        conn.send(out)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def measure_memory(variants: tuple[str, ...], model_dir: Path, size_name: str, lora_targets: list[str],
                   work: Path, log=print) -> dict[str, dict[str, Any]]:
    """Each variant's peak step memory, in a forked child process of its own."""
    ctx = mp.get_context("fork")
    out = {}
    for v in variants:
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_memory_child, args=(v, str(model_dir), size_name, lora_targets, str(work), child))
        p.start()
        child.close()
        result = parent.recv()
        p.join()
        if "error" in result:
            raise RuntimeError(f"memory of {v}: {result['error']}")
        out[v] = result
        log(f"memory {v}: step peak {result['step_peak_mib']:.1f} MiB above {result['resident_before_mib']:.1f} MiB")
    return out


# ---- the run -------------------------------------------------------------------------------------------
def judged(t: dict[str, float]) -> dict[str, float]:
    """The three ratios of the acceptance: DPO against its two floors, and TRL's step time over ours (= our pairs/s
    over TRL's)."""
    return {"dpo / (sft + ref_forward)": t["dpo"] / (t["sft"] + t["ref_forward"]),
            "dpo_cached_ref / sft": t["dpo_cached_ref"] / t["sft"],
            "pairs/s ours / TRL (= trl_dpo / dpo)": t["trl_dpo"] / t["dpo"]}


TARGETS = {"dpo / (sft + ref_forward)": ("<=", 1.05), "dpo_cached_ref / sft": ("<=", 1.05),
           "pairs/s ours / TRL (= trl_dpo / dpo)": (">=", 1.0)}


def _passes(value: float, target: tuple[str, float]) -> bool:
    op, bound = target
    return value <= bound if op == "<=" else value >= bound


def measure(size_name: str = "small", rounds: int = 10, warmup: int = 1, threads: int = 1, memory: bool = True,
            log=print) -> dict[str, Any]:
    import peft
    import transformers
    import trl

    size = SIZES[size_name]
    torch.set_num_threads(threads)
    out: dict[str, Any] = {"size": size_name, "notes": size.notes, "size_config": asdict(size), "threads": threads,
                           "rounds": rounds, "warmup": warmup, "beta": BETA, "learning_rate": LR,
                           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                        "trl": trl.__version__, "peft": peft.__version__},
                           "device": "cuda" if torch.cuda.is_available() else "cpu",
                           "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_model(size, work / "model")
        ours = Ours(model_dir, size)
        targets = list(ours.adapter.lora_target_modules)
        if memory:  # first: forked children from a parent that has not run a step yet
            out["memory"] = measure_memory(("sft", "ref_forward", "dpo", "dpo_cached_ref", "trl_dpo"), model_dir,
                                           size_name, targets, work, log)
        theirs = TRL(model_dir, size, targets, work)
        same_tokens(ours.batch, theirs.batch)
        ours_trainable = sum(p.numel() for p in ours.trainable)
        if ours_trainable != theirs.trainable:
            raise AssertionError(f"LoRA sizes differ: {ours_trainable} trainable here, {theirs.trainable} in TRL's")
        ids = ours.batch["inputs"]["input_ids"]
        out.update(parameters=ours.params, trainable=ours_trainable, pairs=size.pairs, rows=int(ids.shape[0]),
                   width=int(ids.shape[1]), trl_width=int(theirs.batch["input_ids"].shape[1]),
                   answer_tokens=int(ours.batch["response_mask"].sum()),
                   image_tokens=int((ids == ours.adapter.image_token_id).sum()))
        steps = {v: getattr(ours, v) for v in OURS} | {"trl_dpo": theirs.trl_dpo}

        cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}  # the process's CPU time of each timed step

        def step(v: str) -> None:
            c0 = time.process_time()
            steps[v]()
            cpu[v].append(time.process_time() - c0)

        warm_up(step, VARIANTS, warmup)
        for v in VARIANTS:
            cpu[v].clear()

        def progress(r: int, times: dict[str, list[float]]) -> None:
            log(f"round {r + 1}/{rounds}: {format_times(medians(times))}")

        times = time_rounds(step, VARIANTS, rounds, order=rotating, after_round=progress)
        out["profile"] = {v: profile_step(steps[v]) for v in ("dpo", "trl_dpo")}
        mask = ours.batch["response_mask"]
        keep = ids.shape[1] - int(mask.float().argmax(1).min()) + 1  # the adapter's logits_to_keep
        t_mask = theirs.batch["completion_mask"]
        compact = out["device"] == "cuda"  # TRL's fused head scores only completion positions with Triton
        out["lm_head_rows_per_pass"] = {"ours": int(ids.shape[0] * keep), "TRL": int(
            t_mask[:, 1:].sum() if compact else t_mask.shape[0] * (t_mask.shape[1] - 1))}
        collate = [_timed(ours.collate) for _ in range(3)]
        trl_collate = [_timed(lambda: theirs.trainer.data_collator(copy.deepcopy(theirs.rows))) for _ in range(3)]
    med, fast = medians(times), fastest(times)
    per_round = per_round_ratios(times, judged)
    ratios = median_of_ratios(per_round)
    out.update(median_s_per_step=med, fastest_s_per_step=fast,
               pairs_per_s={"ours (dpo)": size.pairs / med["dpo"], "ours (dpo_cached_ref)":
                            size.pairs / med["dpo_cached_ref"], "TRL (trl_dpo)": size.pairs / med["trl_dpo"]},
               ratios=ratios, ratios_of_medians=judged(med), ratios_of_fastest=judged(fast),
               targets={k: list(v) for k, v in TARGETS.items()},
               pass_={k: _passes(ratios[k], TARGETS[k]) for k in ratios}, per_round_ratios=per_round,
               all_s_per_step=times, cpu_median_s_per_step=medians(cpu),
               cpu_ratios=median_of_ratios(per_round_ratios(cpu, judged)), all_cpu_s_per_step=cpu,
               collate_median_s={"ours": statistics.median(collate),
                                                       "TRL": statistics.median(trl_collate)},
               load_average_after=os.getloadavg())
    out["pass"] = out.pop("pass_")
    out["all_pass"] = all(out["pass"].values())
    return out


def profile_step(fn: Callable[[], None], top: int = 6) -> dict[str, Any]:
    """One step under ``torch.profiler`` (CPU activity): the total self time and the ``top`` operators by it."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = list(prof.key_averages())
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"self_cpu_s": sum(e.self_cpu_time_total for e in events) / 1e6,
            "top": [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in ranked]}


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def markdown(r: dict[str, Any]) -> str:
    v = r["versions"]
    lines = [
        f"{r['notes']}: {r['parameters'] / 1e6:.1f} M parameters, {r['trainable'] / 1e6:.2f} M trainable (LoRA). "
        f"One batch of {r['pairs']} pairs = {r['rows']} rows [chosen ; rejected], {r['width']} tokens wide "
        f"(TRL's collator: {r['trl_width']}), {r['image_tokens']} image tokens and {r['answer_tokens']} answer "
        f"tokens in all; TRL's batch holds the same tokens and answer masks (asserted). {r['device'].upper()}, "
        f"{r['threads']} torch thread(s); torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, "
        f"peft {v['peft']}; sigmoid loss, β = {r['beta']}, AdamW lr {r['learning_rate']}, clip 1.", "",
        f"Step times: medians (and minima) of {r['rounds']} rounds of one step per variant in a rotating order, after "
        f"{r['warmup']} warm-up steps each; collate is outside every timed step (shown on its own). Machine load "
        f"(1-min load average, 2 cores) before / after: {r['load_average_before'][0]:.1f} / "
        f"{r['load_average_after'][0]:.1f} — other jobs shared the cores, so absolute times are pessimistic; the "
        "ratios compare variants interleaved under the same load. The verdict is the median over rounds of each "
        "round's own ratio; the ratio of medians and of the fastest steps are shown beside it.", "",
        "| variant | median s/step | fastest s/step | pairs/s (median) | median CPU s/step |", "|---|---|---|---|---|"]
    for name in VARIANTS:
        pps = f"{r['pairs'] / r['median_s_per_step'][name]:.2f}" if name not in ("ref_forward",) else ""
        lines.append(f"| {name} | {r['median_s_per_step'][name]:.4f} | {r['fastest_s_per_step'][name]:.4f} | {pps} | "
                     f"{r['cpu_median_s_per_step'][name]:.4f} |")
    lines += [f"| (collate: ours / TRL's, not in the steps) | {r['collate_median_s']['ours']:.4f} / "
              f"{r['collate_median_s']['TRL']:.4f} | | | |", "",
              "| ratio | median of per-round ratios | target | | ratio of medians | ratio of fastest | CPU time: "
              "median of per-round ratios |", "|---|---|---|---|---|---|---|"]
    for k, val in r["ratios"].items():
        op, bound = r["targets"][k]
        lines.append(f"| {k} | {val:.3f} | {'≤' if op == '<=' else '≥'} {bound:.2f} | "
                     f"{'PASS' if r['pass'][k] else 'FAIL'} | {r['ratios_of_medians'][k]:.3f} | "
                     f"{r['ratios_of_fastest'][k]:.3f} | {r['cpu_ratios'][k]:.3f} |")
    spread = {k: (min(x[k] for x in r["per_round_ratios"]), max(x[k] for x in r["per_round_ratios"]))
              for k in r["ratios"]}
    lines += ["", "The verdict is on wall time (the house rule). The last column is the same ratio on the process's "
              "CPU time of each step (one thread: the time it ran, not the time it waited for a core while other "
              "jobs held it), measured in the same steps. Per-round wall ratios ranged "
              + "; ".join(f"{k}: {lo:.2f}–{hi:.2f}" for k, (lo, hi) in spread.items()) + "."]
    rows, prof = r["lm_head_rows_per_pass"], r["profile"]
    lines += ["", f"Where the time goes: one profiled step each (torch.profiler, CPU self time; profiled steps run "
              f"slower than plain ones). The LM head (vocabulary {r['size_config']['text']['vocab_size']}) projects "
              f"{rows['ours']} positions per pass here (the adapter's logits_to_keep: from the batch's first answer "
              f"token on) and {rows['TRL']} in TRL's fused head"
              + (" (off CUDA it scores every position of every row)" if r["device"] != "cuda" else "") + ".", "",
              "| | ours (dpo) | | TRL (trl_dpo) | |", "|---|---|---|---|---|",
              f"| total self CPU s | {prof['dpo']['self_cpu_s']:.2f} | | {prof['trl_dpo']['self_cpu_s']:.2f} | |"]
    for a, b in zip(prof["dpo"]["top"], prof["trl_dpo"]["top"]):
        lines.append(f"| | {a['op']} × {a['calls']} | {a['self_cpu_s']:.2f} | {b['op']} × {b['calls']} | "
                     f"{b['self_cpu_s']:.2f} |")
    if "memory" in r:
        m = r["memory"]
        how = next(iter(m.values()))["measure"]
        lines += ["", f"Peak memory per step ({how}; each variant in a forked child process of its own that loads its "
                  "own model, runs one untimed step, then two measured ones; glibc's mmap threshold fixed at "
                  "128 KiB so freed tensors leave the resident set):", "",
                  "| variant | step peak MiB (above the resident set before) | resident before MiB | peak MiB |",
                  "|---|---|---|---|"]
        lines += [f"| {name} | {x['step_peak_mib']:.1f} | {x['resident_before_mib']:.1f} | {x['peak_mib']:.1f} |"
                  for name, x in m.items()]
        lines += ["", f"Step peak, TRL / ours (DPO): {m['trl_dpo']['step_peak_mib'] / m['dpo']['step_peak_mib']:.2f}"]
    return "\n".join(lines)


def run(quick: bool = False) -> dict[str, Any]:
    """For ``benchmarks/run.py``: ``--quick`` is a smoke run at the tiny size (no memory children)."""
    result = measure("tiny" if quick else "small", rounds=2 if quick else 10, warmup=1,
                     memory=not quick)
    result["markdown"] = markdown(result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--rounds", type=int, default=10, help="rounds of one step per variant (10: each variant in "
                                                           "every place of the rotating order twice)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before timing")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: no OpenMP spin-waits on shared cores)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--out", help="write vlm_step.{json,md} here")
    args = p.parse_args(argv)
    started = time.time()
    result = measure(args.size, args.rounds, args.warmup, args.threads, not args.no_memory)
    args_line = " ".join(argv if argv is not None else sys.argv[1:])
    result["command"] = f"python benchmarks/vlm_step.py {args_line}".strip()
    result["date"] = time.strftime("%Y-%m-%d", time.gmtime(started))
    result["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                         "cpu_count": os.cpu_count(), "device": result["device"]}
    md = (f"# vlm_step ({args.size})\n\n`{result['command']}` — {result['date']}, {result['machine']['processor']}, "
          f"{os.cpu_count()} cores, {result['device']}\n\n" + markdown(result) + "\n")
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "vlm_step.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "vlm_step.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
