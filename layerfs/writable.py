"""The ``os``-shaped write operations of a filesystem with an upper layer.

Each function only decides: it checks what ``os`` on a local directory
would check, in the same order, so the errors and errnos match, then asks
the upper store (:mod:`layerfs.upper`) for one of its changes, which
changes the host and the view together; all under the upper's lock.
Nothing here touches the host or the tree.  Permission bits are not
checked here (a FUSE mount lets the kernel check them with
``default_permissions``); the caller acts as the owner.
"""

from __future__ import annotations

import errno
import io
import os
import stat as _stat
from typing import Optional

import attrs

from .entry import kind_name
from .errors import ReadOnlyError, path_error
from .paths import encode_name, is_within, split
from .union import ORIGIN_LOWER, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, FrozenNode, Node
from .upper import Upper, check_name, now_ns

ACCESS_MODE = os.O_ACCMODE


def writer(fs, path) -> Upper:
    if fs.upper is None or not fs.upper.writable:
        raise ReadOnlyError(os.fspath(path))
    return fs.upper


def existing(fs, path, follow: bool) -> tuple[str, Node]:
    real, node = fs.tree.resolve(os.fsdecode(path), follow)
    if node is None:
        raise path_error(errno.ENOENT, os.fspath(path))
    return real, node


def free_name(fs, path) -> str:
    """The canonical path for a new entry *path*; it must not exist."""
    real, node = fs.tree.resolve(os.fsdecode(path), False)
    if node is not None:
        raise path_error(errno.EEXIST, os.fspath(path))
    check_name(real)
    return real


# -- files and handles -------------------------------------------------------

class Handle:
    """An open file: what a file descriptor is to ``os``.

    Reads of a file still in a lower layer go to that layer; once any
    handle writes, the file is copied up and every handle reads the copy.
    An unlinked file stays readable and writable through its handles.
    """

    def __init__(self, fs, node: Node, path: str, flags: int, fd: Optional[int]):
        self.fs = fs
        self._node = node
        self.path = path
        self.flags = flags
        self.fd = fd
        self.append = bool(flags & os.O_APPEND)
        self.counted = fs.upper is not None
        if self.counted:
            fs.upper.opened_handle(node)
        self.readable = flags & ACCESS_MODE != os.O_WRONLY
        self.writable = flags & ACCESS_MODE != os.O_RDONLY

    @property
    def node(self) -> Node:
        """The open inode as it is now: a container copies an image's node
        when it first changes it (:meth:`layerfs.union.Tree.current`)."""
        node = self._node
        if node.__class__ is FrozenNode:
            node = self._node = self.fs.tree.current(node)
        return node

    def pread(self, size: int, offset: int) -> bytes:
        if not self.readable:
            raise path_error(errno.EBADF, self.path)
        if self.fd is not None:         # an upper file's: never a directory
            return os.pread(self.fd, size, offset)
        node = self.node
        if node.children is not None:
            raise path_error(errno.EISDIR, self.path)
        return self.fs.read_node(node, offset, size)

    def pwrite(self, data: bytes, offset: int) -> int:
        if not self.writable:
            raise path_error(errno.EBADF, self.path)
        with self.fs.upper.lock:
            return self.fs.upper.write_data(self.node, self.fd, data, offset, self.append)

    def truncate(self, length: int) -> None:
        if not self.writable:
            raise path_error(errno.EINVAL, self.path)
        with self.fs.upper.lock:
            self.fs.upper.truncate_data(self.node, self.fd, length)

    def allocate(self, mode: int, offset: int, length: int) -> None:
        """``fallocate(2)`` through this handle (*mode* as its flags)."""
        if not self.writable:
            raise path_error(errno.EBADF, self.path)
        if offset < 0 or length <= 0:
            raise path_error(errno.EINVAL, self.path)
        with self.fs.upper.lock:
            self.fs.upper.allocate_data(self.node, self.fd, mode, offset, length)

    def fsync(self, datasync: bool = False) -> None:
        """The file's data, and the sidecar records a metadata change of
        it may have left (a metacopy has no host file of its own)."""
        if self.fd is not None:
            (os.fdatasync if datasync else os.fsync)(self.fd)
        if self.fs.upper is not None and self.fs.upper.writable:
            self.fs.upper.flush_records()

    def flush(self) -> None:
        """Writes go straight to the host file; nothing is buffered here."""

    def fstat(self) -> os.stat_result:
        return self.node.stat()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.counted and self.fs.upper is not None:
            self.fs.upper.closed_handle(self._node)     # by its inode number
        self.counted = False


