"""audio/token_models.py: the masked-token (MaskGIT) and autoregressive restorers over the codec's tokens.

Save → load round trips (directly and through the one loader, LoRA directories included), seeded sampling,
the cosine mask, locality of attention (what chunking relies on), supervised training on a toy task, and
chunked restoration against unchunked. Tiny configs: a 16 kHz codec with hop 128 (125 frames/s), 2 codebooks
of 16 entries, trained for a few seconds; restorers of width 32.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from mm_align.audio.codec import CodecConfig, SpeechCodec, train_codec
from mm_align.audio.io import load_audio, save_audio
from mm_align.audio.token_models import (
    ARRestorerConfig,
    ARTokenRestorer,
    MaskedRestorerConfig,
    MaskedTokenRestorer,
    ar_training_loss,
    cosine_mask,
    exact_overlap_seconds,
    load_restorer,
    local_attention_bias,
    restore,
    restore_file,
    restore_main,
    save_restorer,
    train_restorer,
)

SR = 16000
Q, K, D = 2, 16, 16
SHAPE = dict(num_quantizers=Q, codebook_size=K, cond_dim=D, dim=32, depth=2, heads=2, attn_window=4)


def _utterance(seed: int, seconds: float = 1.0) -> torch.Tensor:
    """Three tones with random pitches under a slow amplitude envelope."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(SR * seconds)) / SR
    freqs = 150 + 300 * torch.rand(3, generator=g)
    env = 0.5 + 0.5 * torch.sin(2 * math.pi * (1 + 3 * torch.rand(1, generator=g)) * t)
    return 0.2 * env * sum(torch.sin(2 * math.pi * f * t + 6 * torch.rand(1, generator=g)) for f in freqs)


def _degrade(wave: torch.Tensor, seed: int) -> torch.Tensor:
    return wave + 0.05 * torch.randn(wave.shape, generator=torch.Generator().manual_seed(1000 + seed))


CLEAN = [_utterance(i) for i in range(8)]
DEGRADED = [_degrade(w, i) for i, w in enumerate(CLEAN)]


def _masked(seed: int = 0, **kw) -> MaskedTokenRestorer:
    torch.manual_seed(seed)
    return MaskedTokenRestorer(MaskedRestorerConfig(**{**SHAPE, "decode_block_frames": 4, **kw}))


def _ar(seed: int = 0, **kw) -> ARTokenRestorer:
    torch.manual_seed(seed)
    return ARTokenRestorer(ARRestorerConfig(**{**SHAPE, **kw}))


@pytest.fixture(scope="module")
def codec() -> SpeechCodec:
    """Trained briefly, so its codes vary over time (an untrained RVQ maps nearly everything to one code)."""
    torch.manual_seed(0)
    c = SpeechCodec(CodecConfig(n_fft=256, hop_length=128, hidden=32, latent_dim=D, num_quantizers=Q,
                                codebook_size=K))
    train_codec(c, CLEAN, steps=30, batch_size=4, segment_seconds=0.25, lr=3e-3)
    return c


@pytest.fixture(scope="module")
def trained(codec: SpeechCodec) -> dict:
    """Both restorers (and the codec) after 80 supervised steps on the toy task (degraded = clean + noise)."""
    out: dict = {"codec": codec}
    for name, model in (("masked", _masked()), ("ar", _ar())):
        losses = train_restorer(model, codec, DEGRADED, CLEAN, steps=80, batch_size=8, crop_seconds=0.5, lr=1e-2)
        out[name] = (model, losses)
    return out


def _cond(codec: SpeechCodec, seconds: float = 0.5, seed: int = 3) -> torch.Tensor:
    return codec.features(_degrade(_utterance(seed, seconds), seed)[None])  # (1, D, N)


# ---- building blocks ---------------------------------------------------------------------------------------
def test_local_attention_bias() -> None:
    """ALiBi ``−m_h·|i − j|`` within the window (slopes 2^(−8h/H)), −inf outside it, and after the query when
    causal; a padded key is hidden except from itself."""
    bias = local_attention_bias(6, 2, 2, causal=False)
    assert bias.shape == (1, 2, 6, 6)
    assert bias[0, 0, 3, 1].item() == pytest.approx(-2 * 2**-4)
    assert bias[0, 1, 3, 4].item() == pytest.approx(-1 / 256)
    assert math.isinf(bias[0, 0, 0, 3].item()) and bias[0, 0, 3, 3].item() == 0.0
    causal = local_attention_bias(6, 2, 2, causal=True)
    assert math.isinf(causal[0, 0, 2, 3].item()) and math.isfinite(causal[0, 0, 3, 2].item())
    keys = torch.tensor([[True, True, True, True, False, False]])
    padded = local_attention_bias(6, 2, 2, causal=False, key_mask=keys)
    assert padded.shape == (1, 2, 6, 6) and math.isinf(padded[0, 0, 3, 4].item())
    assert padded[0, 0, 5, 5].item() == 0.0 and math.isinf(padded[0, 0, 5, 4].item())


