"""VAE latent distributions and text embeddings encoded once per dataset and cached on disk.

With ``model.precompute: true`` the diffusion adapter encodes every record once, before training,
and training runs the UNet only (no VAE, no text encoder per step). What is cached is the VAE's
latent DISTRIBUTION (mean and std, unscaled, float32), not one sample of it: each step still draws
the latent ``mean + std·z`` with the per-sample seed, so a precomputed run and a live run give the
same numbers. Text embeddings (and SDXL's pooled embedding and ``add_time_ids``) are fixed per record.

Layout: ``<dir>/<key>/chunk-00000.safetensors`` (256 records each) + ``manifest.json``, written to a
temporary directory and renamed into place, so a killed build never leaves a half cache that looks
whole. The key hashes the adapter fingerprint (model path, settings, resolution, encoder dtype), the
records' content and, for image paths, each file's size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mm_align.atomic import atomic_write_json
from mm_align.data import UnpairedSample
from mm_align.reference_cache import records_fingerprint

__all__ = ["LatentCache", "default_latent_dir"]

CHUNK = 256
_BUILD_BATCH = 8


def default_latent_dir() -> Path:
    return Path(os.environ.get("MM_ALIGN_CACHE", Path.home() / ".cache" / "mm_align")) / "latents"


def _record_key(record: Any) -> str:
    return records_fingerprint([record])


def _file_stats(records: Sequence[Any], base_dir: Path | None) -> str:
    """Size and mtime of every image file the records name, so an edited image invalidates the cache."""
    h = hashlib.sha256()
    for r in records:
        values = [r.completion] if isinstance(r, UnpairedSample) else [r.chosen, r.rejected]
        for v in values:
            if isinstance(v, str):
                p = Path(v)
                p = base_dir / p if not p.is_absolute() and base_dir is not None else p
                st = p.stat() if p.is_file() else None
                h.update(f"{v}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1};".encode())
    return h.hexdigest()[:16]


class LatentCache:
    """Per-record latent moments and text conditioning of one dataset, read lazily (memory-mapped)."""

    def __init__(self, directory: Path, keys: list[str]) -> None:
        self.directory = directory
        self.index = {k: i for i, k in enumerate(keys)}
        self._open: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers re-open the files themselves
        return {**self.__dict__, "_open": {}}

    @classmethod
    def load_or_build(cls, adapter: Any, records: Sequence[Any], directory: str | Path | None = None) -> LatentCache:
        """Open the cache of ``records`` under ``adapter``'s encoders, encoding it first if absent."""
        root = Path(directory or adapter.config.precompute_dir or default_latent_dir())
        blob = json.dumps({
            "adapter": adapter.fingerprint(),
            "records": records_fingerprint(records),
            "files": _file_stats(records, adapter.base_dir),
        }, sort_keys=True)
        path = root / hashlib.sha256(blob.encode()).hexdigest()[:32]
        keys = [_record_key(r) for r in records]
        if not (path / "manifest.json").is_file():
            cls._build(adapter, records, path)
        return cls(path, keys)

    @staticmethod
    def _build(adapter: Any, records: Sequence[Any], path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        unpaired = isinstance(records[0], UnpairedSample)
        text_pairs = not unpaired and any(adapter.rejected_prompt(r) is not None for r in records)
        bar = tqdm(total=len(records), desc="precompute latents", dynamic_ncols=True)
        for c, start in enumerate(range(0, len(records), CHUNK)):
            parts: dict[str, list[torch.Tensor]] = {}
            chunk = records[start : start + CHUNK]
            for b in range(0, len(chunk), _BUILD_BATCH):
                for k, v in LatentCache._encode(adapter, chunk[b : b + _BUILD_BATCH], unpaired, text_pairs,
                                                device).items():
                    parts.setdefault(k, []).append(v.cpu())
                bar.update(len(chunk[b : b + _BUILD_BATCH]))
            tensors = {k: torch.cat(v).contiguous() for k, v in parts.items()}
            save_file(tensors, str(tmp / f"chunk-{c:05d}.safetensors"))
        bar.close()
        atomic_write_json(tmp / "manifest.json", {"records": len(records), "chunk": CHUNK, "text_pairs": text_pairs})
        frozen = (adapter.vae, adapter.text_encoder, adapter.text_encoder_2, getattr(adapter, "text_encoder_3", None))
        for module in frozen:  # not needed while training
            if module is not None:
                module.to("cpu")
        if path.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, path)

    @staticmethod
    def _encode(adapter: Any, records: Sequence[Any], unpaired: bool, text_pairs: bool,
                device: torch.device) -> dict[str, torch.Tensor]:
        sides = ["c"] if unpaired else ["c", "r"]
        out: dict[str, torch.Tensor] = {}
        for side in sides:
            values = [r.completion if unpaired else (r.chosen if side == "c" else r.rejected) for r in records]
            pixels = [adapter._pixels(v, r) for v, r in zip(values, records)]
            mean, std = adapter.encode_images(torch.stack([p for p, _ in pixels]).to(device))
            out[f"mean_{side}"], out[f"std_{side}"] = mean, std
            if getattr(adapter, "is_sdxl", False):
                out[f"time_ids_{side}"] = torch.tensor([t for _, t in pixels], dtype=torch.float32)
        prompts = {"c": [r.prompt if isinstance(r.prompt, str) else str(r.prompt) for r in records]}
        if text_pairs:
            prompts["r"] = [adapter.rejected_prompt(r) or p for r, p in zip(records, prompts["c"])]
        for side, texts in prompts.items():
            if hasattr(adapter, "encode_prompts"):  # an adapter that tokenises and encodes itself (flow models)
                enc = adapter.encode_prompts(texts, device)
                out[f"text_{side}"], out[f"pooled_{side}"] = enc["_text"], enc["_pooled"]
                continue
            ids = adapter.tokenizer(texts, padding="max_length", max_length=adapter.tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt").input_ids.to(device)
            ids2 = None
            if adapter.is_sdxl:
                tok = adapter.tokenizer_2
                ids2 = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                           return_tensors="pt").input_ids.to(device)
            enc = adapter.encode_text(ids, ids2)
            out[f"text_{side}"] = enc["_text"]
            if "_pooled" in enc:
                out[f"pooled_{side}"] = enc["_pooled"]
        return out

    def _row(self, i: int, name: str) -> torch.Tensor:
        c = i // CHUNK
        if c not in self._open:
            self._open[c] = safe_open(str(self.directory / f"chunk-{c:05d}.safetensors"), framework="pt")
        return self._open[c].get_slice(name)[i % CHUNK]

    def lookup(self, records: Sequence[Any], sides: int, text_pairs: bool) -> dict[str, torch.Tensor]:
        """The batch entries ``_lat_mean``, ``_lat_std`` (sides·B rows, ``[chosen ; rejected]``), ``_text``
        (B rows, or 2B for text-preference pairs), ``_pooled`` when the text encoders pool (SDXL, SD3, FLUX) and
        SDXL's ``time_ids``."""
        idx = []
        for r in records:
            i = self.index.get(_record_key(r))
            if i is None:
                raise ValueError(
                    f"record {getattr(r, 'id', None)!r} is not in the precomputed latents {self.directory} "
                    "(precompute covers the training set; evaluate other data with model.precompute=false)"
                )
            idx.append(i)
        side_names = ["c", "r"][:sides]
        text_sides = ["c", "r"] if text_pairs else ["c"]

        def stack(prefix: str, names: list[str]) -> torch.Tensor:
            return torch.stack([self._row(i, f"{prefix}_{s}") for s in names for i in idx])

        batch = {"_lat_mean": stack("mean", side_names), "_lat_std": stack("std", side_names),
                 "_text": stack("text", text_sides)}
        names = self._names()
        if f"pooled_{text_sides[0]}" in names:
            batch["_pooled"] = stack("pooled", text_sides)
        if f"time_ids_{side_names[0]}" in names:  # SDXL's micro-conditioning
            batch["time_ids"] = stack("time_ids", side_names)
        return batch

    def _names(self) -> set[str]:
        self._row(0, "mean_c")
        return set(self._open[0].keys())