def open_handle(fs, path, flags: int, mode: int = 0o666) -> Handle:
    """``os.open`` for the view."""
    path = os.fsdecode(path)
    writing = flags & ACCESS_MODE != os.O_RDONLY or flags & os.O_TRUNC
    if (writing or flags & os.O_CREAT) and fs.readonly:
        raise ReadOnlyError(path)
    if fs.readonly:
        return _open(fs, path, flags, mode)
    with fs.upper.lock:
        return _open(fs, path, flags, mode)


def _open(fs, path: str, flags: int, mode: int) -> Handle:
    creating = flags & os.O_CREAT
    exclusive = creating and flags & os.O_EXCL
    follow = not (flags & os.O_NOFOLLOW or exclusive)
    real, node = fs.tree.resolve(path, follow)
    if node is None:
        if not creating:
            raise path_error(errno.ENOENT, path)
        if path.endswith("/"):
            raise path_error(errno.EISDIR, path)
        check_name(real)
        node = create_file(fs.upper, real, mode)
    elif exclusive:
        raise path_error(errno.EEXIST, path)
    kind = node.mode & S_IFMT
    if kind == S_IFLNK:
        raise path_error(errno.ELOOP, path)
    if flags & os.O_DIRECTORY and kind != S_IFDIR:
        raise path_error(errno.ENOTDIR, path)
    writing = flags & ACCESS_MODE != os.O_RDONLY
    if kind == S_IFDIR:
        if writing or flags & os.O_TRUNC:
            raise path_error(errno.EISDIR, path)
        return Handle(fs, node, real, flags, None)
    if kind != S_IFREG:
        # Device nodes and fifos of an image are not backed by anything.
        raise path_error(errno.ENXIO, path)
    if not (writing or flags & os.O_TRUNC):
        return Handle(fs, node, real, flags, None)
    upper = fs.upper
    node = upper.copy_up(real, node, with_data=True)
    fd = upper.open_data(node)
    handle = Handle(fs, node, real, flags, fd)
    if flags & os.O_TRUNC and node.size:
        # Also for O_RDONLY | O_TRUNC, which truncates on Linux (the kernel
        # has checked write permission): not through the read-only handle.
        upper.truncate_data(node, fd, 0)
    return handle


def open_unnamed(fs, node: Node, flags: int) -> Handle:
    """``os.open`` of an inode that no name reaches any more (a process
    still references it: the kernel reopens an unlinked file through
    ``/proc/PID/fd``).  Its data is what the upper kept for it; a lower
    file's is still in its layer, and can be read but not written
    (``ESTALE``)."""
    writing = flags & ACCESS_MODE != os.O_RDONLY or flags & os.O_TRUNC
    if writing and fs.readonly:
        raise ReadOnlyError("")
    node = fs.tree.current(node)
    kind = node.mode & S_IFMT
    if kind == S_IFDIR:
        if writing:
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        return Handle(fs, node, "", flags, None)
    if kind != S_IFREG:
        raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
    if not writing:
        return Handle(fs, node, "", flags, None)
    upper = fs.upper
    with upper.lock:
        fd = upper.reopen_orphan(node)
        handle = Handle(fs, node, "", flags, fd)
        if flags & os.O_TRUNC and node.size:
            upper.truncate_data(node, fd, 0)
    return handle


def create_file(upper: Upper, path: str, mode: int) -> Node:
    node = upper.new_node(S_IFREG | (mode & 0o7777), path)
    upper.place(path, node)
    return node


# -- directories, links, special files ------------------------------------------

