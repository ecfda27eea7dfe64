"""Fingerprints of base weights and scoring settings: an adapter's part of the reference-cache key.

A reference score depends on the weights of every network that shapes it (for a diffusion model:
the UNet, and the VAE and text encoders that make its latents and conditioning), on the tokenizer
and scheduler configs, and on the scoring settings. Hashing every parameter of a loaded model
costs gigabytes of reading per run (SDXL, a 7B VLM), so the weights are identified instead by the
FILES they were loaded from:

- A file in a Hugging Face hub cache snapshot (``.../models--org--name/snapshots/<commit>/...``) is
  a symlink to ``.../models--org--name/blobs/<etag>``; for LFS files (every weights file) the etag
  is the sha256 of the file's contents (the hub's ``X-Linked-Etag``), so the digest is read from
  the link without reading the file. Links are followed one hop at a time and the first per-repo
  blob name is taken: huggingface_hub ≥ 2 may link that blob on to a cache-wide store named by a
  Xet hash, which is not a sha256 of the contents.
- Any other file of at least 1 MiB: its sha256, computed once and cached in a small JSON file
  (:func:`digest_cache_file`) keyed by the real path and the file's ``(size, mtime_ns,
  ctime_ns)``. A rewrite changes mtime and ctime (ctime cannot be set back by ``touch`` or
  ``os.utime``), so the entry is recomputed; a digest is not cached while the file changes under
  it or while its stamp is too recent to tell a same-tick rewrite apart (as git's "racy" entries).
  The cache is written atomically; an unreadable or corrupt cache file is ignored (recomputed).
- Smaller files (configs, tokenizer files): hashed directly, every time.

The fingerprint is CONTENT-ADDRESSED: it hashes each file's path relative to the model directory
(``unet/diffusion_pytorch_model.safetensors``) and its sha256, never where the directory lives, so
an identical copy of a model at another path, or the same files in the hub cache, give the same
fingerprint and share reference caches. Settings fields that only say where the model is (by
default ``pretrained``) are left out of the settings hash for that reason.

Modules with no files (built in memory, e.g. the synthetic adapter's policy from a seed) are
fingerprinted by their state dict (:func:`state_dict_fingerprint`, the former
the former ``reference_cache.model_fingerprint``): cheap for small models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger

from mm_align.atomic import atomic_write_json

__all__ = [
    "feed",
    "cache_root",
    "digest_cache_file",
    "hub_blob_digest",
    "file_digest",
    "model_dir_files",
    "hub_snapshot_dir",
    "weights_fingerprint",
    "pretrained_fingerprint",
    "state_dict_fingerprint",
]

logger = get_logger(__name__)

FINGERPRINT_VERSION = "mm_align.fingerprint/1"
DIGEST_CACHE_VERSION = 1
_CHUNK = 8 << 20  # bytes read per hash update
_UNCACHED_BELOW = 1 << 20  # files smaller than this are hashed directly, never cached
_RACY_NS = 2_000_000_000  # a digest is cached only when the file's stamp is this much older than the hash's end
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HUB_REPO_DIR = re.compile(r"(models|datasets|spaces)--.+")
_SHARD = re.compile(r"-\d+-of-\d+$")
_WEIGHT_FAMILIES = ("safetensors", "bin")  # the order the torch loaders of diffusers and transformers prefer
# Weights of other frameworks/formats: never loaded by the torch loaders, so never part of a fingerprint.
_OTHER_WEIGHTS = (".msgpack", ".h5", ".onnx", ".onnx_data", ".pb", ".tflite", ".ckpt", ".pt", ".pth", ".gguf", ".ot")


def _note(msg: str) -> None:
    try:
        logger.info(msg, main_process_only=True)
    except RuntimeError:  # no accelerate state yet (an adapter built outside the trainer)
        logging.getLogger(__name__).info(msg)


def cache_root() -> Path:
    """The mm-align cache root: ``$MM_ALIGN_CACHE``, else ``~/.cache/mm_align``."""
    return Path(os.environ.get("MM_ALIGN_CACHE", Path.home() / ".cache" / "mm_align"))


def digest_cache_file() -> Path:
    """The JSON file of cached file digests, under :func:`cache_root`."""
    return cache_root() / "fingerprints" / "file_digests.json"


# ---- hashing helpers ---------------------------------------------------------------------------
def feed(h: Any, value: Any) -> None:
    """Feed ``value`` into hasher ``h`` by structure: bytes by digest, dicts by key, dataclasses by field."""
    if isinstance(value, bytes):
        h.update(b"b"), h.update(hashlib.sha256(value).digest())
    elif isinstance(value, dict):
        h.update(b"{")
        for k in sorted(value):
            h.update(str(k).encode()), feed(h, value[k])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"[")
        for v in value:
            feed(h, v)
        h.update(b"]")
    elif hasattr(value, "__dataclass_fields__"):
        # fields with compare=False (a record's origin) are not part of the value
        feed(h, {k: getattr(value, k) for k, f in value.__dataclass_fields__.items() if f.compare})
    else:
        h.update(repr(value).encode())


def _settings(settings: Any, ignore: Iterable[str]) -> Any:
    """A dataclass (or dict) as a dict without the fields in ``ignore``; anything else unchanged."""
    ignore = set(ignore)
    if hasattr(settings, "__dataclass_fields__"):
        settings = {k: getattr(settings, k) for k in settings.__dataclass_fields__}
    if isinstance(settings, dict):
        return {k: v for k, v in settings.items() if k not in ignore}
    return settings


def _hash_state_dict(h: Any, model: torch.nn.Module) -> None:
    """Feed every tensor of ``model.state_dict()`` into ``h`` (reads every parameter: slow for large models)."""
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode()), h.update(v.detach().float().cpu().numpy().tobytes())


def _sha256_file(path: str | Path) -> str:
    """The sha256 of a file's contents, read in large chunks."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


