"""Benchmark runner: ``python benchmarks/run.py NAME [--quick]`` writes results/NAME.{json,md}.

Each benchmark module defines ``run(quick: bool) -> dict`` (the JSON payload, with a "markdown"
key holding the human summary). Numbers are measured in one run on this machine; medians and
ratios only, since the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {"loop_overhead": "loop_overhead", "image_step": "image_step", "image_shapes": "image_shapes",
              "fingerprint": "fingerprint", "speech_metrics": "speech_metrics", "speech_flow_step": "speech_flow_step",
              "speech_token_step": "speech_token_step", "speech": "speech", "vlm_step": "vlm_step",
              "vlm_shapes": "vlm_shapes"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run; results not committed)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--work", help="scratch directory for benchmarks that train (default: runs/bench_NAME)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    module = importlib.import_module(BENCHMARKS[args.name])
    started = time.time()
    accepts = inspect.signature(module.run).parameters
    kwargs = {"results_dir": Path(args.out)} if "results_dir" in accepts else {}
    if args.work:
        if "work" not in accepts:
            p.error(f"--work: benchmark {args.name} has no scratch directory")
        kwargs["work"] = Path(args.work)
    payload = module.run(quick=args.quick, **kwargs)
    import torch

    payload["machine"] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": payload.pop("device", "cpu"),
    }
    payload["command"] = f"python benchmarks/run.py {args.name}" + (" --quick" if args.quick else "")
    payload["date"] = time.strftime("%Y-%m-%d", time.gmtime(started))
    markdown = payload.pop("markdown")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    header = f"# {args.name}\n\n`{payload['command']}` — {payload['date']}, {payload['machine']['processor']}, " \
             f"torch {payload['machine']['torch']}, {payload['machine']['threads']} threads, " \
             f"{payload['machine']['device']}\n\n"
    (out / f"{args.name}.md").write_text(header + markdown + "\n")
    print(header + markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
