"""``mm-align``: one entry point, an explicit list of commands.

    mm-align train --config CONFIG [key=value ...]
    mm-align generate|evaluate|bench|convert MODALITY [args ...]
    mm-align doctor DATA [--format F] [--kind paired|unpaired] [--modality M]
    mm-align report RUN_DIR
    mm-align quickstart [--output-dir DIR] [--world shapes|synthetic] [--steps N]
    mm-align ls [losses|adapters|configs|accelerate [NAME]]

Every command also runs as ``accelerate launch -m mm_align.cli COMMAND ...``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

COMMANDS = ("train", "generate", "evaluate", "bench", "convert", "doctor", "report", "quickstart", "ls")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm-align", description="Preference alignment across modalities.")
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    sub.required = True

    t = sub.add_parser("train", help="train a model on preference data")
    t.add_argument("--config", required=True, help="a YAML file or the name of a shipped config (mm-align ls)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.learning_rate=1e-5")

    modality_commands = (
        ("generate", "generate preference data"),
        ("evaluate", "score samples with evaluators"),
        ("bench", "benchmark base vs aligned"),
        ("convert", "convert datasets between formats"),
    )
    for name, what in modality_commands:
        g = sub.add_parser(name, help=f"{what} for a modality")
        g.add_argument("modality", help="image, video, vlm or speech")
        g.add_argument("args", nargs=argparse.REMAINDER, help="the modality command's own arguments")

    d = sub.add_parser("doctor", help="validate a preference dataset before training")
    d.add_argument("data", help="jsonl file, parquet file or shard directory, or HF dataset directory")
    d.add_argument("--format", default="auto")
    d.add_argument("--kind", choices=("paired", "unpaired"), default="paired")
    d.add_argument("--modality", default=None, help="add the modality's own checks (e.g. image: corrupt/tiny images)")

    r = sub.add_parser("report", help="render a run's training curves as one HTML page")
    r.add_argument("run_dir")
    r.add_argument("--output", default=None)

    q = sub.add_parser("quickstart", help="the embedded default, end to end, with a report")
    q.add_argument("--output-dir", default="runs/quickstart")
    q.add_argument("--world", choices=("shapes", "synthetic"), default="shapes",
                   help="shapes: text-to-image on the shapes world; synthetic: the core toy world")
    q.add_argument("--steps", type=int, default=None, help="training steps (default: the world's own)")

    ls = sub.add_parser("ls", help="list losses, adapters, shipped configs and accelerate configs")
    ls.add_argument("what", nargs="?", choices=("losses", "adapters", "configs", "accelerate"), default=None)
    ls.add_argument("name", nargs="?", default=None,
                    help="with 'accelerate': print only this config's path (ddp, fsdp, zero2, zero3)")
    return p


def cmd_train(config: str, overrides: Sequence[str]) -> int:
    from mm_align.orchestration import load_run_config, run_training

    result = run_training(load_run_config(config, overrides), log=print)
    if result.is_main_process:
        print(
            f"trained {result.step} steps ({result.skipped_steps} skipped) on {result.num_processes} process(es); "
            f"output: {result.output_dir}"
        )
    return 0


def cmd_modality(command: str, modality: str, args: Sequence[str]) -> int:
    from mm_align.recipes import MODALITIES, MODALITY_COMMANDS, load_object

    if modality not in MODALITIES:
        print(f"error: unknown modality '{modality}'; valid: {', '.join(MODALITIES)}", file=sys.stderr)
        return 2
    target = MODALITY_COMMANDS.get((command, modality))
    if target is None:
        print(
            f"mm-align {command} {modality}: not implemented yet — the {modality} modality has not landed this "
            "command. Available now: " + (", ".join(f"{c} {m}" for c, m in sorted(MODALITY_COMMANDS)) or "none"),
            file=sys.stderr,
        )
        return 2
    return int(load_object(target)(list(args)) or 0)


def cmd_doctor(data: str, fmt: str, kind: str, modality: str | None = None) -> int:
    from mm_align.recipes import modality_doctor

    report = modality_doctor(modality)(data, format=fmt, kind=kind)
    print(report.table())
    print(f"{report.source}: {report.rows} rows, {report.valid} valid — {'OK' if report.ok else 'ERRORS FOUND'}")
    return 0 if report.ok else 1


def cmd_ls(what: str | None, name: str | None = None) -> int:
    from mm_align.losses import LOSSES
    from mm_align.recipes import ADAPTERS, MODALITY_COMMANDS, accelerate_configs, shipped_configs

    if name is not None:
        configs = accelerate_configs()
        if what != "accelerate" or name not in configs:
            raise ValueError(f"'mm-align ls accelerate NAME' prints one accelerate config; NAME is one of "
                             f"{', '.join(sorted(configs))}")
        print(configs[name])
        return 0
    if what in (None, "losses"):
        print("losses:")
        for name, spec in sorted(LOSSES.items()):
            ref = "reference" if spec.needs_reference else "reference-free"
            data = "paired" if spec.paired else "unpaired"
            print(f"  {name:<14} {spec.score_kind:<6} {data:<9} {ref:<15} β={spec.default_beta:g}")
    if what in (None, "adapters"):
        print("adapters:")
        for name, target in sorted(ADAPTERS.items()):
            print(f"  {name:<14} {target}")
        print("modality commands:", ", ".join(f"{c} {m}" for c, m in sorted(MODALITY_COMMANDS)) or "none yet")
    if what in (None, "configs"):
        print("configs:")
        for config, path in sorted(shipped_configs().items()):
            print(f"  {config:<24} {path}")
    if what in (None, "accelerate"):
        print("accelerate configs (accelerate launch --config_file PATH -m mm_align.cli train ...):")
        for config, path in sorted(accelerate_configs().items()):
            print(f"  {config:<24} {path}")
    return 0


def cmd_report(run_dir: str, output: str | None) -> int:
    from mm_align.report import write_report

    print(write_report(run_dir, output=output))
    return 0


def cmd_quickstart(output_dir: str, steps: int | None, world: str = "shapes") -> int:
    from mm_align.recipes import QUICKSTARTS, load_object

    kwargs = {} if steps is None else {"steps": steps}
    report = load_object(QUICKSTARTS[world])(Path(output_dir), **kwargs)
    print(f"report: {report}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            return cmd_train(args.config, args.overrides)
        if args.command in ("generate", "evaluate", "bench", "convert"):
            return cmd_modality(args.command, args.modality, args.args)
        if args.command == "doctor":
            return cmd_doctor(args.data, args.format, args.kind, args.modality)
        if args.command == "report":
            return cmd_report(args.run_dir, args.output)
        if args.command == "quickstart":
            return cmd_quickstart(args.output_dir, args.steps, args.world)
        return cmd_ls(args.what, args.name)
    except (ValueError, TypeError, FileNotFoundError) as exc:  # ConfigError and DataError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
