"""The peers and floors a layerfs mount is compared with, and how to mount them.

Each mounted target is a directory tree the mount workloads run on:

- ``layerfs``: ``python -m layerfs.cli mount`` of the layer files;
- ``overlayfs``: kernel overlayfs over the layers extracted one directory
  each, whiteouts converted to overlay format (0/0 character devices and
  ``trusted.overlay.opaque=y``), read-only (no upper directory);
- ``fuse-overlayfs``: the same directories through fuse-overlayfs;
- ``ratarmount``: ratarmount union-mounting the plain tars (it knows no
  whiteouts, so its view also shows deleted files: stated in the report);
- ``ext4``: the final view extracted on the disk here (floor);
- ``tmpfs``: the final view extracted into a tmpfs (floor).

A peer whose tool is missing is skipped with the reason, never faked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from typing import Optional

import attrs

OPAQUE_XATTR = "trusted.overlay.opaque"
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
TAR_FLAGS = {"tar": [], "tar.gz": ["-z"], "tar.zst": ["--zstd"]}


class Skip(Exception):
    """A peer cannot run here; the message says why."""


def run(*argv, cwd=None, env=None) -> None:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({result.returncode}): "
                           f"{result.stderr.strip() or result.stdout.strip()}")


def drop_caches() -> None:
    """Empty the page, dentry and inode caches (needs root)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as control:
        control.write("3\n")


def extract_tar(archive: str, dest: str, compression: str = "tar") -> None:
    os.makedirs(dest, exist_ok=True)
    run("tar", "-x", *TAR_FLAGS[compression], "--numeric-owner", "-f", archive, "-C", dest)


def convert_whiteouts(layer_dir: str) -> int:
    """Turn OCI markers in an extracted layer into overlayfs's own format."""
    converted = 0
    for top, dirs, files in os.walk(layer_dir):
        for name in files:
            if not name.startswith(WHITEOUT_PREFIX):
                continue
            marker = os.path.join(top, name)
            os.unlink(marker)
            if name == OPAQUE_MARKER:
                os.setxattr(top, OPAQUE_XATTR, b"y")
            else:
                os.mknod(os.path.join(top, name[len(WHITEOUT_PREFIX):]), stat.S_IFCHR | 0o600,
                         os.makedev(0, 0))
            converted += 1
        for name in [d for d in dirs if d.startswith(WHITEOUT_PREFIX)]:
            raise RuntimeError(f"marker name used by a directory: {os.path.join(top, name)}")
    return converted


def extract_for_overlay(layer_files: list, dest: str) -> list:
    """Each layer in its own directory ``dest/N`` in overlay format; kept
    when complete.  Returns the directory names, bottom first."""
    names = [str(i) for i in range(len(layer_files))]
    stamp = os.path.join(dest, "DONE")
    if os.path.exists(stamp):
        return names
    shutil.rmtree(dest, ignore_errors=True)
    for name, layer in zip(names, layer_files):
        extract_tar(layer, os.path.join(dest, name))
        convert_whiteouts(os.path.join(dest, name))
    open(stamp, "w").close()
    return names


def time_tar_extract(layer_files: list, compression: str, scratch: str) -> float:
    """Seconds to ``tar -x`` every layer into its own directory (what a
    runtime does before it can mount an overlay)."""
    dest = tempfile.mkdtemp(prefix="tarx-", dir=scratch)
    try:
        drop_caches()
        start = time.perf_counter()
        for index, layer in enumerate(layer_files):
            extract_tar(layer, os.path.join(dest, str(index)), compression)
        os.sync()
        return time.perf_counter() - start
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def is_mounted(path: str) -> bool:
    return os.path.ismount(path)


def umount(path: str) -> None:
    if not is_mounted(path):
        return
    for attempt in range(50):
        result = subprocess.run(["umount", path], capture_output=True, text=True)
        if result.returncode == 0 or not is_mounted(path):
            return
        time.sleep(0.1)
    run("umount", "-l", path)


