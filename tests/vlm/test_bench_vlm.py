"""``mm-align bench vlm`` end to end (mm_align.vlm.bench) on the tiny LLaVA of tests/vlm/tiny_vlms and fixture copies
of all six benchmarks in their published layouts (tests/vlm/test_bench_formats.py writes them).

The tiny model's accuracy is whatever it is; what is checked: the JSON's structure and bookkeeping (every accuracy
recomputed from the stored responses through the extraction rules), that a rerun gives the same JSON apart from
``timing``, that a LoRA directory is loaded over its base (a zero-initialised LoRA answers exactly as the base, a
random one as ``PeftModel.from_pretrained`` loaded here), and POPE's metrics on hand-made predictions.
"""

from __future__ import annotations

import json

import pytest
import torch
from mm_align.vlm.answer_extraction import extract_answer, is_correct
from mm_align.vlm.bench import bench_main, bench_vlm, item_messages, item_text, parse_bench, pope_metrics
from mm_align.vlm.bench_formats import BenchItem, read_benchmark
from mm_align.vlm.vlm_generation import greedy_answers
from mm_align.vlm.vlm_loading import load_vlm
from peft import PeftModel

from .test_bench_formats import (
    write_blink,
    write_mantis,
    write_mmmu,
    write_muirbench,
    write_nlvr2,
    write_pope,
)
from .tiny_vlms import make_tiny_llava

BENCHES = ("mmmu", "blink", "mantis", "muirbench", "nlvr2", "pope")


def _lora(base, path, zero: bool):
    from peft import LoraConfig, get_peft_model

    model, processor = load_vlm(base)
    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=True if zero else False))
    peft.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_vlm")
    base = make_tiny_llava(root / "base")
    models = {"base": base, "zero_lora": _lora(base, root / "zero_lora", True),
              "lora": _lora(base, root / "lora", False)}
    pope = write_pope(root / "pope")
    benches = {"mmmu": str(write_mmmu(root / "MMMU")), "blink": str(write_blink(root / "BLINK")),
               "mantis": str(write_mantis(root / "Mantis-Eval")), "muirbench": str(write_muirbench(root / "MUIR")),
               "nlvr2": str(write_nlvr2(root / "nlvr2")), "pope": f"{pope},images={root / 'pope' / 'val2014'}"}
    kw = {"max_new_tokens": 4, "batch_size": 3, "n_boot": 500, "progress": False, "examples": 2}
    first = bench_vlm(models, benches, root / "out1", **kw)
    second = bench_vlm(models, benches, root / "out2", **kw)
    return root, models, benches, first, second


def test_results_structure_and_bookkeeping(setup):
    root, models, benches, results, _ = setup
    assert results["command"] == "bench vlm" and results["order"] == ["base", "zero_lora", "lora"]
    assert results["baseline"] == "base" and set(results["benchmarks"]) == set(BENCHES)
    assert results["benchmarks"]["mmmu"]["skipped_by_reader"] == {
        "no gold answer (a split whose answers are withheld)": 1}
    assert results["benchmarks"]["mmmu"]["kinds"] == {"multiple_choice": 2, "open": 1}
    assert results["models"]["lora"]["kind"] == "lora"
    assert results["models"]["lora"]["base"] == str(models["base"].resolve())
    assert results["models"]["base"]["kind"] == "model"
    for name in BENCHES:
        spec = parse_bench(f"{name}={benches[name]}")
        items = read_benchmark(spec.format, spec.path, **spec.options).items
        assert results["benchmarks"][name]["ids"] == [i.id for i in items]
        for model in results["order"]:
            entry = results["models"][model]["benchmarks"][name]
            per = entry["per_item"]
            assert all(len(per[k]) == len(items) for k in ("response", "parsed", "rule", "correct"))
            for item, response, parsed, correct in zip(items, per["response"], per["parsed"], per["correct"]):
                e = extract_answer(response, item.kind, item.options)
                assert (e.answer, int(is_correct(e, item.answer, item.kind))) == (parsed, correct)
            assert entry["accuracy"] == pytest.approx(sum(per["correct"]) / len(items))
            assert entry["unparsed"] == sum(p is None for p in per["parsed"])
            if "subsets" in entry:
                assert sum(s["n"] for s in entry["subsets"].values()) == len(items)
                assert sum(s["correct"] for s in entry["subsets"].values()) == entry["correct"]
            assert ("vs_baseline" in entry) == (model != "base")
            if model != "base":
                vs = entry["vs_baseline"]
                base_correct = results["models"]["base"]["benchmarks"][name]["per_item"]["correct"]
                assert vs["mean_diff"] == pytest.approx((sum(per["correct"]) - sum(base_correct)) / len(items))
                assert vs["ci"][0] <= vs["mean_diff"] <= vs["ci"][1] and vs["n"] == len(items)
    pope = results["models"]["base"]["benchmarks"]["pope"]
    assert set(pope["pope"]) >= {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    assert pope["pope"]["accuracy"] == pytest.approx(pope["accuracy"])
    assert set(results["models"]["base"]["benchmarks"]["mmmu"]["subsets"]) == {"Accounting", "Art"}


def test_rerun_gives_the_same_json(setup):
    root, _, _, first, second = setup
    a = json.loads((root / "out1" / "results.json").read_text())
    b = json.loads((root / "out2" / "results.json").read_text())
    assert "timing" in a and "timing" in b
    a.pop("timing"), b.pop("timing")
    assert a == b
    assert (root / "out1" / "results.md").read_text() == (root / "out2" / "results.md").read_text()


def test_lora_dirs_load_over_their_base(setup):
    root, models, benches, results, _ = setup
    for name in BENCHES:
        base = results["models"]["base"]["benchmarks"][name]
        zero = results["models"]["zero_lora"]["benchmarks"][name]
        assert zero["per_item"]["response"] == base["per_item"]["response"]  # a zero LoRA changes nothing
        assert zero["vs_baseline"]["mean_diff"] == 0.0 and zero["vs_baseline"]["ci"] == [0.0, 0.0]
    # the random LoRA answers as the adapter loaded here through peft itself
    model, processor = load_vlm(models["base"])
    model = PeftModel.from_pretrained(model, str(models["lora"])).eval()
    items = read_benchmark("blink", benches["blink"]).items
    direct = greedy_answers(model, processor, [(item_messages(i), i.images) for i in items], max_new_tokens=4,
                            batch_size=3)
    assert results["models"]["lora"]["benchmarks"]["blink"]["per_item"]["response"] == direct


def test_markdown_and_report(setup):
    root, _, _, results, _ = setup
    md = (root / "out1" / "results.md").read_text()
    assert "| benchmark | items | base | zero_lora | lora | zero_lora − base [95% CI] | lora − base [95% CI] |" in md
    assert "| POPE | model | accuracy | precision | recall | F1 | yes-ratio |" in md
    assert "↳ Accounting" in md and "LoRA over" in md and "Skipped by the readers: mmmu: 1" in md
    page = (root / "out1" / "report.html").read_text()
    assert page.count("<svg") == 1 and page.count("class='item'") == 2 * len(BENCHES)
    assert "data:image/png;base64," in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")


def test_pope_metrics_by_hand():
    golds = ["yes", "yes", "yes", "yes", "no", "no", "no", "no"]
    parsed = ["yes", "no", "yes", "yes", "yes", "yes", None, "no"]
    m = pope_metrics(parsed, golds)
    # TP = 3 (items 0, 2, 3), FN = 1 (item 1), FP = 2 (items 4, 5), TN = 1 (item 7); item 6 unparsed on a "no"
    assert (m["tp"], m["fn"], m["fp"], m["tn"], m["unparsed"]) == (3, 1, 2, 1, 1)
    assert m["accuracy"] == pytest.approx(4 / 8)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["recall"] == pytest.approx(3 / 4)
    assert m["f1"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))
    assert m["yes_ratio"] == pytest.approx(5 / 8)  # the model's yes answers, not the gold ones (4 / 8)
    # an unparsed answer on a "yes" item is a false negative
    m = pope_metrics([None, "no"], ["yes", "no"])
    assert (m["tp"], m["fn"], m["precision"], m["recall"], m["f1"], m["yes_ratio"]) == (0, 1, 0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="as many answers as gold answers"):
        pope_metrics(["yes"], ["yes", "no"])


