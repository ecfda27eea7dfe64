"""Model loading without the libraries' own progress bars: one bar per job is ours to draw (CONVENTIONS.md).

diffusers ("Loading pipeline components") and transformers ("Loading weights") each draw a bar per
``from_pretrained``; a quickstart loads a pipeline four times, so their bars outnumbered ours.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["quiet_loading"]


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Switch diffusers' and transformers' progress bars off for the block, then back to how they were."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    states = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    for module, _ in states:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in states:
            if enabled:
                module.enable_progress_bar()