def wait_mounted(path: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not is_mounted(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} not mounted after {timeout} s")
        time.sleep(0.005)
    os.listdir(path)


@attrs.define
class Target:
    """A tree to run mount workloads on, and how long it took to get there."""

    name: str
    root: str
    ready_seconds: Optional[float] = None
    unmount: Optional[str] = None        # mountpoint to unmount at the end

    def close(self) -> None:
        if self.unmount:
            umount(self.unmount)


def mount_layerfs(sources: list, mountpoint: str, cache_dir: str, name: str = "layerfs") -> Target:
    """Mount with the CLI; the ready time includes starting Python.  One
    source is IMAGE; several are a stack of layer files (``--layer``)."""
    os.makedirs(mountpoint, exist_ok=True)
    # LAYERFS_BENCH_CHECKOUT/PYTHON: another checkout's layerfs (see
    # benchmarks/requests.py), to measure code before and after a change.
    env = dict(os.environ, PYTHONPATH=os.environ.get("LAYERFS_BENCH_CHECKOUT") or _repo_root())
    python = os.environ.get("LAYERFS_BENCH_PYTHON") or sys.executable
    start = time.perf_counter()
    image = sources if len(sources) == 1 else [
        word for source in sources for word in ("--layer", source)]
    run(python, "-m", "layerfs.cli", "mount", "--cache-dir", cache_dir,
        *image, mountpoint, env=env)
    wait_mounted(mountpoint)
    return Target(name, mountpoint, time.perf_counter() - start, mountpoint)


def mount_overlay(layers_dir: str, names: list, mountpoint: str) -> Target:
    """Kernel overlayfs; relative lower paths keep the option string short."""
    os.makedirs(mountpoint, exist_ok=True)
    if len(names) == 1:
        # A read-only overlay needs two lower directories: add an empty one.
        os.makedirs(os.path.join(layers_dir, "empty"), exist_ok=True)
        names = ["empty", *names]
    lower = ":".join(reversed(names))
    start = time.perf_counter()
    run("mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lower}", mountpoint,
        cwd=layers_dir)
    return Target("overlayfs", mountpoint, time.perf_counter() - start, mountpoint)


def mount_fuse_overlayfs(layers_dir: str, names: list, mountpoint: str) -> Target:
    if shutil.which("fuse-overlayfs") is None:
        raise Skip("fuse-overlayfs is not installed (apt-get install fuse-overlayfs)")
    os.makedirs(mountpoint, exist_ok=True)
    lower = ":".join(os.path.join(layers_dir, n) for n in reversed(names))
    start = time.perf_counter()
    run("fuse-overlayfs", "-o", f"lowerdir={lower}", mountpoint)
    wait_mounted(mountpoint)
    return Target("fuse-overlayfs", mountpoint, time.perf_counter() - start, mountpoint)


def mount_ratarmount(tars: list, mountpoint: str, index_dir: str) -> Target:
    if shutil.which("ratarmount") is None:
        raise Skip("ratarmount is not installed (pip install ratarmount)")
    os.makedirs(mountpoint, exist_ok=True)
    os.makedirs(index_dir, exist_ok=True)
    start = time.perf_counter()
    run("ratarmount", "--index-folders", index_dir, *tars, mountpoint)
    wait_mounted(mountpoint)
    return Target("ratarmount", mountpoint, time.perf_counter() - start, mountpoint)


def mount_tmpfs_copy(tree: str, mountpoint: str) -> Target:
    """The final view copied into a fresh tmpfs."""
    os.makedirs(mountpoint, exist_ok=True)
    run("mount", "-t", "tmpfs", "-o", "size=16g", "tmpfs", mountpoint)
    run("cp", "-a", f"{tree}/.", mountpoint)
    return Target("tmpfs", mountpoint, None, mountpoint)


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def targets_closed(targets: list):
    try:
        yield targets
    finally:
        for target in targets:
            with contextlib.suppress(Exception):
                target.close()