def test_item_text():
    item = BenchItem("1", ["x"], "<image>\nWhich colour?", ["red", " blue "], "B", "multiple_choice")
    assert item_text(item) == ("<image>\nWhich colour?\nA. red\nB. blue\n"
                               "Answer with the option's letter from the given choices directly.")
    yn = BenchItem("2", ["x"], "<image>\nIs there a dog?", None, "no", "yes_no")
    assert item_text(yn).endswith("Is there a dog?\nAnswer the question using a single word or phrase.")
    own = BenchItem("3", ["x", "y"], "<image><image> Both red.", None, "true", "yes_no",
                    instruction="Answer true or false.")
    assert item_text(own).endswith("Both red.\nAnswer true or false.")


def test_command_line(setup, tmp_path, capsys):
    root, models, benches, _, _ = setup
    out = tmp_path / "cli"
    code = bench_main(["--model", f"base={models['base']}", "--model", f"lora={models['lora']}", "--bench",
                       f"pope={benches['pope']}", "--bench", f"nlvr2_dev={benches['nlvr2']}", "--out", str(out),
                       "--max-items", "3", "--max-new-tokens", "3", "--n-boot", "200", "--baseline", "lora"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["baseline"] == "lora" and results["benchmarks"]["nlvr2_dev"]["format"] == "nlvr2"
    assert results["benchmarks"]["pope"]["items"] == 3
    assert "vs_baseline" in results["models"]["base"]["benchmarks"]["pope"]
    assert (out / "report.html").is_file() and "report:" in capsys.readouterr().out
    assert bench_main(["--model", f"base={models['base']}", "--out", str(out)]) == 2
    assert "needs --bench" in capsys.readouterr().err
    assert bench_main(["--model", f"base={models['base']}", "--bench", f"vqa={benches['nlvr2']}",
                       "--out", str(out)]) == 2
    assert "benchmark 'vqa': unknown format" in capsys.readouterr().err
    assert bench_main(["--model", f"base={models['base']}", "--bench", f"pope={benches['pope']}", "--out", str(out),
                       "--baseline", "other"]) == 2
    assert "--baseline 'other' is not one of the models (base)" in capsys.readouterr().err
    assert bench_main(["--model", f"base={root}", "--bench", f"pope={benches['pope']}", "--out", str(out)]) == 2
    assert "error:" in capsys.readouterr().err  # a folder that holds no model


def test_parse_bench_options(setup):
    _, _, benches, _, _ = setup
    spec = parse_bench(f"pope_random={benches['pope']}")
    assert spec.format == "pope" and set(spec.options) == {"images"}
    with pytest.raises(ValueError, match="option 'images' is not key=value"):
        parse_bench(f"pope={benches['pope'].split(',')[0]},images")
    with pytest.raises(FileNotFoundError, match="--bench mmmu: /nowhere: no such file or directory"):
        parse_bench("mmmu=/nowhere")