def mkdir(fs, path, mode: int = 0o777) -> None:
    upper = writer(fs, path)
    with upper.lock:
        real = free_name(fs, path)
        # mkdir(2) takes the permission and sticky bits only.
        node = upper.new_node(S_IFDIR | (mode & 0o1777), real)
        upper.place(real, node)


def symlink(fs, target: str, path) -> None:
    upper = writer(fs, path)
    with upper.lock:
        real = free_name(fs, path)
        node = upper.new_node(S_IFLNK | 0o777, real)
        node.target = os.fsdecode(target)
        node.size = len(encode_name(node.target))
        upper.place(real, node)


def mknod(fs, path, mode: int = 0o600, device: int = 0) -> None:
    upper = writer(fs, path)
    kind = mode & S_IFMT or S_IFREG
    with upper.lock:
        real = free_name(fs, path)
        if kind == S_IFREG:
            create_file(upper, real, mode)
            return
        if kind not in (_stat.S_IFIFO, _stat.S_IFCHR, _stat.S_IFBLK, _stat.S_IFSOCK):
            raise path_error(errno.EINVAL, os.fspath(path))
        if kind != _stat.S_IFIFO and not upper.is_root:
            raise path_error(errno.EPERM, os.fspath(path))
        node = upper.new_node(kind | (mode & 0o7777), real)
        node.rdev = device if kind in (_stat.S_IFCHR, _stat.S_IFBLK) else 0
        upper.place(real, node)


def link(fs, source, destination) -> None:
    """A new name for a file, as ``link(2)`` (a symlink is not followed)."""
    upper = writer(fs, destination)
    with upper.lock:
        source_real, node = existing(fs, source, follow=False)
        real = free_name(fs, destination)       # EEXIST before EPERM, as link(2)
        if node.children is not None:
            raise path_error(errno.EPERM, os.fspath(source))
        check_name(real)
        upper.link(source_real, node, real)


# -- removal and renaming ------------------------------------------------------

def unlink(fs, path) -> None:
    upper = writer(fs, path)
    with upper.lock:
        real, node = existing(fs, path, follow=False)
        if node.children is not None:
            raise path_error(errno.EISDIR, os.fspath(path))
        upper.remove(real, node)


def rmdir(fs, path) -> None:
    upper = writer(fs, path)
    with upper.lock:
        real, node = existing(fs, path, follow=False)
        if node.children is None:
            raise path_error(errno.ENOTDIR, os.fspath(path))
        if real == "/":
            raise path_error(errno.EBUSY, os.fspath(path))
        if node.children:
            raise path_error(errno.ENOTEMPTY, os.fspath(path))
        upper.remove(real, node)


def rename(fs, source, destination) -> None:
    """``os.replace`` for the view: files and directories, lower ones too."""
    upper = writer(fs, source)
    with upper.lock:
        # rename(2)'s order: both parents, then "/" (busy), then the names.
        source_real, node = fs.tree.resolve(os.fsdecode(source), False)
        destination_real, target = fs.tree.resolve(os.fsdecode(destination), False)
        if source_real == "/" or destination_real == "/":
            raise path_error(errno.EBUSY, os.fspath(source))
        if node is None:
            raise path_error(errno.ENOENT, os.fspath(source))
        if target is node:
            return
        if is_within(destination_real, source_real):
            raise path_error(errno.EINVAL, os.fspath(destination))
        if is_within(source_real, destination_real):
            raise path_error(errno.ENOTEMPTY, os.fspath(destination))
        if node.children is not None:
            if target is not None and target.children is None:
                raise path_error(errno.ENOTDIR, os.fspath(destination))
            if target is not None and target.children:
                raise path_error(errno.ENOTEMPTY, os.fspath(destination))
        elif target is not None and target.children is not None:
            raise path_error(errno.EISDIR, os.fspath(destination))
        check_name(destination_real)
        upper.rename(source_real, node, destination_real, target)


# -- metadata --------------------------------------------------------------------