def test_cosine_mask() -> None:
    """Masks only valid tokens, at least one; the same generator seed gives the same mask; the mean ratio over
    many draws is E[cos(π/2·u)] = 2/π (the cosine schedule)."""
    valid = torch.ones(Q, 20, dtype=torch.bool)
    valid[:, 15:] = False
    masks = [cosine_mask(valid, torch.Generator().manual_seed(s)) for s in range(400)]
    assert all(m.any() and not (m & ~valid).any() for m in masks)
    assert torch.equal(masks[7], cosine_mask(valid, torch.Generator().manual_seed(7)))
    assert not torch.equal(masks[7], masks[8])
    ratio = sum(float(m.sum()) / 30 for m in masks) / len(masks)
    assert ratio == pytest.approx(2 / math.pi, abs=0.04)


@pytest.mark.parametrize("paradigm", ["masked", "ar"])
def test_outputs_are_local(codec: SpeechCodec, paradigm: str) -> None:
    """Changing the condition at frame 30 changes one forward's logits only within ``receptive_field_frames``
    of it, and for the AR model never before it minus the conditioning kernel's look-ahead."""
    model = _masked() if paradigm == "masked" else _ar()
    cond = _cond(codec)
    tokens = codec.encode(_utterance(3, 0.5)[None])
    bumped = cond.clone()
    bumped[:, :, 30] += 5.0
    with torch.no_grad():
        diff = (model(tokens, bumped) - model(tokens, cond)).abs().amax(dim=(0, 1, 3))  # (N,)
    changed = (diff > 0).nonzero().flatten()
    r = model.receptive_field_frames
    assert changed.numel() > 0 and changed.min() >= 30 - r and changed.max() <= 30 + r
    if paradigm == "ar":
        assert changed.min() >= 30 - model.config.cond_kernel // 2


# ---- save / load -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("paradigm", ["masked", "ar"])
def test_save_load_round_trip(codec: SpeechCodec, tmp_path: Path, paradigm: str) -> None:
    """save_pretrained → from_pretrained (config.json + model.safetensors) and save_restorer → load_restorer
    (paradigm read from config.json, the codec from codec/) give equal logits and equal samples."""
    model = _masked(seed=1) if paradigm == "masked" else _ar(seed=1)
    cls = type(model)
    model.save_pretrained(tmp_path / "plain")
    again = cls.from_pretrained(tmp_path / "plain")
    assert again.config == model.config
    save_restorer(model, codec, tmp_path / "dir")
    loaded, loaded_codec = load_restorer(tmp_path / "dir")
    assert type(loaded) is cls and loaded.config.paradigm == paradigm
    cond = _cond(codec)
    tokens = codec.encode(_utterance(3, 0.5)[None])
    with torch.no_grad():
        want = model.eval()(tokens, cond)
        assert torch.equal(again(tokens, cond), want) and torch.equal(loaded(tokens, cond), want)
    kw = {"steps": 3} if paradigm == "masked" else {}
    assert torch.equal(loaded.generate(cond, seed=5, **kw), model.generate(cond, seed=5, **kw))
    assert torch.equal(loaded_codec.encode(_utterance(3, 0.5)), codec.encode(_utterance(3, 0.5)))


def test_load_restorer_refuses_what_it_cannot_load(codec: SpeechCodec, tmp_path: Path) -> None:
    """A directory without config.json, an unknown paradigm, and a codec that does not fit are errors."""
    with pytest.raises(FileNotFoundError, match="not a restorer directory"):
        load_restorer(tmp_path)
    save_restorer(_masked(), codec, tmp_path / "m")
    cfg = (tmp_path / "m" / "config.json").read_text().replace('"masked"', '"flow"')
    (tmp_path / "m" / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match="paradigm 'flow'; valid: masked, ar"):
        load_restorer(tmp_path / "m")
    save_restorer(_ar(codebook_size=8), codec, tmp_path / "a")
    with pytest.raises(ValueError, match="the restorer expects Q=2, K=8"):
        load_restorer(tmp_path / "a")


