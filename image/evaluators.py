"""Image evaluators: CLIP score, HPSv2 / v2.1, PickScore and the LAION aesthetic predictor.

Each is built from a dataclass config (validated like every mm-align config), loads its weights from
a local path or a hub id (the user's weights: never fetched by tests) and scores batches of PIL images
against their prompts on the configured device::

    evaluator = build_evaluator({"type": "pickscore", "model": "yuvalkirstain/PickScore_v1",
                                 "processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"})
    scores = evaluator.score(images, prompts)  # (N,) float64, higher is better

``mm-align evaluate image`` scores a folder of samples (``mm-align generate image`` output, or any
jsonl of ``{image, prompt}``) or a preference dataset (Pick-a-Pic parquet, pair folders, jsonl pairs);
on pairs it also reports how often each evaluator agrees with the human label.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from mm_align.image.image_io import load_image
from mm_align.image.pair_readers import read_image_pairs
from mm_align.image.sampling import resolve_device
from PIL import Image

from mm_align.config import ConfigError, from_dict, option
from mm_align.help_format import HelpFormatter

__all__ = [
    "Evaluator", "ClipScoreConfig", "ClipScore", "HPSv2Config", "HPSv2", "PickScoreConfig", "PickScore",
    "AestheticConfig", "AestheticScore", "EVALUATORS", "build_evaluator", "build_scorers", "evaluate_main",
    "parse_evaluator_arg", "resolve_weights_file",
]

HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Evaluator(Protocol):
    """What generation, pairing and benchmarks ask of an evaluator."""

    name: str
    higher_is_better: bool

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray: ...


def resolve_weights_file(spec: str, default_filename: str | None = None) -> str:
    """A local weights file from a path, or from a hub id ``org/repo`` / ``org/repo/file`` (via the HF cache).

    A path that exists is returned as is. Otherwise ``spec`` is read as a hub repository (plus an optional
    file name; ``default_filename`` otherwise) and downloaded by ``huggingface_hub`` — which honours
    ``HF_HUB_OFFLINE=1``, so offline runs use only what is cached.

    Raises:
        FileNotFoundError: ``spec`` is neither an existing file nor a hub id (the message says which it tried).
    """
    if Path(spec).is_file():
        return spec
    parts = spec.split("/")
    if Path(spec).is_absolute() or spec.startswith(".") or len(parts) < 2:
        raise FileNotFoundError(f"{spec}: no such weights file")
    repo, filename = ("/".join(parts[:2]), "/".join(parts[2:])) if len(parts) > 2 else (spec, default_filename)
    if not filename:
        raise FileNotFoundError(f"{spec}: not a file, and as a hub id it names no file (use org/repo/FILE)")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename)
    except Exception as err:  # noqa: BLE001 - hub errors are many; the message names the spec
        raise FileNotFoundError(f"{spec}: not a local file, and the hub file {repo}/{filename} could not be "
                                f"loaded ({type(err).__name__}: {err})") from err


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _check_inputs(images: list[Image.Image], prompts: list[str], who: str) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"{who}: {len(images)} images but {len(prompts)} prompts")


class _OpenClipBase:
    """An open_clip model + its eval transform + tokenizer; cosine(image, text) per pair, batched."""

    def _load_open_clip(self, model: str, pretrained: str | None, device: str, precision: str) -> None:
        import open_clip

        self.device = resolve_device(device)
        self.dtype = _DTYPES[precision]
        clip, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=pretrained or None)
        self.model = clip.to(self.device, self.dtype).eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model)

    @torch.no_grad()
    def _embed(self, images: list[Image.Image], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.stack([self.preprocess(i.convert("RGB")) for i in images]).to(self.device, self.dtype)
        tokens = self.tokenizer(prompts).to(self.device)
        img = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        txt = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return img, txt

    def _cosine(self, images: list[Image.Image], prompts: list[str], batch_size: int) -> np.ndarray:
        _check_inputs(images, prompts, self.name)
        out = np.empty(len(images), dtype=np.float64)
        for s in _batches(len(images), batch_size):
            img, txt = self._embed(images[s], prompts[s])
            out[s] = (img * txt).sum(-1).cpu().double().numpy()
        return out


@dataclass
class ClipScoreConfig:
    model: str = option(help="open_clip model: an architecture name (ViT-H-14), 'hf-hub:org/repo' or "
                             "'local-dir:PATH' (open_clip_config.json + weights).")
    pretrained: str | None = option(None, help="open_clip pretrained tag (laion2b_s32b_b79k) or a checkpoint file; "
                                               "none for hf-hub:/local-dir: models, which carry their weights.")
    scale: float = option(1.0, help="Multiply the cosine (100 gives the CLIPScore of some papers).")
    name: str = option("clip_score", help="The score's name in outputs and pair rules.")
    device: str = option("auto", help="auto, cpu, cuda, cuda:1…")
    precision: Literal["fp32", "bf16", "fp16"] = option("fp32", help="Evaluator weights dtype.")
    batch_size: int = option(32, help="Images per forward pass.")


class ClipScore(_OpenClipBase):
    """CLIP score (Hessel et al. 2021, eq. 1 with w = ``scale``): ``scale · cos(E_img(x), E_txt(c))``."""

    higher_is_better = True

    def __init__(self, cfg: ClipScoreConfig):
        self.cfg, self.name = cfg, cfg.name
        self._load_open_clip(cfg.model, cfg.pretrained, cfg.device, cfg.precision)

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        return self.cfg.scale * self._cosine(images, prompts, self.cfg.batch_size)


@dataclass
class HPSv2Config:
    checkpoint: str = option(help="HPS checkpoint: a local .pt file, or hub id 'xswu/HPSv2' (file chosen by version).")
    version: Literal["v2.0", "v2.1"] = option("v2.1", help="v2.0 and v2.1 scores are not comparable: both are named.")
    model: str = option("ViT-H-14", help="open_clip architecture the checkpoint was fine-tuned from.")
    name: str | None = option(None, help="Score name; default 'hpsv2.0' / 'hpsv2.1'.")
    device: str = option("auto", help="auto, cpu, cuda, cuda:1…")
    precision: Literal["fp32", "bf16", "fp16"] = option("fp32", help="Evaluator weights dtype.")
    batch_size: int = option(32, help="Images per forward pass.")


class HPSv2(_OpenClipBase):
    """Human Preference Score v2 / v2.1 (Wu et al. 2023): cosine of a fine-tuned open_clip ViT-H-14's embeddings.

    The checkpoint holds the whole fine-tuned CLIP (``{"state_dict": …}`` or a bare state dict) and is
    loaded over an uninitialised ``model`` architecture. The score is ``cos(E_img, E_txt)`` (the HPSv2
    repository's ``logits_per_image`` diagonal before its ×100 display scaling).
    """

    higher_is_better = True

    def __init__(self, cfg: HPSv2Config):
        self.cfg = cfg
        self.name = cfg.name or f"hps{cfg.version}"
        self._load_open_clip(cfg.model, None, cfg.device, "fp32")
        path = resolve_weights_file(cfg.checkpoint, HPS_FILES[cfg.version])
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        state = {k.removeprefix("module."): v for k, v in state.items()}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: not an HPS checkpoint for open_clip {cfg.model!r} "
                             f"(missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})")
        self.model.to(self.device, _DTYPES[cfg.precision])
        self.dtype = _DTYPES[cfg.precision]

    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        return self._cosine(images, prompts, self.cfg.batch_size)


@dataclass
class PickScoreConfig:
    model: str = option("yuvalkirstain/PickScore_v1", help="transformers CLIPModel: local dir or hub id.")
    processor: str = option("laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                            help="transformers CLIP processor (tokenizer + image processor): local dir or hub id.")
    name: str = option("pickscore", help="Score name.")
    device: str = option("auto", help="auto, cpu, cuda, cuda:1…")
    precision: Literal["fp32", "bf16", "fp16"] = option("fp32", help="Evaluator weights dtype.")
    batch_size: int = option(32, help="Images per forward pass.")


class PickScore:
    """PickScore (Kirstain et al. 2023, §4): ``exp(logit_scale) · cos(E_img, E_txt)`` of a fine-tuned CLIP-H."""

    higher_is_better = True

    def __init__(self, cfg: PickScoreConfig):
        from transformers import AutoProcessor, CLIPModel

        self.cfg, self.name = cfg, cfg.name
        self.device = resolve_device(cfg.device)
        self.processor = AutoProcessor.from_pretrained(cfg.processor)
        self.model = CLIPModel.from_pretrained(cfg.model, dtype=_DTYPES[cfg.precision]).to(self.device).eval()
        self.model.requires_grad_(False)

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        _check_inputs(images, prompts, self.name)
        out = np.empty(len(images), dtype=np.float64)
        scale = float(self.model.logit_scale.exp())
        for s in _batches(len(images), self.cfg.batch_size):
            inputs = self.processor(text=prompts[s], images=[i.convert("RGB") for i in images[s]], padding=True,
                                    truncation=True, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            result = self.model(**inputs)  # image_embeds / text_embeds are L2-normalised
            cos = (result.image_embeds.float() * result.text_embeds.float()).sum(-1)
            out[s] = (scale * cos).cpu().double().numpy()
        return out


@dataclass
class AestheticConfig:
    head: str = option(help="Predictor head: a local .pth/.safetensors file or 'org/repo/FILE' on the hub "
                            "(e.g. sac+logos+ava1-l14-linearMSE.pth: the MLP, or a single linear layer).")
    clip_model: str = option("ViT-L-14", help="open_clip model whose image embeddings the head reads.")
    clip_pretrained: str | None = option("openai", help="open_clip pretrained tag or checkpoint file (none for "
                                                        "hf-hub:/local-dir: models).")
    name: str = option("aesthetic", help="Score name.")
    device: str = option("auto", help="auto, cpu, cuda, cuda:1…")
    precision: Literal["fp32", "bf16", "fp16"] = option("fp32", help="CLIP weights dtype (the head runs in fp32).")
    batch_size: int = option(32, help="Images per forward pass.")


class _MLPHead(torch.nn.Module):
    """The improved-aesthetic-predictor MLP: ``layers`` = Linear/Dropout stack (keys ``layers.N.*``)."""

    def __init__(self, layers: torch.nn.Sequential):
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _aesthetic_head(state: dict[str, torch.Tensor], path: str) -> torch.nn.Module:
    """The LAION predictor's head from its state dict: the MLP (``layers.{0,2,4,6,7}``) or one ``Linear``."""
    if set(state) == {"weight", "bias"}:
        head = torch.nn.Linear(state["weight"].shape[1], 1)
        head.load_state_dict(state)
        return head
    linear = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")})
    if not linear:
        raise ValueError(f"{path}: not an aesthetic head (expected keys weight/bias or layers.N.weight; got "
                         f"{sorted(state)[:6]})")
    modules: list[torch.nn.Module] = []
    for idx in linear:
        while len(modules) < idx:  # the dropouts between the Linear layers (identity at eval)
            modules.append(torch.nn.Dropout(0.0))
        w = state[f"layers.{idx}.weight"]
        modules.append(torch.nn.Linear(w.shape[1], w.shape[0]))
    head = _MLPHead(torch.nn.Sequential(*modules))
    head.load_state_dict(state)
    return head


class AestheticScore(_OpenClipBase):
    """LAION aesthetic predictor (Schuhmann et al., improved-aesthetic-predictor): ``head(E_img / ‖E_img‖)``.

    The head regresses the 1–10 aesthetic rating from the L2-normalised CLIP ViT-L/14 image embedding;
    the prompt is not used (the argument is accepted so every evaluator has the same interface).
    """

    higher_is_better = True

    def __init__(self, cfg: AestheticConfig):
        self.cfg, self.name = cfg, cfg.name
        self._load_open_clip(cfg.clip_model, cfg.clip_pretrained, cfg.device, cfg.precision)
        path = resolve_weights_file(cfg.head)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        self.head = _aesthetic_head(dict(state), path).to(self.device).eval().requires_grad_(False)

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str] | None = None) -> np.ndarray:
        out = np.empty(len(images), dtype=np.float64)
        for s in _batches(len(images), self.cfg.batch_size):
            pixels = torch.stack([self.preprocess(i.convert("RGB")) for i in images[s]]).to(self.device, self.dtype)
            emb = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
            out[s] = self.head(emb).squeeze(-1).cpu().double().numpy()
        return out


