"""FUSE requests per workload: how many round trips each one costs.

The kernel's ``/sys/fs/fuse/connections/*/`` files count only waiting and
aborted requests, so the requests are counted where they arrive: layerfs is
mounted in the foreground with ``-o debug``, libfuse writes one line per
request (``unique: N, opcode: LOOKUP (1), ...``) to the server's stderr, and
each workload's share of that trace is tallied by opcode.  The trace slows
the server down: these runs count, they are not timed.

``LAYERFS_BENCH_CHECKOUT`` and ``LAYERFS_BENCH_PYTHON`` mount another
checkout's layerfs (for instance the code before a change, with its own
virtualenv), so counts before and after come from the same workloads.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import time

from benchmarks import mounted, peers

OPCODE = re.compile(rb"opcode: ([A-Z_]+)")


def layerfs_command() -> tuple[list, dict]:
    checkout = os.environ.get("LAYERFS_BENCH_CHECKOUT") or peers._repo_root()
    python = os.environ.get("LAYERFS_BENCH_PYTHON") or sys.executable
    return [python, "-m", "layerfs.cli"], dict(os.environ, PYTHONPATH=checkout)


def count_requests(sources: list, mountpoint: str, cache_dir: str, trace_path: str,
                   paths: dict, workloads: dict) -> dict:
    """``{workload: {opcode: count}}``: each workload run once on a traced
    mount (the caches dropped by the cold ones, as when timed)."""
    os.makedirs(mountpoint, exist_ok=True)
    command, env = layerfs_command()
    counts = {}
    with open(trace_path, "wb") as trace:
        server = subprocess.Popen([*command, "mount", "-f", "-o", "debug", "--cache-dir",
                                   cache_dir, *sources, mountpoint], env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=trace)
        try:
            peers.wait_mounted(mountpoint, timeout=300)
            for name, (prepare, workload) in workloads.items():
                if prepare is not None:
                    prepare(mountpoint, paths)
                before = _settled_size(trace_path)
                workload(mountpoint, paths)
                after = _settled_size(trace_path)
                counts[name] = tally(trace_path, before, after)
        finally:
            peers.umount(mountpoint)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    return counts


def _settled_size(path: str) -> int:
    """The trace's size once the server has stopped writing to it (the
    replies of the last requests are written after the workload returns)."""
    size = os.path.getsize(path)
    while True:
        time.sleep(0.2)
        now = os.path.getsize(path)
        if now == size:
            return size
        size = now


def tally(path: str, start: int, end: int) -> dict:
    with open(path, "rb") as trace:
        trace.seek(start)
        text = trace.read(end - start)
    found = collections.Counter(match.group(1).decode() for match in OPCODE.finditer(text))
    return dict(sorted(found.items(), key=lambda item: -item[1]))


def _find_once(root: str, paths: dict) -> None:
    mounted._find(root)


# name: (untraced preparation, the traced workload); find_warm counts the
# second find only.
WORKLOADS = {
    "find_cold": (None, mounted.find_cold),
    "find_warm": (_find_once, _find_once),
    "random_stat_10k": (None, mounted.random_stats),
    "readdir_all": (None, mounted.readdir_all),
    "read_small_5k": (None, mounted.read_small),
}
