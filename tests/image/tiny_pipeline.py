"""A tiny SD1.5-type diffusers model built from configs (seeded) and saved with ``save_pretrained``,
so tests load it through the same ``from_pretrained`` code a user runs on a real checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def tiny_tokenizer(directory: Path) -> CLIPTokenizer:
    """A character-level CLIP BPE tokenizer (no merges) written from a local vocab."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), pad_token="!",
                         model_max_length=16)


def save_tiny_sd15(root: Path, prediction_type: str = "epsilon") -> Path:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    )
    text = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=64,
        bos_token_id=0, eos_token_id=1, pad_token_id=2, max_position_embeddings=16,
    ))
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tiny_tokenizer(root.parent / f"{root.name}_tok"), unet=unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(root)  # the layout of a real checkpoint: model_index.json + one folder per component
    return root


def save_tiny_sdxl(root: Path) -> Path:
    """A tiny SDXL-type pipeline: two text encoders, pooled embeddings, text_time micro-conditioning."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids × 8 + the pooled text embedding
        cross_attention_dim=64, norm_num_groups=8,  # 32 (encoder 1) + 32 (encoder 2)
    )
    vae = AutoencoderKL(
        block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    )
    text_cfg = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=64,
                    bos_token_id=0, eos_token_id=1, pad_token_id=2, max_position_embeddings=16, projection_dim=32)
    text = CLIPTextModel(CLIPTextConfig(**text_cfg))
    text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
    tok = tiny_tokenizer(root.parent / f"{root.name}_tok")
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text, text_encoder_2=text_2, tokenizer=tok, tokenizer_2=tok, unet=unet,
        scheduler=DDPMScheduler(num_train_timesteps=1000), force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(root)
    return root