# type -> (config class, evaluator class)
EVALUATORS: dict[str, tuple[type, type]] = {
    "clip_score": (ClipScoreConfig, ClipScore),
    "hpsv2": (HPSv2Config, HPSv2),
    "pickscore": (PickScoreConfig, PickScore),
    "aesthetic": (AestheticConfig, AestheticScore),
}


def build_evaluator(spec: dict[str, Any]) -> Any:
    """An evaluator from ``{"type": NAME, **config}`` (``type`` in :data:`EVALUATORS`), every key validated.

    Raises:
        ConfigError: unknown type (the message lists the known ones), unknown key or ill-typed value.
    """
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in EVALUATORS:
        raise ConfigError(f"evaluator type {kind!r} is not one of {sorted(EVALUATORS)}")
    config_cls, evaluator_cls = EVALUATORS[kind]
    return evaluator_cls(from_dict(config_cls, spec, path=f"evaluator.{kind}"))


def parse_evaluator_arg(text: str) -> dict[str, Any]:
    """``type:key=value,key=value`` → ``{"type": ..., key: value}`` (values parsed as YAML scalars)."""
    import yaml

    kind, _, rest = text.partition(":")
    spec: dict[str, Any] = {"type": kind.strip()}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"evaluator option {item!r} in {text!r} is not key=value")
        spec[key.strip()] = yaml.safe_load(value)
    return spec


