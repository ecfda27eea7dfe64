"""The shapes world: a text-to-image task with a ground-truth judge, small enough for a CPU.

Prompts are ``"a {colour} {shape} on a {background} background"``. A PIL renderer draws the true
image (with seeded jitter of position and size), and a programmatic ORACLE reads any image and
scores colour, shape and background correctness in [0, 1] — the stand-in for a human judge that
preference methods must move. The prompts are split once, deterministically, into a training split
and a held-out split of prompts never trained on (every colour, shape and background still occurs
in training; only the combinations are new).

The oracle: the background colour is the palette colour nearest to the median border pixel; the
foreground is every pixel far from it. ``colour`` = the fraction of foreground pixels (eroded by one
pixel, away from anti-aliased edges) whose nearest palette colour is the prompted one;
``background`` = the fraction of border pixels nearest to the prompted background; ``shape`` = IoU
of the foreground with the prompted shape drawn in the foreground's bounding box, divided by the
best IoU over all shapes (1 when the prompted shape fits best). An attribute counts as correct when
its score is > 0.5 (shape: when it is the best fit).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS", "SHAPES", "BACKGROUNDS", "ShapeSpec", "all_specs", "split_specs", "parse_prompt", "render",
    "oracle_scores", "OracleScores", "ShapesOracle", "ShapesOracleAttributes", "WEIGHTS_DIR", "shapes_sd_dir",
    "shapes_clip_dir", "resolve_model",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def _shipped(name: str, script: str) -> Path:
    path = WEIGHTS_DIR / name
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: the shapes world's {name} weights are not there; rebuild them with "
                                f"python -m mm_align.image.toyworld.{script}")
    return path


def shapes_sd_dir() -> Path:
    """The shipped shapes-world text-to-image model (a diffusers SD1.5-type pipeline directory)."""
    return _shipped("shapes-sd", "train_shapes_sd")


def resolve_model(name: str) -> str:
    """``shapes`` → the shipped shapes-world model directory; any other model name or path unchanged."""
    return str(shapes_sd_dir()) if name == "shapes" else name


def shapes_clip_dir() -> Path:
    """The shipped shapes-world learned scorer (an open_clip local-dir model)."""
    return _shipped("shapes-clip", "train_shapes_clip")

COLOURS: dict[str, tuple[int, int, int]] = {  # shape colours, well apart in RGB
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "purple": (130, 40, 170),
    "orange": (245, 140, 20),
    "pink": (250, 130, 200),
    "cyan": (40, 210, 230),
}
NEUTRALS: dict[str, tuple[int, int, int]] = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128)}
PALETTE: dict[str, tuple[int, int, int]] = {**COLOURS, **NEUTRALS}
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
BACKGROUNDS = tuple(PALETTE)
PROMPT = "a {colour} {shape} on a {background} background"
_PROMPT_RE = re.compile(r"^a (\w+) (\w+) on a (\w+) background$")
HELD_OUT_FRACTION = 0.5
SPLIT_SEED = 20261122


@dataclass(frozen=True)
class ShapeSpec:
    """One prompt of the world."""

    colour: str
    shape: str
    background: str

    @property
    def prompt(self) -> str:
        return PROMPT.format(colour=self.colour, shape=self.shape, background=self.background)


def all_specs() -> list[ShapeSpec]:
    """Every (colour, shape, background) with the background not the shape's colour: 8 × 5 × 10 = 400."""
    return [ShapeSpec(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS if b != c]


@lru_cache(maxsize=1)
def _split() -> tuple[tuple[ShapeSpec, ...], tuple[ShapeSpec, ...]]:
    specs = all_specs()
    rng = random.Random(SPLIT_SEED)
    for _ in range(1000):
        rng.shuffle(specs)
        n_held = int(len(specs) * HELD_OUT_FRACTION)
        held, train = specs[:n_held], specs[n_held:]
        # every attribute value and every colour-shape pairing must occur in training
        if ({s.colour for s in train} == set(COLOURS) and {s.shape for s in train} == set(SHAPES)
                and {s.background for s in train} == set(BACKGROUNDS)
                and len({(s.colour, s.shape) for s in train}) == len(COLOURS) * len(SHAPES)):
            return tuple(train), tuple(held)
    raise RuntimeError("no split covers every attribute")  # pragma: no cover - the seed above works


def split_specs(split: str) -> list[ShapeSpec]:
    """``"train"`` or ``"heldout"`` prompts (200 each), in a fixed order."""
    train, held = _split()
    if split == "train":
        return list(train)
    if split in ("heldout", "held_out", "test"):
        return list(held)
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")


def parse_prompt(prompt: str) -> ShapeSpec:
    """The spec of a world prompt; ValueError naming the prompt if it is not one."""
    m = _PROMPT_RE.match(prompt.strip().lower())
    if not m or m.group(1) not in COLOURS or m.group(2) not in SHAPES or m.group(3) not in PALETTE:
        raise ValueError(f"not a shapes-world prompt: {prompt!r} (expected '{PROMPT}')")
    return ShapeSpec(m.group(1), m.group(2), m.group(3))


def _polygon(shape: str, box: tuple[float, float, float, float]) -> list[tuple[float, float]] | None:
    x0, y0, x1, y1 = box
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "cross":
        a, b = w / 6, h / 6  # arms a third of the box wide
        return [(cx - a, y0), (cx + a, y0), (cx + a, cy - b), (x1, cy - b), (x1, cy + b), (cx + a, cy + b),
                (cx + a, y1), (cx - a, y1), (cx - a, cy + b), (x0, cy + b), (x0, cy - b), (cx - a, cy - b)]
    return None


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill: object) -> None:
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        poly = _polygon(shape, box)
        assert poly is not None, shape
        draw.polygon(poly, fill=fill)


