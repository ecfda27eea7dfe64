"""Train the shapes VLM world's base model: a tiny LLaVA that answers questions about shapes-world scenes.

    python -m mm_align.vlm.toyworld.train_shapes_vlm [--out DIR] [--steps N] [--threads 2] [--no-eval]

The model is transformers' own ``LlavaForConditionalGeneration`` at a tiny size (:data:`MODEL_CFG`, 0.77 M
parameters): a 3-layer CLIP vision tower over 48 px inputs in 8 px patches (36 image tokens an image, CLS dropped;
the world's 64 px images are downsampled by the processor: a shape stays 10–12 px wide, and prompts stay short
enough to train on two shared CPU cores), a two-layer GELU projector, and a 4-layer Llama LM (128 wide); the
processor is a ``LlavaProcessor`` (``CLIPImageProcessor`` resizing any image to 48 × 48 without a crop; collages
come padded to a square) over an offline word-level tokenizer (:func:`build_tokenizer`: the world's vocabulary,
lower-cased, split on whitespace and punctuation) with a LLaVA-1.5 style chat template
(``USER: <image>\\n... ASSISTANT: red</s>``), all written by ``save_pretrained`` so
:func:`mm_align.vlm.vlm_loading.load_vlm` loads it as any user's checkpoint.

Training has two stages, as LLaVA's, on the world's TRAIN split only:

1. **Vision** (:func:`pretrain_vision`, the stand-in for CLIP's pretraining): the tower alone, with linear heads on
   each patch token predicting what lies under that patch (:func:`patch_labels`: colour, shape, the object's
   position, the background). Trained only through the language loss, a from-scratch tower learned the background
   and nothing else (the first shipped model: dev accuracy 0.35, one constant answer per question kind); with
   whole-scene targets on every token it learned positions and counts but not colours and shapes (0.41–0.56).
2. **Language** (the tower frozen): supervised fine-tuning from scratch (cross-entropy on the answer tokens and the
   end-of-sequence token only) on :func:`mm_align.vlm.toyworld.shapes_vlm.qa_items`, in three prompt forms per
   question, drawn at random: the bare question; the question with the bench's short-answer instruction; and the
   bench's multiple-choice rendering (:func:`mm_align.vlm.bench.item_text`: the options one a line and the
   option-letter instruction). The target is always the short answer text (``red``), which the bench's extraction
   reads as the option it names. A share of the rows (``--caption-share 0.3``) asks for the scene's description
   (:func:`caption_text`, every attribute named): a dozen supervised tokens a row instead of one, which took the
   language model past the loss plateau where it answered without reading the image (dev accuracy 0.60 without
   the captions, 0.83 with them). Every tenth step (``--multi-share 0.1``) is a multi-image step of half a batch:
   items made from TRAIN items by :func:`mm_align.vlm.mia_augment.augment` (sequence, grid, pic-in-pic, through
   :func:`mm_align.vlm.toyworld.shapes_vlm.make_multi_item`), so multi-image prompts are familiar but the model
   stays weak on them (dev 0.26–0.45): room for MIA-DPO.

Deterministic on a CPU: the data order, the option draws and the initialisation come from ``--seed`` and the thread
count is fixed (``--threads``, default 1: the same sums in the same order on any machine, and on two cores shared
with other jobs one thread is as fast as two). The shipped model took 1500 vision steps of 64 and 2000 language
steps of 32 rows (415 s with its dev evaluation on one shared core; ``training.json`` beside the weights records the
settings, ``dev_accuracy.json`` the accuracies and the time). At the end the dev split is scored through
``mm-align bench vlm``'s own path (:func:`mm_align.vlm.bench.bench_vlm` on the benchmark files of
:mod:`~mm_align.vlm.toyworld.shapes_vlm`), and the accuracies are written to ``dev_accuracy.json`` beside the
weights.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from mm_align.vlm.bench import INSTRUCTIONS, item_messages
from mm_align.vlm.bench_formats import BenchItem
from mm_align.vlm.toyworld import shapes_vlm as world
from mm_align.vlm.vlm_records import prompt_messages

__all__ = ["MODEL_CFG", "TrainConfig", "CHAT_TEMPLATE", "SPECIAL_TOKENS", "vocabulary", "build_tokenizer",
           "build_processor", "build_model", "patch_labels", "pretrain_vision", "CAPTION_PROMPT", "caption_text",
           "training_rows", "train", "evaluate_dev", "main"]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CHAT_TEMPLATE = (
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
MODEL_CFG: dict[str, Any] = {
    "vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
               "image_size": 48, "patch_size": 8, "projection_dim": 64},
    "text": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 1024},
}
# words of the prompts other components write around the world's questions (MIA-DPO's rewrites, chat roles)
_EXTRA_WORDS = ("user assistant system image images picture in for the center centre middle of which one this is "
                "a an and or answer question with option options letter choices given directly using single word "
                "phrase tile collage sequence inside small large big first second third last yes no true false "
                "describe")


@dataclass
class TrainConfig:
    """The training run's settings (the defaults are the shipped model's)."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 200
    weight_decay: float = 0.01
    train_scenes: int = 6000
    multi_share: float = 0.1
    caption_share: float = 0.3
    seed: int = 0
    threads: int = 1
    dev_scenes: int = 60
    dev_multi_items: int = 100
    vision_steps: int = 1500
    vision_batch_size: int = 64
    vision_lr: float = 2e-3

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.train_scenes < 1:
            raise ValueError("steps, batch_size and train_scenes must be >= 1")
        if self.vision_steps < 0 or self.vision_batch_size < 1:
            raise ValueError("vision_steps must be >= 0 and vision_batch_size >= 1")
        if not 0.0 <= self.caption_share < 1.0:
            raise ValueError(f"caption_share must be in [0, 1), got {self.caption_share}")
        if not 0.0 <= self.multi_share < 1.0:
            raise ValueError(f"multi_share must be in [0, 1), got {self.multi_share}")


