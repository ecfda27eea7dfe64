"""Caption perturbation for text-preference optimisation (TPO; ALGORITHMS.md §3).

TDPO/TKTO train on one image under its true caption (preferred) and under a MISMATCHED caption,
the true one perturbed along one of four axes:

- ``objects``: swap an object noun, change a count ("two dogs" → "four dogs", "a dog" → "three
  dogs"), or add an object ("a dog" → "a dog and a cat");
- ``attributes``: swap a colour, a material or a style for another of the same kind;
- ``spatial``: swap a spatial relation or a motion ("on" ↔ "under", "left of" ↔ "right of",
  "running" ↔ "sitting");
- ``context``: swap the background, weather, light or time ("at night" ↔ "during the day",
  "beach" → "forest", "on a white background" → "on a blue background").

:class:`RuleBasedPerturber` works offline from the word lists below (the paper used an LLM);
:class:`CausalLMPerturber` wraps ANY local transformers causal LM and validates its answer, with an
optional fall-back to the rules. Both are deterministic given the seed, and
:func:`perturb_dataset` seeds each caption from (seed, index), so the result does not depend on
batching or on which process reads the data.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mm_align.config import from_dict, option

__all__ = [
    "AXES", "OPERATIONS", "OBJECT_GROUPS", "Perturbation", "PerturberConfig", "RuleBasedPerturber", "CausalLMConfig",
    "CausalLMPerturber", "make_perturber", "perturb_dataset",
]

AXES = ("objects", "attributes", "spatial", "context")
# the edits each axis can make (a Perturbation's ``operation``)
OPERATIONS: dict[str, tuple[str, ...]] = {
    "objects": ("swap_object", "change_count", "add_object"),
    "attributes": ("swap_colour", "swap_material", "swap_style"),
    "spatial": ("swap_relation", "swap_motion"),
    "context": ("change_time", "change_weather", "change_place", "change_setting", "change_light",
                "change_background"),
}

# Each entry is a list of synonyms: a replacement is always drawn from ANOTHER entry.
COLOURS = [["red"], ["orange"], ["yellow"], ["green"], ["blue"], ["purple", "violet"], ["pink"], ["brown"],
           ["black"], ["white"], ["gray", "grey"], ["cyan", "turquoise"], ["magenta"], ["gold", "golden"],
           ["silver"], ["beige"]]
MATERIALS = [["wooden", "wood"], ["metal", "metallic", "steel"], ["glass"], ["plastic"], ["stone"], ["leather"],
             ["paper"], ["ceramic"], ["woolen", "wool"], ["marble"], ["concrete"], ["rubber"], ["velvet"]]
STYLES = [["photo", "photograph"], ["painting"], ["sketch", "drawing"], ["cartoon"], ["watercolor", "watercolour"],
          ["pixel art"], ["3d render"], ["anime"], ["oil painting"], ["pencil drawing"]]
OBJECT_GROUPS: dict[str, dict[str, str]] = {  # a swap stays within its group: singular -> plural
    "animal": {"dog": "dogs", "cat": "cats", "horse": "horses", "bird": "birds", "elephant": "elephants",
               "giraffe": "giraffes", "zebra": "zebras", "sheep": "sheep", "cow": "cows", "bear": "bears"},
    "person": {"person": "people", "man": "men", "woman": "women", "child": "children", "boy": "boys",
               "girl": "girls"},
    "vehicle": {"car": "cars", "bus": "buses", "bicycle": "bicycles", "boat": "boats", "train": "trains",
                "airplane": "airplanes"},
    "thing": {"chair": "chairs", "table": "tables", "cup": "cups", "bottle": "bottles", "clock": "clocks",
              "book": "books", "laptop": "laptops", "phone": "phones", "umbrella": "umbrellas", "ball": "balls",
              "kite": "kites", "lamp": "lamps", "sofa": "sofas", "vase": "vases", "hat": "hats", "shoe": "shoes"},
    "food": {"apple": "apples", "banana": "bananas", "pizza": "pizzas", "cake": "cakes", "sandwich": "sandwiches"},
    "plant": {"tree": "trees", "flower": "flowers"},
    "building": {"house": "houses", "tower": "towers", "bridge": "bridges"},
    "shape": {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
              "heart": "hearts", "cross": "crosses", "hexagon": "hexagons", "diamond": "diamonds",
              "rectangle": "rectangles", "oval": "ovals", "pentagon": "pentagons"},
}
OBJECTS = {s: p for group in OBJECT_GROUPS.values() for s, p in group.items()}
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
           "ten": 10}
NUMBER_WORDS = {v: k for k, v in NUMBERS.items()}
SPATIAL = [["on top of", "atop"], ["underneath", "beneath", "under", "below"], ["above", "over"],
           ["to the left of", "left of"], ["to the right of", "right of"], ["in front of"], ["behind"],
           ["inside", "in"], ["outside"], ["next to", "beside"], ["far from"], ["on"]]
MOTION = [["running"], ["sitting"], ["standing"], ["lying"], ["walking"], ["sleeping"], ["jumping"], ["flying"],
          ["swimming"], ["eating"]]
CONTEXT = {
    "time": [["at night", "at nighttime"], ["during the day", "in the daytime"], ["at sunset", "at dusk"],
             ["at sunrise", "at dawn"], ["in the morning"], ["in the evening"]],
    "weather": [["sunny"], ["rainy"], ["snowy"], ["foggy", "misty"], ["cloudy"], ["stormy"]],
    "place": [["beach"], ["forest"], ["city"], ["desert"], ["mountain", "mountains"], ["field"], ["kitchen"],
              ["bedroom"], ["street"], ["park"], ["lake"], ["snow"], ["garden"], ["office"]],
    "setting": [["indoors"], ["outdoors"]],
    "light": [["brightly lit"], ["dimly lit"], ["in the dark"], ["in bright sunlight"]],
}


@dataclass
class Perturbation:
    """One mismatched caption and how it was made."""

    original: str
    perturbed: str
    axis: str
    operation: str
    span: str
    replacement: str


@dataclass
class PerturberConfig:
    """The rule-based perturber: which axes it may use, and optional replacement word lists."""

    axes: list[str] = option(default_factory=lambda: list(AXES), help="Axes to draw from.")
    colours: list[str] | None = option(None, help="Replace the colour list (one word per entry).")
    objects: dict[str, str] | None = option(None, help="Replace the object list: singular -> plural.")
    operations: list[str] | None = option(
        None, help="Only these edits (e.g. [swap_object, swap_colour]); None: every edit of the axes.")

    def __post_init__(self) -> None:
        bad = [a for a in self.axes if a not in AXES]
        if bad or not self.axes:
            raise ValueError(f"unknown perturbation axes {bad}; valid: {', '.join(AXES)}")
        if self.operations is not None:
            known = {op for a in self.axes for op in OPERATIONS[a]}
            bad = [o for o in self.operations if o not in known]
            if bad or not self.operations:
                raise ValueError(f"perturbation operations {bad or '[]'} are not edits of the axes {self.axes}; "
                                 f"valid: {', '.join(sorted(known))}")


def _rng(rng: random.Random | int | None) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


def _match_case(original: str, replacement: str) -> str:
    if original.isupper() and len(original) > 1:
        return replacement.upper()
    if original[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def _phrase_pattern(phrases: Sequence[str]) -> re.Pattern[str]:
    ordered = sorted(set(phrases), key=len, reverse=True)  # longest first: "on top of" before "on"
    return re.compile(r"\b(" + "|".join(re.escape(p) for p in ordered) + r")\b", re.IGNORECASE)


@dataclass
class _Edit:
    start: int
    end: int
    replacement: str
    operation: str


class RuleBasedPerturber:
    """Offline caption perturbation from word lists (see the module docstring)."""

    def __init__(self, config: PerturberConfig | None = None) -> None:
        self.config = config or PerturberConfig()
        self.colours = [[c] for c in self.config.colours] if self.config.colours else COLOURS
        self.objects = self.config.objects or OBJECTS
        self.groups = {"custom": self.config.objects} if self.config.objects else OBJECT_GROUPS
        self.plurals = {p: s for s, p in self.objects.items()}
        self._groups: dict[str, list[list[str]]] = {
            "colour": self.colours, "material": MATERIALS, "style": STYLES, "relation": SPATIAL, "motion": MOTION,
            **{f"context_{k}": v for k, v in CONTEXT.items()},
        }
        self._patterns = {k: _phrase_pattern([w for entry in v for w in entry]) for k, v in self._groups.items()}
        nouns = list(self.objects) + [p for p in self.plurals if p not in self.objects]
        self._noun = _phrase_pattern(nouns)
        colour_words = [w for entry in self.colours for w in entry]
        self._background = re.compile(r"\b(" + "|".join(map(re.escape, colour_words)) + r")(\s+background)\b",
                                      re.IGNORECASE)
        numbers = "|".join(["a", "an", *NUMBERS, r"\d+"])
        noun_alternatives = "|".join(map(re.escape, sorted(nouns, key=len, reverse=True)))
        self._count = re.compile(rf"\b({numbers})\s+((?:[a-z]+\s+){{0,2}}?)({noun_alternatives})\b", re.IGNORECASE)

    # ---- candidate edits per axis -------------------------------------------------------------
    def _swaps(self, caption: str, group: str, operation: str) -> list[tuple[_Edit, list[str]]]:
        entries = self._groups[group]
        out = []
        for m in self._patterns[group].finditer(caption):
            word = m.group(1).lower()
            own = next(e for e in entries if word in e)
            others = [e[0] for e in entries if e is not own]
            out.append((_Edit(m.start(1), m.end(1), "", operation), others))
        return out

    def _objects(self, caption: str) -> list[tuple[_Edit, list[str]]]:
        out: list[tuple[_Edit, list[str]]] = []
        for m in self._noun.finditer(caption):
            word = m.group(1).lower()
            singular = word if word in self.objects else self.plurals[word]
            group = next((g for g in self.groups.values() if singular in g), self.objects)
            if word in self.objects:
                others = [s for s in group if s != word and group[s] != word]
            else:
                others = [p for s, p in group.items() if p != word and s != singular]
            start = m.start(1)
            article = re.search(r"\b(a|an)\s+$", caption[:start], re.IGNORECASE)
            if article and word in self.objects:  # "an apple" → "a pizza": the article agrees
                start = article.start()
                others = [f"{'an' if o[0] in 'aeiou' else 'a'} {o}" for o in others]
            out.append((_Edit(start, m.end(1), "", "swap_object"), others))
        for m in self._count.finditer(caption):
            det, adjs, noun = m.group(1).lower(), m.group(2), m.group(3).lower()
            current = 1 if det in ("a", "an", "one") else NUMBERS.get(det, int(det) if det.isdigit() else 0)
            singular = self.plurals.get(noun, noun)
            plural = self.objects.get(singular, noun)
            choices = [n for n in range(1, 7) if n != current]
            texts = []
            for n in choices:
                number = ("an" if singular[0] in "aeiou" else "a") if n == 1 else (str(n) if det.isdigit()
                                                                                   else NUMBER_WORDS[n])
                texts.append(f"{number} {adjs}{singular if n == 1 else plural}")
            out.append((_Edit(m.start(), m.end(), "", "change_count"), texts))
            if current == 1:  # add a second, different object after this noun phrase
                others = [s for s in self.objects if s != singular]
                adds = [f"{m.group(0)} and {'an' if o[0] in 'aeiou' else 'a'} {o}" for o in others]
                out.append((_Edit(m.start(), m.end(), "", "add_object"), adds))
        return out

    def _context(self, caption: str) -> list[tuple[_Edit, list[str]]]:
        out = []
        for kind in CONTEXT:
            out += self._swaps(caption, f"context_{kind}", f"change_{kind}")
        for m in self._background.finditer(caption):
            word = m.group(1).lower()
            own = next(e for e in self.colours if word in e)
            # a new background must not be the colour of something else in the caption
            used = {w.lower() for w in re.findall(r"[A-Za-z]+", caption)}
            others = [e[0] for e in self.colours if e is not own and not (set(e) & used)]
            out.append((_Edit(m.start(1), m.end(1), "", "change_background"), others))
        return out

    def candidates(self, caption: str, axis: str) -> list[tuple[_Edit, list[str]]]:
        """Every place ``axis`` could change ``caption``, with the replacements it could put there."""
        if axis == "objects":
            found = self._objects(caption)
        elif axis == "attributes":
            found = (self._swaps(caption, "colour", "swap_colour") + self._swaps(caption, "material", "swap_material")
                     + self._swaps(caption, "style", "swap_style"))
            background_spans = {m.start(1) for m in self._background.finditer(caption)}
            if len(found) > len(background_spans):  # prefer the object's colour over the background's
                found = [f for f in found if f[0].start not in background_spans or f[0].operation != "swap_colour"]
        elif axis == "spatial":
            found = self._swaps(caption, "relation", "swap_relation") + self._swaps(caption, "motion", "swap_motion")
        elif axis == "context":
            found = self._context(caption)
        else:
            raise ValueError(f"unknown axis {axis!r}; valid: {', '.join(AXES)}")
        allowed = self.config.operations
        return [(e, opts) for e, opts in found if opts and (allowed is None or e.operation in allowed)]

    def perturb(self, caption: str, axis: str | None = None,
                rng: random.Random | int | None = None) -> Perturbation | None:
        """A mismatched caption along ``axis`` (None: the first applicable axis in a seeded random order)."""
        r = _rng(rng)
        axes = [axis] if axis is not None else r.sample(self.config.axes, len(self.config.axes))
        for ax in axes:
            found = self.candidates(caption, ax)
            while found:
                edit, options = found.pop(r.randrange(len(found)))
                original = caption[edit.start : edit.end]
                replacement = _match_case(original, r.choice(options))
                before = caption[: edit.start]
                article = re.search(r"\b(a|an)(\s+)$", before, re.IGNORECASE)
                if article:  # "a street" → "an office", not "a office"
                    fixed = "an" if replacement[:1].lower() in "aeiou" else "a"
                    before = before[: article.start()] + _match_case(article.group(1), fixed) + article.group(2)
                perturbed = before + replacement + caption[edit.end :]
                if perturbed.lower() != caption.lower():
                    return Perturbation(caption, perturbed, ax, edit.operation, original, replacement)
        return None

    def perturb_many(self, captions: Sequence[str], axes: Sequence[str | None] | None = None,
                     seed: int = 0) -> list[Perturbation | None]:
        axes = list(axes) if axes is not None else [None] * len(captions)
        return [self.perturb(c, a, _index_seed(seed, i)) for i, (c, a) in enumerate(zip(captions, axes))]


def _index_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest(), "little")


# ---- an LLM perturber ------------------------------------------------------------------------------
_AXIS_TEXT = {
    "objects": "the objects (swap an object, add one, or change how many there are)",
    "attributes": "one attribute (a colour, a material or a style)",
    "spatial": "a spatial relation or a motion (e.g. on/under, left/right, running/sitting)",
    "context": "the context (the background, the weather, the light or the time of day)",
}
_PREFIX = re.compile(r"^\s*(new caption|caption|answer|output)\s*[:\-]\s*", re.IGNORECASE)


@dataclass
class CausalLMConfig:
    """A perturber around any transformers causal LM (a local directory or hub id)."""

    pretrained: str = option("", help="The causal LM: a local directory or hub id.")
    device: str = option("cpu", help="cpu, cuda, cuda:1, ...")
    max_new_tokens: int = option(48, help="Tokens generated per caption.")
    temperature: float = option(0.0, help="0 = greedy decoding; > 0 samples (seeded).")
    max_length_ratio: float = option(3.0, help="Reject answers longer than this many times the caption.")
    fallback: bool = option(False, help="Use the rule-based perturber when the LM's answer is rejected.")
    axes: list[str] = option(default_factory=lambda: list(AXES), help="Axes to draw from.")


class CausalLMPerturber:
    """Ask a causal LM to rewrite the caption along one axis; keep the answer only if it is a valid edit."""

    def __init__(self, config: CausalLMConfig) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not config.pretrained:
            raise ValueError("the causal-LM perturber needs pretrained: a model directory or hub id")
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(config.pretrained)
        self.model = AutoModelForCausalLM.from_pretrained(config.pretrained).to(config.device).eval()
        self.rules = RuleBasedPerturber(PerturberConfig(axes=list(config.axes)))

    def instruction(self, caption: str, axis: str) -> str:
        return (f"Rewrite this image caption so that it no longer matches the image, by changing only "
                f"{_AXIS_TEXT[axis]}. Keep every other word. Answer with the new caption only.\n"
                f"Caption: {caption}\nNew caption:")

    def generate(self, prompt: str, seed: int) -> str:
        """The LM's raw continuation of ``prompt`` (chat template when the tokenizer has one)."""
        import torch

        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
        else:
            text = prompt
        inputs = tok(text, return_tensors="pt").to(self.config.device)
        torch.manual_seed(seed)
        kw: dict[str, Any] = {"max_new_tokens": self.config.max_new_tokens, "do_sample": self.config.temperature > 0}
        if self.config.temperature > 0:
            kw["temperature"] = self.config.temperature
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        with torch.no_grad():
            out = self.model.generate(**inputs, pad_token_id=pad, **kw)
        return tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def parse(self, caption: str, answer: str) -> str | None:
        """The first non-empty line, without quotes or a "Caption:" prefix; None when not a valid edit."""
        line = next((x.strip() for x in answer.splitlines() if x.strip()), "")
        line = _PREFIX.sub("", line).strip().strip("\"'`“”‘’").strip()
        if not line or line.lower() == caption.strip().lower():
            return None
        if len(line) > self.config.max_length_ratio * len(caption) + 20:
            return None
        return line

    def perturb(self, caption: str, axis: str | None = None,
                rng: random.Random | int | None = None) -> Perturbation | None:
        r = _rng(rng)
        ax = axis if axis is not None else r.choice(self.config.axes)
        seed = r.randrange(2**31)
        perturbed = self.parse(caption, self.generate(self.instruction(caption, ax), seed))
        if perturbed is not None:
            return Perturbation(caption, perturbed, ax, "llm_rewrite", caption, perturbed)
        if self.config.fallback:
            return self.rules.perturb(caption, axis, r)
        return None

    def perturb_many(self, captions: Sequence[str], axes: Sequence[str | None] | None = None,
                     seed: int = 0) -> list[Perturbation | None]:
        axes = list(axes) if axes is not None else [None] * len(captions)
        return [self.perturb(c, a, _index_seed(seed, i)) for i, (c, a) in enumerate(zip(captions, axes))]


