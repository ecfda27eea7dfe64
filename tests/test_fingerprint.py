"""Weights fingerprints (the adapter's reference-cache key part): identified by the files the weights were
loaded from, by content; digests cached by (path, size, mtime, ctime); hub blobs named by their sha256."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from mm_align import fingerprint as fp
from mm_align.fingerprint import (
    file_digest,
    hub_blob_digest,
    model_dir_files,
    pretrained_fingerprint,
    state_dict_fingerprint,
    weights_fingerprint,
)


@dataclass
class Settings:
    pretrained: str = "somewhere"
    resolution: int = 512


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # rewritten in place, like an overwrite with new weights
        f.write(data)
    return path


def _big(seed: int, size: int = 2 << 20) -> bytes:
    """Over the 1 MiB below which files are hashed directly, never cached."""
    return torch.randint(0, 256, (size,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8).numpy()\
        .tobytes()


def _no_hashing(monkeypatch) -> None:
    def boom(path):
        raise AssertionError(f"{path} was read and hashed")

    monkeypatch.setattr(fp, "_sha256_file", boom)


@pytest.fixture
def settle(monkeypatch):
    """Files written in a test are 'settled' 20 ms after their last change (the default margin is 2 s)."""
    monkeypatch.setattr(fp, "_RACY_NS", 20_000_000)
    return lambda: time.sleep(0.05)


# ---- file digests ------------------------------------------------------------------------------
def test_digest_is_the_sha256_and_read_from_the_cache_the_second_time(tmp_path, settle, monkeypatch):
    data = _big(0)
    f = _write(tmp_path / "w.safetensors", data)
    cache = tmp_path / "cache" / "digests.json"
    settle()
    assert file_digest(f, cache) == _sha(data)
    entry = json.loads(cache.read_text())["files"][os.path.realpath(f)]
    assert entry["sha256"] == _sha(data) and entry["size"] == len(data)
    _no_hashing(monkeypatch)
    assert file_digest(f, cache) == _sha(data)  # no read: from the cache
    link = tmp_path / "link.safetensors"
    link.symlink_to(f)
    assert file_digest(link, cache) == _sha(data)  # keyed by the real path


def test_same_size_rewrite_changes_the_digest_even_with_mtime_restored(tmp_path, settle):
    cache = tmp_path / "digests.json"
    f = _write(tmp_path / "w.safetensors", _big(0))
    settle()
    first = file_digest(f, cache)
    st = f.stat()
    _write(f, _big(1))  # other weights, the same size
    assert f.stat().st_size == st.st_size
    assert file_digest(f, cache) == _sha(_big(1)) != first
    settle()
    file_digest(f, cache)  # cached now
    cached = f.stat()
    _write(f, _big(2))
    os.utime(f, ns=(cached.st_atime_ns, cached.st_mtime_ns))  # size and mtime as cached; ctime cannot be set back
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (cached.st_size, cached.st_mtime_ns)
    assert file_digest(f, cache) == _sha(_big(2))


def test_a_digest_is_not_cached_while_the_file_is_fresh(tmp_path):
    """Within the default 2 s of the last write a same-size rewrite could keep the stamp (coarse clocks)."""
    cache = tmp_path / "digests.json"
    f = _write(tmp_path / "w.safetensors", _big(0))
    assert file_digest(f, cache) == _sha(_big(0))
    assert not cache.exists()


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00", b"[]", b'{"version": 1, "files": []}',
                                     b'{"version": 99, "files": {}}'])
def test_a_corrupt_digest_cache_is_ignored_and_rewritten(tmp_path, settle, content):
    cache = tmp_path / "digests.json"
    cache.write_bytes(content)
    f = _write(tmp_path / "w.safetensors", _big(0))
    settle()
    assert file_digest(f, cache) == _sha(_big(0))
    assert json.loads(cache.read_text())["files"][os.path.realpath(f)]["sha256"] == _sha(_big(0))


def test_a_bad_cache_entry_is_recomputed(tmp_path, settle):
    cache = tmp_path / "digests.json"
    f = _write(tmp_path / "w.safetensors", _big(0))
    settle()
    file_digest(f, cache)
    data = json.loads(cache.read_text())
    data["files"][os.path.realpath(f)]["sha256"] = "not a digest"
    cache.write_text(json.dumps(data))
    assert file_digest(f, cache) == _sha(_big(0))


def test_an_unwritable_digest_cache_is_not_an_error(tmp_path, settle):
    blocker = _write(tmp_path / "a_file", b"x")
    f = _write(tmp_path / "w.safetensors", _big(0))
    settle()
    assert file_digest(f, blocker / "digests.json") == _sha(_big(0))  # its parent is a file: not writable


def test_the_cache_keeps_other_files_and_drops_deleted_ones(tmp_path, settle):
    cache = tmp_path / "digests.json"
    a, b = _write(tmp_path / "a.bin", _big(0)), _write(tmp_path / "b.bin", _big(1))
    settle()
    file_digest(a, cache), file_digest(b, cache)
    assert set(json.loads(cache.read_text())["files"]) == {os.path.realpath(a), os.path.realpath(b)}
    a.unlink()
    c = _write(tmp_path / "c.bin", _big(2))
    settle()
    file_digest(c, cache)
    assert set(json.loads(cache.read_text())["files"]) == {os.path.realpath(b), os.path.realpath(c)}


# ---- the hub cache layout ----------------------------------------------------------------------
def _git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def fake_hub_repo(cache: Path, repo_id: str, model_dir: Path, commit: str = "a" * 40) -> Path:
    """``model_dir`` as huggingface_hub stores a download: blobs named by etag (sha256 for LFS files, the git
    sha1 for the small ones), ``snapshots/<commit>/...`` relative symlinks to them, ``refs/main``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    for f in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        data = f.read_bytes()
        etag = _sha(data) if f.suffix in (".safetensors", ".bin") else _git_sha1(data)
        blob = repo / "blobs" / etag
        _write(blob, data)
        pointer = repo / "snapshots" / commit / f.relative_to(model_dir)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    _write(repo / "refs" / "main", commit.encode())
    return repo / "snapshots" / commit


