"""Lazy reading from a registry (issue 12, item 4, plain gzip/zstd layers):
layers are streamed once to index them, nothing but the index and what the
cache budget holds is kept, and a later read fetches only the ranges it
needs, each checked against checksums recorded while the whole blob was
verified."""

from __future__ import annotations

import gzip
import hashlib
import os
import random

import pytest
import zstandard

import layerfs
from layerfs.cache import IndexCache
from layerfs.registry import Options
from layerfs.remote import RemoteBlob
from layerfs.testing import layers as L
from layerfs.testing.writers import tar_bytes

from registry_helpers import Registry

GZIP_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD_TYPE = "application/vnd.oci.image.layer.v1.tar+zstd"


def make_tar(files: dict) -> bytes:
    """A pax tar of regular files, name -> contents."""
    return tar_bytes(L.Layer([L.file(name, data) for name, data in files.items()]))


def files_of(seed: int, prefix: str, text: bool = False, count: int = 60) -> dict:
    """Random bytes, or (*text*) words that compress about 3:1."""
    rng = random.Random(seed)
    words = [rng.randbytes(4).hex().encode() for _ in range(300)]
    files = {}
    for i in range(count):
        size = rng.choice([100, 5000, 300_000])
        files[f"{prefix}/f{i}"] = (b" ".join(rng.choices(words, k=size // 9 + 1))[:size]
                                   if text else rng.randbytes(size))
    return files


@pytest.fixture
def lazy_image(registry: Registry):
    gz_files, zst_files = files_of(1, "g", count=150), files_of(2, "z", text=True)
    gz_tar, zst_tar = make_tar(gz_files), make_tar(zst_files)
    blobs = [gzip.compress(gz_tar, 1), zstandard.ZstdCompressor().compress(zst_tar)]
    pushed = registry.push_image(
        "lazy", "v1", blobs, layer_types=[GZIP_TYPE, ZSTD_TYPE],
        diff_ids=["sha256:" + hashlib.sha256(t).hexdigest() for t in (gz_tar, zst_tar)])
    return {"ref": f"docker://{registry.host}/lazy:v1", "files": {**gz_files, **zst_files},
            "blobs": blobs, "tars": (gz_tar, zst_tar), "pushed": pushed}


def test_a_lazy_open_keeps_no_blob_and_reads_only_needed_ranges(tmp_path, lazy_image):
    budget = len(lazy_image["tars"][1]) * 2 // 3       # no whole copy fits
    cache = IndexCache(tmp_path / "cache", size=budget)
    with layerfs.open(lazy_image["ref"], cache=cache, registry=Options(lazy=True)) as fs:
        remotes = fs.image.layer_sources
        assert all(isinstance(r, RemoteBlob) for r in remotes)
        assert [layer.storage for layer in fs.image.layers] == ["checkpoints", "spans"]
        indexed = [r.bytes_fetched for r in remotes]
        sizes = [len(b) for b in lazy_image["blobs"]]
        # one pass each (gzip: its checkpoints built by the pass); both:
        # the look for a TOC footer first (a few dozen bytes at the end);
        # gzip: a read crossing the end of an 8 MiB request asks for its
        # start again (rapidgzip reads 128 KiB at a time)
        assert sizes[1] <= indexed[1] <= sizes[1] + 4096
        assert sizes[0] <= indexed[0] <= sizes[0] + (256 << 10) + 4096
        small = [p for p, d in lazy_image["files"].items() if p.startswith("g/")
                 and len(d) == 5000][0]    # near the start: not in memory
        assert fs.read_bytes("/" + small) == lazy_image["files"][small]
        fetched = remotes[0].bytes_fetched - indexed[0]
        assert 0 < fetched < len(lazy_image["blobs"][0]) // 2
        for path, data in lazy_image["files"].items():
            assert fs.read_bytes("/" + path) == data
        assert remotes[1].bytes_fetched == indexed[1]    # zstd spans: no refetch
    assert cache.usage() <= budget
    registry_blobs = os.path.join(cache.root, "registry", "blobs", "sha256")
    kept = set(os.listdir(registry_blobs)) if os.path.isdir(registry_blobs) else set()
    for layer in lazy_image["pushed"]["manifest"]["layers"]:
        assert layer["digest"].partition(":")[2] not in kept


def test_a_lazy_reopen_with_a_whole_copy_needs_no_network(tmp_path, lazy_image, registry):
    cache = IndexCache(tmp_path / "cache", size=64 << 20)
    digest_ref = (f"docker://{registry.host}/lazy@{lazy_image['pushed']['digest']}")
    with layerfs.open(digest_ref, cache=cache, registry=Options(lazy=True)) as fs:
        assert [layer.storage for layer in fs.image.layers] == ["copy", "copy"]
    with layerfs.open(digest_ref, cache=cache, registry=Options(lazy=True)) as fs:
        # the index cache answers before any look for a TOC footer: no request
        assert all(r.requests == 0 and r.bytes_fetched == 0 for r in fs.image.layer_sources)
        for path, data in lazy_image["files"].items():
            assert fs.read_bytes("/" + path) == data


def _blob_files(cache: IndexCache) -> set:
    root = os.path.join(cache.root, "registry", "blobs", "sha256")
    return set(os.listdir(root)) if os.path.isdir(root) else set()


def test_lazy_is_the_default_and_layerfs_lazy_0_opts_out(tmp_path, lazy_image, monkeypatch):
    layer_hexes = {d["digest"].partition(":")[2]
                   for d in lazy_image["pushed"]["manifest"]["layers"]}
    monkeypatch.delenv("LAYERFS_LAZY", raising=False)
    assert Options().lazy
    cache = IndexCache(tmp_path / "lazy")
    with layerfs.open(lazy_image["ref"], cache=cache) as fs:
        assert all(isinstance(r, RemoteBlob) for r in fs.image.layer_sources)
    assert not layer_hexes & _blob_files(cache)
    for value in ("0", "false"):
        monkeypatch.setenv("LAYERFS_LAZY", value)
        assert not Options().lazy
    cache = IndexCache(tmp_path / "whole")
    with layerfs.open(lazy_image["ref"], cache=cache) as fs:
        assert not any(isinstance(r, RemoteBlob) for r in fs.image.layer_sources)
    assert layer_hexes <= _blob_files(cache)
    cache = IndexCache(tmp_path / "explicit")
    monkeypatch.delenv("LAYERFS_LAZY")
    layerfs.open(lazy_image["ref"], cache=cache, registry=Options(lazy=False)).close()
    assert layer_hexes <= _blob_files(cache)


def test_a_lazily_read_image_reopens_offline_and_by_digest_with_the_registry_stopped(
        tmp_path, lazy_image, registry, monkeypatch):
    """#11 item 5 under lazy reading: what the first use fetched (the index
    cache's whole copies, within the budget) serves the second, with no
    network: by digest, and with --offline by tag."""
    monkeypatch.delenv("LAYERFS_LAZY", raising=False)
    cache = IndexCache(tmp_path / "cache", size=64 << 20)
    digest_ref = f"docker://{registry.host}/lazy@{lazy_image['pushed']['digest']}"
    with layerfs.open(lazy_image["ref"], cache=cache) as fs:
        assert [layer.storage for layer in fs.image.layers] == ["copy", "copy"]
    registry.stop()
    with layerfs.open(digest_ref, cache=cache) as fs:
        for path, data in lazy_image["files"].items():
            assert fs.read_bytes("/" + path) == data
    with layerfs.open(lazy_image["ref"], cache=cache, registry=Options(offline=True)) as fs:
        for path, data in lazy_image["files"].items():
            assert fs.read_bytes("/" + path) == data


def test_offline_refuses_a_lazy_layer_the_cache_lacks_in_one_line(
        tmp_path, lazy_image, registry, monkeypatch):
    monkeypatch.delenv("LAYERFS_LAZY", raising=False)
    cache = IndexCache(tmp_path / "cache", size=64 << 20)
    layerfs.open(lazy_image["ref"], cache=cache, registry=Options(lazy=True)).close()
    for entry in list(cache.scan()):            # the copies go, the indexes stay
        if entry.evictable:
            cache.remove(entry)
    registry.stop()
    from layerfs.errors import RegistryError
    with pytest.raises(RegistryError) as caught:
        with layerfs.open(lazy_image["ref"], cache=cache,
                          registry=Options(offline=True)) as fs:
            for path in lazy_image["files"]:
                fs.read_bytes("/" + path)
    message = str(caught.value)
    assert "\n" not in message and "--offline forbids fetching it" in message
    assert f"docker://{registry.host}/lazy@sha256:" in message
