"""Helpers for the mount tests: a sample image, mounting and always unmounting.

Every mount made here is unmounted in teardown (``fusermount -u -z`` as the
last resort), so no test leaves a mount behind.  Tests skip only where FUSE
cannot work at all: not root, no /dev/fuse, no libfuse, no fusermount.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
import time

import pytest

import layerfs
from layerfs import mount as layerfs_mount

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MTIME = 1_600_000_000
BIG = bytes((i * 7 + i // 251) % 256 for i in range(300_000))
NON_UTF8_NAME = "caf\udce9"          # b"caf\xe9" in the tar


ABSOLUTE_TARGET = "/nonexistent-layerfs-test-target/passwd"


def fuse_unavailable() -> str:
    """Why a real mount is impossible here, or "" if it is possible."""
    if os.geteuid() != 0:
        return "FUSE mount tests need root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not (shutil.which("fusermount") or shutil.which("fusermount3")):
        return "no fusermount"
    try:
        from layerfs import fuse  # noqa: F401
    except OSError as error:
        return f"the libfuse 3 binding cannot load ({error})"
    return ""


# Under CI=true nothing that needs FUSE is skipped: a missing piece fails
# the tests that need it (.ci/run installs every one).
requires_fuse = pytest.mark.skipif(bool(fuse_unavailable()) and os.environ.get("CI") != "true",
                                   reason=fuse_unavailable() or "-")


def upper_supported() -> bool:
    import inspect
    return "upper" in inspect.signature(layerfs.open).parameters


requires_upper = pytest.mark.skipif(
    not upper_supported() and os.environ.get("CI") != "true", reason="waiting for the writable upper layer: "
                                  "layerfs.open(..., upper=DIR) does not exist yet")


# -- a sample image ----------------------------------------------------

def _add(tar, name, kind=tarfile.REGTYPE, data=b"", **fields):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = MTIME
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def write_sample_layers(directory) -> list:
    """Two layers exercising every kind of entry, a whiteout and an opaque
    directory; returns their paths, base first."""
    base = os.path.join(directory, "base.tar")
    with tarfile.open(base, "w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        _add(tar, "etc", tarfile.DIRTYPE, mode=0o755)
        _add(tar, "etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n", mode=0o644)
        _add(tar, "etc/shadow", data=b"secret\n", mode=0o600, gid=42)
        _add(tar, "bin", tarfile.DIRTYPE, mode=0o755)
        _add(tar, "bin/tool", data=BIG, mode=0o755, uid=1000, gid=1000)
        _add(tar, "bin/tool-link", tarfile.LNKTYPE, linkname="bin/tool")
        _add(tar, "bin/suid", data=b"#!/bin/sh\n", mode=0o4755)
        _add(tar, "lib/libx.so.1", data=b"ELF")
        _add(tar, "lib/libx.so", tarfile.SYMTYPE, linkname="libx.so.1")
        _add(tar, "usr/lib/old", data=b"hidden by an opaque marker")
        # An absolute symlink. Through a mount the kernel follows it on the
        # HOST, so it must name nothing that exists there: tests write to paths.
        _add(tar, "absolute", tarfile.SYMTYPE, linkname=ABSOLUTE_TARGET)
        _add(tar, "dangling", tarfile.SYMTYPE, linkname="nowhere")
        _add(tar, "dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3)
        _add(tar, "dev/sda", tarfile.BLKTYPE, mode=0o660, devmajor=8, devminor=0)
        _add(tar, "run/fifo", tarfile.FIFOTYPE, mode=0o644)
        info_xattr = {"SCHILY.xattr.user.comment": "hello", "SCHILY.xattr.user.other": "\u00e9t\u00e9"}
        _add(tar, "attrs", data=b"with xattrs", pax_headers=info_xattr)
        _add(tar, "empty", data=b"")
        _add(tar, NON_UTF8_NAME, data=b"latin-1 name")
    top = os.path.join(directory, "top.tar")
    with tarfile.open(top, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "etc/.wh.shadow")
        _add(tar, "usr/lib/.wh..wh..opq")
        _add(tar, "usr/lib/new", data=b"new in top\n")
        _add(tar, "etc/passwd", data=b"root:x:0:0::/root:/bin/bash\n", mode=0o644)
    return [base, top]


# -- mounting and always unmounting ------------------------------------

def is_mounted(path) -> bool:
    return layerfs_mount.mount_type(os.path.abspath(path)) is not None


def force_unmount(path) -> None:
    """Unmount whatever is left on *path*: politely, then lazily."""
    path = os.path.abspath(path)
    if not is_mounted(path):
        return
    try:
        layerfs_mount.umount(path)
    except OSError:
        pass
    if is_mounted(path):
        subprocess.run(["fusermount", "-u", "-z", path], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_until(predicate, timeout: float = 20.0) -> bool:
    """For an external process only: poll *predicate* until true or timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class ThreadMount:
    """An open filesystem served in a thread of this process (foreground
    mode); stop() unmounts and waits until the filesystem is closed."""

    def __init__(self, fs, mountpoint, options=()):
        self.mountpoint = mountpoint
        self.error = None
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True,
                                       args=(fs, layerfs_mount.parse_options(options), ready))
        self.thread.start()
        ready.wait(30)
        if self.error is not None:
            raise self.error
        assert is_mounted(mountpoint), "the FUSE thread did not mount"

    def _serve(self, fs, options, ready):
        try:
            layerfs_mount.serve(fs, self.mountpoint, options, on_ready=ready.set)
        except BaseException as error:      # reported by __init__ or stop()
            self.error = error
        finally:
            ready.set()

    def stop(self):
        force_unmount(self.mountpoint)
        self.thread.join(30)
        assert not self.thread.is_alive(), "the FUSE thread did not finish"
        if self.error is not None:
            raise self.error