def test_hub_blob_names_give_the_digest_without_reading(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _write(src / "unet" / "diffusion_pytorch_model.safetensors", _big(0))
    _write(src / "unet" / "config.json", b'{"a": 1}')
    snap = fake_hub_repo(tmp_path / "hub", "org/name", src)
    weights = snap / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.is_symlink() and hub_blob_digest(weights) == _sha(_big(0))
    assert hub_blob_digest(snap / "unet" / "config.json") is None  # a git-sha1 blob: read instead
    (tmp_path / "hub_link").symlink_to(tmp_path / "hub")  # a cache reached through a symlinked directory
    assert hub_blob_digest(tmp_path / "hub_link" / weights.relative_to(tmp_path / "hub")) == _sha(_big(0))
    _no_hashing(monkeypatch)
    assert file_digest(weights, tmp_path / "d.json") == _sha(_big(0))


def test_a_blob_linked_on_to_the_shared_store_still_gives_the_etag(tmp_path):
    """huggingface_hub ≥ 2 may make ``blobs/<etag>`` a link to ``<cache>/blobs/<xx>/<xet hash>``: not a sha256."""
    src = tmp_path / "src"
    _write(src / "model.safetensors", _big(0))
    snap = fake_hub_repo(tmp_path / "hub", "org/name", src)
    blob = (snap / "model.safetensors").resolve()
    store = _write(tmp_path / "hub" / "blobs" / "ee" / ("e" * 64), blob.read_bytes())
    blob.unlink()
    blob.symlink_to(os.path.relpath(store, blob.parent))
    assert hub_blob_digest(snap / "model.safetensors") == _sha(_big(0))


def test_hub_snapshot_local_copy_and_hub_id_give_one_fingerprint(tmp_path, monkeypatch):
    import huggingface_hub.constants

    src = tmp_path / "src"
    _write(src / "unet" / "diffusion_pytorch_model.safetensors", _big(0))
    _write(src / "unet" / "config.json", b'{"a": 1}')
    _write(src / "scheduler" / "scheduler_config.json", b'{"b": 2}')
    snap = fake_hub_repo(tmp_path / "hub", "org/name", src)
    subs = ["unet", "scheduler"]
    local = pretrained_fingerprint(Settings(), src, subs, cache_file=tmp_path / "d.json")
    assert pretrained_fingerprint(Settings(), snap, subs, cache_file=tmp_path / "d.json") == local
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    real = fp._sha256_file  # the small configs are read; the weights' digest is their blob's name

    monkeypatch.setattr(fp, "_sha256_file", lambda p: real(p) if Path(p).stat().st_size < 1024 else pytest.fail(p))
    assert pretrained_fingerprint(Settings(pretrained="org/name"), "org/name", subs) == local


# ---- which files ---------------------------------------------------------------------------------
def _names(files: list[Path]) -> list[str]:
    return [p.name for p in files]


def test_model_dir_files_picks_what_the_loaders_read(tmp_path):
    d = tmp_path / "unet"
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin", "diffusion_flax_model.msgpack", "model.onnx", ".hidden"):
        _write(d / name, b"x")
    assert _names(model_dir_files(tmp_path, "unet")) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert _names(model_dir_files(tmp_path, "unet", variant="fp16")) == [
        "config.json", "diffusion_pytorch_model.fp16.safetensors"]
    (d / "diffusion_pytorch_model.safetensors").unlink()
    assert _names(model_dir_files(tmp_path, "unet")) == ["config.json", "diffusion_pytorch_model.bin"]
    with pytest.raises(FileNotFoundError, match="not a directory"):
        model_dir_files(tmp_path, "vae")


def test_model_dir_files_follows_shard_indexes(tmp_path):
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    _write(tmp_path / "model.safetensors.index.json", json.dumps({"weight_map": dict(zip("ab", shards))}).encode())
    for s in shards + ["config.json", "model.fp16-00001-of-00001.safetensors"]:
        _write(tmp_path / s, b"x")
    _write(tmp_path / "model.safetensors.index.fp16.json",
           json.dumps({"weight_map": {"a": "model.fp16-00001-of-00001.safetensors"}}).encode())
    assert _names(model_dir_files(tmp_path)) == ["config.json", *shards, "model.safetensors.index.json"]
    assert _names(model_dir_files(tmp_path, variant="fp16")) == [
        "config.json", "model.fp16-00001-of-00001.safetensors", "model.safetensors.index.fp16.json"]
    (tmp_path / shards[1]).unlink()
    with pytest.raises(FileNotFoundError, match="00002-of-00002"):
        model_dir_files(tmp_path)


# ---- fingerprints --------------------------------------------------------------------------------
def test_fingerprint_changes_with_settings_files_subfolder_and_variant(tmp_path):
    for sub in ("unet", "vae"):
        _write(tmp_path / "m" / sub / "config.json", b"{}")
        _write(tmp_path / "m" / sub / "diffusion_pytorch_model.safetensors", b"same bytes")
        _write(tmp_path / "m" / sub / "diffusion_pytorch_model.fp16.safetensors", b"same bytes")
    m, s = tmp_path / "m", Settings()
    base = pretrained_fingerprint(s, m, ["unet"])
    assert pretrained_fingerprint(replace(s, resolution=256), m, ["unet"]) != base
    assert pretrained_fingerprint(replace(s, pretrained="elsewhere"), m, ["unet"]) == base  # where, not what
    assert pretrained_fingerprint(s, m, ["vae"]) != base  # the same bytes in another component
    assert pretrained_fingerprint(s, m, ["unet", "vae"]) != base
    assert pretrained_fingerprint(s, m, ["unet"], variant="fp16") != base
    assert pretrained_fingerprint(s, m, ["unet"], extra={"dtype": "bf16"}) != base
    shutil.copytree(m, tmp_path / "copy")
    assert pretrained_fingerprint(s, tmp_path / "copy", ["unet"]) == base  # content-addressed
    _write(m / "unet" / "diffusion_pytorch_model.safetensors", b"same_bytes")
    assert pretrained_fingerprint(s, m, ["unet"]) != base


def test_weights_fingerprint_of_a_file_list(tmp_path):
    a, b = _write(tmp_path / "a.safetensors", b"1"), _write(tmp_path / "b" / "config.json", b"2")
    one = weights_fingerprint(Settings(), [a, b])
    assert weights_fingerprint(Settings(), [b, a]) == one
    assert weights_fingerprint(Settings(), [a, b], extra="x") != one
    assert weights_fingerprint(Settings(), {"a.safetensors": a, "config.json": b}) == one
    assert weights_fingerprint(Settings(), [a, b], ignore=["pretrained"]) != one
    with pytest.raises(ValueError, match="share a file name"):
        weights_fingerprint(Settings(), [a, _write(tmp_path / "c" / "a.safetensors", b"3")])


def test_state_dict_fingerprint_follows_the_weights():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    twin = torch.nn.Linear(3, 2)
    twin.load_state_dict(net.state_dict())
    assert state_dict_fingerprint(Settings(), net) == state_dict_fingerprint(Settings(), twin)
    with torch.no_grad():
        twin.bias[0] += 1e-6
    assert state_dict_fingerprint(Settings(), net) != state_dict_fingerprint(Settings(), twin)


def test_in_memory_modules_fall_back_to_their_state_dict(tmp_path):
    _write(tmp_path / "unet" / "config.json", b"{}")  # a folder without weights files
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    one = pretrained_fingerprint(Settings(), tmp_path, ["unet"], modules={"unet": net})
    with torch.no_grad():
        net.bias += 1
    assert pretrained_fingerprint(Settings(), tmp_path, ["unet"], modules={"unet": net}) != one
    assert pretrained_fingerprint(Settings(), "no/such-model", ["unet"], modules={"unet": net}) != one
    with pytest.raises(FileNotFoundError, match="neither a directory"):
        pretrained_fingerprint(Settings(), "no/such-model", ["unet"])


# ---- the diffusion adapter -------------------------------------------------------------------------
def _tiny_pipeline():
    """tests/image/tiny_pipeline.py (tests/ is no package), loaded by path."""
    import importlib.util

    path = Path(__file__).parent / "image" / "tiny_pipeline.py"
    spec = importlib.util.spec_from_file_location("_tiny_pipeline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sd_adapter(path: Path, **kw):
    from mm_align.image.diffusion_adapter import DiffusionModelConfig, StableDiffusionAdapter

    return StableDiffusionAdapter(DiffusionModelConfig(pretrained=str(path), resolution=16, **kw))


def _perturb(model_dir: Path, subfolder: str, loader) -> None:
    """Load one component, change one weight a little, save it back in place."""
    model = loader.from_pretrained(model_dir, subfolder=subfolder)
    with torch.no_grad():
        next(iter(model.parameters())).add_(1e-3)
    model.save_pretrained(model_dir / subfolder)


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory) -> Path:
    return _tiny_pipeline().save_tiny_sd15(tmp_path_factory.mktemp("fp_tiny_sd15") / "model")


def test_building_the_adapter_never_hashes_parameters(tmp_path, sd15_dir, monkeypatch):
    """Fails on the code before mm_align.fingerprint: model_fingerprint read every UNet parameter."""
    import mm_align.image.diffusion_adapter as sd

    def boom(*args, **kwargs):
        raise AssertionError("the loaded parameters were hashed")

    monkeypatch.setattr(sd, "model_fingerprint", boom, raising=False)
    monkeypatch.setattr(fp, "_hash_state_dict", boom)
    adapter = _sd_adapter(sd15_dir)
    assert len(adapter.fingerprint()) == 24


def test_adapter_fingerprint_covers_every_component_that_shapes_a_score(tmp_path, sd15_dir):
    """UNet, VAE (latents), text encoder (conditioning), tokenizer, scheduler config and the settings.

    The VAE-only and copy-at-another-path checks fail on the former code (UNet parameters + config, path included).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    model = tmp_path / "model"
    shutil.copytree(sd15_dir, model)
    base = _sd_adapter(model).fingerprint()
    assert _sd_adapter(sd15_dir).fingerprint() == base  # an identical copy elsewhere: the same
    assert _sd_adapter(model, encoder_dtype="bfloat16").fingerprint() != base
    assert _sd_adapter(model, revision="main").fingerprint() != base
    seen = {base}
    for sub, loader in (("vae", AutoencoderKL), ("text_encoder", CLIPTextModel), ("unet", UNet2DConditionModel)):
        _perturb(model, sub, loader)  # in place: the same path
        seen.add(_sd_adapter(model).fingerprint())
        assert len(seen) == 2 + ["vae", "text_encoder", "unet"].index(sub), f"{sub} change not seen"
    cfg = model / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "prediction_type": "v_prediction"}))
    seen.add(_sd_adapter(model).fingerprint())
    tok = model / "tokenizer" / "tokenizer_config.json"
    tok.write_text(json.dumps({**json.loads(tok.read_text()), "model_max_length": 12}))
    seen.add(_sd_adapter(model).fingerprint())
    assert len(seen) == 6


def test_sdxl_adapter_fingerprint_covers_the_second_text_encoder(tmp_path):
    from transformers import CLIPTextModelWithProjection

    model = _tiny_pipeline().save_tiny_sdxl(tmp_path / "xl")
    base = _sd_adapter(model).fingerprint()
    _perturb(model, "text_encoder_2", CLIPTextModelWithProjection)
    assert _sd_adapter(model).fingerprint() != base


def test_adapter_from_a_hub_id_uses_the_snapshot_files(tmp_path, sd15_dir, monkeypatch):
    import huggingface_hub.constants

    fake_hub_repo(tmp_path / "hub", "org/tiny-sd", sd15_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    local = _sd_adapter(sd15_dir).fingerprint()
    monkeypatch.setattr(fp, "_hash_state_dict", lambda *a: pytest.fail("fell back to hashing parameters"))
    assert _sd_adapter("org/tiny-sd").fingerprint() == local
