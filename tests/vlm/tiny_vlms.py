"""Tiny real vision-language models for the VLM tests: transformers' own classes at tiny configs, saved with
``save_pretrained`` to a directory that ``AutoModelForImageTextToText.from_pretrained`` and
``AutoProcessor.from_pretrained`` load back, exactly as a user's checkpoint would be.

- :func:`make_tiny_llava`: ``LlavaForConditionalGeneration`` (a 2-layer CLIP vision tower at 24 px, patch 6, so
  16 image tokens per image; a 2-layer Llama LM) and a ``LlavaProcessor`` (``CLIPImageProcessor``).
- :func:`make_tiny_qwen2vl`: ``Qwen2VLForConditionalGeneration`` (2-layer vision tower, patch 4, merge 2; a
  2-layer Qwen2 LM with M-RoPE) and a ``Qwen2VLProcessor`` whose image processor keeps every image between
  ``min_pixels`` and ``max_pixels`` (so the number of image tokens varies with the image, 16 at most by default).

The tokenizers are built offline with the ``tokenizers`` library: a word-level vocabulary over a fixed word list
(:data:`WORDS`: the shapes-world vocabulary and common question words) plus the special tokens each processor
needs, wrapped in ``PreTrainedTokenizerFast``, with a chat template in the family's style, so
``processor.apply_chat_template`` renders conversations with interleaved images and text. Everything is seeded
(``torch.manual_seed(0)``): the same call writes the same weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

__all__ = ["WORDS", "make_tiny_llava", "make_tiny_qwen2vl", "make_tiny_qwen25vl", "TINY_VLM_BUILDERS", "draw_shape",
           "write_pairs"]

WORDS: tuple[str, ...] = tuple(
    """a an the is are it this that there what which how many where who of in on at to and or not no yes
    image picture photo shape shapes colour color background count position left right top bottom center centre
    middle upper lower corner red green blue yellow orange purple black white gray grey brown pink cyan magenta
    circle square triangle star rectangle ellipse hexagon diamond cross one two three four five six seven eight
    nine ten zero object objects thing things big small large tiny answer question describe tell me you see
    please with has have do does can color colors colours image1 image2 image3 image4 image5 image6 image7 image8
    image9 for from by as be I think looks like shown here user assistant system helpful
    . , ? ! : ; ' " ( ) - _ / 0 1 2 3 4 5 6 7 8 9""".split()
)

LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]