def chmod(fs, path, mode: int, *, follow_symlinks: bool = True) -> None:
    def change(node: Node) -> None:
        if node.mode & S_IFMT == S_IFLNK:
            # Linux symlinks have no permissions: lchmod is EOPNOTSUPP.
            raise path_error(errno.EOPNOTSUPP, os.fspath(path))
        node.mode = (node.mode & S_IFMT) | (mode & 0o7777)
    change_metadata(fs, path, follow_symlinks, change)


def chown(fs, path, uid: int, gid: int, *, follow_symlinks: bool = True) -> None:
    def change(node: Node) -> None:
        if uid != -1:
            node.uid = uid
        if gid != -1:
            node.gid = gid
        if node.children is None and not node.is_symlink:
            # As chown(2): a changed owner drops set-user-ID, and set-group-ID
            # when group execution is on (else the bit means mandatory locking).
            node.mode &= ~_stat.S_ISUID
            if node.mode & _stat.S_IXGRP:
                node.mode &= ~_stat.S_ISGID
    change_metadata(fs, path, follow_symlinks, change)


def utime(fs, path, times=None, *, ns=None, follow_symlinks: bool = True) -> None:
    if times is not None and ns is not None:
        raise ValueError("utime: you may specify either 'times' or 'ns' but not both")
    if times is not None:
        ns = (int(times[0] * 1e9), int(times[1] * 1e9))
    stamp = now_ns()
    atime_ns, mtime_ns = ns if ns is not None else (stamp, stamp)

    def change(node: Node) -> None:
        node.atime_ns, node.mtime_ns = atime_ns, mtime_ns
    change_metadata(fs, path, follow_symlinks, change)


def setxattr(fs, path, attribute: str, value: bytes, flags: int = 0, *,
             follow_symlinks: bool = True) -> None:
    def change(node: Node) -> None:
        check_xattr_allowed(node, attribute, path)
        present = attribute in (node.xattrs or {})
        if flags & os.XATTR_CREATE and present:
            raise path_error(errno.EEXIST, os.fspath(path))
        if flags & os.XATTR_REPLACE and not present:
            raise path_error(errno.ENODATA, os.fspath(path))
        node.xattrs = {**(node.xattrs or {}), attribute: bytes(value)}
    change_metadata(fs, path, follow_symlinks, change)


def removexattr(fs, path, attribute: str, *, follow_symlinks: bool = True) -> None:
    def change(node: Node) -> None:
        check_xattr_allowed(node, attribute, path)
        if attribute not in (node.xattrs or {}):
            raise path_error(errno.ENODATA, os.fspath(path))
        remaining = dict(node.xattrs)
        del remaining[attribute]
        node.xattrs = remaining or None
    change_metadata(fs, path, follow_symlinks, change)


def check_xattr_allowed(node: Node, attribute: str, path) -> None:
    """Linux allows user.* attributes on regular files and directories only."""
    kind = node.mode & S_IFMT
    if attribute.startswith("user.") and kind not in (S_IFREG, S_IFDIR):
        raise path_error(errno.EPERM, os.fspath(path))


class Unnamed:
    """Stands for the path of an inode that no name reaches any more (an
    unlinked file a process still references: ``fchmod``, ``futimens``,
    ``fsetxattr`` of it), where the metadata functions above take a path."""

    __slots__ = ("node",)

    def __init__(self, node: Node):
        self.node = node

    def __fspath__(self) -> str:
        return f"(unlinked inode {self.node.ino})"


def change_metadata(fs, path, follow_symlinks: bool, change) -> None:
    """Apply *change(node)* to the inode at *path* (or :class:`Unnamed`)
    and store the result: a metadata change never copies a file's data."""
    upper = writer(fs, path)
    with upper.lock:
        if isinstance(path, Unnamed):
            upper.set_unnamed_metadata(path.node, change)
            return
        real, node = existing(fs, path, follow_symlinks)
        upper.set_metadata(real, node, change)


def truncate(fs, path, length: int) -> None:
    if length < 0:          # checked before the path, as truncate(2)
        raise path_error(errno.EINVAL, os.fspath(path))
    handle = open_handle(fs, path, os.O_WRONLY)
    try:
        handle.truncate(length)
    finally:
        handle.close()


