"""Cost of the adapter's weights fingerprint (the reference-cache key) on an SDXL-size UNet.

An SDXL-config ``UNet2DConditionModel`` (2.6 B parameters, random weights, bfloat16: ~5.1 GB) is
built on the meta device, materialised, filled and written with ``save_pretrained`` (one
safetensors file) to a scratch directory, then timed:

- ``old``: the former ``reference_cache.model_fingerprint`` (every parameter converted to float32
  bytes and hashed), once;
- ``cold_disk``: :func:`mm_align.fingerprint.pretrained_fingerprint` with an empty digest cache and
  the file dropped from the page cache (``posix_fadvise(DONTNEED)``, best effort): reads the file;
- ``cold_cached_pages``: the same with the file in the page cache (the hashing cost alone);
- ``warm``: the digest read from the cache (median of repeats): what every later run pays;
- ``hub``: the file moved into a hub-cache layout (``blobs/<sha256>`` + snapshot symlink), empty
  digest cache: the digest is the blob's name, no reading (median of repeats).

Acceptance: the warm fingerprint < 1 s. The scratch weights are deleted afterwards.

    python benchmarks/run.py fingerprint            # SDXL-size (needs ~11 GB free disk, ~8 GB free memory)
    python benchmarks/run.py fingerprint --quick    # a small UNet, smoke run only
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SDXL_UNET: dict[str, Any] = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SMALL_UNET: dict[str, Any] = dict(  # --quick
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128, 256), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=128, attention_head_dim=8,
)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def _build_unet(config: dict[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    """The UNet with random weights, never materialised in float32 (meta device, then filled in ``dtype``)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    unet = unet.to(dtype).to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in [*unet.parameters(), *unet.buffers()]:
            t.normal_(0.0, 0.02, generator=g)
    return unet.eval()


