"""The shapes VLM world: questions about shapes-world images with ground-truth answers, small enough for a CPU.

A **scene** is 1–3 shapes of the image world (:mod:`mm_align.image.toyworld.shapes`: its colours, shapes and
backgrounds) on a background, each at one of five positions (left, right, top, bottom, centre). In a scene the
shapes' colours, kinds and positions are all different and no shape has the background's colour, so every
question below has exactly one answer. A scene is drawn by PIL at :data:`IMAGE_SIZE` = 64 px (drawn 4× larger and
downsampled, anti-aliased as the image world's pictures are; the position and size of each shape jittered from a
seed): 64 px keeps a shape 13–17 px wide, fits three shapes at five positions without overlap, and leaves a shape
of several pixels when two to four scenes are tiled into one collage, while the images stay cheap to render and to
encode (the shipped model's processor downsamples them to its 48 px tower: 36 image tokens an image, so two shared
CPU cores train it in minutes).

**Questions** (one of each kind that applies, per scene), with short answers:

- ``colour``: "What colour is the shape?" (one shape) / "What colour is the circle?" → ``red``;
- ``shape``: "What shape is in the image?" / "What shape is on the left?" → ``circle``;
- ``background``: "What colour is the background?" → ``white``;
- ``count``: "How many shapes are there?" → ``2``;
- ``position``: "Where is the red circle?" → ``left``.

Each question also has multiple-choice options (the answer and distractors of the same kind, drawn from a seed;
the count question's options are always 1, 2, 3), which the benchmarks use: a tiny model answers with the option's
text and :mod:`mm_align.vlm.answer_extraction` reads it (rule 5), as it reads a letter.

**Splits** are by scene spec (the background and the set of (colour, shape, position) triples; not the render
seed): a spec's split is fixed by a CRC-32 of its canonical string (80 % train, 10 % dev, 10 % test), so a dev or
test scene is never a training scene, on any machine. Scenes of a split are drawn by a seeded generator that keeps
only specs of that split, distinct within the split; everything is deterministic.

**Benchmarks** are written as Mantis-Eval parquet copies (``<dir>/<split>-00000-of-00001.parquet``: ``id``,
``question_type`` ``multi-choice``, ``question``, ``images`` (PNG bytes), ``options``, ``answer`` (a letter),
``category``), which ``mm-align bench vlm --bench mantis_shapes=DIR,split=dev`` reads
(:func:`mm_align.vlm.bench_formats.read_mantis_eval`): :func:`write_single_benchmark` (category = the question
kind) and :func:`write_multi_benchmarks` (sequence, grid collage and pic-in-pic items made by
:func:`mm_align.vlm.mia_augment.augment` from a split's items with distractor scenes of the same split; category =
the format and its image count).
"""

from __future__ import annotations

import io
import random
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from mm_align.image.toyworld.shapes import COLOURS, PALETTE, SHAPES
from mm_align.vlm.answer_extraction import option_letters
from PIL import Image, ImageDraw

__all__ = ["IMAGE_SIZE", "POSITIONS", "QUESTION_KINDS", "SPLITS", "SceneObject", "Scene", "QAItem", "scene_split",
           "sample_scenes", "scene_boxes",
           "render_scene", "scene_questions", "question_text", "answer_for", "answer_space",
           "choose_options", "qa_items", "item_image", "benchmark_row", "write_single_benchmark", "MULTI_FORMATS",
           "MULTI_IMAGE_COUNTS", "MultiItem", "make_multi_item", "multi_items", "write_multi_benchmarks",
           "WEIGHTS_DIR", "MODEL_NAME", "shapes_vlm_dir", "resolve_vlm", "write_source"]

IMAGE_SIZE = 64
POSITIONS = ("left", "right", "top", "bottom", "centre")
QUESTION_KINDS = ("colour", "shape", "background", "count", "position")
SPLITS = ("train", "dev", "test")
MAX_SHAPES = 3
N_OPTIONS = 4
WORLD_SEED = 20261205
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MODEL_NAME = "shapes-vlm"

_ANCHORS = {"left": (0.18, 0.5), "right": (0.82, 0.5), "top": (0.5, 0.18), "bottom": (0.5, 0.82),
            "centre": (0.5, 0.5)}
_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
          "centre": "in the centre"}
