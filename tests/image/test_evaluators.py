"""Image evaluators: tiny real models (open_clip, transformers CLIP) saved to disk and loaded back through
the evaluators; each score is checked against the formula computed by hand from the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mm_align.image.evaluators import (
    EVALUATORS,
    build_evaluator,
    evaluate,
    evaluate_main,
    resolve_weights_file,
)
from mm_align.image.toyworld.shapes import ShapesOracle, ShapeSpec, render
from PIL import Image
from safetensors.torch import save_file

from mm_align.config import ConfigError

CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
PROMPTS = ["a red circle on a white background", "a blue square on a black background",
           "a green triangle on a gray background"]


def _images() -> list[Image.Image]:
    specs = [ShapeSpec("red", "circle", "white"), ShapeSpec("blue", "square", "black"),
             ShapeSpec("green", "triangle", "gray")]
    return [render(s, 48, seed=i) for i, s in enumerate(specs)]


def _open_clip_dir(path: Path, seed: int = 0) -> Path:
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**CFG)
    path.mkdir(parents=True)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": CFG, "preprocess_cfg": {
        "mean": [0.5] * 3, "std": [0.5] * 3}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "open_clip_model.safetensors"))
    return path


def _by_hand_open_clip(model, images, prompts, preprocess, tokenizer) -> np.ndarray:
    with torch.no_grad():
        img = F.normalize(model.encode_image(torch.stack([preprocess(i) for i in images])), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
    return (img * txt).sum(-1).double().numpy()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return _open_clip_dir(tmp_path_factory.mktemp("oc") / "clip")


def test_clip_score_is_the_cosine_of_the_saved_model(clip_dir):
    import open_clip

    ev = build_evaluator({"type": "clip_score", "model": f"local-dir:{clip_dir}", "device": "cpu", "batch_size": 2})
    images = _images()
    got = ev.score(images, PROMPTS)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    want = _by_hand_open_clip(model.eval(), images, PROMPTS, preprocess, tokenizer)
    assert got.shape == (3,) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.all(np.abs(got) <= 1.0 + 1e-6)
    # batching does not change a score; the prompt does; scale multiplies
    one = build_evaluator({"type": "clip_score", "model": f"local-dir:{clip_dir}", "device": "cpu", "batch_size": 1,
                           "scale": 100.0, "name": "clip100"})
    np.testing.assert_allclose(one.score(images, PROMPTS), 100 * got, rtol=1e-5, atol=1e-4)
    assert one.name == "clip100" and ev.name == "clip_score" and ev.higher_is_better
    assert not np.allclose(ev.score(images, PROMPTS[::-1]), got)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        ev.score(images, PROMPTS[:2])


def test_hps_loads_its_checkpoint_over_the_architecture(clip_dir, tmp_path):
    import open_clip

    trained = _open_clip_dir(tmp_path / "trained", seed=1)  # stands in for the fine-tuned HPS weights
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{trained}")
    ckpt = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    ev = build_evaluator({"type": "hpsv2", "checkpoint": str(ckpt), "model": f"local-dir:{clip_dir}",
                          "device": "cpu"})
    assert ev.name == "hpsv2.1"
    images = _images()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{trained}")
    want = _by_hand_open_clip(model.eval(), images, PROMPTS, preprocess, tokenizer)
    np.testing.assert_allclose(ev.score(images, PROMPTS), want, atol=1e-5)
    plain = build_evaluator({"type": "clip_score", "model": f"local-dir:{clip_dir}", "device": "cpu"})
    assert not np.allclose(plain.score(images, PROMPTS), want, atol=1e-3)  # the checkpoint, not the init, scores
    v20 = build_evaluator({"type": "hpsv2", "checkpoint": str(ckpt), "model": f"local-dir:{clip_dir}",
                           "version": "v2.0", "device": "cpu"})
    assert v20.name == "hpsv2.0"  # never mixed up with v2.1 in outputs
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"visual.nope": torch.zeros(1)}}, bad)
    with pytest.raises(ValueError, match="bad.pt: not an HPS checkpoint"):
        build_evaluator({"type": "hpsv2", "checkpoint": str(bad), "model": f"local-dir:{clip_dir}", "device": "cpu"})


@pytest.fixture(scope="module")
def pickscore_dirs(tmp_path_factory) -> tuple[Path, Path]:
    from mm_align.image.toyworld.train_shapes_sd import build_tokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    root = tmp_path_factory.mktemp("pick")
    tok = build_tokenizer(root / "tok_src")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tok)
    processor.save_pretrained(root / "processor")
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=len(tok.get_vocab()), max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                         pad_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16, logit_scale_init_value=3.0,
    )
    CLIPModel(cfg).save_pretrained(root / "model")
    return root / "model", root / "processor"


def test_pickscore_is_logit_scale_times_cosine(pickscore_dirs):
    from transformers import CLIPModel, CLIPProcessor

    model_dir, proc_dir = pickscore_dirs
    ev = build_evaluator({"type": "pickscore", "model": str(model_dir), "processor": str(proc_dir), "device": "cpu",
                          "batch_size": 2})
    images = _images()
    got = ev.score(images, PROMPTS)
    model, proc = CLIPModel.from_pretrained(model_dir).eval(), CLIPProcessor.from_pretrained(proc_dir)
    with torch.no_grad():
        inputs = proc(text=PROMPTS, images=images, padding=True, return_tensors="pt")
        img = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=inputs["input_ids"],
                                                     attention_mask=inputs["attention_mask"]).pooler_output)
        want = model.logit_scale.exp() * (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)
    np.testing.assert_allclose(got, want.double().numpy(), rtol=1e-5, atol=1e-5)
    assert abs(model.logit_scale.exp().item() - np.exp(3.0)) < 1e-5 and np.all(np.abs(got) <= np.exp(3.0) + 1e-4)


def _aesthetic_mlp_state(dim: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    sizes = [(dim, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    state = {}
    for idx, (i, o) in zip((0, 2, 4, 6, 7), sizes):
        layer = torch.nn.Linear(i, o)
        state[f"layers.{idx}.weight"], state[f"layers.{idx}.bias"] = layer.weight.data, layer.bias.data
    return state


def test_aesthetic_head_reads_the_normalised_image_embedding(clip_dir, tmp_path):
    import open_clip

    state = _aesthetic_mlp_state(CFG["embed_dim"])
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    ev = build_evaluator({"type": "aesthetic", "head": str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"),
                          "clip_model": f"local-dir:{clip_dir}", "clip_pretrained": None, "device": "cpu"})
    images = _images()
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    with torch.no_grad():
        x = F.normalize(model.eval().encode_image(torch.stack([preprocess(i) for i in images])), dim=-1)
        for idx in (0, 2, 4, 6):  # Linear, Dropout (identity at eval) … then the last two Linear layers
            x = F.linear(x, state[f"layers.{idx}.weight"], state[f"layers.{idx}.bias"])
        x = F.linear(x, state["layers.7.weight"], state["layers.7.bias"])
    np.testing.assert_allclose(ev.score(images, PROMPTS), x.squeeze(-1).double().numpy(), atol=1e-5)
    np.testing.assert_allclose(ev.score(images, ["unrelated"] * 3), ev.score(images, PROMPTS))  # image-only score

    linear = torch.nn.Linear(CFG["embed_dim"], 1)
    save_file({"weight": linear.weight.data, "bias": linear.bias.data}, str(tmp_path / "linear.safetensors"))
    lin = build_evaluator({"type": "aesthetic", "head": str(tmp_path / "linear.safetensors"),
                           "clip_model": f"local-dir:{clip_dir}", "clip_pretrained": None, "device": "cpu"})
    with torch.no_grad():
        want = linear(F.normalize(model.encode_image(torch.stack([preprocess(i) for i in images])), dim=-1))
    np.testing.assert_allclose(lin.score(images, PROMPTS), want.squeeze(-1).double().numpy(), atol=1e-5)

    torch.save({"something": torch.zeros(2)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth: not an aesthetic head"):
        build_evaluator({"type": "aesthetic", "head": str(tmp_path / "bad.pth"), "clip_model": f"local-dir:{clip_dir}",
                         "clip_pretrained": None, "device": "cpu"})


def test_build_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="not one of"):
        build_evaluator({"type": "imagereward_typo"})
    with pytest.raises(ConfigError, match="batchsize"):
        build_evaluator({"type": "clip_score", "model": "x", "batchsize": 3})
    with pytest.raises(ConfigError, match="version"):
        build_evaluator({"type": "hpsv2", "checkpoint": "x", "version": "v3"})
    assert set(EVALUATORS) == {"clip_score", "hpsv2", "pickscore", "aesthetic"}
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        resolve_weights_file(str(tmp_path / "missing.pt"))
    f = tmp_path / "here.pt"
    f.write_bytes(b"x")
    assert resolve_weights_file(str(f)) == str(f)


def test_evaluate_samples_and_pair_agreement(clip_dir, tmp_path):
    from mm_align.image.pair_writers import write_pair_folders

    from mm_align.data.records import PreferencePair

    images = _images()
    samples = tmp_path / "gen"
    (samples / "samples").mkdir(parents=True)
    with open(samples / "samples.jsonl", "w") as f:
        for i, (im, p) in enumerate(zip(images, PROMPTS)):
            im.save(samples / "samples" / f"{i}.png")
            f.write(json.dumps({"prompt": p, "file": f"samples/{i}.png"}) + "\n")
    spec = f"clip_score:model=local-dir:{clip_dir},device=cpu"
    assert evaluate_main([str(samples), "--evaluator", spec, "--evaluator", "shapes_oracle",
                          "--out", str(tmp_path / "ev")]) == 0
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["kind"] == "samples" and summary["samples"] == 3
    rows = [json.loads(line) for line in (tmp_path / "ev" / "scores.jsonl").read_text().splitlines()]
    assert [r["scores"]["shapes_oracle"] for r in rows] == [1.0, 1.0, 1.0]  # the renderer's own images are right
    assert summary["mean"]["shapes_oracle"]["mean"] == 1.0

    # pairs: the true image vs the image of another prompt; the oracle agrees with every label
    wrong = images[1:] + images[:1]
    for i in range(3):
        images[i].save(tmp_path / f"c{i}.png")
        wrong[i].save(tmp_path / f"r{i}.png")
    pairs = [PreferencePair(PROMPTS[i], str(tmp_path / f"c{i}.png"), str(tmp_path / f"r{i}.png"), id=str(i))
             for i in range(3)]
    write_pair_folders(pairs, tmp_path / "pairs")
    result = evaluate(tmp_path / "pairs", [build_evaluator({"type": "clip_score", "model": f"local-dir:{clip_dir}",
                                                            "device": "cpu"}), ShapesOracle()])
    assert result["kind"] == "pairs" and result["pairs"] == 3
    agree = result["agreement"]["shapes_oracle"]
    assert (agree["agree"], agree["disagree"], agree["ties"], agree["rate"]) == (3, 0, 0, 1.0)
    assert 0.0 < agree["ci"][0] < 1.0
    with pytest.raises(SystemExit):
        evaluate_main([str(samples)])  # --evaluator is required


def test_evaluate_names_an_unreadable_image_and_writes_nothing(clip_dir, tmp_path):
    (tmp_path / "gen").mkdir()
    row = {"prompt": PROMPTS[0], "file": "samples/gone.png"}
    (tmp_path / "gen" / "samples.jsonl").write_text(json.dumps(row) + "\n")
    ev = build_evaluator({"type": "clip_score", "model": f"local-dir:{clip_dir}", "device": "cpu"})
    with pytest.raises(ValueError, match=r"samples/gone.png: cannot read the image"):
        evaluate(tmp_path / "gen", [ev], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "gen" / "samples.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"samples.jsonl:1: malformed json"):
        evaluate(tmp_path / "gen", [ev])