def _evict(path: Path) -> bool:
    """Ask the kernel to drop ``path`` from the page cache (clean pages only); False where unsupported."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _timed(fn: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(quick: bool = False, work: Path | None = None) -> dict:
    from mm_align.image.diffusion_adapter import DiffusionModelConfig

    from mm_align import fingerprint as fp
    from mm_align.fingerprint import state_dict_fingerprint as model_fingerprint  # the former one, unchanged

    config, dtype, name = (SMALL_UNET, torch.float32, "small UNet (smoke run)") if quick else (
        SDXL_UNET, torch.bfloat16, "SDXL UNet")
    repeats = 3 if quick else 7
    parent = Path(work) if work is not None else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    if not quick:
        free_disk, free_mem = shutil.disk_usage(parent).free, _mem_available()
        if free_disk < 11 << 30 or free_mem < 8 << 30:
            raise RuntimeError(f"the SDXL-size benchmark needs ~11 GiB free disk in {parent} and ~8 GiB free memory; "
                               f"found {free_disk / 2**30:.1f} GiB and {free_mem / 2**30:.1f} GiB")
    scratch = Path(tempfile.mkdtemp(prefix="mm_align_fingerprint_", dir=parent))
    settings = DiffusionModelConfig(pretrained=str(scratch / "model"))
    digests = scratch / "digests.json"
    try:
        t_build, unet = _timed(lambda: _build_unet(config, dtype))
        n_params = sum(p.numel() for p in unet.parameters())
        start = time.perf_counter()
        unet.save_pretrained(scratch / "model" / "unet", safe_serialization=True)
        t_save = time.perf_counter() - start
        files = fp.model_dir_files(scratch / "model", "unet")
        weights = [p for p in files if p.suffix == ".safetensors"]
        size = sum(p.stat().st_size for p in weights)
        start = time.perf_counter()
        model_fingerprint(settings, unet)
        t_old = time.perf_counter() - start
        del unet

        def new() -> str:
            return fp.pretrained_fingerprint(settings, scratch / "model", ["unet"], cache_file=digests)

        time.sleep(max(0.0, fp._RACY_NS / 1e9 - (time.time() - max(p.stat().st_mtime for p in weights))))
        evicted = all(_evict(p) for p in weights)
        t_cold_disk, first = _timed(new)
        assert digests.is_file(), "the digest was not cached"
        digests.unlink()
        t_cold_pages, again = _timed(new)
        assert again == first and digests.is_file()
        warm = [_timed(new)[0] for _ in range(repeats)]
        assert new() == first

        # the same file in a hub-cache layout: blobs/<sha256> + a relative snapshot symlink, no digest cache
        snap = scratch / "hub" / "models--bench--sdxl-unet" / "snapshots" / ("0" * 40)
        shutil.copytree(scratch / "model" / "unet", snap / "unet", ignore=shutil.ignore_patterns("*.safetensors"))
        for w in weights:
            blob = scratch / "hub" / "models--bench--sdxl-unet" / "blobs" / fp.file_digest(w, digests)
            blob.parent.mkdir(parents=True, exist_ok=True)
            os.replace(w, blob)
            (snap / "unet" / w.name).symlink_to(os.path.relpath(blob, snap / "unet"))
        empty = scratch / "no_digests.json"
        hub = []
        for _ in range(repeats):
            empty.unlink(missing_ok=True)
            t, hub_fp = _timed(lambda: fp.pretrained_fingerprint(settings, snap, ["unet"], cache_file=empty))
            hub.append(t)
        assert hub_fp == first, "the hub layout changed the fingerprint"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    warm_med, hub_med = statistics.median(warm), statistics.median(hub)
    ok = warm_med < 1.0
    gb = size / 1e9
    md = (
        f"Model: {name}, {n_params / 1e9:.2f} B parameters, random weights, {str(dtype).split('.')[-1]}, "
        f"one safetensors file of {gb:.2f} GB (`save_pretrained`). CPU: {_cpu_name()}, {os.cpu_count()} cores.\n"
        f"Set-up (not timed below): build {t_build:.1f} s, save {t_save:.1f} s.\n\n"
        "| fingerprint | s | |\n|---|---|---|\n"
        f"| old: `model_fingerprint` (every parameter as float32 bytes) | {t_old:.2f} | once |\n"
        f"| new, cold digest, file {'dropped from' if evicted else 'maybe in'} the page cache | {t_cold_disk:.2f} | "
        f"once, {gb / t_cold_disk:.2f} GB/s |\n"
        f"| new, cold digest, file in the page cache | {t_cold_pages:.2f} | once, {gb / t_cold_pages:.2f} GB/s |\n"
        f"| **new, warm (digest cache)** | **{warm_med:.4f}** | median of {repeats} |\n"
        f"| new, hub-cache layout (blob name = sha256), no digest cache | {hub_med:.4f} | median of {repeats} |\n\n"
        f"Old / warm: {t_old / warm_med:,.0f}×. **Warm fingerprint {warm_med * 1e3:.1f} ms (target < 1 s) — "
        f"{'PASS' if ok else 'FAIL'}.** A full SDXL pipeline adds the VAE and both text encoders (~1.8 GB more in "
        "fp16): hashed once cold, then a few ms each warm (the warm cost is per file, not per byte)."
    )
    return {
        "benchmark": "fingerprint",
        "model": name,
        "unet_config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "parameters": n_params,
        "dtype": str(dtype),
        "weights_bytes": size,
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "build_s": t_build,
        "save_s": t_save,
        "old_model_fingerprint_s": t_old,
        "cold_disk_s": t_cold_disk,
        "page_cache_evicted": evicted,
        "cold_page_cache_s": t_cold_pages,
        "warm_median_s": warm_med,
        "warm_s": warm,
        "hub_layout_median_s": hub_med,
        "hub_layout_s": hub,
        "target_warm_s": 1.0,
        "pass": ok,
        "markdown": md,
    }