# ---- file digests ------------------------------------------------------------------------------
def hub_blob_digest(path: str | Path) -> str | None:
    """The sha256 of a hub-cache file read from its blob's name, without reading the file; None if not one.

    Follows ``path``'s symlinks one hop at a time (each relative target resolved against the real
    directory of the link) and returns the first name of a per-repo blob,
    ``<cache>/(models|datasets|spaces)--<id>/blobs/<64 hex>``: the LFS sha256 of the contents.
    Non-LFS files (small configs) are blobs named by a 40-hex git sha1 and return None, as does a
    hub file stored without symlinks (a copy in the snapshot, e.g. on Windows).

    Args:
        path (`str` or `Path`): A file, e.g. ``.../snapshots/<commit>/unet/diffusion_pytorch_model.safetensors``.

    Returns:
        `str` or `None`: The 64-hex sha256, or None.
    """
    p = Path(os.path.abspath(path))
    for _ in range(40):  # symlink hops, as the OS's own limit
        if p.parent.name == "blobs" and _HUB_REPO_DIR.fullmatch(p.parent.parent.name) and _SHA256.fullmatch(p.name):
            return p.name
        if not p.is_symlink():
            return None
        p = Path(os.path.normpath(os.path.join(os.path.realpath(p.parent), os.readlink(p))))
    return None


def _stamp(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _read_digest_cache(path: Path) -> dict[str, dict[str, Any]]:
    """The cached entries of ``path``; an absent, unreadable or malformed file gives none."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        _note(f"digest cache {path} unreadable ({exc}); digests are recomputed")
        return {}
    if not isinstance(data, dict) or data.get("version") != DIGEST_CACHE_VERSION or not isinstance(
        data.get("files"), dict
    ):
        _note(f"digest cache {path} has an unknown format; digests are recomputed")
        return {}
    return {k: v for k, v in data["files"].items() if isinstance(v, dict)}


def _write_digest_cache(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Add ``entry`` to the cache file (re-read first, entries of deleted files dropped), atomically."""
    try:
        files = _read_digest_cache(path)
        files = {k: v for k, v in files.items() if os.path.exists(k)}
        files[key] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"version": DIGEST_CACHE_VERSION, "files": files})
    except OSError as exc:  # a read-only cache: the digest is still right, only not remembered
        _note(f"digest cache {path} not written ({exc})")


def file_digest(path: str | Path, cache_file: str | Path | None = None) -> str:
    """The sha256 of a file's contents, computed at most once per file version.

    Order: a hub blob's name (:func:`hub_blob_digest`, no reading); a file under 1 MiB is hashed
    directly; otherwise the digest cache entry of the file's real path if its ``(size, mtime_ns,
    ctime_ns)`` still match, else the file is hashed and the entry written.

    Args:
        path (`str` or `Path`): The file (symlinks are followed).
        cache_file (`str` or `Path`, *optional*): The digest cache; defaults to :func:`digest_cache_file`.

    Returns:
        `str`: The 64-hex sha256 of the contents.
    """
    blob = hub_blob_digest(path)
    if blob is not None:
        return blob
    real = os.path.realpath(path)
    before = os.stat(real)
    if before.st_size < _UNCACHED_BELOW:
        return _sha256_file(real)
    cache = Path(cache_file) if cache_file is not None else digest_cache_file()
    stamp = _stamp(before)
    entry = _read_digest_cache(cache).get(real)
    if entry is not None and all(entry.get(k) == v for k, v in stamp.items()):
        digest = entry.get("sha256")
        if isinstance(digest, str) and _SHA256.fullmatch(digest):
            return digest
    digest = _sha256_file(real)
    after = os.stat(real)
    settled = time.time_ns() - max(before.st_mtime_ns, before.st_ctime_ns) >= _RACY_NS
    if _stamp(after) == stamp and settled:
        _write_digest_cache(cache, real, {**stamp, "sha256": digest})
    return digest


