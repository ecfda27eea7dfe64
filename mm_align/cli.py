"""``mm-align``: one entry point, an explicit list of commands.

    mm-align train --config CONFIG [key=value ...]
    mm-align generate|evaluate|bench|convert MODALITY [args ...]
    mm-align doctor DATA [--format F] [--kind paired|unpaired] [--modality M]
    mm-align report RUN_DIR
    mm-align quickstart [--output-dir DIR] [--world shapes|speech|vlm|synthetic] [--steps N]
    mm-align ls [losses|adapters|configs|keys|accelerate [NAME]]

Every command also runs as ``accelerate launch -m mm_align.cli COMMAND ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import textwrap
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mm_align.help_format import HelpFormatter, RawDescriptionHelpFormatter

COMMANDS = ("train", "generate", "evaluate", "bench", "convert", "restore", "doctor", "report", "quickstart", "ls")
LS_WHAT = ("losses", "adapters", "configs", "keys", "accelerate")


def config_keys_epilog() -> str:
    """The config sections of a run and their keys (for ``mm-align train --help``).

    Imports :mod:`mm_align.run_config` (and with it peft), so it is built only when the help is asked for.
    """
    from mm_align.run_config import RunConfig

    lines = ["config keys (YAML sections; override any as section.key=value; `mm-align ls keys` prints every",
             "key with its type, default and help):"]
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        help_text = f.metadata.get("help", "")
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            names = [g.name for g in dataclasses.fields(tp)]
            lines.append(f"  {f.name}: {help_text}")
            lines += textwrap.wrap(", ".join(names), width=96, initial_indent="    ", subsequent_indent="    ")
        else:
            lines.append(f"  {f.name}: {help_text}")
    return "\n".join(lines)


class _TrainHelp(argparse.Action):
    """``mm-align train -h``: the usage, then the config sections and their keys (built only now)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: str | None = None,
                 ) -> None:
        parser.epilog = config_keys_epilog()
        parser.print_help()
        parser.exit()


def _modalities_with(command: str) -> list[str]:
    from mm_align.recipes import MODALITY_COMMANDS

    return sorted({m for c, m in MODALITY_COMMANDS if c == command})


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm-align", description="Preference alignment across modalities.",
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    sub.required = True

    t = sub.add_parser("train", help="train a model on preference data", add_help=False,
                       description="Train a model on preference data: a run config (YAML) plus key=value overrides.",
                       formatter_class=RawDescriptionHelpFormatter)
    t.add_argument("-h", "--help", action=_TrainHelp, help="show this help (with the config keys) and exit")
    t.add_argument("--config", required=True, help="a YAML file or the name of a shipped config (mm-align ls)")
    t.add_argument("overrides", nargs="*",
                   help="key=value overrides, e.g. train.learning_rate=1e-5 (the keys are listed below)")

    modality_commands = (
        ("generate", "generate preference data"),
        ("evaluate", "score samples with evaluators"),
        ("bench", "benchmark base vs aligned"),
        ("convert", "convert datasets between formats"),
        ("restore", "restore degraded inputs with a model"),
    )
    for name, what in modality_commands:
        modalities = _modalities_with(name)
        listed = ", ".join(modalities) or "none yet"
        g = sub.add_parser(name, help=f"{what} for a modality ({listed})", formatter_class=HelpFormatter)
        g.add_argument("modality", help=f"the modality: {listed} (`mm-align {name} MODALITY --help` for its options)")
        g.add_argument("args", nargs=argparse.REMAINDER, help="the modality command's own arguments")

    d = sub.add_parser("doctor", help="validate a preference dataset before training", formatter_class=HelpFormatter)
    d.add_argument("data", help="jsonl file, parquet file or shard directory, or HF dataset directory "
                                "(pair folders and Pick-a-Pic data: add --modality image; LLaMA-Factory dataset dirs: "
                                "add --modality vlm)")
    d.add_argument("--format", default="auto",
                   help="auto (from the path), jsonl, parquet or hf; with --modality image also pickapic or "
                        "pair_folders; with --modality speech also manifest, voicebank or dns; with --modality vlm "
                        "also trl or llamafactory")
    d.add_argument("--kind", choices=("paired", "unpaired"), default="paired",
                   help="paired: prompt, chosen, rejected; unpaired: prompt, completion, label")
    d.add_argument("--modality", default=None,
                   help="add the modality's own checks (image: corrupt/tiny images; speech: missing, unreadable, "
                        "silent, clipped or NaN audio, length mismatches; vlm: image/placeholder count mismatches, "
                        "missing or unreadable images, empty or identical answers, large images)")
    d.add_argument("--sample-rate", type=int, default=None,
                   help="with --modality speech: the rate the audio should have (default 16000); others are flagged")

    r = sub.add_parser("report", help="render a run's training curves as one HTML page", formatter_class=HelpFormatter)
    r.add_argument("run_dir", help="a training run's output directory (it holds metrics.jsonl)")
    r.add_argument("--output", default=None, help="the HTML file to write (default: RUN_DIR/report.html)")

    q = sub.add_parser("quickstart", help="the embedded default, end to end, with a report",
                       formatter_class=HelpFormatter)
    q.add_argument("--output-dir", default="runs/quickstart",
                   help="where the data, the run and the report go (default: runs/quickstart)")
    q.add_argument("--world", choices=("shapes", "speech", "vlm", "synthetic"), default="shapes",
                   help="shapes: text-to-image on the shapes world; speech: speech restoration on the speech world; "
                        "vlm: MIA-DPO on the shapes VLM world; synthetic: the core toy world")
    q.add_argument("--steps", type=int, default=None, help="training steps (default: the world's own)")

    ls = sub.add_parser("ls", help="list losses, adapters, shipped configs, config keys and accelerate configs",
                        formatter_class=HelpFormatter)
    ls.add_argument("what", nargs="?", choices=LS_WHAT, default=None,
                    help="what to list (default: all but keys); keys: every config key with its type, default and "
                         "help")
    ls.add_argument("name", nargs="?", default=None,
                    help="with 'accelerate': print only this config's path (ddp, fsdp, zero2, zero3)")
    return p


