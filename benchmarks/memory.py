"""The FUSE server's memory: peak resident size after a cold ``find``.

For layerfs the server is the mount daemon (found through its lock file);
for fuse-overlayfs the process whose command line names the mount point.
Both are measured the same way: ``VmHWM`` (peak RSS) from
``/proc/PID/status`` after dropping the caches and walking the whole tree
with a stat of every entry, so every entry has passed through the daemon.
"""

from __future__ import annotations

import os
from typing import Optional

from benchmarks import mounted, peers


def peak_rss(pid: int) -> int:
    """Peak resident set size of *pid*, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def server_of(mountpoint: str) -> Optional[int]:
    """The pid of the FUSE server of *mountpoint*: layerfs's lock file, or
    the process whose arguments end with the mount point."""
    from layerfs.mount import server_pid
    pid = server_pid(mountpoint)
    if pid is not None:
        return pid
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                argv = cmdline.read().split(b"\0")
        except OSError:
            continue
        if os.fsencode(mountpoint) in argv and b"fuse-overlayfs" in os.path.basename(argv[0]):
            return int(entry)
    return None


def after_cold_find(targets: list) -> dict:
    """``{target: peak RSS bytes}`` for each FUSE target after a cold find."""
    out = {}
    for target in targets:
        pid = server_of(target.root)
        if pid is None:
            continue
        mounted.find_cold(target.root, {})
        out[target.name] = peak_rss(pid)
    return out
