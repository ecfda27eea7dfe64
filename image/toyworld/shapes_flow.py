"""Where the shapes world's flow-matching (SD3-type) text-to-image model ships, in the style of
:func:`mm_align.image.toyworld.shapes.shapes_sd_dir`.

The weights are written by ``python -m mm_align.image.toyworld.train_shapes_flow`` into
``image/toyworld/weights/shapes-flow`` (a ``StableDiffusion3Pipeline`` directory).
"""

from __future__ import annotations

from pathlib import Path

from mm_align.image.toyworld.shapes import WEIGHTS_DIR

__all__ = ["SHAPES_FLOW_NAME", "SHAPES_FLOW_SCRIPT", "shapes_flow_dir", "resolve_flow_model"]

SHAPES_FLOW_NAME = "shapes-flow"  # the folder under weights/ and the model name resolve_flow_model maps
SHAPES_FLOW_SCRIPT = "train_shapes_flow"


def shapes_flow_dir() -> Path:
    """The shipped shapes-world flow-matching model (a diffusers SD3-type pipeline directory).

    Raises:
        FileNotFoundError: the weights are not there (the message names the command that builds them).
    """
    path = WEIGHTS_DIR / SHAPES_FLOW_NAME
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path}: the shapes world's {SHAPES_FLOW_NAME} weights are not there; rebuild them "
                                f"with python -m mm_align.image.toyworld.{SHAPES_FLOW_SCRIPT}")
    return path


def resolve_flow_model(name: str) -> str:
    """``shapes-flow`` → the shipped flow shapes model directory; any other model name or path unchanged."""
    return str(shapes_flow_dir()) if name == SHAPES_FLOW_NAME else name