# ---- which files a model was loaded from -------------------------------------------------------
@dataclass(frozen=True)
class _WeightName:
    family: str  # "safetensors" or "bin"
    index: bool  # a shard index (``*.safetensors.index.json``)
    shard: bool  # one shard (``*-00001-of-00002.safetensors``)
    variant: str | None  # "fp16", ... ; None for the default weights


def _weight_name(name: str) -> _WeightName | None:
    """Parse a diffusers/transformers weights file name (single, shard, index; with or without a variant).

    ``diffusion_pytorch_model.safetensors``, ``model-00001-of-00002.safetensors``,
    ``diffusion_pytorch_model.fp16.safetensors``, ``model.fp16-00001-of-00002.safetensors``,
    ``model.safetensors.index.json``, ``diffusion_pytorch_model.safetensors.index.fp16.json``.
    """
    raw = name.split(".")
    tokens = [_SHARD.sub("", t) for t in raw]
    if len(tokens) < 2:
        return None
    index = tokens[-1] == "json" and "index" in tokens
    family = next((f for f in _WEIGHT_FAMILIES if f in tokens[1:]), None)
    if family is None or not (index or tokens[-1] == family):
        return None
    rest = [t for t in tokens[1:] if t not in (family, "index", "json")]
    return _WeightName(family, index, any(_SHARD.search(t) for t in raw), ".".join(rest) or None)


