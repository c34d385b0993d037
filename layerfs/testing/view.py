"""Snapshots: any filesystem tree as the dict the reference model returns.

:func:`snapshot` reads a layerfs filesystem (through its ``os``-shaped
methods) or a real directory (through :mod:`os`) into ``{path:
ModelNode}``, so the output of any tool can be compared with
:func:`layerfs.testing.model.apply_stack`.  Inode numbers differ between
tools, so hardlinks are recorded as ``link_group``: the set of every name of
the same file.  :func:`diff_views` says, line by line, how two views differ.
"""

from __future__ import annotations

import os
import stat

import attrs

from layerfs.paths import join
from layerfs.testing import layers as L
from layerfs.testing.model import ModelNode

_KINDS = {stat.S_IFREG: L.FILE, stat.S_IFDIR: L.DIR, stat.S_IFLNK: L.SYMLINK,
          stat.S_IFIFO: L.FIFO, stat.S_IFCHR: L.CHARDEV, stat.S_IFBLK: L.BLOCKDEV}


class _DiskReader:
    """Reads a directory tree on disk; only ``user.*`` xattrs are kept
    (the others belong to the host: security labels, overlay's own)."""

    def __init__(self, root: str):
        self.root = os.fspath(root)

    def _host(self, path: str) -> str:
        return self.root if path == "/" else self.root + path

    def lstat(self, path):
        return os.lstat(self._host(path))

    def listdir(self, path):
        return os.listdir(self._host(path))

    def readlink(self, path):
        return os.readlink(self._host(path))

    def read_bytes(self, path):
        with open(self._host(path), "rb") as f:
            return f.read()

    def xattrs(self, path, kind):
        host = self._host(path)
        names = [n for n in os.listxattr(host, follow_symlinks=False) if n.startswith("user.")]
        return {n: os.getxattr(host, n, follow_symlinks=False) for n in names}


class _LayerfsReader:
    def __init__(self, fs):
        self.fs = fs
        self.lstat, self.listdir, self.readlink = fs.lstat, fs.listdir, fs.readlink
        self.read_bytes = fs.read_bytes

    def xattrs(self, path, kind):
        follow = False if kind == L.SYMLINK else True
        return {n: self.fs.getxattr(path, n, follow_symlinks=follow)
                for n in self.fs.listxattr(path, follow_symlinks=follow)}


def snapshot(source) -> dict:
    """``{path: ModelNode}`` for every path under *source*, root included.

    *source* is a directory on disk (``str`` or path-like) or a layerfs
    filesystem.  Directories are walked with ``listdir`` + ``lstat``, never
    through a symlink."""
    if isinstance(source, (str, os.PathLike)):
        reader = _DiskReader(source)
    else:
        reader = _LayerfsReader(source)
    nodes, inodes = {}, {}
    pending = ["/"]
    while pending:
        path = pending.pop()
        st = reader.lstat(path)
        kind = _KINDS[stat.S_IFMT(st.st_mode)]
        nodes[path] = _node(reader, path, st, kind)
        if kind == L.DIR:
            pending.extend(join(path, name) for name in reader.listdir(path))
        else:
            inodes.setdefault((st.st_dev, st.st_ino), []).append(path)
    for names in inodes.values():
        group = frozenset(names)
        for path in names:
            nodes[path] = _with_group(nodes[path], group)
    return nodes


def _node(reader, path: str, st, kind: str) -> ModelNode:
    rdev = (os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in L.DEVICE_KINDS else (0, 0)
    return ModelNode(
        kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
        reader.read_bytes(path) if kind == L.FILE else b"",
        reader.readlink(path) if kind == L.SYMLINK else "",
        tuple(sorted(reader.xattrs(path, kind).items())), rdev)


def _with_group(node: ModelNode, group: frozenset) -> ModelNode:
    return attrs.evolve(node, link_group=group)


def diff_views(expected: dict, actual: dict, limit: int = 20) -> list:
    """Human-readable differences between two views (empty if equal)."""
    lines = []
    for path in sorted(set(expected) | set(actual)):
        want, got = expected.get(path), actual.get(path)
        if want == got:
            continue
        if want is None or got is None:
            lines.append(f"{path!r}: expected {want!r}, got {got!r}")
            continue
        fields = [f for f in ("kind", "mode", "uid", "gid", "mtime_ns", "content", "target",
                              "xattrs", "rdev", "link_group")
                  if getattr(want, f) != getattr(got, f)]
        lines.append(f"{path!r} ({want.kind}): " + "; ".join(
            f"{f}: expected {_short(getattr(want, f))}, got {_short(getattr(got, f))}"
            for f in fields))
    if len(lines) > limit:
        lines[limit:] = [f"... and {len(lines) - limit} more"]
    return lines


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + f"... ({len(text)} chars)"


def assert_views_equal(expected: dict, actual: dict) -> None:
    """``assert`` the two views are equal, with a readable message."""
    lines = diff_views(expected, actual)
    assert not lines, "views differ:\n  " + "\n  ".join(lines)
