"""Every change layerfs makes on the host's disk goes through :class:`HostDir`.

The upper layer is written into a directory that may hold symlinks copied up
from an image (``etc -> /etc``).  A host path operation that followed one of
them would write outside the upper directory.  So nothing here takes a host
path: every operation opens the parent directory component by component with
``O_NOFOLLOW | O_DIRECTORY`` from a directory file descriptor held for the
root, and acts on the last component relative to that descriptor, never
following it.  A symlink met on the way is an error (``ELOOP``/``ENOTDIR``),
not a detour.  This is the one place to audit for escapes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat as _stat
from typing import Iterator, Optional

from .errors import path_error
from .paths import split

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class HostDir:
    """A directory on the host, addressed by canonical paths ``/a/b``
    relative to it."""

    def __init__(self, root: str):
        self.root = root
        self.fd = os.open(root, DIR_FLAGS)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- walking --------------------------------------------------------

    def open_dir(self, path: str) -> int:
        """A new descriptor for directory *path*; no symlink is followed."""
        fd = os.dup(self.fd)
        try:
            for name in path.split("/"):
                if not name:
                    continue
                child = os.open(name, DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = child
        except OSError as error:
            os.close(fd)
            raise path_error(error.errno, path) from None
        return fd

    @contextlib.contextmanager
    def at(self, path: str) -> Iterator[tuple[int, str]]:
        """``(parent_fd, name)`` for *path*, the descriptor closed after."""
        parent, name = split(path)
        fd = self.open_dir(parent)
        try:
            yield fd, name
        finally:
            os.close(fd)

    # -- queries ---------------------------------------------------------

    def lstat(self, path: str) -> os.stat_result:
        if path == "/":
            return os.fstat(self.fd)
        with self.at(path) as (parent, name):
            return os.stat(name, dir_fd=parent, follow_symlinks=False)

    def exists(self, path: str) -> bool:
        try:
            self.lstat(path)
        except OSError:
            return False
        return True

    def listdir(self, path: str) -> list[tuple[str, os.stat_result]]:
        """``(name, lstat)`` of each entry of directory *path*, sorted."""
        fd = self.open_dir(path)
        try:
            return sorted((name, os.stat(name, dir_fd=fd, follow_symlinks=False))
                          for name in os.listdir(fd))
        finally:
            os.close(fd)

    def walk(self, path: str = "/") -> Iterator[tuple[str, os.stat_result]]:
        """Every path beneath *path* (not itself), parents first, sorted."""
        for name, st in self.listdir(path):
            child = path + name if path == "/" else f"{path}/{name}"
            yield child, st
            if _stat.S_ISDIR(st.st_mode):
                yield from self.walk(child)

    def readlink(self, path: str) -> str:
        with self.at(path) as (parent, name):
            return os.readlink(name, dir_fd=parent)

    # -- changes ----------------------------------------------------------

    def open_file(self, path: str, flags: int, mode: int = 0o600) -> int:
        with self.at(path) as (parent, name):
            return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=parent)

    def mkdir(self, path: str, mode: int = 0o700) -> None:
        with self.at(path) as (parent, name):
            os.mkdir(name, mode, dir_fd=parent)

    def symlink(self, target: str, path: str) -> None:
        with self.at(path) as (parent, name):
            os.symlink(target, name, dir_fd=parent)

    def mknod(self, path: str, mode: int, device: int = 0) -> None:
        with self.at(path) as (parent, name):
            os.mknod(name, mode, device, dir_fd=parent)

    def link(self, source: str, destination: str) -> None:
        with self.at(source) as (source_parent, source_name), \
                self.at(destination) as (destination_parent, destination_name):
            os.link(source_name, destination_name, src_dir_fd=source_parent,
                    dst_dir_fd=destination_parent, follow_symlinks=False)

    def rename(self, source: str, destination: str) -> None:
        """Atomically move *source* to *destination*, replacing it."""
        with self.at(source) as (source_parent, source_name), \
                self.at(destination) as (destination_parent, destination_name):
            os.rename(source_name, destination_name, src_dir_fd=source_parent,
                      dst_dir_fd=destination_parent)

    def unlink(self, path: str) -> None:
        with self.at(path) as (parent, name):
            os.unlink(name, dir_fd=parent)

    def rmdir(self, path: str) -> None:
        with self.at(path) as (parent, name):
            os.rmdir(name, dir_fd=parent)

    def remove_tree(self, path: str) -> None:
        """Remove *path* and everything beneath it, following no symlink."""
        with self.at(path) as (parent, name):
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            if not _stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=parent)
                return
            remove_tree_at(parent, name)

    def chmod(self, path: str, mode: int) -> None:
        """Set permission bits; symlinks have none on Linux and are skipped."""
        st = self.lstat(path)
        if _stat.S_ISLNK(st.st_mode):
            return
        with self.at(path) as (parent, name):
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            os.chmod(f"/proc/self/fd/{fd}", mode)
        finally:
            os.close(fd)

    def chown(self, path: str, uid: int, gid: int) -> None:
        with self.at(path) as (parent, name):
            os.chown(name, uid, gid, dir_fd=parent, follow_symlinks=False)

    def utime(self, path: str, atime_ns: int, mtime_ns: int) -> os.stat_result:
        """Set the times; returns the entry's lstat after (its new ctime),
        read through the same walk."""
        with self.at(path) as (parent, name):
            os.utime(name, ns=(atime_ns, mtime_ns), dir_fd=parent, follow_symlinks=False)
            return os.stat(name, dir_fd=parent, follow_symlinks=False)

    @contextlib.contextmanager
    def xattr_path(self, path: str) -> Iterator[str]:
        """xattr calls take no dir_fd: name the entry through the parent's
        ``/proc/self/fd`` link, which the kernel resolves to that very
        directory; the last component is then not followed (``l*xattr``)."""
        with self.at(path) as (parent, name):
            yield f"/proc/self/fd/{parent}/{name}"

    def setxattr(self, path: str, attribute: str, value: bytes, flags: int = 0) -> None:
        with self.xattr_path(path) as proc_path:
            os.setxattr(proc_path, attribute, value, flags, follow_symlinks=False)

    def removexattr(self, path: str, attribute: str) -> None:
        with self.xattr_path(path) as proc_path:
            os.removexattr(proc_path, attribute, follow_symlinks=False)

    def listxattr(self, path: str) -> dict[str, bytes]:
        with self.xattr_path(path) as proc_path:
            try:
                names = os.listxattr(proc_path, follow_symlinks=False)
            except OSError as error:
                if error.errno in (errno.ENOTSUP, errno.EPERM):
                    return {}
                raise
            return {n: os.getxattr(proc_path, n, follow_symlinks=False) for n in names}

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.fd)



def remove_tree_at(parent: int, name: str) -> None:
    """Remove directory *name* of the directory *parent* with everything in
    it, opening each level with O_NOFOLLOW (shutil.rmtree takes dir_fd only
    from Python 3.11)."""
    fd = os.open(name, DIR_FLAGS, dir_fd=parent)
    try:
        for child in os.listdir(fd):
            if _stat.S_ISDIR(os.stat(child, dir_fd=fd, follow_symlinks=False).st_mode):
                remove_tree_at(fd, child)
            else:
                os.unlink(child, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent)


def copy_fd(source_read, destination_fd: int, size: int, chunk: int = 1 << 20) -> None:
    """Copy *size* bytes, read with ``source_read(offset, length)``, to a
    host descriptor, keeping holes where the source reads as zeros."""
    offset = 0
    zeros: Optional[bytes] = None
    while offset < size:
        length = min(chunk, size - offset)
        data = source_read(offset, length)
        if not data:
            raise path_error(errno.EIO, "<copy-up>")
        if zeros is None or len(zeros) != len(data):
            zeros = bytes(len(data))
        if data != zeros:
            os.pwrite(destination_fd, data, offset)
        offset += len(data)
    os.ftruncate(destination_fd, size)


def write_file_atomically(host: HostDir, path: str, data: bytes, scratch: str) -> None:
    """Replace the file *path* of *host* by one holding *data*: written in
    the directory *scratch* of the same filesystem, fsynced, renamed over
    *path*, and the rename made durable by an fsync of the parent."""
    temporary = f"{scratch}/.{split(path)[1]}.{os.getpid()}.tmp"
    fd = host.open_file(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    host.rename(temporary, path)
    parent = host.open_dir(split(path)[0])
    try:
        os.fsync(parent)
    finally:
        os.close(parent)