_SPLIT_OF_BUCKET = {0: "dev", 1: "test"}  # crc32 % 10; the other eight buckets are train


def shapes_vlm_dir() -> Path:
    """The shipped shapes-world VLM: a LLaVA directory (``save_pretrained`` of model and processor).

    Raises:
        FileNotFoundError: naming the directory and the script that rebuilds it.
    """
    path = WEIGHTS_DIR / MODEL_NAME
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the shapes VLM world's model is not there; rebuild it with "
                                "python -m mm_align.vlm.toyworld.train_shapes_vlm")
    return path


def resolve_vlm(name: str) -> str:
    """``shapes-vlm`` (or ``shapes``) → the shipped model directory; any other name or path unchanged (a local
    directory of that name wins)."""
    if name in (MODEL_NAME, "shapes") and not Path(name).exists():
        return str(shapes_vlm_dir())
    return name


@dataclass(frozen=True)
class SceneObject:
    """One shape of a scene."""

    colour: str
    shape: str
    position: str


@dataclass(frozen=True)
class Scene:
    """A background and 1–3 shapes (objects in :data:`POSITIONS` order)."""

    background: str
    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        if self.background not in PALETTE:
            raise ValueError(f"scene background {self.background!r} is not a palette colour ({', '.join(PALETTE)})")
        if not 1 <= len(self.objects) <= MAX_SHAPES:
            raise ValueError(f"a scene has 1 to {MAX_SHAPES} shapes, got {len(self.objects)}")
        for o in self.objects:
            if o.colour not in COLOURS or o.shape not in SHAPES or o.position not in POSITIONS:
                raise ValueError(f"scene object {o}: colour must be one of {', '.join(COLOURS)}, shape one of "
                                 f"{', '.join(SHAPES)}, position one of {', '.join(POSITIONS)}")
            if o.colour == self.background:
                raise ValueError(f"scene object {o} has the background's colour")
        for attr in ("colour", "shape", "position"):
            values = [getattr(o, attr) for o in self.objects]
            if len(set(values)) != len(values):
                raise ValueError(f"a scene's shapes need different {attr}s, got {values}")
        if list(self.objects) != sorted(self.objects, key=lambda o: POSITIONS.index(o.position)):
            raise ValueError("a scene's objects must be in POSITIONS order (use Scene.of)")

    @classmethod
    def of(cls, background: str, objects: list[SceneObject] | tuple[SceneObject, ...]) -> Scene:
        """A scene with its objects put in canonical (position) order."""
        return cls(background, tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position))))

    @property
    def key(self) -> str:
        """The canonical spec string the split is drawn from (``white|red circle left|blue square top``)."""
        return "|".join([self.background] + [f"{o.colour} {o.shape} {o.position}" for o in self.objects])

    def find(self, **attrs: str) -> SceneObject | None:
        """The one object with these attribute values, or None."""
        hits = [o for o in self.objects if all(getattr(o, k) == v for k, v in attrs.items())]
        return hits[0] if len(hits) == 1 else None


@dataclass(frozen=True)
class QAItem:
    """One single-image question about a rendered scene.

    Args:
        id: unique in its split (``dev-00012-colour``).
        split: ``train``, ``dev`` or ``test``.
        scene: the scene asked about.
        seed: the render seed of its image (:func:`render_scene`).
        kind: one of :data:`QUESTION_KINDS`.
        subject: what the question names (the shape, the position, ``"colour shape"``, or ``""``).
        question: the question text (no image mark).
        answer: the short ground-truth answer.
        options: multiple-choice options, the answer among them.
    """

    id: str
    split: str
    scene: Scene
    seed: int
    kind: str
    subject: str
    question: str
    answer: str
    options: tuple[str, ...] = field(default=())

    @property
    def answer_letter(self) -> str:
        return option_letters(len(self.options))[self.options.index(self.answer)]


def scene_split(scene: Scene) -> str:
    """The split of a scene spec: a CRC-32 of :attr:`Scene.key` (the same on every machine and Python)."""
    return _SPLIT_OF_BUCKET.get(zlib.crc32(scene.key.encode()) % 10, "train")


def _random_scene(rng: random.Random) -> Scene:
    n = rng.randint(1, MAX_SHAPES)
    colours = rng.sample(list(COLOURS), n)
    shapes = rng.sample(list(SHAPES), n)
    positions = rng.sample(list(POSITIONS), n)
    background = rng.choice([b for b in PALETTE if b not in colours])
    return Scene.of(background, [SceneObject(c, s, p) for c, s, p in zip(colours, shapes, positions)])


