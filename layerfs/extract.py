"""Copying entries out of a view onto the host (``fs.extract``, ``layerfs cp``).

The rule this module owns: nothing is written outside the destination,
whatever the image holds.  Every host entry is made relative to a directory
descriptor, by name, with ``O_NOFOLLOW``/``O_EXCL`` (or ``mkdir``, ``mknod``,
``symlink``, ``link``, which never follow the last component): an image's
symlink is recreated as a symlink and never followed on the host, and a name
that already exists in the destination is refused, never replaced or
written through.  Times, modes and xattrs are copied; owners only by root
(as ``cp -a`` and ``tar -x`` do); hardlinks within the copied tree stay
hardlinks.
"""

from __future__ import annotations

import errno
import os
import stat as _stat
from typing import TYPE_CHECKING

from .paths import join, split
from .union import Node

if TYPE_CHECKING:
    from .fs import FileSystem

_CHUNK = 1 << 20


def extract(fs: "FileSystem", path: str, dest: str) -> str:
    """Copy *path* of *fs* (a file or a whole tree) to *dest* on the host,
    as ``cp -a`` does: into *dest* when it is an existing directory, else
    as *dest* itself; a symlink is copied as a symlink (``cp -a`` is
    ``--no-dereference``).  Returns the host path written."""
    parent_path, base = split(path.rstrip("/") or "/")
    real = join(fs.realpath(parent_path), base) if base else "/"
    node = fs.node(real, False)
    dest = os.fspath(dest)
    parent, name = os.path.split(os.path.abspath(dest))
    if os.path.isdir(dest):
        parent, name = os.path.abspath(dest), split(real)[1] or "root"
    copier = _Copier(fs, os.geteuid() == 0)
    parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        copier.copy(real, node, parent_fd, name)
    finally:
        os.close(parent_fd)
    return os.path.join(parent, name)


class _Copier:
    def __init__(self, fs: "FileSystem", as_root: bool):
        self.fs = fs
        self.as_root = as_root
        self.linked: dict[int, tuple[int, str]] = {}   # ino -> (dir fd, name) first made
        self.open_dirs: list[int] = []

    def copy(self, path: str, node: Node, dir_fd: int, name: str) -> None:
        try:
            if node.children is not None:
                self._copy_directory(path, node, dir_fd, name)
            else:
                self._copy_leaf(path, node, dir_fd, name)
        finally:
            for fd in self.open_dirs:
                os.close(fd)
            self.open_dirs.clear()

    def _copy_directory(self, path: str, node: Node, dir_fd: int, name: str) -> None:
        os.mkdir(name, 0o700, dir_fd=dir_fd)
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
        try:
            prefix = "" if path == "/" else path
            # A volume's PATH is copied as an empty directory: neither the
            # host's content nor the image's it hides (as export and commit).
            children = {} if self.fs.in_volume(path) else node.children
            for child_name, child in sorted(children.items()):
                child_path = f"{prefix}/{child_name}"
                if child.children is not None:
                    self._copy_directory(child_path, child, fd, child_name)
                else:
                    self._copy_leaf(child_path, child, fd, child_name)
            # Last, so that creating the children did not change its mtime,
            # and so that a read-only directory could still be filled.
            self._set_metadata(fd, node)
        finally:
            os.close(fd)

    def _copy_leaf(self, path: str, node: Node, dir_fd: int, name: str) -> None:
        if node.nlink > 1 and node.ino in self.linked:
            first_fd, first_name = self.linked[node.ino]
            os.link(first_name, name, src_dir_fd=first_fd, dst_dir_fd=dir_fd,
                    follow_symlinks=False)
            return
        kind = _stat.S_IFMT(node.mode)
        if kind == _stat.S_IFLNK:
            os.symlink(node.target, name, dir_fd=dir_fd)
            self._set_times(name, dir_fd, node)
            if self.as_root:
                os.chown(name, node.uid, node.gid, dir_fd=dir_fd, follow_symlinks=False)
        elif kind == _stat.S_IFREG:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                         0o600, dir_fd=dir_fd)
            try:
                self._copy_data(node, fd)
                self._set_metadata(fd, node)
            finally:
                os.close(fd)
        else:
            try:
                os.mknod(name, 0o600 | kind, node.rdev, dir_fd=dir_fd)
            except PermissionError:
                raise PermissionError(errno.EPERM, f"{path}: only root can make a "
                                      f"{'fifo' if kind == _stat.S_IFIFO else 'device node'}"
                                      " here") from None
            if self.as_root:
                os.chown(name, node.uid, node.gid, dir_fd=dir_fd, follow_symlinks=False)
            os.chmod(name, _stat.S_IMODE(node.mode), dir_fd=dir_fd)
            self._set_times(name, dir_fd, node)
        if node.nlink > 1:
            kept = os.dup(dir_fd)
            self.open_dirs.append(kept)
            self.linked[node.ino] = (kept, name)

    def _copy_data(self, node: Node, fd: int) -> None:
        offset = 0
        while offset < node.size:
            chunk = self.fs.read_node(node, offset, _CHUNK)
            if not chunk:
                break
            os.write(fd, chunk)
            offset += len(chunk)

    def _set_metadata(self, fd: int, node: Node) -> None:
        """xattrs, owner, mode, times, in the order that keeps each: an
        ownership change clears set-id bits, so the mode comes after it."""
        for attribute, value in (node.xattrs or {}).items():
            try:
                os.setxattr(fd, attribute, value)
            except OSError as error:
                # What the host refuses (trusted.* without root, any xattr on
                # a filesystem without them) is left out, as tar -x does.
                if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
        if self.as_root:
            os.fchown(fd, node.uid, node.gid)
        os.fchmod(fd, _stat.S_IMODE(node.mode))
        os.utime(fd, ns=(node.atime_ns, node.mtime_ns))

    @staticmethod
    def _set_times(name: str, dir_fd: int, node: Node) -> None:
        os.utime(name, ns=(node.atime_ns, node.mtime_ns), dir_fd=dir_fd,
                 follow_symlinks=False)