# -- file objects for FileSystem.open -------------------------------------------

def flags_for_mode(mode: str) -> int:
    """The ``os.open`` flags of a builtin ``open`` mode string."""
    letters = set(mode) - {"b", "t"}
    plus = "+" in letters
    letters.discard("+")
    if len(letters) != 1 or len(mode) != len(set(mode)):
        raise ValueError(f"invalid mode: {mode!r}")
    base = letters.pop()
    flags = {"r": 0, "w": os.O_CREAT | os.O_TRUNC, "a": os.O_CREAT | os.O_APPEND,
             "x": os.O_CREAT | os.O_EXCL}.get(base)
    if flags is None:
        raise ValueError(f"invalid mode: {mode!r}")
    if plus:
        return flags | os.O_RDWR
    return flags | (os.O_RDONLY if base == "r" else os.O_WRONLY)


class HandleFile(io.RawIOBase):
    """A raw file object over a :class:`Handle`, for ``FileSystem.open``."""

    def __init__(self, handle: Handle):
        super().__init__()
        self.handle = handle
        self.name = handle.path
        self.position = handle.node.size if handle.append else 0

    def readable(self) -> bool:
        return self.handle.readable

    def writable(self) -> bool:
        return self.handle.writable

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.handle.pread(len(buffer), self.position)
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)

    def write(self, data) -> int:
        count = self.handle.pwrite(bytes(data), self.position)
        self.position = self.handle.node.size if self.handle.append else self.position + count
        return count

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position,
                io.SEEK_END: self.handle.node.size}[whence]
        if base + offset < 0:
            raise path_error(errno.EINVAL, self.name)
        self.position = base + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def truncate(self, size: Optional[int] = None) -> int:
        size = self.position if size is None else size
        self.handle.truncate(size)
        return size

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a layerfs file has no host descriptor")

    def close(self) -> None:
        if not self.closed:
            self.handle.close()
        super().close()


def open_file(fs, path, mode: str, buffering: int, encoding, errors, newline):
    """``FileSystem.open`` for every mode."""
    flags = flags_for_mode(mode)
    handle = open_handle(fs, path, flags)
    if handle.node.children is not None:     # os.open takes a directory, open() does not
        handle.close()
        raise path_error(errno.EISDIR, os.fspath(path))
    raw = HandleFile(handle)
    if buffering == 0:
        if "b" not in mode:
            raise ValueError("can't have unbuffered text I/O")
        return raw
    size = buffering if buffering > 1 else io.DEFAULT_BUFFER_SIZE
    if raw.readable() and raw.writable():
        binary = io.BufferedRandom(raw, size)
    elif raw.writable():
        binary = io.BufferedWriter(raw, size)
    else:
        binary = io.BufferedReader(raw, size)
    if "b" in mode:
        return binary
    return io.TextIOWrapper(binary, encoding=encoding, errors=errors, newline=newline)


@attrs.frozen
class Change:
    """One entry of :meth:`FileSystem.diff`."""

    path: str
    change: str      # "added", "modified" or "deleted"
    kind: str        # "file", "directory", "symlink", ...


def diff(fs) -> list[Change]:
    """What the upper layer changed, relative to the image, sorted by path.

    A deleted directory is listed once, not with everything it held.
    Paths at or below a volume's PATH are left out.
    """
    if fs.upper is None:
        return []
    upper = fs.upper
    nodes = fs.tree.nodes
    changes = []
    in_volume = fs.in_volume      # volumes are left out, as commit leaves them out
    for path in upper.lower_paths:
        if path not in nodes and split(path)[0] in nodes and not in_volume(path):
            changes.append(Change(path, "deleted", kind_name(upper.lower_paths[path])))
    for path, node in nodes.items():
        if node.origin == ORIGIN_LOWER or path == "/" or in_volume(path):
            continue
        state = "modified" if path in upper.lower_paths else "added"
        changes.append(Change(path, state, kind_name(node.mode)))
    return sorted(changes, key=lambda change: change.path)