def sample_scenes(split: str, n: int, seed: int = WORLD_SEED) -> list[tuple[Scene, int]]:
    """``n`` distinct scenes of ``split`` with their render seeds, in a fixed order.

    Args:
        split: ``train``, ``dev`` or ``test``.
        n: how many (at most the split's supply; 1–3 shapes give tens of thousands of specs per held-out split).
        seed: the generator's seed; each split draws from its own stream of it.

    Raises:
        ValueError: an unknown split or a negative ``n``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown shapes-VLM split {split!r}; valid: {', '.join(SPLITS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{seed}:{split}")
    out: list[tuple[Scene, int]] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise ValueError(f"could not draw {n} distinct {split} scenes (got {len(out)})")  # pragma: no cover
        scene = _random_scene(rng)
        if scene_split(scene) != split or scene.key in seen:
            continue
        seen.add(scene.key)
        out.append((scene, rng.randrange(2**31)))
    return out


def render_scene(scene: Scene, seed: int, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene's image: each shape 20–26 % of the side, within ±3 % of its position's anchor (seeded); a new
    image each call (renders are cached)."""
    return _render_cached(scene, seed, size).copy()


def scene_boxes(scene: Scene, seed: int) -> list[tuple[float, float, float, float]]:
    """Each object's bounding box in the rendered image, as fractions of the side ``(x0, y0, x1, y1)``, in
    ``scene.objects`` order (the jitter :func:`render_scene` draws from ``seed``)."""
    rng = random.Random(seed)
    boxes = []
    for o in scene.objects:
        ax, ay = _ANCHORS[o.position]
        side = rng.uniform(0.20, 0.26)
        cx, cy = ax + rng.uniform(-0.03, 0.03), ay + rng.uniform(-0.03, 0.03)
        boxes.append((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
    return boxes


@lru_cache(maxsize=8192)
def _render_cached(scene: Scene, seed: int, size: int) -> Image.Image:
    big = size * 4
    image = Image.new("RGB", (big, big), PALETTE[scene.background])
    draw = ImageDraw.Draw(image)
    for o, box in zip(scene.objects, scene_boxes(scene, seed)):
        _draw_shape(draw, o.shape, tuple(v * big for v in box), COLOURS[o.colour])
    return image.resize((size, size), Image.LANCZOS)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float],
                fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    elif shape == "cross":
        a, b = w / 6, h / 6
        draw.polygon([(cx - a, y0), (cx + a, y0), (cx + a, cy - b), (x1, cy - b), (x1, cy + b), (cx + a, cy + b),
                      (cx + a, y1), (cx - a, y1), (cx - a, cy + b), (x0, cy + b), (x0, cy - b), (cx - a, cy - b)],
                     fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def question_text(kind: str, subject: str) -> str:
    """The question of ``kind`` about ``subject`` (``""`` for a subject-less one; module docstring)."""
    if kind == "colour":
        return "What colour is the shape?" if subject == "" else f"What colour is the {subject}?"
    if kind == "shape":
        return "What shape is in the image?" if subject == "" else f"What shape is {_WHERE[subject]}?"
    if kind == "background":
        return "What colour is the background?"
    if kind == "count":
        return "How many shapes are there?"
    if kind == "position":
        return f"Where is the {subject}?"
    raise ValueError(f"unknown question kind {kind!r}; valid: {', '.join(QUESTION_KINDS)}")


def answer_for(scene: Scene, kind: str, subject: str) -> str | None:
    """The answer of a question (``kind``, ``subject``) about ``scene``, or None when it does not apply (the
    subject is not in the scene, or a subject-less colour / shape question about a scene of several shapes)."""
    if kind == "background":
        return scene.background
    if kind == "count":
        return str(len(scene.objects))
    if kind == "colour":
        o = scene.objects[0] if subject == "" and len(scene.objects) == 1 else (
            scene.find(shape=subject) if subject else None)
        return o.colour if o else None
    if kind == "shape":
        o = scene.objects[0] if subject == "" and len(scene.objects) == 1 else (
            scene.find(position=subject) if subject else None)
        return o.shape if o else None
    if kind == "position":
        colour, _, shape = subject.partition(" ")
        o = scene.find(colour=colour, shape=shape)
        return o.position if o else None
    raise ValueError(f"unknown question kind {kind!r}; valid: {', '.join(QUESTION_KINDS)}")


def answer_space(kind: str) -> tuple[str, ...]:
    """Every possible answer of a question of ``kind``."""
    return {"colour": tuple(COLOURS), "shape": SHAPES, "background": tuple(PALETTE),
            "count": tuple(str(i) for i in range(1, MAX_SHAPES + 1)), "position": POSITIONS}[kind]


def choose_options(kind: str, answer: str, rng: random.Random, prefer: list[str] | tuple[str, ...] = ()
                   ) -> tuple[str, ...]:
    """Multiple-choice options: the answer, the ``prefer`` red herrings first (other answers that a confused
    model might give), then random ones of the kind, :data:`N_OPTIONS` in all, shuffled; the count question always
    has the options 1, 2, 3 in order."""
    space = answer_space(kind)
    if kind == "count":
        return space
    others = [p for p in dict.fromkeys(prefer) if p != answer and p in space]
    rest = [s for s in space if s != answer and s not in others]
    rng.shuffle(rest)
    options = [answer] + (others + rest)[: N_OPTIONS - 1]
    rng.shuffle(options)
    return tuple(options)


def scene_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """One ``(kind, subject)`` of each kind for ``scene`` (the subject drawn from ``rng``), in kind order."""
    pick = rng.choice(scene.objects)
    single = len(scene.objects) == 1
    return [("colour", "" if single else pick.shape), ("shape", "" if single else rng.choice(scene.objects).position),
            ("background", ""), ("count", ""),
            ("position", f"{(o := rng.choice(scene.objects)).colour} {o.shape}")]


def qa_items(split: str, n_scenes: int, seed: int = WORLD_SEED, kinds: tuple[str, ...] = QUESTION_KINDS
             ) -> list[QAItem]:
    """The single-image question items of ``split``: one of each of ``kinds`` per scene, ``n_scenes`` scenes.

    The first ``m`` scenes of a split are the same for every ``n_scenes >= m`` (and so are their items).

    Args:
        split: ``train``, ``dev`` or ``test``.
        n_scenes: scenes to draw (:func:`sample_scenes`).
        seed: the world seed.
        kinds: the question kinds to ask (a subset of :data:`QUESTION_KINDS`).
    """
    bad = [k for k in kinds if k not in QUESTION_KINDS]
    if bad:
        raise ValueError(f"unknown question kind(s) {bad}; valid: {', '.join(QUESTION_KINDS)}")
    items = []
    for i, (scene, render_seed) in enumerate(sample_scenes(split, n_scenes, seed)):
        rng = random.Random(f"{seed}:{split}:q{i}")
        for kind, subject in scene_questions(scene, rng):
            if kind not in kinds:
                continue
            answer = answer_for(scene, kind, subject)
            assert answer is not None, (scene, kind, subject)
            items.append(QAItem(f"{split}-{i:05d}-{kind}", split, scene, render_seed, kind, subject,
                                question_text(kind, subject), answer,
                                choose_options(kind, answer, rng)))
    return items


def item_image(item: QAItem, size: int = IMAGE_SIZE) -> Image.Image:
    """The rendered image of an item's scene."""
    return render_scene(item.scene, item.seed, size)


def write_source(out_dir: str | Path, split: str = "train", n_scenes: int = 100, seed: int = WORLD_SEED,
                 kinds: tuple[str, ...] = QUESTION_KINDS) -> Path:
    """Single-image items of ``split`` as the input of ``mm-align generate vlm``: ``out_dir/source.jsonl`` (one
    ``{"id", "image", "question", "answer"}`` a line, the image path relative to the file) and
    ``out_dir/images/<scene>.png``. MIA-DPO's pairs are built from these (the ground truth is the only label).

    Returns:
        The path of ``source.jsonl``.
    """
    import json

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for item in qa_items(split, n_scenes, seed, kinds):
        rel = f"images/{_scene_id(item)}.png"
        if not (out / rel).is_file():
            item_image(item).save(out / rel)
        lines.append(json.dumps({"id": item.id, "image": rel, "question": item.question, "answer": item.answer}))
    path = out / "source.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path


def _png(image: Image.Image) -> dict[str, Any]:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def benchmark_row(item_id: str, question: str, images: list[Image.Image], options: tuple[str, ...] | list[str],
                  answer: str, category: str) -> dict[str, Any]:
    """A Mantis-Eval row (multi-choice; the answer a letter; images as PNG bytes).

    Raises:
        ValueError: the answer is not one of the options.
    """
    options = list(options)
    if answer not in options:
        raise ValueError(f"{item_id}: the answer {answer!r} is not one of the options {options}")
    return {"id": item_id, "question_type": "multi-choice", "question": question,
            "images": [_png(im) for im in images], "options": options,
            "answer": option_letters(len(options))[options.index(answer)], "category": category}


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("id", pa.string()), ("question_type", pa.string()), ("question", pa.string()),
                        ("images", pa.list_(image)), ("options", pa.list_(pa.string())), ("answer", pa.string()),
                        ("category", pa.string())])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    tmp.replace(path)
    return path


