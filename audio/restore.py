"""``mm-align restore speech --model DIR IN OUT``: one command for every restoration paradigm.

The model directory says what it is: a token restorer's ``config.json`` names its ``paradigm``
(``masked`` or ``ar``, :mod:`mm_align.audio.token_models`); a flow enhancer's does not
(:mod:`mm_align.audio.flow_enhancer`). A PEFT LoRA directory is read through the base model its
``adapter_config.json`` names. The paradigm's own options follow (``--steps``, ``--seed``,
``--chunk-seconds``, ...; ``mm-align restore speech --model DIR --help`` lists them).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["restore_main", "paradigm_of"]


def paradigm_of(model_dir: str | Path) -> str:
    """``"masked"``, ``"ar"`` or ``"flow"`` for a model directory (or a LoRA directory over one)."""
    root = Path(model_dir)
    adapter = root / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if base:
            base_path = Path(base) if Path(base).is_absolute() else root / base
            root = base_path if base_path.exists() else Path(base)
        elif (root / "base").is_dir():
            root = root / "base"
    config = root / "config.json"
    if config.is_file():
        paradigm = json.loads(config.read_text(encoding="utf-8")).get("paradigm")
        if paradigm in ("masked", "ar"):
            return paradigm
    return "flow"


def restore_main(argv: list[str]) -> int:
    """Route to the paradigm's restore command; ``--model DIR`` is required."""
    from mm_align.help_format import HelpFormatter

    p = argparse.ArgumentParser(prog="mm-align restore speech", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter, add_help=False)
    p.add_argument("--model", default=None, help="a flow, masked or ar restorer directory (or a LoRA directory)")
    p.add_argument("-h", "--help", action="store_true", help="this help; with --model, the paradigm's own options")
    p.add_argument("args", nargs=argparse.REMAINDER, help="IN OUT (a file or a folder) and the paradigm's options")
    ns = p.parse_args(list(argv))
    rest = list(ns.args)
    if ns.model is None and "--model" in rest and rest.index("--model") + 1 < len(rest):
        i = rest.index("--model")
        ns.model = rest[i + 1]
        del rest[i: i + 2]
    if ns.help and ns.model is None:
        p.print_help()
        return 0
    if ns.model is None:
        print("error: mm-align restore speech needs --model DIR (a flow, masked or ar restorer directory)",
              file=sys.stderr)
        return 2
    from mm_align.audio.toyworld.world_models import resolve_restorer

    ns.model = resolve_restorer(ns.model)  # "speech_flow" etc.: the speech world's shipped bases
    if not Path(ns.model).exists():
        print(f"error: --model {ns.model}: no such directory", file=sys.stderr)
        return 2
    if ns.help:
        rest.append("--help")
    if paradigm_of(ns.model) == "flow":
        from mm_align.audio.flow_enhancer import restore_main as flow_restore

        return flow_restore(["--model", ns.model, *rest])
    from mm_align.audio.token_models import restore_main as token_restore

    return token_restore([ns.model, *rest])