def build_scorers(specs: list[str]) -> list[Any]:
    """Evaluators from ``--evaluator`` arguments: ``shapes_oracle``, ``shapes_oracle_attributes`` or any type of
    :data:`EVALUATORS` (``type:key=value,...``).

    Raises:
        ValueError: two evaluators share a name, or an option is not ``key=value``.
        ConfigError: an unknown evaluator type or key (see :func:`build_evaluator`).
    """
    out = []
    for text in specs:
        spec = parse_evaluator_arg(text)
        if spec["type"] == "shapes_oracle":
            from mm_align.image.toyworld.shapes import ShapesOracle

            out.append(ShapesOracle())
        elif spec["type"] == "shapes_oracle_attributes":
            from mm_align.image.toyworld.shapes import ShapesOracleAttributes

            out.append(ShapesOracleAttributes())
        else:
            out.append(build_evaluator(spec))
    names = [e.name for e in out]
    if len(set(names)) != len(names):
        raise ValueError(f"two evaluators share a name: {names}")
    return out


# ---------------------------------------------------------------------------------------------------
# mm-align evaluate image
# ---------------------------------------------------------------------------------------------------


def _sample_rows(path: Path) -> tuple[list[dict[str, Any]], Path]:
    """``{image, prompt}`` rows of a samples jsonl (``generate`` output dir or a jsonl file)."""
    file = path / "samples.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: neither a samples.jsonl nor a directory holding one")
    rows = []
    for n, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}:{n}: malformed json ({err.msg})") from err
        image = row.get("image", row.get("file", row.get("path")))
        prompt = row.get("prompt", row.get("caption"))
        if not isinstance(image, str) or not isinstance(prompt, str):
            raise ValueError(f"{file}:{n}: needs an image path ('image' or 'file') and a 'prompt'")
        rows.append({**row, "image": image, "prompt": prompt})
    return rows, file.parent


