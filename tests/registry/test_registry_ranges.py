"""Fetched ranges of a lazily read registry blob are kept in the cache
(layerfs.rangestore, issue 12): within the budget, verified on every load,
shared by a reopen and by other processes, counted by a proxy in front of
the registry that every process goes through."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys

import pytest

import layerfs
from layerfs.cache import IndexCache
from layerfs.registry import Options

from servers import CountingProxy
from test_registry_lazy import GZIP_TYPE, files_of, make_tar


@pytest.fixture
def proxy(registry):
    server = CountingProxy(registry.url)
    yield server
    server.close()


@pytest.fixture
def gzip_image(registry, proxy):
    """One gzip layer of random files (about 15 MB): its copy does not fit
    the budgets below, so it is read through checkpoints or the stream form,
    re-reading its blob by ranges."""
    files = files_of(1, "g", count=150)
    tar = make_tar(files)
    blob = gzip.compress(tar, 1)
    pushed = registry.push_image("ranges", "v1", [blob], layer_types=[GZIP_TYPE],
                                 diff_ids=["sha256:" + hashlib.sha256(tar).hexdigest()])
    digest = pushed["manifest"]["layers"][0]["digest"]
    return {"ref": f"docker://{proxy.host}/ranges:v1", "files": files, "blob": blob,
            "hex": digest.partition(":")[2], "tar": tar}


def _small_file(files: dict) -> str:
    """A 5000-byte file about a third into the blob: past its first chunk,
    away from the last ones (which the indexing pass leaves in memory)."""
    small = [p for p, d in files.items() if len(d) == 5000]
    return small[len(small) // 3]


def _ranges(cache: IndexCache) -> list:
    return [e for e in cache.scan() if e.kind == "ranges"]


def test_a_reopen_and_another_process_read_a_file_with_no_byte_fetched(
        tmp_path, gzip_image, proxy):
    cache = IndexCache(tmp_path / "cache", size=8 << 20)
    path = _small_file(gzip_image["files"])
    with layerfs.open(gzip_image["ref"], cache=cache, registry=Options(lazy=True)) as fs:
        assert [layer.storage for layer in fs.image.layers] == ["checkpoints"]
        first_open = proxy.blob_bytes
        assert fs.read_bytes("/" + path) == gzip_image["files"][path]
        [entry] = _ranges(cache)
        assert entry.pinned and entry.digest == "sha256:" + gzip_image["hex"]
        assert entry.size >= 2 << 20       # the head the reader reads when built, the file
    # a fresh IndexCache object over the same directory: no byte fetched
    fresh = IndexCache(tmp_path / "cache")
    proxy.reset()
    with layerfs.open(gzip_image["ref"], cache=fresh, registry=Options(lazy=True)) as fs:
        assert fs.read_bytes("/" + path) == gzip_image["files"][path]
        assert [r.bytes_fetched for r in fs.image.layer_sources] == [0]
    assert proxy.blob_bytes == 0
    # another process: no byte fetched either
    env = dict(os.environ, LAYERFS_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("LAYERFS_CACHE_SIZE", None)
    done = subprocess.run([sys.executable, "-m", "layerfs.cli", "cat", gzip_image["ref"],
                           "/" + path], capture_output=True, env=env, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout == gzip_image["files"][path]
    assert proxy.blob_bytes == 0 and proxy.blob_requests == 0
    print(f"first open and cat: {first_open} B requested; reopen and cat 0 B; "
          f"another process 0 B")
    listed = subprocess.run([sys.executable, "-m", "layerfs.cli", "cache", "ls", "--json"],
                            capture_output=True, text=True, env=env, timeout=60,
                            stdin=subprocess.DEVNULL)
    kinds = {e["kind"] for e in json.loads(listed.stdout)["entries"]}
    assert "ranges" in kinds


def test_under_a_tiny_budget_nothing_beyond_the_budget_is_kept(tmp_path, gzip_image, proxy):
    budget = 3 << 20
    cache = IndexCache(tmp_path / "cache", size=budget)
    files = gzip_image["files"]
    with layerfs.open(gzip_image["ref"], cache=cache, registry=Options(lazy=True)) as fs:
        assert [layer.storage for layer in fs.image.layers] != ["copy"]
        for path in sorted(files)[::7]:
            assert fs.read_bytes("/" + path) == files[path]
            assert cache.usage() <= budget
        [entry] = _ranges(cache)
        assert 0 < entry.size <= budget


def test_a_stored_chunk_that_does_not_match_is_fetched_again(tmp_path, gzip_image, proxy):
    cache = IndexCache(tmp_path / "cache", size=8 << 20)
    path = _small_file(gzip_image["files"])
    with layerfs.open(gzip_image["ref"], cache=cache, registry=Options(lazy=True)) as fs:
        fs.read_bytes("/" + path)
    ranges = cache.ranges_path(gzip_image["hex"])
    with open(ranges, "r+b") as handle:    # damage the head, which every open reads
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    proxy.reset()
    with layerfs.open(gzip_image["ref"], cache=IndexCache(tmp_path / "cache"),
                      registry=Options(lazy=True)) as fs:
        assert fs.read_bytes("/" + path) == gzip_image["files"][path]
        assert fs.image.layer_sources[0].bytes_fetched > 0
    proxy.reset()       # rewritten: the next reopen fetches nothing
    with layerfs.open(gzip_image["ref"], cache=IndexCache(tmp_path / "cache"),
                      registry=Options(lazy=True)) as fs:
        assert fs.read_bytes("/" + path) == gzip_image["files"][path]
    assert proxy.blob_bytes == 0


def test_kept_ranges_serve_offline_with_the_registry_stopped(tmp_path, gzip_image,
                                                              registry, proxy):
    cache = IndexCache(tmp_path / "cache", size=8 << 20)
    path = _small_file(gzip_image["files"])
    with layerfs.open(gzip_image["ref"], cache=cache, registry=Options(lazy=True)) as fs:
        assert fs.read_bytes("/" + path) == gzip_image["files"][path]
    registry.stop()
    with layerfs.open(gzip_image["ref"], cache=IndexCache(tmp_path / "cache"),
                      registry=Options(lazy=True, offline=True)) as fs:
        assert fs.read_bytes("/" + path) == gzip_image["files"][path]


def test_a_gzip_layer_beyond_the_budget_is_fetched_once_and_reads_exactly_at_checkpoints(
        tmp_path, registry, proxy, monkeypatch):
    """The indexing pass builds the checkpoints itself (issue 12, item 1):
    the blob goes over the network once (before: twice, the second time for
    rapidgzip), and a read at or just before every checkpoint is exact."""
    spacing = 1 << 20
    monkeypatch.setenv("LAYERFS_SPAN_SIZE", str(spacing))
    files = files_of(4, "t", text=True, count=150)    # words: checkpoints need windows
    tar = make_tar(files)
    blob = gzip.compress(tar, 6)
    registry.push_image("once", "v1", [blob], layer_types=[GZIP_TYPE],
                        diff_ids=["sha256:" + hashlib.sha256(tar).hexdigest()])
    cache = IndexCache(tmp_path / "cache", size=len(blob) // 2)
    with layerfs.open(f"docker://{proxy.host}/once:v1", cache=cache,
                      registry=Options(lazy=True)) as fs:
        [layer] = fs.image.layers
        assert layer.storage == "checkpoints"
        # the pass, and the config, the look for a TOC footer and the gzip
        # trailer (a few hundred bytes); the reader's head was kept from
        # the pass.  Before: twice the blob.
        assert len(blob) <= proxy.blob_bytes <= len(blob) + 4096
        for boundary in range(0, len(tar), spacing):
            for offset in (max(0, boundary - 3), boundary):
                assert layer.read_data(offset, 9) == tar[offset:offset + 9]
        for path in sorted(files)[::10]:
            assert fs.read_bytes("/" + path) == files[path]
    assert cache.usage() <= cache.budget