def vocabulary() -> list[str]:
    """The tokenizer's words: every word of the world's questions and answers, option letters and digits, the
    bench's instructions and the words of multi-image prompts; sorted (the special tokens come first, separately).
    """
    from tokenizers import pre_tokenizers

    texts = [*INSTRUCTIONS.values(), _EXTRA_WORDS, " ".join(world.POSITIONS), "0 1 2 3 4 5 6 7 8 9",
             " ".join(chr(c) for c in range(ord("a"), ord("z") + 1)), ". , ? ! : ; ' \" ( ) - _ /",
             " ".join(f"image{k}" for k in range(1, 17))]
    from mm_align.image.toyworld.shapes import PALETTE, SHAPES

    texts += [" ".join(PALETTE), " ".join(SHAPES)]
    for kind in world.QUESTION_KINDS:
        subjects = {"colour": ["", *SHAPES], "shape": ["", *world.POSITIONS], "position": [f"{c} {s}" for c in PALETTE
                                                                                           for s in SHAPES]}
        for subject in subjects.get(kind, [""]):
            texts.append(world.question_text(kind, subject))
    pre = pre_tokenizers.Whitespace()
    words = {w.lower() for t in texts for w, _ in pre.pre_tokenize_str(t)}
    return sorted(words)


def build_tokenizer():
    """The word-level ``PreTrainedTokenizerFast`` (:data:`SPECIAL_TOKENS` first, then :func:`vocabulary`)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in vocabulary():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # words joined by spaces, " ." -> "."
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.padding_side = "right"
    return fast


def build_processor():
    """The ``LlavaProcessor``: a ``CLIPImageProcessor`` to 48 × 48 (no crop) and :func:`build_tokenizer`."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = MODEL_CFG["vision"]["image_size"]
    image_processor = CLIPImageProcessor(size={"height": size, "width": size}, do_center_crop=False,
                                         crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(),
                          patch_size=MODEL_CFG["vision"]["patch_size"], vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def build_model(tokenizer, seed: int = 0):
    """A freshly initialised ``LlavaForConditionalGeneration`` at :data:`MODEL_CFG` (``torch.manual_seed(seed)``)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(**MODEL_CFG["vision"])
    text = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **MODEL_CFG["text"])
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


# ---- data --------------------------------------------------------------------------------------------------
Row = tuple[list[dict[str, Any]], list[Any], str]  # (prompt messages, images, answer text)


def _prompt_forms(question: str, images: list[Any], options: tuple[str, ...] | list[str], rng: random.Random
                  ) -> list[dict[str, Any]]:
    """One of the three prompt forms (module docstring), as chat messages with an image part per ``<image>``."""
    form = rng.randrange(3)
    marks = question.count("<image>")
    question = "<image>" * (len(images) - marks) + ("\n" if marks < len(images) else "") + question
    if form == 0:
        return prompt_messages(question)
    if form == 1:
        item = BenchItem("train", images, question, None, "", "open")
    else:
        item = BenchItem("train", images, question, list(options), "", "multiple_choice")
    return item_messages(item)


CAPTION_PROMPT = "Describe the image."


def caption_text(scene: world.Scene) -> str:
    """A scene's description, every attribute named: ``white background. left: red circle. top: blue square.``"""
    objects = [f"{o.position}: {o.colour} {o.shape}." for o in scene.objects]
    return " ".join([f"{scene.background} background.", *objects])


def training_rows(items: list[world.QAItem], rng: random.Random, caption_share: float = 0.0) -> Callable[[], Row]:
    """A sampler of single-image training rows over ``items`` (a random item, a random prompt form); a share
    ``caption_share`` of them asks for the scene's description instead (:func:`caption_text`)."""
    def draw() -> Row:
        it = items[rng.randrange(len(items))]
        image = world.item_image(it)
        if caption_share and rng.random() < caption_share:
            return prompt_messages("<image>\n" + CAPTION_PROMPT), [image], caption_text(it.scene)
        return _prompt_forms(it.question, [image], it.options, rng), [image], it.answer
    return draw


def _multi_rows(items: list[world.QAItem], rng: random.Random, seed: int) -> Callable[[], Row] | None:
    """A sampler of multi-image rows made by ``mia_augment`` from train items (distractors from a window of train
    scenes around the target), or None when :mod:`mm_align.vlm.mia_augment` is not there."""
    try:
        import mm_align.vlm.mia_augment  # noqa: F401
    except ImportError:
        return None
    counter = [0]

    def draw() -> Row:
        i = rng.randrange(len(items))
        pool = items[max(0, i - 60): i + 60]
        m = world.make_multi_item(items[i], pool, rng.choice(world.MULTI_FORMATS), None, seed, j=counter[0])
        counter[0] += 1
        return _prompt_forms(m.question, m.images, m.options, rng), m.images, m.answer
    return draw


def _batch(processor, rows: list[Row]) -> dict[str, torch.Tensor]:
    """Tokenised rows with labels on the answer and ``</s>`` only."""
    tok = processor.tokenizer
    prompts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m, _, _ in rows]
    texts = [p + " " + a + tok.eos_token for p, (_, _, a) in zip(prompts, rows)]
    images = [im for _, ims, _ in rows for im in ims]
    enc = processor(text=texts, images=images, return_tensors="pt", padding=True, add_special_tokens=False)
    answer_lens = [len(tok(" " + a + tok.eos_token, add_special_tokens=False)["input_ids"]) for _, _, a in rows]
    labels = torch.full_like(enc["input_ids"], -100)
    for i, n in enumerate(answer_lens):
        end = int(enc["attention_mask"][i].sum())
        labels[i, end - n:end] = enc["input_ids"][i, end - n:end]
    enc["labels"] = labels
    return enc