def _open(image: str, base: Path) -> Image.Image:
    try:
        return load_image(image, base)
    except (OSError, ValueError) as err:  # missing file, not an image: name it before any output is written
        raise ValueError(f"{base / image}: cannot read the image ({type(err).__name__}: {err})") from err


def _is_samples(path: Path) -> bool:
    return (path.is_dir() and (path / "samples.jsonl").is_file() and not (path / "chosen").exists()) or (
        path.is_file() and path.suffix == ".jsonl" and "chosen" not in _first_row_keys(path))


def _first_row_keys(path: Path) -> set[str]:
    with open(path) as f:
        for line in f:
            if line.strip():
                try:
                    return set(json.loads(line))
                except json.JSONDecodeError:
                    return set()
    return set()


def evaluate(path: str | Path, evaluators: list[Any], out: Path | None = None, batch: int = 64) -> dict[str, Any]:
    """Score a samples set or a preference dataset with each evaluator; returns (and writes) a summary.

    Samples: one score per image and evaluator, means with 95% intervals. Pairs: chosen and rejected
    scored, plus the evaluator's agreement with the label (``score(chosen) > score(rejected)``; ties
    counted apart), with a Wilson 95% interval — the usual check that a scorer tracks human preference.
    """
    from mm_align.stats import mean_interval, win_rate

    path = Path(path)
    summary: dict[str, Any] = {"input": str(path), "evaluators": [e.name for e in evaluators]}
    scored: list[dict[str, Any]] = []
    if _is_samples(path):
        rows, base = _sample_rows(path)
        for s in _batches(len(rows), batch):
            images = [_open(r["image"], base) for r in rows[s]]
            prompts = [r["prompt"] for r in rows[s]]
            scores = {e.name: e.score(images, prompts) for e in evaluators}
            for j, r in enumerate(rows[s]):
                scored.append({"image": r["image"], "prompt": r["prompt"],
                               "scores": {n: float(v[j]) for n, v in scores.items()}})
        summary["kind"], summary["samples"] = "samples", len(scored)
        summary["mean"] = {e.name: dict(zip(("mean", "low", "high"),
                                            mean_interval([r["scores"][e.name] for r in scored])))
                           for e in evaluators}
    else:
        result = read_image_pairs(path)
        pairs = result.records
        for s in _batches(len(pairs), batch):
            prompts = [p.prompt for p in pairs[s]]
            chosen = [load_image(p.chosen) for p in pairs[s]]
            rejected = [load_image(p.rejected) for p in pairs[s]]
            sc = {e.name: (e.score(chosen, prompts), e.score(rejected, prompts)) for e in evaluators}
            for j, p in enumerate(pairs[s]):
                scored.append({"id": p.id, "prompt": p.prompt,
                               "scores": {n: {"chosen": float(c[j]), "rejected": float(r[j])}
                                          for n, (c, r) in sc.items()}})
        summary["kind"], summary["pairs"] = "pairs", len(scored)
        summary["skipped"] = result.skipped_by_reason()
        summary["agreement"] = {}
        for e in evaluators:
            w = win_rate([r["scores"][e.name]["chosen"] for r in scored],
                         [r["scores"][e.name]["rejected"] for r in scored], e.higher_is_better)
            summary["agreement"][e.name] = {"rate": w.rate, "ci": list(w.ci), "agree": w.wins, "disagree": w.losses,
                                            "ties": w.ties}
    if out is not None:
        from mm_align.atomic import atomic_write_text

        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "scores.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in scored))
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def evaluate_main(argv: list[str]) -> int:
    """``mm-align evaluate image``: score samples or preference pairs with one or more evaluators."""
    p = argparse.ArgumentParser(prog="mm-align evaluate image", description=evaluate_main.__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("input", help="samples (generate output dir / jsonl of image+prompt) or pairs (Pick-a-Pic "
                                 "parquet, pair folders, jsonl pairs)")
    p.add_argument("--evaluator", action="append", required=True,
                   help=f"type:key=value,... with type in {sorted(EVALUATORS)}, shapes_oracle or "
                        "shapes_oracle_attributes (repeatable)")
    p.add_argument("--out", help="write scores.jsonl + summary.json here (default: print the summary only)")
    p.add_argument("--batch", type=int, default=64, help="images loaded per step")
    args = p.parse_args(argv)
    summary = evaluate(args.input, build_scorers(args.evaluator), Path(args.out) if args.out else None, args.batch)
    print(json.dumps(summary, indent=2, default=str))
    return 0