def _split_file(out_dir: Path, split: str) -> Path:
    return out_dir / f"{split}-00000-of-00001.parquet"


def write_single_benchmark(out_dir: str | Path, splits: tuple[str, ...] = ("dev", "test"), n_scenes: int = 60,
                           seed: int = WORLD_SEED) -> Path:
    """The held-out single-image benchmark as a Mantis-Eval copy: ``out_dir/<split>-00000-of-00001.parquet`` per
    split, ``n_scenes`` scenes × 5 questions each (category = the question kind).

    Read it with ``mm-align bench vlm --bench mantis_shapes=OUT_DIR,split=dev``.

    Raises:
        ValueError: ``train`` among the splits (the benchmark is held out) or an unknown split.
    """
    out = Path(out_dir)
    for split in splits:
        if split not in ("dev", "test"):
            raise ValueError(f"benchmark splits are dev and test (held out), got {split!r}")
        rows = [benchmark_row(it.id, it.question, [item_image(it)], it.options, it.answer, it.kind)
                for it in qa_items(split, n_scenes, seed)]
        _write_parquet(rows, _split_file(out, split))
    return out


# ---- multi-image items (MIA-DPO's formats, through mm_align.vlm.mia_augment) --------------------------------------
MULTI_FORMATS = ("sequence", "grid", "pic_in_pic")
MULTI_IMAGE_COUNTS: dict[str, tuple[int, ...]] = {"sequence": (2, 3, 4), "grid": (2, 3, 4), "pic_in_pic": (2,)}
"""Source images per multi-image item: the paper's counts up to 4 (a 3×3 collage squeezed into a 64 px tower leaves
shapes of 2–3 px, and five 64-token images make prompts too long for the CPU budget)."""


