"""Tiny untrained restorers of every paradigm, saved as model directories, whose outputs the metric suite can score.

A flow enhancer with a small velocity (its sample stays near its small initial noise) and a masked-token restorer
over a codec whose decoder is scaled ×3 (about −31 dBFS): loud enough not to count as silent, never clipped.
Built from configs and saved with ``save_pretrained`` / ``save_restorer``, as a user's directories would be.
"""

from __future__ import annotations

from pathlib import Path

import torch
from mm_align.audio.codec import CodecConfig, SpeechCodec
from mm_align.audio.flow_enhancer import FlowEnhancer
from mm_align.audio.token_models import MaskedRestorerConfig, MaskedTokenRestorer, save_restorer

__all__ = ["TOKEN_SHAPE", "tiny_codec", "write_tiny_restorers"]

TOKEN_SHAPE = dict(num_quantizers=2, codebook_size=16, cond_dim=16, dim=32, depth=1, heads=2, attn_window=4)


def tiny_codec() -> SpeechCodec:
    """An untrained 2-codebook codec of 16 entries (call ``torch.manual_seed`` first for a fixed one)."""
    return SpeechCodec(CodecConfig(n_fft=256, hop_length=128, hidden=16, latent_dim=16, num_quantizers=2,
                                   codebook_size=16))


def write_tiny_restorers(root: Path, before_scaling=None) -> Path:
    """``root/flow`` and ``root/masked`` (seeded); ``before_scaling(codec)`` runs on the codec before its decoder
    is scaled up (to save a quiet model over the unscaled codec, say)."""
    torch.manual_seed(0)
    flow = FlowEnhancer(channels=(4, 8), norm_groups=2, sigma=0.1)
    with torch.no_grad():  # a small velocity: the sample stays near its (small) initial noise
        flow.conv_out.weight.mul_(0.1)
        flow.conv_out.bias.mul_(0.1)
    flow.save_pretrained(root / "flow")
    codec = tiny_codec()
    if before_scaling is not None:
        before_scaling(codec)
    with torch.no_grad():
        codec.decoder[-1].weight.mul_(3.0)  # compressed magnitudes ×3: about −31 dBFS
        codec.decoder[-1].bias.mul_(3.0)
    save_restorer(MaskedTokenRestorer(MaskedRestorerConfig(**TOKEN_SHAPE)), codec, root / "masked")
    return root
