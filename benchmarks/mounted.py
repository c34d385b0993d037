"""Workloads through a mounted tree (layerfs FUSE, peers, floors).

Every workload takes the tree's root and the corpus's paths (absolute inside
the image) and returns seconds.  "Cold" workloads drop the kernel's page,
dentry and inode caches first, so a FUSE daemon answers every lookup.
"""

from __future__ import annotations

import os
import subprocess
import time

from benchmarks.peers import drop_caches

CHUNK = 1 << 20


def _find(root: str) -> float:
    start = time.perf_counter()
    subprocess.run(["find", root, "-printf", "%s %m\n"], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def find_cold(root: str, paths: dict) -> float:
    """``find`` with a stat of every entry, caches dropped."""
    drop_caches()
    return _find(root)


def find_warm(root: str, paths: dict) -> float:
    """The same ``find`` again, caches as the previous one left them."""
    _find(root)
    return _find(root)


def random_stats(root: str, paths: dict) -> float:
    """10,000 ``lstat`` of seeded random paths, caches dropped."""
    chosen = [root + p for p in paths["random_stat"]]
    drop_caches()
    lstat = os.lstat
    start = time.perf_counter()
    for path in chosen:
        lstat(path)
    return time.perf_counter() - start


def random_stats_warm(root: str, paths: dict) -> float:
    """The same 10,000 ``lstat`` with the caches warm (a first pass
    fills them, the second is timed)."""
    chosen = [root + p for p in paths["random_stat"]]
    lstat = os.lstat
    for path in chosen:
        lstat(path)
    start = time.perf_counter()
    for path in chosen:
        lstat(path)
    return time.perf_counter() - start


def readdir_all(root: str, paths: dict) -> float:
    """``listdir`` of every directory, caches dropped."""
    chosen = [root + p for p in paths["dirs"]]
    drop_caches()
    listdir = os.listdir
    start = time.perf_counter()
    for path in chosen:
        listdir(path)
    return time.perf_counter() - start


def read_small(root: str, paths: dict) -> float:
    """Open, read and close 5,000 seeded random small files, caches dropped."""
    chosen = [root + p for p in paths["small_files"]]
    drop_caches()
    start = time.perf_counter()
    for path in chosen:
        with open(path, "rb", buffering=0) as stream:
            while stream.read(CHUNK):
                pass
    return time.perf_counter() - start


def read_large(root: str, paths: dict) -> float:
    """Sequential read of the large file in 1 MiB reads, caches dropped."""
    return read_cold(root + paths["large"])


def read_cold(path: str) -> float:
    """Sequential read of *path* in 1 MiB reads, caches dropped."""
    drop_caches()
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as stream:
        while stream.read(CHUNK):
            pass
    return time.perf_counter() - start


TREE_WORKLOADS = {
    "find_cold": find_cold,
    "find_warm": find_warm,
    "random_stat_10k": random_stats,
    "random_stat_10k_warm": random_stats_warm,
    "readdir_all": readdir_all,
    "read_small_5k": read_small,
}