class _DropReadSummary(logging.Filter):
    """Drops the readers' skipped-rows summary: ``mm-align train`` prints the same summary itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        from mm_align.data.io import READ_SUMMARY

        return not getattr(record, READ_SUMMARY, False)


@contextlib.contextmanager
def _one_read_summary() -> Iterator[None]:
    """While training from the CLI, the skip counts are printed once (by the run's log), not also logged."""
    readers = logging.getLogger("mm_align.data.io")  # read_rows logs the summary here for every reader
    drop = _DropReadSummary()
    readers.addFilter(drop)
    try:
        yield
    finally:
        readers.removeFilter(drop)


_MODEL_LOADERS = frozenset({"load_config", "cached_file", "cached_files", "hf_hub_download", "snapshot_download"})


def _raised_loading_a_model(exc: BaseException) -> bool:
    """Whether ``exc`` came out of a ``from_pretrained`` (diffusers, transformers, peft, the hub), not a save."""
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_name
        if "from_pretrained" in name or name in _MODEL_LOADERS:
            return True
        tb = tb.tb_next
    return False


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, (str, Path)):
        yield str(value)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _failed_model(model: dict[str, Any], message: str) -> str:
    """The ``model:`` value the loader failed on: the one its message names, else ``model.pretrained``."""
    named = [v for v in _strings(model) if v and v.rstrip("/") in message]
    if named:
        return max(named, key=len)
    return str(model.get("pretrained", "the model"))


def cmd_train(config: str, overrides: Sequence[str]) -> int:
    from mm_align.orchestration import load_run_config, run_training

    run_config = load_run_config(config, overrides)
    try:
        with _one_read_summary():
            result = run_training(run_config, log=print)
    except OSError as exc:
        if not _raised_loading_a_model(exc):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        named = _failed_model(run_config.model, str(exc))
        print(f"error: {named}: not a diffusers/transformers model directory (nor a model id in the local cache): "
              f"{first}", file=sys.stderr)
        return 2
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


def _pair_folders_hint(data: str) -> str | None:
    """The line that says to add ``--modality image`` when ``data`` is a pair-folders directory."""
    p = Path(data)
    if not p.is_dir():
        return None
    try:
        from mm_align.image.pair_readers import is_pair_folders
    except ImportError:  # the image modality is not installed
        return None
    if not is_pair_folders(p):
        return None
    return (f"{data}: a directory of image pair folders (chosen/ + rejected/, or <id>/prompt.txt + images): "
            f"add --modality image, i.e. mm-align doctor {data} --modality image")


def cmd_doctor(data: str, fmt: str, kind: str, modality: str | None = None, sample_rate: int | None = None) -> int:
    from mm_align.data.io import detect_format
    from mm_align.recipes import modality_doctor

    if modality is None and fmt == "auto":
        hint = _pair_folders_hint(data)
        if hint is not None:
            try:
                detect_format(data)
            except ValueError:  # the core formats cannot read it: it is pair folders only
                print(f"error: {hint}", file=sys.stderr)
                return 2
    if sample_rate is not None and modality != "speech":
        print("error: --sample-rate is read by --modality speech only", file=sys.stderr)
        return 2
    extra = {"sample_rate": sample_rate} if sample_rate is not None else {}
    report = modality_doctor(modality)(data, format=fmt, kind=kind, **extra)
    print(report.table())  # the table ends with the verdict line: printed once
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
    if what == "keys":
        from mm_align.config import describe
        from mm_align.help_format import plain
        from mm_align.run_config import RunConfig

        print("config keys (key: type = default  # help); override any as key=value after --config:")
        for line in plain(describe(RunConfig)).splitlines():
            print(f"  {line}")
        return 0
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
        if args.command in ("generate", "evaluate", "bench", "convert", "restore"):
            return cmd_modality(args.command, args.modality, args.args)
        if args.command == "doctor":
            return cmd_doctor(args.data, args.format, args.kind, args.modality, args.sample_rate)
        if args.command == "report":
            return cmd_report(args.run_dir, args.output)
        if args.command == "quickstart":
            return cmd_quickstart(args.output_dir, args.steps, args.world)
        return cmd_ls(args.what, args.name)
    except (ValueError, TypeError, FileNotFoundError) as exc:  # ConfigError and DataError are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if not _is_training_stop(exc):
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _is_training_stop(exc: BaseException) -> bool:
    """A stop the trainer raises on purpose (``NonFiniteLossError``, ...): its message is the whole story.

    Any ``RuntimeError`` subclass defined in :mod:`mm_align.trainer`, or one whose class sets
    ``cli_message = True``; the class names are not imported, so new ones need no change here.
    """
    cls = type(exc)
    return cls is not RuntimeError and (cls.__module__ == "mm_align.trainer" or getattr(cls, "cli_message", False))


if __name__ == "__main__":
    sys.exit(main())