def render(spec: ShapeSpec | str, size: int = 32, seed: int | None = None) -> Image.Image:
    """The true image of a prompt: the shape at a seeded position and size (40–70% of the side)."""
    spec = parse_prompt(spec) if isinstance(spec, str) else spec
    rng = random.Random(seed)
    scale = 4  # draw large, then downsample: anti-aliased edges like a real photo's
    big = size * scale
    side = rng.uniform(0.4, 0.7) * big
    x0 = rng.uniform(0.08 * big, big * 0.92 - side)
    y0 = rng.uniform(0.08 * big, big * 0.92 - side)
    image = Image.new("RGB", (big, big), PALETTE[spec.background])
    _draw(ImageDraw.Draw(image), spec.shape, (x0, y0, x0 + side, y0 + side), COLOURS[spec.colour])
    return image.resize((size, size), Image.LANCZOS)


@dataclass
class OracleScores:
    """The oracle's reading of one image against one prompt."""

    colour: float
    shape: float
    background: float
    shape_correct: bool

    @property
    def correct(self) -> dict[str, bool]:
        return {"colour": self.colour > 0.5, "shape": self.shape_correct, "background": self.background > 0.5}

    @property
    def all_correct(self) -> bool:
        return all(self.correct.values())

    @property
    def mean(self) -> float:
        return (self.colour + self.shape + self.background) / 3


def _nearest(pixels: np.ndarray, names: list[str]) -> np.ndarray:
    """Index into ``names`` of the nearest palette colour of each ``(N, 3)`` pixel."""
    table = np.array([PALETTE[n] for n in names], dtype=np.float32)  # (K, 3)
    return ((pixels[:, None, :] - table[None]) ** 2).sum(-1).argmin(1)


def _mask(shape: str, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    image = Image.new("L", (size, size), 0)
    _draw(ImageDraw.Draw(image), shape, box, 255)
    return np.asarray(image) > 127


def oracle_scores(image: Image.Image, prompt: str | ShapeSpec) -> OracleScores:
    """Score ``image`` against a world prompt (see the module docstring for the rules)."""
    spec = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w, _ = array.shape
    names = list(PALETTE)
    border = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])  # (4·side, 3)
    border_labels = _nearest(border, names)
    background = float((border_labels == names.index(spec.background)).mean())
    seen_bg = np.median(border, axis=0)
    far = np.sqrt(((array - seen_bg) ** 2).sum(-1)) > 60.0  # (h, w) foreground mask
    if far.sum() < 4:
        return OracleScores(0.0, 0.0, background, False)
    core = far.copy()  # the mask eroded by one pixel: anti-aliased edges mix the two colours
    core[1:] &= far[:-1]
    core[:-1] &= far[1:]
    core[:, 1:] &= far[:, :-1]
    core[:, :-1] &= far[:, 1:]
    fg_labels = _nearest(array[core if core.sum() >= 4 else far], names)
    colour = float((fg_labels == names.index(spec.colour)).mean())
    ys, xs = np.nonzero(far)
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    ious = {}
    for shape in SHAPES:
        template = _mask(shape, box, max(h, w))[:h, :w]
        union = np.logical_or(template, far).sum()
        ious[shape] = float(np.logical_and(template, far).sum() / union) if union else 0.0
    best = max(ious.values())
    shape_score = ious[spec.shape] / best if best > 0 else 0.0
    return OracleScores(colour, shape_score, background, max(ious, key=ious.get) == spec.shape)


class ShapesOracle:
    """The oracle as an evaluator (``score(images, prompts)`` → the mean of its three scores per image).

    For benchmarks only: preference data for training is labelled by learned scorers, never by it.
    """

    name = "shapes_oracle"
    higher_is_better = True

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        return np.array([oracle_scores(i, p).mean for i, p in zip(images, prompts)], dtype=np.float64)

    def details(self, images: list[Image.Image], prompts: list[str]) -> list[OracleScores]:
        return [oracle_scores(i, p) for i, p in zip(images, prompts)]


class ShapesOracleAttributes:
    """The oracle's verdict as a judge would give it: how many of colour, shape, background are right (0–3).

    Two images compare by this count, so a pair of equally right images is a tie rather than a "win"
    decided by a few pixels of the continuous :class:`ShapesOracle` score; the bench's decisive win
    rate over it is then a sign test on attribute errors fixed vs introduced.
    """

    name = "shapes_oracle_attributes"
    higher_is_better = True

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        return np.array([sum(oracle_scores(i, p).correct.values()) for i, p in zip(images, prompts)],
                        dtype=np.float64)