# ---- stage 1: the vision tower ------------------------------------------------------------------------------
def _colour_names() -> list[str]:
    from mm_align.image.toyworld.shapes import COLOURS, PALETTE

    return sorted(set(PALETTE) | set(COLOURS))


def patch_labels(scene: world.Scene, seed: int) -> list[list[int]]:
    """The vision tower's stage-1 targets, one row per patch token (row-major over the tower's patch grid): the
    colour under the patch's centre (an object's, or the background's), the shape there (0 = none, else 1 + its
    index in ``SHAPES``), that object's position (0 = none, else 1 + its index in :data:`world.POSITIONS`), and the
    background colour. A patch is an object's when its centre lies in the object's box (:func:`world.scene_boxes`).
    """
    from mm_align.image.toyworld.shapes import SHAPES

    colours = _colour_names()
    grid = MODEL_CFG["vision"]["image_size"] // MODEL_CFG["vision"]["patch_size"]
    boxes = world.scene_boxes(scene, seed)
    rows = []
    for r in range(grid):
        for c in range(grid):
            x, y = (c + 0.5) / grid, (r + 0.5) / grid
            hit = next((o for o, (x0, y0, x1, y1) in zip(scene.objects, boxes) if x0 <= x <= x1 and y0 <= y <= y1),
                       None)
            rows.append([colours.index(hit.colour if hit else scene.background),
                         SHAPES.index(hit.shape) + 1 if hit else 0,
                         world.POSITIONS.index(hit.position) + 1 if hit else 0,
                         colours.index(scene.background)])
    return rows


