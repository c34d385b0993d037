"""In-process workloads: the library API, no FUSE.

Each function returns plain numbers; :mod:`benchmarks.run` repeats them in
alternation (A B A B ...) and keeps the medians.  Rates are operations per
second over a fixed, seeded list of paths.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.peers import drop_caches

CHUNK = 1 << 20


def timed(function, *args) -> float:
    start = time.perf_counter()
    function(*args)
    return time.perf_counter() - start


def shuffled(paths: list, seed: int, count: int = 0) -> list:
    rng = random.Random(seed)
    chosen = list(paths)
    rng.shuffle(chosen)
    if count:
        chosen = (chosen * (count // max(1, len(chosen)) + 1))[:count]
    return chosen


def missing_paths(paths: list) -> list:
    return [p + ".missing" for p in paths]


def stat_loop(fs, paths: list) -> None:
    stat = fs.stat
    for path in paths:
        stat(path)


def lstat_loop(fs, paths: list) -> None:
    lstat = fs.lstat
    for path in paths:
        lstat(path)


def missing_loop(fs, paths: list) -> None:
    lstat = fs.lstat
    for path in paths:
        try:
            lstat(path)
        except FileNotFoundError:
            pass


def dict_loop(table: dict, paths: list) -> None:
    """The floor: a bare dict lookup per path."""
    for path in paths:
        table[path]


def listdir_loop(fs, dirs: list) -> None:
    listdir = fs.listdir
    for path in dirs:
        listdir(path)


def walk_all(fs) -> None:
    for _ in fs.walk("/"):
        pass


def read_small(fs, files: list) -> None:
    read_bytes = fs.read_bytes
    for path in files:
        read_bytes(path)


def open_read_small(fs, files: list) -> None:
    for path in files:
        with fs.open(path) as stream:
            stream.read()


def read_stream(opener, path: str) -> int:
    total = 0
    with opener(path, "rb") as stream:
        while True:
            chunk = stream.read(CHUNK)
            if not chunk:
                return total
            total += len(chunk)


def probe_open(sources: list, cache_dir: str) -> dict:
    """Open in a fresh process: seconds, RSS growth, entries (JSON)."""
    env = dict(os.environ, PYTHONPATH=_repo_root())
    result = subprocess.run([sys.executable, "-m", "benchmarks.open_probe", cache_dir, *sources],
                            capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"open_probe failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout)


def cold_and_warm_open(sources: list, scratch: str) -> tuple:
    """First open with an empty index cache (page cache dropped), then an
    open that finds every index in the cache."""
    cache_dir = tempfile.mkdtemp(prefix="lfs-cache-", dir=scratch)
    try:
        drop_caches()
        cold = probe_open(sources, cache_dir)
        warm = probe_open(sources, cache_dir)
        return cold, warm
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