@dataclass(frozen=True)
class MultiItem:
    """One multi-image question made from a single-image item and distractor scenes of the same split.

    Args:
        id: ``"<item id>:<format>:<n>:<j>"`` (:func:`mm_align.vlm.mia_augment.augment`'s).
        split: the split of the target and of every distractor.
        fmt: ``sequence``, ``grid`` or ``pic_in_pic``.
        n_images: source images shown (the sequence length, the tile count, 2 for pic-in-pic).
        question: the rewritten prompt with one ``<image>`` mark per image (``Image1: <image>\\n...In Image2, ...``).
        images: the prompt's images (PIL).
        answer: the target item's ground truth.
        options: multiple-choice options: the answer, then the distractors' answers to the same question where they
            have one (the confusions MIA-DPO targets), then random ones of the kind; shuffled.
        source: the target single-image item.
        distractor_scenes: the distractors' scenes, in display order.
        augmentation: ``meta["augmentation"]`` of the augmented sample (target position, boxes, ...).
    """

    id: str
    split: str
    fmt: str
    n_images: int
    question: str
    images: list[Image.Image]
    answer: str
    options: tuple[str, ...]
    source: QAItem
    distractor_scenes: tuple[Scene, ...]
    augmentation: dict[str, Any]


def _scene_id(item: QAItem) -> str:
    return item.id.rsplit("-", 1)[0]


