"""``mm-align generate vlm`` (mm_align.vlm.generate) end to end on the tiny LLaVA and Qwen2-VL saved to a temp dir:
single-image jsonl -> MIA-DPO augmentation -> the model's greedy answers with attention -> pairs in TRL's vision
format, read back through read_trl_vision and trained one DPO step through the VLM adapter; reruns identical;
resume after an interruption; other settings refused; random and matched-random modes; bad source lines named."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from mm_align.vlm.formats import read_trl_vision
from mm_align.vlm.generate import generate_main, generate_vlm_pairs, read_single_image_source

from mm_align import recipes
from mm_align.data import DataError
from mm_align.lora import LoraSettings
from mm_align.orchestration import run_training
from mm_align.run_config import DataConfig, RunConfig, TrainConfig

from .tiny_vlms import COLOURS, draw_shape, make_tiny_llava, make_tiny_qwen2vl

KW = dict(n_per_item=3, max_items=4, batch_size=4, max_new_tokens=4, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen_vlm")
    names = list(COLOURS)
    rows = []
    for i in range(10):
        colour, shape = names[i % 4], "circle" if i % 3 else "square"
        image = draw_shape(root / "data" / "img" / f"{i}.png", colour, shape)
        if i == 9:  # the record form, with one image
            rows.append({"id": f"s{i}", "prompt": "<image>\nWhat colour is the shape?", "images": [f"img/{i}.png"],
                         "chosen": colour})
        else:
            rows.append({"id": f"s{i}", "image": str(image.relative_to(root / "data")),
                         "question": "What colour is the shape?" if i % 2 else "Is it a circle or a square?",
                         "answer": colour if i % 2 else shape})
    src = root / "data" / "single.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"llava": make_tiny_llava(root / "llava"), "qwen2vl": make_tiny_qwen2vl(root / "qwen2vl"), "data": src,
            "root": root}


def _train_one_step(model: Path, data: Path, out: Path) -> float:
    cfg = RunConfig(adapter="vlm", model={"pretrained": str(model), "max_length": 512},
                    data=DataConfig(train=str(data), format="trl_vision"),
                    train=TrainConfig(output_dir=str(out), loss=["sigmoid"], beta=0.1, learning_rate=1e-3,
                                      lr_scheduler="constant", max_steps=1, batch_size=2, lora=LoraSettings(r=4),
                                      log_every=1, checkpointing_steps=1000, report_to=["none"],
                                      cache_dir=str(out.parent / f"{out.name}-cache"), save_final=False))
    result = run_training(cfg, adapter=recipes.build_adapter("vlm", cfg.model))
    assert result.step == 1
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_end_to_end(world, tmp_path, family):
    out = tmp_path / "pairs"
    res = generate_vlm_pairs(world[family], world["data"], out, tile_size=32, **KW)
    s = res.summary
    assert s["items"] == 4 and s["pool_items"] == 10 and s["samples"] == 12 and res.generated == 12
    assert s["pairs"] + sum(s["discarded"].values()) == 12
    assert {f: d["samples"] for f, d in s["per_format"].items()} == {"sequence": 4, "grid": 4, "pic_in_pic": 4}
    assert s["settings"]["attention_layer"] == 1 and s["settings"]["square"] == (family == "llava")
    assert s["pairs"] >= 1, s  # a random tiny model answers wrongly, and spreads its attention
    read = read_trl_vision(res.pairs_path, strict=True)
    assert len(read.records) == s["pairs"] and not read.skipped
    truth = {it.id: it.answer for it in read_single_image_source(world["data"])}
    for rec in read.records:
        aug, mia = rec.meta["augmentation"], rec.meta["mia"]
        assert rec.chosen[0]["content"][0]["text"] == truth[aug["source_id"]]  # chosen = the ground truth
        rejected = rec.rejected[0]["content"][0]["text"]
        assert rejected.strip().lower() != truth[aug["source_id"]]
        assert len(rec.meta["images"]) == (aug["n_images"] if aug["format"] == "sequence" else 1)
        assert all(Path(p).is_file() and Path(p).parent == out / "images" for p in rec.meta["images"])
        assert mia["rejection"] == "attention" and mia["ratio"] < mia["threshold"]
    sel = {x.id: x for x in res.selections}
    assert all(sel[r.id].kept for r in read.records)
    loss = _train_one_step(world[family], res.pairs_path, tmp_path / "train")
    assert loss == pytest.approx(math.log(2.0), rel=1e-5)


def test_rerun_resume_and_settings(world, tmp_path):
    out = tmp_path / "pairs"
    first = generate_vlm_pairs(world["llava"], world["data"], out, **KW)
    files = {n: (out / n).read_bytes() for n in ("train.jsonl", "summary.json", "generations.jsonl")}
    again = generate_vlm_pairs(world["llava"], world["data"], out, **KW)
    assert again.generated == 0 and again.resumed == 12
    assert {n: (out / n).read_bytes() for n in ("train.jsonl", "summary.json")} == \
        {n: files[n] for n in ("train.jsonl", "summary.json")}
    # an interruption: 5 generations kept, then a torn line
    lines = files["generations.jsonl"].decode().splitlines()
    (out / "generations.jsonl").write_text("\n".join(lines[:5]) + "\n" + lines[5][:17])
    resumed = generate_vlm_pairs(world["llava"], world["data"], out, **{**KW, "batch_size": 3})
    assert resumed.generated == 7 and resumed.resumed == 5
    assert (out / "train.jsonl").read_bytes() == files["train.jsonl"]
    assert (out / "summary.json").read_bytes() == files["summary.json"]
    assert first.summary == resumed.summary
    with pytest.raises(ValueError, match="other settings \\(seed: 0 -> 1"):
        generate_vlm_pairs(world["llava"], world["data"], out, seed=1, **KW)
    # the selection is redone from the stored generations: random mode in the same directory
    rnd = generate_vlm_pairs(world["llava"], world["data"], out, rejection="random", **KW)
    assert rnd.generated == 0 and rnd.summary["pairs"] >= first.summary["pairs"]
    assert rnd.summary["attention_rule_keeps"] == first.summary["pairs"]
    assert rnd.summary["settings"]["rejection"] == "random"
    matched = generate_vlm_pairs(world["llava"], world["data"], out, rejection="random", random_pairs="matched", **KW)
    for fmt, d in matched.summary["per_format"].items():
        assert d["pairs"] == min(d["attention_rule_keeps"], rnd.summary["per_format"][fmt]["pairs"])


def test_bad_source_lines(world, tmp_path):
    img = world["data"].parent / "img" / "0.png"
    cases = [
        ("{not json", "single.jsonl:1: malformed JSON"),
        (json.dumps({"image": str(img), "question": "What?"}), "single.jsonl:1: missing answer"),
        (json.dumps({"image": "nope.png", "question": "What?", "answer": "red"}), "image file not found"),
        (json.dumps({"image": str(img), "question": "<image>\n", "answer": "red"}), "single.jsonl:1: empty question"),
        (json.dumps({"prompt": "<image><image> What?", "images": [str(img), str(img)], "answer": "red"}),
         "needs one image and one image placeholder"),
        (json.dumps({"id": "a", "image": str(img), "question": "Q?", "answer": "red"}) + "\n"
         + json.dumps({"id": "a", "image": str(img), "question": "Q?", "answer": "red"}),
         "single.jsonl:2: id 'a' repeats line 1"),
    ]
    for text, message in cases:
        path = tmp_path / "single.jsonl"
        path.write_text(text + "\n")
        with pytest.raises(DataError, match=message.replace("?", "\\?").replace("(", "\\(")):
            read_single_image_source(path)


def test_cli(world, tmp_path, capsys):
    out = tmp_path / "cli"
    code = generate_main(["--model", str(world["llava"]), "--data", str(world["data"]), "--out", str(out),
                          "--formats", "sequence,pic_in_pic", "--n-per-item", "2", "--max-items", "2",
                          "--max-new-tokens", "3", "--batch-size", "4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "pairs kept" in printed and str(out / "train.jsonl") in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["per_format"]) == {"sequence", "pic_in_pic"} and summary["samples"] == 4
    assert generate_main(["--model", str(world["llava"]), "--data", str(world["data"])]) == 2
    assert generate_main(["--model", str(world["llava"]), "--data", str(world["data"]), "--out", str(out),
                          "--formats", "mosaic"]) == 2
    assert "formats must be a non-empty subset" in capsys.readouterr().err
