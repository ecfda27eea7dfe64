"""The image package's shared homes: image IO, scorer building, the readers and writers of image pairs, and
the sampler flags of `mm-align generate image` / `mm-align bench image` (one helper, every SamplerConfig field)."""

from __future__ import annotations

import argparse

import pytest
from mm_align.image import (
    bench,
    converters,
    diffusion_adapter,
    evaluators,
    generate,
    image_checks,
    image_io,
    pair_readers,
    pair_writers,
)
from mm_align.image.sampling import SamplerConfig, add_sampler_args, sampler_from_args
from PIL import Image


def test_old_import_locations_still_work():
    assert diffusion_adapter.load_image is image_io.load_image
    assert diffusion_adapter.image_to_tensor is image_io.image_to_tensor
    assert image_checks.IMAGE_EXTENSIONS is image_io.IMAGE_EXTENSIONS
    assert generate.build_scorers is evaluators.build_scorers
    assert generate.parse_evaluator_arg is evaluators.parse_evaluator_arg
    for name in ("detect_image_format", "iter_pair_folder_rows", "read_image_pairs", "read_pair_folders", "FORMATS"):
        assert getattr(converters, name) is getattr(pair_readers, name)
    for name in ("write_image_jsonl", "write_pair_folders", "write_pickapic"):
        assert getattr(converters, name) is getattr(pair_writers, name)
    assert set(converters.__all__) >= {"convert", "convert_main", "read_pair_folders", "write_pickapic"}


def test_png_bytes_is_lossless():
    image = Image.new("RGB", (5, 3), (10, 200, 30))
    image.putpixel((2, 1), (1, 2, 3))
    data = image_io.png_bytes(image)
    assert data.startswith(b"\x89PNG")
    assert image_io.load_image(data).tobytes() == image.tobytes()


def test_sampler_flags_cover_every_field_and_default_to_the_config():
    parser = argparse.ArgumentParser()
    add_sampler_args(parser)
    assert sampler_from_args(parser.parse_args([])) == SamplerConfig()
    args = parser.parse_args(["--steps", "3", "--guidance-scale", "2.5", "--negative-prompt", "blurry",
                              "--batch-size", "4", "--resolution", "16", "--device", "cpu", "--dtype", "bfloat16"])
    assert sampler_from_args(args) == SamplerConfig(steps=3, guidance_scale=2.5, negative_prompt="blurry",
                                                    batch_size=4, resolution=16, device="cpu", dtype="bfloat16")
    with pytest.raises(SystemExit):
        parser.parse_args(["--dtype", "float8"])


SAMPLER_ARGV = ["--steps", "3", "--guidance-scale", "2", "--batch-size", "4", "--device", "cpu", "--resolution", "16",
                "--negative-prompt", "ugly", "--dtype", "float16"]
SAMPLER = SamplerConfig(steps=3, guidance_scale=2.0, batch_size=4, device="cpu", resolution=16,
                        negative_prompt="ugly", dtype="float16")


class _Stop(Exception):
    pass


def _capture(store: dict, key: str, position: int):
    def fake(*args, **kwargs):
        store[key] = kwargs.get("sampler", args[position] if len(args) > position else None)
        raise _Stop

    return fake


def test_generate_and_bench_take_the_same_sampler_flags(tmp_path, monkeypatch):
    seen: dict = {}
    monkeypatch.setattr(generate, "generate", _capture(seen, "generate", 7))
    monkeypatch.setattr(bench, "bench", _capture(seen, "bench", 5))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle on a white background\n")
    with pytest.raises(_Stop):
        generate.generate_main(["--model", "shapes", "--prompts", str(prompts), "--out", str(tmp_path / "g"),
                                "--evaluator", "shapes_oracle", *SAMPLER_ARGV])
    with pytest.raises(_Stop):
        bench.bench_main(["--model", "shapes", "--prompts", str(prompts), "--out", str(tmp_path / "b"),
                          "--evaluator", "shapes_oracle", *SAMPLER_ARGV])
    assert seen == {"generate": SAMPLER, "bench": SAMPLER}