def stack(layers) -> list:
    """``--layer FILE`` for each layer file, base first: how the command
    line names a stack of layer files in place of IMAGE."""
    return [word for layer in layers for word in ("--layer", str(layer))]


def run_cli(*arguments, check=False, **kwargs):
    """``python -m layerfs.cli ARGS`` with this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "layerfs.cli", *arguments], env=env,
                          capture_output=True, text=True, check=check, timeout=60,
                          stdin=subprocess.DEVNULL, **kwargs)


# -- a local directory to compare with ---------------------------------

def extract_view(view: dict, dest: str) -> str:
    """Create *view* (``{path: ModelNode}``, from
    :func:`layerfs.testing.view.snapshot`) as a real tree at *dest*: the
    plain local directory that differential tests run the same commands on.
    Needs root (owners, device nodes)."""
    from layerfs.testing import layers as L
    os.makedirs(dest, exist_ok=True)
    for path in sorted(view):                    # parents before children
        node, host = view[path], dest + path if path != "/" else dest
        first = min(node.link_group) if node.link_group else path
        if first != path:
            os.link(dest + first, host)
            continue
        if node.kind == L.DIR:
            os.makedirs(host, exist_ok=True)
        elif node.kind == L.FILE:
            with open(host, "wb") as handle:
                handle.write(node.content)
        elif node.kind == L.SYMLINK:
            os.symlink(node.target, host)
        elif node.kind == L.FIFO:
            os.mkfifo(host)
        else:
            kind = stat.S_IFCHR if node.kind == L.CHARDEV else stat.S_IFBLK
            os.mknod(host, kind | 0o600, os.makedev(*node.rdev))
        for name, value in node.xattrs:
            os.setxattr(host, name, value, follow_symlinks=False)
        os.chown(host, node.uid, node.gid, follow_symlinks=False)
        if node.kind != L.SYMLINK:
            os.chmod(host, node.mode)            # after chown, which clears set-id bits
    for path in sorted(view, reverse=True):      # children first: dirs keep their mtime
        host = dest + path if path != "/" else dest
        os.utime(host, ns=(view[path].mtime_ns, view[path].mtime_ns), follow_symlinks=False)
    return dest


RECENT_NS = (MTIME + 86_400) * 10**9


def comparable(view: dict) -> dict:
    """*view* with every recent mtime (set by the clock while a test ran)
    replaced by 0; old ones (the image's, or set explicitly by a test) stay,
    so a time that should have changed and did not still shows.  Symlink
    modes are dropped: the mount shows the image's, Linux always 0777."""
    import attrs
    from layerfs.testing import layers as L
    return {path: attrs.evolve(node, mtime_ns=0 if node.mtime_ns >= RECENT_NS else node.mtime_ns,
                               mode=0o777 if node.kind == L.SYMLINK else node.mode)
            for path, node in view.items()}


def assert_same_tree(expected_dir: str, actual_dir: str) -> None:
    from layerfs.testing.view import assert_views_equal, snapshot
    assert_views_equal(comparable(snapshot(expected_dir)), comparable(snapshot(actual_dir)))