def make_multi_item(item: QAItem, pool: list[QAItem], fmt: str, n: int | None, seed: int, j: int = 0
                    ) -> MultiItem:
    """One multi-image item: ``item`` augmented by :func:`mm_align.vlm.mia_augment.augment` with distractors drawn
    from the scenes of ``pool`` other than ``item``'s (one candidate per scene), tiles of :data:`IMAGE_SIZE` px and
    collages padded to a square.

    Raises:
        ValueError: an unknown format or count, a pool of another split, or what ``augment`` raises.
    """
    from mm_align.vlm.mia_augment import SourceItem, augment

    if fmt not in MULTI_IMAGE_COUNTS:
        raise ValueError(f"unknown multi-image format {fmt!r}; valid: {', '.join(MULTI_FORMATS)}")
    if n is not None and n not in MULTI_IMAGE_COUNTS[fmt]:
        raise ValueError(f"{fmt}: {n} images; valid: {MULTI_IMAGE_COUNTS[fmt]}")
    scenes: dict[str, QAItem] = {}
    for p in pool:
        if p.split != item.split:
            raise ValueError(f"distractor {p.id} is of split {p.split!r}, the item {item.id} of {item.split!r}")
        if _scene_id(p) != _scene_id(item):
            scenes.setdefault(_scene_id(p), p)
    sources = {sid: SourceItem(item_image(p), p.question, p.answer, sid) for sid, p in scenes.items()}
    if n is None:
        n = random.Random(f"{seed}:{item.id}:{fmt}:n:{j}").choice(MULTI_IMAGE_COUNTS[fmt])
    target = SourceItem(item_image(item), item.question, item.answer, item.id)
    sample = augment(target, list(sources.values()), fmt, n=n, seed=seed, tile_size=IMAGE_SIZE, j=j, square=True)
    aug = sample.augmentation
    distractors = tuple(scenes[d].scene for d in aug["distractor_ids"])
    herrings = [a for s in distractors if (a := answer_for(s, item.kind, item.subject)) is not None]
    rng = random.Random(f"{seed}:{sample.id}:options")
    return MultiItem(sample.id, item.split, fmt, int(aug["n_images"]), sample.prompt, list(sample.images),
                     item.answer, choose_options(item.kind, item.answer, rng, herrings), item, distractors, aug)


def multi_items(split: str, fmt: str, n_items: int, seed: int = WORLD_SEED, pool_scenes: int = 200) -> list[MultiItem]:
    """``n_items`` multi-image items of ``split`` in format ``fmt``: targets drawn (seeded) from the single-image
    items of the split's first ``pool_scenes`` scenes, the image counts of :data:`MULTI_IMAGE_COUNTS` in turn, the
    distractors from the same scenes (never the target's).

    Raises:
        ValueError: an unknown split or format, or more items than the pool holds.
    """
    items = qa_items(split, pool_scenes, seed)
    if n_items > len(items):
        raise ValueError(f"{n_items} {fmt} items asked for, but {split}'s {pool_scenes} scenes hold {len(items)} "
                         "questions")
    targets = random.Random(f"{seed}:{split}:{fmt}:targets").sample(items, n_items)
    counts = MULTI_IMAGE_COUNTS.get(fmt)
    if counts is None:
        raise ValueError(f"unknown multi-image format {fmt!r}; valid: {', '.join(MULTI_FORMATS)}")
    return [make_multi_item(t, items, fmt, counts[i % len(counts)], seed) for i, t in enumerate(targets)]


def write_multi_benchmarks(out_dir: str | Path, splits: tuple[str, ...] = ("dev", "test"), n_items: int = 150,
                           seed: int = WORLD_SEED, formats: tuple[str, ...] = MULTI_FORMATS) -> dict[str, Path]:
    """The held-out multi-image benchmarks as Mantis-Eval copies, one folder per format under ``out_dir``
    (``out_dir/<format>/<split>-00000-of-00001.parquet``; category = ``<format>-<n images>``).

    Returns:
        format -> its folder (read it with ``--bench mantis_shapes_<format>=FOLDER,split=dev``).

    Raises:
        ValueError: ``train`` among the splits, or an unknown format.
    """
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for fmt in formats:
        for split in splits:
            if split not in ("dev", "test"):
                raise ValueError(f"benchmark splits are dev and test (held out), got {split!r}")
            rows = [benchmark_row(m.id, m.question, m.images, m.options, m.answer, f"{m.fmt}-{m.n_images}")
                    for m in multi_items(split, fmt, n_items, seed)]
            _write_parquet(rows, _split_file(out / fmt, split))
        paths[fmt] = out / fmt
    return paths