def test_lora_directory_loads_through_load_restorer_and_peft(codec: SpeechCodec, tmp_path: Path) -> None:
    """A peft LoRA directory naming its base restorer loads back with the LoRA applied — through load_restorer
    and through peft's own PeftModel.from_pretrained — with the same outputs."""
    from peft import PeftModel
    from safetensors.torch import save_file

    from mm_align.lora import LoraSettings, add_lora, lora_state_dict

    save_restorer(_ar(), codec, tmp_path / "base")
    model = add_lora(_ar(), LoraSettings(r=2), ["to_q", "to_v"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    config = model.peft_config["default"]
    config.base_model_name_or_path = str(tmp_path / "base")
    config.save_pretrained(str(tmp_path / "lora"))
    save_file({f"base_model.model.{k}": v for k, v in lora_state_dict(model).items()},
              str(tmp_path / "lora" / "adapter_model.safetensors"))
    cond = _cond(codec)
    tokens = codec.encode(_utterance(3, 0.5)[None])
    loaded, _ = load_restorer(tmp_path / "lora")
    via_peft = PeftModel.from_pretrained(ARTokenRestorer.from_pretrained(tmp_path / "base"), tmp_path / "lora").eval()
    with torch.no_grad():
        want = model.eval()(tokens, cond)
        assert not torch.allclose(want, _ar()(tokens, cond))  # the LoRA does something
        assert torch.allclose(loaded(tokens, cond), want, atol=1e-6)
        assert torch.allclose(via_peft(tokens, cond), want, atol=1e-6)


# ---- sampling ----------------------------------------------------------------------------------------------
def test_masked_sampling(codec: SpeechCodec, trained) -> None:
    """Seeded: the same seed gives the same tokens, another seed others; greedy ignores the seed; one greedy step
    is the argmax of one all-[MASK] forward; no [MASK] is left; padded frames come back as 0."""
    model = trained["masked"][0]
    cond = _cond(codec)
    a, b, c = (model.generate(cond, steps=4, seed=s) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.max()) < K and a.shape == (1, Q, cond.shape[-1])
    assert torch.equal(model.generate(cond, steps=4, greedy=True, seed=1), model.generate(cond, steps=4, greedy=True))
    with torch.no_grad():
        one = model(torch.full((1, Q, cond.shape[-1]), model.mask_id), cond).argmax(-1)
    assert torch.equal(model.generate(cond, steps=1, greedy=True), one)
    mask = torch.ones(1, cond.shape[-1], dtype=torch.bool)
    mask[:, 50:] = False
    padded = model.generate(cond, steps=4, seed=1, frame_mask=mask)
    assert (padded[:, :, 50:] == 0).all()


def test_ar_sampling(codec: SpeechCodec, trained) -> None:
    """Seeded; top_k=1 is greedy; greedy tokens are the argmax of the teacher-forced forward on themselves (the
    windowed frame-by-frame generation equals the full sequence's computation); a prefix is kept as given."""
    model = trained["ar"][0]
    cond = _cond(codec)
    a, b, c = (model.generate(cond, seed=s) for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = model.generate(cond, greedy=True)
    assert torch.equal(model.generate(cond, top_k=1, seed=9), greedy)
    with torch.no_grad():
        assert torch.equal(model(greedy, cond).argmax(-1), greedy)
    prefix = torch.randint(K, (1, Q, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.generate(cond, prefix=prefix, seed=1)[:, :, :10], prefix)


# ---- training ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("paradigm", ["masked", "ar"])
def test_supervised_training_lowers_the_loss(trained, paradigm: str) -> None:
    """40 steps on the toy task (clean codes from their noisy versions) start at chance, ln K ≈ 2.8, and lower the
    loss: the masked model's (MaskGIT, scored on cosine-schedule masks) by over 10 %, the AR model's (which can
    also lean on the previous frame) by over 30 %. The same seed trains the same way."""
    model, losses = trained[paradigm]
    assert losses[0] == pytest.approx(math.log(K), abs=0.3)
    assert sum(losses[-5:]) / 5 < {"masked": 0.9, "ar": 0.7}[paradigm] * sum(losses[:5]) / 5
    codec = trained["codec"]
    again = _masked() if paradigm == "masked" else _ar()
    assert train_restorer(again, codec, DEGRADED, CLEAN, steps=3, batch_size=8, crop_seconds=0.5, lr=1e-2) \
        == losses[:3]


# ---- restoration -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("paradigm", ["masked", "ar"])
def test_chunked_restoration_equals_unchunked(codec: SpeechCodec, trained, paradigm: str) -> None:
    """A 4 s input restored in chunks (overlap = :func:`exact_overlap_seconds`, chunks 2.5× that) equals the
    one-shot restoration everywhere, overlaps included: |chunked − unchunked| ≤ 1e-5 × peak.

    Why that tolerance: decoding is deterministic (greedy AR; greedy masked, block-local ranking), the
    restorer, the codec encoder and decoder are local, and every output sample is taken from chunk positions at
    least a quarter overlap (≥ the receptive field) from the chunk's edges, so the chunks see the same inputs as
    the unchunked pass there and decode the same tokens; what remains is float32 rounding of convolutions and
    FFTs over different lengths (~1e-7 relative here). A flipped token shows as a difference of percents of the
    peak: with a thirty-second of that overlap the chunks no longer agree (the check bites; an eighth was
    still enough context for the masked model trained on this machine's float kernels)."""
    model = trained[paradigm][0]
    wave = _degrade(torch.cat([_utterance(60 + i) for i in range(4)]), 60)  # (64000,), 4 s
    overlap = exact_overlap_seconds(model, codec, steps=3)
    kw = dict(steps=3, greedy=True)
    whole = restore(model, codec, wave, SR, chunk_seconds=None, **kw)
    chunked = restore(model, codec, wave, SR, chunk_seconds=2.5 * overlap, overlap_seconds=overlap, **kw)
    assert whole.shape == chunked.shape == wave.shape
    tokens = codec.encode(whole)
    assert tokens.unique().numel() > 4  # a restoration that varies, not one repeated code
    peak = float(whole.abs().max())
    assert float((chunked - whole).abs().max()) <= 1e-5 * peak
    short = restore(model, codec, wave, SR, chunk_seconds=2.5 * overlap, overlap_seconds=overlap / 32, **kw)
    assert float((short - whole).abs().max()) > 1e-3 * peak


def test_chunking_validates_the_overlap(codec: SpeechCodec) -> None:
    wave = _utterance(1, 2.0)
    with pytest.raises(ValueError, match="at most half the chunk"):
        restore(_ar(), codec, wave, SR, chunk_seconds=0.5, overlap_seconds=0.4)


def test_restore_file_and_main_load_any_paradigm(codec: SpeechCodec, trained, tmp_path: Path) -> None:
    """One command restores with a masked or an AR directory: files at the codec's rate, the input's length
    (resampled from 8 kHz); restore_main takes a directory of inputs too."""
    for name in ("masked", "ar"):
        save_restorer(trained[name][0], codec, tmp_path / name)
    save_audio(tmp_path / "in" / "a.wav", _degrade(_utterance(70, 0.6), 70)[::2], 8000)
    save_audio(tmp_path / "in" / "b.wav", _degrade(_utterance(71, 0.4), 71), SR)
    for name in ("masked", "ar"):
        out = restore_file(tmp_path / name, tmp_path / "in" / "a.wav", tmp_path / f"{name}.wav", steps=3)
        wave, sr = load_audio(out)
        assert sr == SR and abs(wave.numel() - int(0.6 * SR)) <= 2
    assert restore_main([str(tmp_path / "masked"), str(tmp_path / "in"), str(tmp_path / "out"), "--steps", "2",
                         "--greedy"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.wav", "b.wav"]


def test_ar_history_noise_corrupts_the_fed_history_not_the_targets(codec: SpeechCodec) -> None:
    model = _ar()
    codes = codec.encode(CLEAN[0][None])  # (1, Q, N)
    cond = codec.features(DEGRADED[0][None])
    mask = torch.ones(1, codes.shape[-1], dtype=torch.bool)
    clean_loss = ar_training_loss(model, codes, cond, mask)
    assert ar_training_loss(model, codes, cond, mask, 0.0, torch.Generator().manual_seed(0)) == clean_loss
    noisy = ar_training_loss(model, codes, cond, mask, 0.5, torch.Generator().manual_seed(0))
    again = ar_training_loss(model, codes, cond, mask, 0.5, torch.Generator().manual_seed(0))
    assert noisy != clean_loss and noisy == again  # seeded
    fed = torch.randint(K, codes.shape, generator=torch.Generator().manual_seed(1))
    logits = model(codes, cond, mask, inputs=fed)
    ref = model.trunk(model.embed_tokens(model._previous(fed)) + model.embed_condition(cond, mask), mask)
    torch.testing.assert_close(logits, ref)
