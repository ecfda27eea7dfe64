"""argparse help for ``mm-align`` and the modality commands: docstring markup rendered as plain text.

Help strings and descriptions are often taken from docstrings, whose double backticks (````x````) are
reStructuredText markup, not text for a terminal. :class:`HelpFormatter` drops them (````--out DIR````
renders as ``--out DIR``); :class:`RawDescriptionHelpFormatter` does the same and keeps the line breaks
of the description and the epilog (for listings such as the config keys under ``mm-align train --help``).
"""

from __future__ import annotations

import argparse
import re

__all__ = ["HelpFormatter", "RawDescriptionHelpFormatter", "plain"]

_DOUBLE_BACKTICKS = re.compile(r"``(.+?)``", re.DOTALL)


def plain(text: str) -> str:
    """``text`` with reStructuredText inline literals (````x````) turned into plain ``x``."""
    return _DOUBLE_BACKTICKS.sub(r"\1", text)


class HelpFormatter(argparse.HelpFormatter):
    """The default argparse formatter, with double backticks removed from every help text."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain(text))

    def _expand_help(self, action: argparse.Action) -> str:
        return plain(super()._expand_help(action))


class RawDescriptionHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's and epilog's line breaks; removes double backticks like :class:`HelpFormatter`."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain(text))

    def _expand_help(self, action: argparse.Action) -> str:
        return plain(super()._expand_help(action))
