"""Tiny SD3-type and FLUX-type diffusers pipelines built from configs (seeded) and saved with ``save_pretrained``,
so tests load them through the same ``from_pretrained`` code a user runs on a real SD3.5 or FLUX.1 checkpoint.

Both have the real component classes and layouts: a 16-channel ``AutoencoderKL`` without quant convs (with
the families' own scaling and shift factors), ``FlowMatchEulerDiscreteScheduler`` (SD3: shift 3; FLUX.1-dev:
dynamic shifting), and offline tokenizers written from local vocabularies (the character-level CLIP BPE of
:mod:`tests.image.tiny_pipeline`, and a character-level Unigram T5 tokenizer).
SD3-type: ``SD3Transformer2DModel`` (patch 2), CLIP-L and CLIP-G stand-ins with projection, a T5 encoder.
FLUX-type: ``FluxTransformer2DModel`` with the guidance embedding (guidance-distilled, as FLUX.1-dev), CLIP + T5.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from .tiny_pipeline import tiny_tokenizer

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tiny_t5_tokenizer() -> T5Tokenizer:
    """A character-level Unigram T5 tokenizer from a local vocabulary (no download, no sentencepiece file)."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(c, -1.0) for c in LETTERS] + [("▁" + c, -1.5) for c in LETTERS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _t5(d_model: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(
        vocab_size=64, d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=4, relative_attention_num_buckets=8,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))


def _clip_config(hidden: int, projection: int) -> CLIPTextConfig:
    return CLIPTextConfig(hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=2, max_position_embeddings=16,
                          projection_dim=projection)


def _vae(scaling: float, shift: float) -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=scaling, shift_factor=shift,
    )


def save_tiny_sd3(root: Path, with_t5: bool = True) -> Path:
    """A tiny SD3-type pipeline (8×8 latents at 16 px); ``with_t5=False`` drops the T5 encoder as SD3 allows."""
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    vae = _vae(1.5305, 0.0609)  # SD3's VAE factors
    text = CLIPTextModelWithProjection(_clip_config(16, 32))
    text_2 = CLIPTextModelWithProjection(_clip_config(16, 32))  # 16 + 16 hidden = T5's 32; pooled 32 + 32 = 64
    text_3 = _t5(32) if with_t5 else None
    tok = tiny_tokenizer(root.parent / f"{root.name}_tok")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text, tokenizer=tok, text_encoder_2=text_2, tokenizer_2=tok,
        text_encoder_3=text_3, tokenizer_3=tiny_t5_tokenizer() if with_t5 else None,
    )
    pipe.save_pretrained(root)
    return root


def save_tiny_flux(root: Path, guidance_embeds: bool = True) -> Path:
    """A tiny FLUX-type pipeline (8×8 latents packed 2×2 into 16 tokens of 64 channels at 16 px)."""
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
        axes_dims_rope=[4, 6, 6],
    )
    vae = _vae(0.3611, 0.1159)  # FLUX.1's VAE factors
    text = CLIPTextModel(_clip_config(32, 32))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)  # FLUX.1-dev's
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=tiny_tokenizer(root.parent / f"{root.name}_tok"),
        text_encoder_2=_t5(32), tokenizer_2=tiny_t5_tokenizer(), transformer=transformer,
    )
    pipe.save_pretrained(root)
    return root
