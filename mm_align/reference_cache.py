"""Reference scores computed once per dataset and cached on disk.

For token models the reference log-probs are fixed per sample, so the cache is exact. For
diffusion (and any adapter with ``stochastic_scores``) the reference score depends on the random
draw (noise, timestep, mask) made in ``collate``. The trainer seeds that draw per sample from
``(seed, sample index, epoch)`` — or ``(seed, sample index)`` with ``sample_seeds=fixed`` — so
the cache is exact too: one cache per epoch, or one for all epochs when the draw is fixed.
The key hashes the adapter's fingerprint (base weights and scoring settings), the data, the
seed, the epoch and the precision.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mm_align.fingerprint import feed
from mm_align.types import Scores

CACHE_FORMAT = "mm_align.reference_cache/2"

__all__ = ["sample_seed", "records_fingerprint", "ReferenceCache", "default_cache_dir"]


def sample_seed(seed: int, index: int, epoch: int | None) -> int:
    """The seed of every random draw made for sample ``index`` (in ``epoch``; None = every epoch)."""
    key = f"{seed}:{index}:{'fixed' if epoch is None else epoch}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("MM_ALIGN_CACHE", Path.home() / ".cache" / "mm_align")) / "reference"


def records_fingerprint(records: Sequence[Any]) -> str:
    """A content hash of a list of records (bytes hashed, never pickled)."""
    h = hashlib.sha256()
    feed(h, list(records))
    return h.hexdigest()[:24]


class ReferenceCache:
    """Per-sample reference scores for a whole dataset, indexed by the sample's position."""

    def __init__(self, kind: str, tensors: dict[str, torch.Tensor], path: Path | None = None) -> None:
        self.kind = kind
        self.tensors = tensors
        self.path = path

    @staticmethod
    def key(adapter_fingerprint: str, data_fingerprint: str, settings: dict[str, Any]) -> str:
        blob = json.dumps({"adapter": adapter_fingerprint, "data": data_fingerprint, **settings}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    @classmethod
    def load_or_build(
        cls,
        path: Path,
        n: int,
        compute: Callable[[list[int]], Scores],
        batch_size: int,
        is_main: bool,
        progress: Callable[[int], Any] | None = None,
        rank: int = 0,
        world: int = 1,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> ReferenceCache:
        """Load ``path`` if it exists, else compute scores for samples ``0..n-1`` and write it atomically.

        Every tensor field of the reference's :class:`Scores` is stored: ``chosen``, ``rejected``,
        ``desirable``, the token counts and each ``extra`` entry (as ``extra.<name>``), so a loss
        that reads the reference's side information (a KTO KL estimate) gets the reference's own.
        The score kind and the format version live in the safetensors metadata.

        With ``world > 1`` every process must call this: process ``rank`` scores samples
        ``rank, rank + world, …`` in the same number of batches as every other process (the reference
        pass is a collective under FSDP2 / ZeRO-3), and ``gather`` (``accelerator.gather``: the
        concatenation over processes of equal-shaped tensors) brings the shares together.
        """
        if path.is_file():
            return cls.load(path)
        if world > 1 and gather is None:
            raise ValueError("a reference cache built by several processes needs gather")
        share = list(range(rank, n, world))
        per_process = -(-n // world)  # every process runs the same number of batches
        share = share + [share[-1] if share else 0] * (per_process - len(share))  # pad with a repeat
        parts: dict[str, list[torch.Tensor]] = {}
        kind = "logp"
        for start in range(0, per_process, batch_size):
            idx = share[start : start + batch_size]
            s = compute(idx)
            kind = s.kind
            for name, t in _score_tensors(s).items():
                parts.setdefault(name, []).append(t.detach().cpu())
            if progress is not None:
                progress(len(idx))
        local = {k: torch.cat(v) for k, v in parts.items()}
        for name, t in local.items():
            if t.shape[0] != per_process:
                raise ValueError(f"reference cache: '{name}' has {t.shape[0]} rows for {per_process} samples")
        if world > 1:
            assert gather is not None
            order = gather(torch.tensor(share, dtype=torch.long))  # (world · per_process,)
            tensors = {}
            for name, t in local.items():
                everyone = gather(t.float()).to(torch.bool if t.dtype == torch.bool else torch.float32)
                full = torch.zeros((n,) + tuple(t.shape[1:]), dtype=everyone.dtype)
                full[order] = everyone  # padded repeats write the same value twice
                tensors[name] = full
        else:
            tensors = {k: v[:n] for k, v in local.items()}
        if is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            save_file(tensors, str(tmp), metadata={"kind": kind, "format": CACHE_FORMAT})
            os.replace(tmp, path)
        return cls(kind, tensors, path)

    @classmethod
    def load(cls, path: Path) -> ReferenceCache:
        """Read a cache file written by :meth:`load_or_build`; a file of another format is an error naming it."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != CACHE_FORMAT or meta.get("kind") not in ("logp", "error"):
            raise ValueError(
                f"{path} is not a reference cache of format {CACHE_FORMAT} (metadata {meta}); delete it to recompute"
            )
        return cls(meta["kind"], load_file(str(path)), path)

    def lookup(self, indices: Sequence[int], like: Scores, device: torch.device) -> Scores:
        """The cached reference scores of ``indices``; ``like`` (the policy's) gives only the dtype.

        Raises:
            ValueError: if the policy's scores carry a field the cache lacks (paired vs unpaired, an
                ``extra`` key): the cache was built for other data or another adapter version.
        """
        idx = torch.as_tensor(list(indices), dtype=torch.long)

        def take(name: str) -> torch.Tensor | None:
            t = self.tensors.get(name)
            return None if t is None else t[idx].to(device)

        missing = sorted(set(_score_tensors(like)) - set(self.tensors))
        if missing:
            raise ValueError(f"reference cache {self.path} lacks {missing}; delete it to recompute")
        chosen = take("chosen")
        assert chosen is not None
        rejected = take("rejected")
        prefix = "extra."
        return Scores(
            kind=self.kind,  # type: ignore[arg-type]
            chosen=chosen.to(like.chosen.dtype),
            rejected=None if rejected is None else rejected.to(like.chosen.dtype),
            desirable=take("desirable"),
            n_tokens_chosen=take("n_tokens_chosen"),
            n_tokens_rejected=take("n_tokens_rejected"),
            extra={k[len(prefix):]: v[idx].to(device) for k, v in self.tensors.items() if k.startswith(prefix)},
        )


def _score_tensors(s: Scores) -> dict[str, torch.Tensor]:
    """Every per-sample tensor of ``s`` by its cache name (``extra`` entries as ``extra.<key>``)."""
    out = {
        name: getattr(s, name)
        for name in ("chosen", "rejected", "desirable", "n_tokens_chosen", "n_tokens_rejected")
        if getattr(s, name) is not None
    }
    out.update({f"extra.{k}": v for k, v in s.extra.items()})
    return {k: v.detach().contiguous() if v.dtype == torch.bool else v.detach().float().contiguous()
            for k, v in out.items()}
