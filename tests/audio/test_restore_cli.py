"""`mm-align restore speech --model DIR IN OUT` routes flow, masked and AR restorers (and LoRA dirs over them)."""

from __future__ import annotations

import math

import pytest
import torch
from mm_align.audio.codec import CodecConfig, SpeechCodec
from mm_align.audio.flow_enhancer import FlowEnhancer
from mm_align.audio.io import load_audio, save_audio
from mm_align.audio.restore import paradigm_of
from mm_align.audio.token_models import (
    ARRestorerConfig,
    ARTokenRestorer,
    MaskedRestorerConfig,
    MaskedTokenRestorer,
    save_restorer,
)

from mm_align.cli import main

SR = 16000
SHAPE = dict(num_quantizers=2, codebook_size=16, cond_dim=16, dim=32, depth=1, heads=2, attn_window=4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("restorers")
    torch.manual_seed(0)
    FlowEnhancer(channels=(4, 8), norm_groups=2).save_pretrained(root / "flow")
    codec = SpeechCodec(CodecConfig(n_fft=256, hop_length=128, hidden=16, latent_dim=16, num_quantizers=2,
                                    codebook_size=16))
    save_restorer(MaskedTokenRestorer(MaskedRestorerConfig(**SHAPE)), codec, root / "masked")
    save_restorer(ARTokenRestorer(ARRestorerConfig(**SHAPE)), codec, root / "ar")
    t = torch.arange(SR // 2) / SR
    save_audio(root / "in.wav", 0.3 * torch.sin(2 * math.pi * 220 * t), SR)
    return root


@pytest.mark.parametrize("paradigm", ["flow", "masked", "ar"])
def test_one_command_restores_every_paradigm(models, tmp_path, paradigm):
    assert paradigm_of(models / paradigm) == paradigm
    out = tmp_path / "out.wav"
    assert main(["restore", "speech", "--model", str(models / paradigm), str(models / "in.wav"), str(out),
                 "--steps", "1", "--chunk-seconds", "0"]) == 0
    wave, sr = load_audio(out)
    assert sr == SR and wave.numel() == SR // 2 and torch.isfinite(wave).all()


def test_restore_needs_a_model(tmp_path, capsys):
    assert main(["restore", "speech", str(tmp_path / "a.wav"), str(tmp_path / "b.wav")]) == 2
    assert "--model DIR" in capsys.readouterr().err
    assert main(["restore", "speech", "--model", str(tmp_path / "nope"), "a", "b"]) == 2
    assert "no such directory" in capsys.readouterr().err