# LLaVA-1.5 style ("USER: <image>\nWhat is it? ASSISTANT: a circle</s>"), images interleaved where the
# conversation puts them; string contents are rendered as they are.
LLAVA_CHAT_TEMPLATE = (
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

# Qwen2-VL style (ChatML with <|vision_start|><|image_pad|><|vision_end|> per image).
QWEN2VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _word_tokenizer(specials: list[str], unk: str, **special_map: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: the special tokens first (ids 0..), then :data:`WORDS`; lower-cased words split on
    whitespace and punctuation; anything else is ``unk``."""
    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in WORDS:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, **special_map)
    fast.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in special_map.values()]})
    return fast


def make_tiny_llava(path: str | Path, image_size: int = 24, patch_size: int = 6) -> Path:
    """A tiny LLaVA (``LlavaForConditionalGeneration`` + ``LlavaProcessor``) saved to ``path``.

    Args:
        path: the directory to write (created).
        image_size: the CLIP tower's input size (every image is resized and centre-cropped to it).
        patch_size: the CLIP patch size; ``(image_size / patch_size)²`` image tokens per image (CLS dropped).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    path = Path(path)
    tokenizer = _word_tokenizer(LLAVA_SPECIALS, "<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.padding_side = "right"
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=patch_size, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                         vision_feature_layer=-1, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT_TEMPLATE)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def make_tiny_qwen2vl(path: str | Path, min_pixels: int = 8 * 8, max_pixels: int = 32 * 32) -> Path:
    """A tiny Qwen2-VL (``Qwen2VLForConditionalGeneration`` + ``Qwen2VLProcessor``) saved to ``path``.

    Args:
        path: the directory to write (created).
        min_pixels / max_pixels: the image processor's pixel budget per image; an image is resized to a multiple
            of 8 px (patch 4 × merge 2) within it, giving ``H·W / 64`` image tokens (16 at most by default).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    path = Path(path)
    tokenizer = _word_tokenizer(QWEN_SPECIALS, "<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.padding_side = "right"
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    torch.manual_seed(0)
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 512, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                         "mrope_section": [2, 1, 1]},
                     "bos_token_id": None, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]},
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4, "mlp_ratio": 2,
                       "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2VLForConditionalGeneration(config).eval()
    image_processor = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                            min_pixels=min_pixels, max_pixels=max_pixels)
    video_processor = Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                            min_pixels=min_pixels, max_pixels=max_pixels)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=video_processor, chat_template=QWEN2VL_CHAT_TEMPLATE)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def make_tiny_qwen25vl(path: str | Path, min_pixels: int = 8 * 8, max_pixels: int = 32 * 32) -> Path:
    """A tiny Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration`` + ``Qwen2_5_VLProcessor``) saved to ``path``: the
    Qwen2-VL tokenizer, template and image processor (patch 4, merge 2), a 2-block windowed vision tower (window
    16 px, block 1 full attention) and a 2-layer M-RoPE LM.

    Args:
        path: the directory to write (created).
        min_pixels / max_pixels: the image processor's pixel budget per image (as :func:`make_tiny_qwen2vl`).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    path = Path(path)
    tokenizer = _word_tokenizer(QWEN_SPECIALS, "<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.padding_side = "right"
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 512, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                                         "mrope_section": [2, 1, 1]},
                     "bos_token_id": None, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 32,
                       "num_heads": 4, "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "window_size": 16, "fullatt_block_indexes": [1]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    kw = dict(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=min_pixels, max_pixels=max_pixels)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**kw), tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(**kw), chat_template=QWEN2VL_CHAT_TEMPLATE)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# family name -> builder, for tests parametrised over every tiny family
TINY_VLM_BUILDERS = {"llava": make_tiny_llava, "qwen2vl": make_tiny_qwen2vl, "qwen25vl": make_tiny_qwen25vl}


# ---- tiny preference data ----------------------------------------------------------------------------------
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (230, 210, 40)}


def draw_shape(path: str | Path, colour: str, shape: str = "circle", size: tuple[int, int] = (32, 32)) -> Path:
    """A PNG of one ``colour`` ``shape`` (circle or square) on a white background, written to ``path``."""
    from PIL import Image, ImageDraw

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, (255, 255, 255))
    w, h = size
    box = (w // 5, h // 5, w - w // 5, h - h // 5)
    draw = ImageDraw.Draw(im)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    im.save(path)
    return path


def write_pairs(root: str | Path, n: int = 8, size: tuple[int, int] = (32, 32)) -> Path:
    """``root/pairs.jsonl``: ``n`` VLM preference pairs over images in ``root/images`` (paths relative to the file).

    Every third pair is a two-image question (a string prompt with ``<image>`` marks, LLaVA style); the others are
    TRL-style chat prompts with one image. Chosen = the true colour, rejected = another colour.
    """
    import json

    root = Path(root)
    names = list(COLOURS)
    rows = []
    for i in range(n):
        colour, other = names[i % len(names)], names[(i + 1) % len(names)]
        first = draw_shape(root / "images" / f"{i}_a.png", colour, "circle" if i % 2 else "square", size)
        if i % 3 == 2:
            second = draw_shape(root / "images" / f"{i}_b.png", other, "circle", size)
            rows.append({"id": f"p{i}", "prompt": "Image1: <image>\nImage2: <image>\nWhat colour is Image1?",
                         "chosen": colour, "rejected": other,
                         "images": [str(first.relative_to(root)), str(second.relative_to(root))]})
        else:
            prompt = [{"role": "user", "content": [{"type": "image"},
                                                   {"type": "text", "text": "What colour is the shape?"}]}]
            rows.append({"id": f"p{i}", "prompt": prompt,
                         "chosen": [{"role": "assistant", "content": [{"type": "text", "text": colour}]}],
                         "rejected": [{"role": "assistant", "content": [{"type": "text", "text": f"{other} shape"}]}],
                         "images": [str(first.relative_to(root))]})
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
