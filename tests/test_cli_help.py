"""``--help`` of ``mm-align`` and the image commands: config keys, real modalities, no markup, help everywhere."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from mm_align import cli
from mm_align.recipes import MODALITIES, MODALITY_COMMANDS


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 0
    return capsys.readouterr().out


def test_train_help_lists_the_config_sections_and_their_keys(capsys):
    from mm_align.run_config import DataConfig, RunConfig, TrainConfig

    out = _help(["train", "--help"], capsys)
    assert "mm-align ls keys" in out
    for section in dataclasses.fields(RunConfig):
        assert f"  {section.name}: " in out
    flat = " ".join(out.split())
    for cls in (DataConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            assert f.name in flat, f.name


def test_ls_keys_prints_every_key_with_type_default_and_help(capsys):
    assert cli.main(["ls", "keys"]) == 0
    out = capsys.readouterr().out
    assert "train.learning_rate: float = 1e-05  # Peak learning rate (AdamW)." in out
    assert "data.train: str = ''  # Training data" in out
    assert "train.lora.r: int = 8" in out
    assert "``" not in out


@pytest.mark.parametrize("command", ["generate", "evaluate", "bench", "convert"])
def test_modality_commands_name_only_the_modalities_that_have_them(command, capsys):
    out = _help([command, "--help"], capsys)
    have = {m for c, m in MODALITY_COMMANDS if c == command}
    assert have and all(m in out for m in have)
    for missing in set(MODALITIES) - have:
        assert missing not in out, missing


def _image_parser(monkeypatch, main, argv=()):
    """The argparse parser a ``*_main(argv)`` builds, caught at its ``parse_args``."""

    class Caught(Exception):
        pass

    def catch(self, *args, **kwargs):
        raise Caught(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    with pytest.raises(Caught) as info:
        main(list(argv))
    return info.value.args[0]


def _image_mains():
    from mm_align.recipes import load_object

    return {f"{c} {m}": load_object(target) for (c, m), target in sorted(MODALITY_COMMANDS.items())}


@pytest.mark.parametrize("name", sorted(f"{c} {m}" for c, m in MODALITY_COMMANDS))
def test_every_image_option_has_help_and_no_backticks(name, monkeypatch):
    parser = _image_parser(monkeypatch, _image_mains()[name])
    unhelped = [a.option_strings or a.dest for a in parser._actions if not a.help]
    assert unhelped == [], f"mm-align {name}: options without help: {unhelped}"
    monkeypatch.undo()
    text = parser.format_help()
    assert "``" not in text, text


def test_help_formatter_turns_double_backticks_into_plain_text():
    from mm_align.help_format import HelpFormatter

    p = argparse.ArgumentParser(prog="x", description="``mm-align x``: the ``--out`` dir",
                                formatter_class=HelpFormatter)
    p.add_argument("--out", help="write ``scores.jsonl`` here")
    text = p.format_help()
    assert "``" not in text and "mm-align x: the --out dir" in text and "write scores.jsonl here" in text