def make_perturber(spec: str | dict[str, Any] | None = "rule") -> RuleBasedPerturber | CausalLMPerturber:
    """``"rule"``, a model directory (→ causal LM), or ``{"type": "rule"|"causal_lm", ...fields}``."""
    if spec is None or spec == "rule":
        return RuleBasedPerturber()
    if isinstance(spec, str):
        return CausalLMPerturber(CausalLMConfig(pretrained=spec))
    spec = dict(spec)
    kind = spec.pop("type", "rule")
    if kind == "rule":
        return RuleBasedPerturber(from_dict(PerturberConfig, spec, path="perturber"))
    if kind == "causal_lm":
        return CausalLMPerturber(from_dict(CausalLMConfig, spec, path="perturber"))
    raise ValueError(f"unknown perturber type {kind!r}; valid: rule, causal_lm")


def perturb_dataset(captions: Sequence[str], perturber: Any, seed: int = 0,
                    axes: Sequence[str] | None = None) -> tuple[list[Perturbation | None], dict[str, int]]:
    """Perturb every caption (caption ``i`` seeded by (seed, i)); returns the results and counts per axis.

    With ``axes``, each caption's axis is drawn (seeded) from them; a caption none applies to gives None,
    counted under ``"unperturbable"``.
    """
    results: list[Perturbation | None] = []
    counts: dict[str, int] = {}
    for i, caption in enumerate(captions):
        r = random.Random(_index_seed(seed, i))
        result = None
        if axes:
            for ax in r.sample(list(axes), len(axes)):
                result = perturber.perturb(caption, ax, r)
                if result is not None:
                    break
        else:
            result = perturber.perturb(caption, None, r)
        results.append(result)
        key = result.axis if result is not None else "unperturbable"
        counts[key] = counts.get(key, 0) + 1
    return results, counts