def model_dir_files(src: str | Path, subfolder: str | None = None, variant: str | None = None) -> list[Path]:
    """The files of a diffusers/transformers model folder that a torch ``from_pretrained`` reads.

    Every non-weights file of ``src/subfolder`` (``config.json``, ``scheduler_config.json``,
    tokenizer files; hidden files skipped), plus the weights of ``variant``: the safetensors files
    if there are any (a single file, or a shard index and every shard it names), else the
    ``.bin`` ones. Weights of other variants and other frameworks (flax, ONNX, ...) are left out.

    Args:
        src (`str` or `Path`): The model directory.
        subfolder (`str`, *optional*): A component folder, e.g. ``"unet"``.
        variant (`str`, *optional*): A weights variant, e.g. ``"fp16"``.

    Returns:
        `list[Path]`: The files, sorted by name.

    Raises:
        FileNotFoundError: If the folder does not exist or a shard named by an index is missing.
    """
    folder = Path(src) / subfolder if subfolder else Path(src)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())
    names = {p: _weight_name(p.name) for p in entries}
    out = [p for p, w in names.items() if w is None and not p.name.endswith(_OTHER_WEIGHTS)]
    for family in _WEIGHT_FAMILIES:
        mine = [p for p, w in names.items() if w is not None and w.family == family and w.variant == variant]
        if not mine:
            continue
        indexes = [p for p in mine if names[p].index]  # type: ignore[union-attr]
        chosen = {p for p in mine if not names[p].shard} | set(indexes)  # type: ignore[union-attr]
        for idx in indexes:
            try:
                weight_map = json.loads(idx.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise FileNotFoundError(f"{idx}: not a readable shard index ({exc})") from exc
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    raise FileNotFoundError(f"{folder / shard}: a shard named by {idx.name} is missing")
                chosen.add(folder / shard)
        if not chosen:  # shards without an index: every one of them
            chosen = set(mine)
        out.extend(chosen)
        break
    return sorted(out, key=lambda p: p.name)


def hub_snapshot_dir(repo_id: str, revision: str | None = None) -> Path | None:
    """The local hub-cache snapshot folder of ``repo_id`` at ``revision``, without any download; None if absent."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception as exc:  # not cached, not a repo id, no huggingface_hub: the caller falls back
        _note(f"{repo_id!r}@{revision or 'main'}: no local hub snapshot ({type(exc).__name__}: {exc})")
        return None


# ---- fingerprints ------------------------------------------------------------------------------
def _is_weights(path: Path) -> bool:
    return _weight_name(path.name) is not None and not path.name.endswith(".json")


def weights_fingerprint(
    settings: Any,
    files: Mapping[str, str | Path] | Sequence[str | Path],
    extra: Any = None,
    ignore: Iterable[str] = (),
    cache_file: str | Path | None = None,
) -> str:
    """A hash of scoring settings and the contents of the files that hold the weights.

    Args:
        settings (`Any`): The scoring settings, usually a config dataclass (hashed field by field).
        files (`Mapping[str, Path]` or `Sequence[Path]`): The files, by a name relative to the model
            (``"unet/config.json"``); a plain sequence names each by its file name.
        extra (`Any`, *optional*): Anything else that shapes the scores (hashed structurally).
        ignore (`Iterable[str]`): Settings fields left out (those that only say where the files are).
        cache_file (`str` or `Path`, *optional*): The digest cache (:func:`file_digest`).

    Returns:
        `str`: 24 hex characters.
    """
    named = dict(files) if isinstance(files, Mapping) else {Path(p).name: p for p in files}
    if not isinstance(files, Mapping) and len(named) != len(files):
        raise ValueError("files share a file name: pass a mapping from relative name to path")
    return _fingerprint(_settings(settings, ignore), {"extra": extra}, named, {}, cache_file)


def _fingerprint(
    settings: Any,
    meta: Any,
    files: Mapping[str, str | Path],
    modules: Mapping[str, torch.nn.Module],
    cache_file: str | Path | None,
) -> str:
    h = hashlib.sha256(FINGERPRINT_VERSION.encode())
    feed(h, settings)
    feed(h, meta)
    feed(h, {name: file_digest(path, cache_file) for name, path in files.items()})
    for name in sorted(modules):
        h.update(f"state_dict:{name}".encode())
        _hash_state_dict(h, modules[name])
    return h.hexdigest()[:24]


def pretrained_fingerprint(
    settings: Any,
    src: str | Path,
    subfolders: Sequence[str | None],
    revision: str | None = None,
    variant: str | None = None,
    modules: Mapping[str, torch.nn.Module | None] | None = None,
    extra: Any = None,
    ignore: Iterable[str] = ("pretrained",),
    cache_file: str | Path | None = None,
) -> str:
    """The fingerprint of a model loaded with ``from_pretrained`` from a directory or hub id, and its settings.

    ``src`` is a local directory, or a hub id whose snapshot is found in the local hub cache (no
    download). For every folder in ``subfolders`` (``None`` = ``src`` itself) the files of
    :func:`model_dir_files` are hashed by content. A folder that holds no weights file the loaders
    read although ``modules`` names a network for it, or a hub id with no local snapshot, falls back
    to hashing that network's state dict (slow for large models; a note is logged) together with
    ``src`` and ``revision``.

    Args:
        settings (`Any`): The scoring settings (a config dataclass).
        src (`str` or `Path`): The model directory or hub id.
        subfolders (`Sequence[str | None]`): Every component folder that shapes the scores.
        revision (`str`, *optional*): The hub revision ``src`` was loaded at.
        variant (`str`, *optional*): The weights variant loaded (``"fp16"``).
        modules (`Mapping[str, nn.Module]`, *optional*): The loaded networks by folder name (``""`` for
            ``src`` itself), for the fallback.
        extra (`Any`, *optional*): Anything else that shapes the scores.
        ignore (`Iterable[str]`): Settings fields left out of the hash (where the model lives).
        cache_file (`str` or `Path`, *optional*): The digest cache (:func:`file_digest`).

    Returns:
        `str`: 24 hex characters.
    """
    modules = {k: m for k, m in (modules or {}).items() if m is not None}
    path = Path(src)
    root = path if path.is_dir() else hub_snapshot_dir(str(src), revision)
    files: dict[str, Path] = {}
    fallback: dict[str, torch.nn.Module] = {}
    if root is None:
        if not modules:
            raise FileNotFoundError(f"{src}: neither a directory nor a hub id in the local hub cache")
        fallback = dict(modules)
    else:
        for sub in subfolders:
            found = model_dir_files(root, sub, variant) if (root / (sub or "")).is_dir() else []
            files.update({f"{sub}/{p.name}" if sub else p.name: p for p in found})
            if (sub or "") in modules and not any(_is_weights(p) for p in found):
                fallback[sub or ""] = modules[sub or ""]
    meta = {"subfolders": list(subfolders), "variant": variant, "extra": extra}
    if fallback:
        _note(f"{src}: hashing the loaded weights of {sorted(fallback)} (no weights files found)")
        meta["source"] = {"src": str(src), "revision": revision}
    return _fingerprint(_settings(settings, ignore), meta, files, fallback, cache_file)


def state_dict_fingerprint(settings: Any, model: torch.nn.Module) -> str:
    """A hash of scoring settings (a dataclass) and every parameter of an in-memory model.

    The same value as the former ``reference_cache.model_fingerprint``. Reads every parameter:
    for small models built in memory (no files to identify them); call it on the base model
    before LoRA is injected, so it names the reference network.
    """
    h = hashlib.sha256()
    feed(h, settings)
    _hash_state_dict(h, model)
    return h.hexdigest()[:24]
