"""The bounded cache under a running mount (issue 12, items 2 and 3):
prune and eviction never break what a mount reads, and a mount whose
layers do not fit the budget reads every byte right through seek points."""

from __future__ import annotations

import gzip
import os
import random

import pytest
import zstandard

from layerfs import mount as layerfs_mount
from layerfs.cache import IndexCache
from layerfs.testing import layers as L
from layerfs.testing.writers import tar_bytes
from mount_helpers import requires_fuse, run_cli

pytestmark = [pytest.mark.mount, requires_fuse]


def files_of(seed: int, prefix: str) -> dict:
    rng = random.Random(seed)
    return {f"{prefix}/f{i}": rng.randbytes(rng.choice([10, 70_000, 900_000]))
            for i in range(24)}


def write_layer(path, files: dict, kind: str) -> str:
    tar = tar_bytes(L.Layer([L.file(name, data) for name, data in files.items()]))
    with open(path, "wb") as stream:
        stream.write(gzip.compress(tar, 1) if kind == "gzip"
                     else zstandard.ZstdCompressor().compress(tar))
    return str(path)


def read_tree(root: str, files: dict) -> dict:
    found = {}
    for name in files:
        with open(os.path.join(root, name), "rb") as stream:
            found[name] = stream.read()
    return found


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "cache")


def prune(cache_dir, *flags):
    result = run_cli("cache", "--cache-dir", cache_dir, "prune", *flags)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("force", [False, True])
def test_prune_during_a_mount_never_breaks_its_reads(tmp_path, mountpoint, cache_dir, force):
    files = files_of(1, "g")
    layer = write_layer(tmp_path / "layer.tar.gz", files, "gzip")
    layerfs_mount.mount([layer], mountpoint, cache_dir=cache_dir)
    half = dict(list(files.items())[:12])
    assert read_tree(mountpoint, half) == half
    output = prune(cache_dir, "--all", *(["--force"] if force else []))
    cache = IndexCache(cache_dir)
    if force:
        assert not [e for e in cache.scan() if e.kind == "copy"]
    else:
        assert "pinned" in output
        assert [e.pinned for e in cache.scan() if e.kind == "copy"] == [True]
    assert read_tree(mountpoint, files) == files     # the daemon's descriptors still read
    layerfs_mount.umount(mountpoint)


def test_a_mounted_layer_is_never_evicted_by_another_open(tmp_path, mountpoint, cache_dir):
    files_a, files_b = files_of(2, "a"), files_of(3, "b")
    a = write_layer(tmp_path / "a.tar.gz", files_a, "gzip")
    b = write_layer(tmp_path / "b.tar.gz", files_b, "gzip")
    size = sum(len(data) for data in files_a.values())
    IndexCache(cache_dir, size=int(size * 1.5))      # room for one copy, not two
    layerfs_mount.mount([a], mountpoint, cache_dir=cache_dir)
    result = run_cli("ls", "--cache-dir", cache_dir, b, "/b")     # indexes b
    assert result.returncode == 0, result.stderr
    kinds = {e.digest: (e.kind, e.pinned) for e in IndexCache(cache_dir).scan()
             if e.kind in ("copy", "spans", "checkpoints")}
    assert ("copy", True) in kinds.values()          # a's, held by the mount
    assert len(kinds) == 2 and sum(kind == "copy" for kind, _ in kinds.values()) == 1
    assert read_tree(mountpoint, files_a) == files_a
    layerfs_mount.umount(mountpoint)


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_mount_beyond_the_budget_reads_every_byte(tmp_path, mountpoint, cache_dir, kind):
    files = files_of(4, "z")
    layer = write_layer(tmp_path / f"layer.{kind}", files, kind)
    IndexCache(cache_dir, size=len(next(iter(files.values()))) + (2 << 20))
    layerfs_mount.mount([layer], mountpoint, cache_dir=cache_dir)
    assert read_tree(mountpoint, files) == files
    usage = IndexCache(cache_dir).usage()
    assert not any(e.kind == "copy" for e in IndexCache(cache_dir).scan())
    assert usage <= IndexCache(cache_dir).budget
    layerfs_mount.umount(mountpoint)