def pretrain_vision(model, processor, cfg: TrainConfig, log: Callable[[str], None] = print) -> float:
    """Stage 1: train the vision tower alone to say, at each patch token, what lies under that patch.

    A real LLaVA starts from a CLIP tower pretrained on image-text pairs; ours starts from scratch, and trained only
    through the language loss it learns the background (the one attribute a mean colour gives) and little else. So,
    as a stand-in for that pretraining, the tower is first trained with cross-entropy on linear heads over EACH patch
    token LLaVA passes on (the last layer, CLS dropped): the colour, shape and position of the object under the
    patch, and the background colour (:func:`patch_labels`), on TRAIN scenes only. Every question of the world is
    then one lookup for the language model's attention (the tokens whose shape is ``circle``: their colour). The
    heads are thrown away. Returns the final running loss.
    """
    from mm_align.image.toyworld.shapes import SHAPES

    if cfg.vision_steps == 0:
        return float("nan")
    tower = model.model.vision_tower
    vc = MODEL_CFG["vision"]
    n_colours = len(_colour_names())
    sizes = [n_colours, len(SHAPES) + 1, len(world.POSITIONS) + 1, n_colours]
    torch.manual_seed(cfg.seed + 1)
    head = torch.nn.Linear(vc["hidden_size"], sum(sizes))
    scenes = world.sample_scenes("train", cfg.train_scenes)
    pixels = torch.cat([processor.image_processor([world.render_scene(sc, seed) for sc, seed in scenes[i:i + 256]],
                                                  return_tensors="pt")["pixel_values"]
                        for i in range(0, len(scenes), 256)])
    labels = torch.tensor([patch_labels(sc, seed) for sc, seed in scenes])  # (scenes, tokens, 4)
    params = [*tower.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.vision_lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    warmup = min(100, cfg.vision_steps // 10 + 1)
    tower.train()
    running, started = 0.0, time.time()
    for step in range(cfg.vision_steps):
        lr = cfg.vision_lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.vision_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(scenes), (cfg.vision_batch_size,), generator=gen)
        feats = tower(pixel_values=pixels[idx]).last_hidden_state[:, 1:]  # (batch, tokens, hidden)
        logits = head(feats).split(sizes, dim=-1)
        target = labels[idx]
        loss = sum(torch.nn.functional.cross_entropy(lg.flatten(0, 1), target[..., k].flatten())
                   for k, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if step % 250 == 0 or step == cfg.vision_steps - 1:
            log(f"vision step {step:5d}  loss {running:.4f}  lr {lr:.2e}  {time.time() - started:.0f}s")
    tower.eval()
    _standardise_projector_input(model, pixels[:1024])
    return running


@torch.no_grad()
def _standardise_projector_input(model, pixels: torch.Tensor) -> None:
    """Fold a per-feature standardisation of the tower's patch tokens into the projector's first linear layer.

    The pretrained tower's tokens share a large common component (a mean several times their spread across scenes),
    which a freshly initialised projector passes on: what tells scenes apart is then a small part of every image
    token the language model sees. ``W' = W / σ``, ``b' = b − W' μ`` (μ, σ per feature over ``pixels``) makes the
    projector see standardised features; LLaVA's architecture and file layout are unchanged.
    """
    feats = model.model.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:].flatten(0, 1)
    mu, sigma = feats.mean(0), feats.std(0).clamp_min(1e-6)
    lin = model.model.multi_modal_projector.linear_1
    lin.weight.div_(sigma)
    if lin.bias is not None:
        lin.bias.sub_(lin.weight @ mu)


# ---- training ----------------------------------------------------------------------------------------------
def train(out: str | Path, cfg: TrainConfig | None = None, log: Callable[[str], None] = print) -> Path:
    """Train the model and save it with its processor to ``out`` (replacing the files there).

    Returns:
        ``out`` as a path.
    """
    cfg = cfg or TrainConfig()
    torch.set_num_threads(cfg.threads)
    out = Path(out)
    processor = build_processor()
    model = build_model(processor.tokenizer, cfg.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"shapes-vlm: {n_params / 1e6:.2f} M parameters; {cfg.steps} steps of {cfg.batch_size}")
    items = world.qa_items("train", cfg.train_scenes)
    rng = random.Random(cfg.seed)
    single = training_rows(items, rng, cfg.caption_share)
    multi = _multi_rows(items, rng, cfg.seed) if cfg.multi_share > 0 else None
    if cfg.multi_share > 0 and multi is None:
        log("shapes-vlm: mm_align.vlm.mia_augment is not there: single-image training only")
    vision_loss = pretrain_vision(model, processor, cfg, log)
    if cfg.vision_steps:  # as LLaVA's stages 1–2: the pretrained tower stays frozen (the random LM's early
        model.model.vision_tower.requires_grad_(False)  # gradients would scramble what it learned)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))

    model.train()
    started, running = time.time(), 0.0
    every = round(1 / cfg.multi_share) if multi is not None else 0
    for step in range(cfg.steps):
        if every and step % every == every - 1:  # a multi-image step: half a batch of longer prompts
            rows = [multi() for _ in range(max(1, cfg.batch_size // 2))]
        else:
            rows = [single() for _ in range(cfg.batch_size)]
        batch = _batch(processor, rows)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
        opt.step()
        running = loss.item() if step == 0 else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == cfg.steps - 1:
            log(f"step {step:5d}  loss {running:.4f}  lr {lr_at(step):.2e}  {time.time() - started:.0f}s")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps({"config": asdict(cfg), "parameters": n_params,
                                                   "final_loss": running, "vision_final_loss": vision_loss,
                                                   "model": MODEL_CFG}, indent=2) + "\n")
    return out


def evaluate_dev(model_dir: str | Path, cfg: TrainConfig | None = None) -> dict[str, Any]:
    """Dev-split accuracy of a model through :func:`mm_align.vlm.bench.bench_vlm`: the single-image benchmark
    (and per question kind) and each multi-image format when :mod:`mm_align.vlm.mia_augment` is there."""
    from mm_align.vlm.bench import bench_vlm

    cfg = cfg or TrainConfig()
    with tempfile.TemporaryDirectory() as tmp:
        single = world.write_single_benchmark(Path(tmp) / "single", ("dev",), cfg.dev_scenes)
        benches = {"mantis_shapes_single": f"{single},split=dev"}
        if hasattr(world, "write_multi_benchmarks"):
            try:
                paths = world.write_multi_benchmarks(Path(tmp) / "multi", ("dev",), cfg.dev_multi_items)
            except ImportError:
                paths = {}
            benches.update({f"mantis_shapes_{fmt}": f"{p},split=dev" for fmt, p in paths.items()})
        results = bench_vlm({"shapes-vlm": model_dir}, benches, Path(tmp) / "bench", progress=False, n_boot=100)
    entries = results["models"]["shapes-vlm"]["benchmarks"]
    return {name.removeprefix("mantis_shapes_"): {"accuracy": e["accuracy"], "n": e["n"], "unparsed": e["unparsed"],
                                                  **({"subsets": {s: v["accuracy"] for s, v in e["subsets"].items()}}
                                                     if "subsets" in e else {})}
            for name, e in entries.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=world.WEIGHTS_DIR / world.MODEL_NAME)
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--multi-share", type=float, default=TrainConfig.multi_share)
    p.add_argument("--caption-share", type=float, default=TrainConfig.caption_share)
    p.add_argument("--threads", type=int, default=TrainConfig.threads)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--vision-steps", type=int, default=TrainConfig.vision_steps)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    p.add_argument("--no-eval", action="store_true", help="skip the dev-split evaluation")
    args = p.parse_args(argv)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, multi_share=args.multi_share,
                      caption_share=args.caption_share,
                      threads=args.threads, seed=args.seed,
                      vision_steps=args.vision_steps, lr=args.lr, warmup=args.warmup)
    started = time.time()
    out = train(args.out, cfg)
    if not args.no_eval:
        acc = evaluate_dev(out, cfg)
        (out / "dev_accuracy.json").write_text(json.dumps({"split": "dev", "accuracy": acc,
                                                           "train_seconds": round(time.time() - started)},
                                                          indent=2) + "\n")
        print(json.dumps(acc, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
