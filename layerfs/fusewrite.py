"""Writable mounts on libfuse 3's low-level API: requests name inodes.

What this gains over the high-level layer (:mod:`layerfs.fuse`, still
there with ``LAYERFS_FUSE_API=high``): an inode the kernel holds stays
reachable whatever happens to its names.  libfuse's high-level layer
forgets the path of a file replaced by ``rename`` or removed by ``unlink``,
so ``fstat`` of a descriptor held on it (even ``O_PATH``) failed with
ESTALE, and it kept an open file that lost its last name alive as a
``.fuse_hidden*`` file, which made a rename over an open file two steps.
Here the kernel's node ids are the view's inodes (:mod:`layerfs.fuseinodes`
keeps them, with the kernel's lookup counts), a removed name is removed at
once, and the upper keeps an unlinked file's data (an open descriptor, no
name on the host) while a handle or the kernel references it, as ext4 and
overlayfs do.

Each request is translated to one call of :class:`layerfs.fusecore.Operations`
with the path of its inode, built from the table and checked against the
view, under the upper's lock (so a concurrent rename cannot change it
meanwhile); requests that need no path (lookup, getattr, read, write,
readdir, xattr reads) act on the node or the handle.  Errors map through
:func:`layerfs.fusecore.errno_of`, in :class:`layerfs.fusell.Server`'s
guard.

Kernel caching is the writable mount's (see ``WRITABLE_OPTIONS`` in
:mod:`layerfs.mount`): replies carry the mount's timeouts (0), directories
are opened and listed afresh (a snapshot per open directory, taken again
at offset 0, so entries removed meanwhile shift nothing), no READDIRPLUS
(attributes that expire at once would only cost lookups counted for
nothing).  The kernel applies the caller's umask (no ``DONT_MASK``), and
each creating request runs as the caller the request names.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import resource
import struct
import threading
from ctypes import POINTER
from typing import Callable, Optional

from . import fusell
from . import writable
from .fusecore import UTIME_NOW, UTIME_OMIT, lower_extent, resolve_times
from .fuseinodes import InodeTable
from .paths import NAME_MAX
from .fusell import (PACKER, Server, _reply_attr, _reply_buf, _reply_create,
                     _reply_entry, _reply_err, _reply_none, _reply_open, _reply_write,
                     binding_module, c_stat, fuse_entry_param, reply_extent)

# fuse_lowlevel.h's setattr bits.
SET_MODE, SET_UID, SET_GID, SET_SIZE = 1 << 0, 1 << 1, 1 << 2, 1 << 3
SET_ATIME, SET_MTIME, SET_ATIME_NOW, SET_MTIME_NOW = 1 << 4, 1 << 5, 1 << 7, 1 << 8
RENAME_NOREPLACE = 1 << 0
UNKNOWN_INO = fusell.UNKNOWN_INO


class fuse_ctx(ctypes.Structure):
    """libfuse 3's ``struct fuse_ctx`` (what ``fuse_req_ctx`` gives)."""
    _fields_ = [("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32),
                ("pid", ctypes.c_int32), ("umask", ctypes.c_uint32)]


_req_ctx = fusell._declare("fuse_req_ctx", POINTER(fuse_ctx), ctypes.c_void_p, held=True)
# The hot replies, given bytes (a packed struct stat, a packed
# fuse_entry_param) rather than ctypes objects built for each request.
_reply_attr_bytes = fusell._declare("fuse_reply_attr", ctypes.c_int, ctypes.c_void_p,
                                    ctypes.c_char_p, ctypes.c_double)
_reply_entry_bytes = fusell._declare("fuse_reply_entry", ctypes.c_int, ctypes.c_void_p,
                                     ctypes.c_char_p)
# struct fuse_entry_param around a packed struct stat: ino and generation
# before, the attribute and entry timeouts after.
_ENTRY_HEAD = struct.Struct("=QQ")
if fuse_entry_param.attr.offset != 16 or \
        ctypes.sizeof(fuse_entry_param) != 16 + PACKER.size + 16:
    raise ImportError("layerfs.fusewrite: unexpected struct fuse_entry_param")

# The ids of the request each thread serves (for fusecore's acting_caller).
_request = threading.local()


def request_context() -> tuple:
    """``(uid, gid, pid)`` of the creating request this thread serves."""
    return _request.ids


def _caller_of(req) -> None:
    ctx = _req_ctx(req).contents
    _request.ids = (ctx.uid, ctx.gid, ctx.pid)


def _name(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _stale() -> OSError:
    return OSError(errno.ESTALE, os.strerror(errno.ESTALE))


class WritableServer(Server):
    """Serves :class:`~layerfs.fusecore.Operations` over a writable
    filesystem on *mountpoint* until unmounted (see :class:`Server`).
    The operations must be made with :func:`request_context` as their
    *context*.  The filesystem is a plain :class:`layerfs.fs.FileSystem`,
    whose paths are its tree's; one with volumes is served by
    :class:`layerfs.fusevolume.VolumeServer`."""

    def __init__(self, operations, mountpoint: str, options: dict,
                 on_ready: Optional[Callable[[], None]] = None):
        fs = operations.fs
        if fs.readonly:
            raise ValueError("a read-only filesystem is served by layerfs.fusell.Server")
        self._setup(fs, mountpoint, options, on_ready)
        self._entry_head = _ENTRY_HEAD.pack
        self._entry_tail = struct.pack("=dd", self.timeout, self.entry_timeout)
        self.operations = operations
        self.handles = operations.handles
        self.upper = fs.upper
        self.table = InodeTable(fs.tree, self.upper.forgotten)
        self.upper.referenced = self.table.holds
        # Open directories: fh -> [their entries as (name, mode, ino), or None].
        self.listings: dict = {}
        self._next_listing = itertools.count(1)

    def serve(self) -> int:
        # An unlinked file the kernel still references keeps a descriptor
        # (layerfs.upper): take the hard limit of descriptors, not 1024.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            except (ValueError, OSError):
                pass
        try:
            return super().serve()
        finally:
            self.upper.referenced = lambda ino: False

    # -- the table ---------------------------------------------------------

    def node(self, ino: int):
        record = self.table.get(ino)
        if record is None:
            raise _stale()
        return record.node

    def record(self, ino: int):
        record = self.table.get(ino)
        if record is None:
            raise _stale()
        return record

    def path(self, ino: int) -> str:
        """The path of inode *ino* now (call with the upper's lock held);
        ESTALE if no name reaches it."""
        path = self.table.path(self.record(ino))
        if path is None:
            raise _stale()
        return path

    def target(self, ino: int):
        """What the facade's metadata functions take for inode *ino*: its
        path, or :class:`layerfs.writable.Unnamed` if no name reaches it."""
        record = self.record(ino)
        return self.table.path(record) or writable.Unnamed(record.node)

    def child_path(self, parent: int, name: bytes) -> str:
        base = self.path(parent)
        return ("/" if base == "/" else base + "/") + _name(name)

    def reply_entry(self, req, parent, name: str, node) -> None:
        """Give the kernel *node* as *name* in *parent* (a record), counted;
        the last step of a request."""
        record = self.table.looked_up(parent, name, node)
        entry = self._entry_head(node.ino, 0) + PACKER.node(node) + self._entry_tail
        if _reply_entry_bytes(req, entry) != 0:
            self.table.unlooked(record)

    def created(self, req, parent: int, name: bytes) -> None:
        """Reply with the entry just made at *name* in *parent*."""
        record = self.record(parent)
        text = _name(name)
        self.reply_entry(req, record, text, record.node.children[text])

    # -- lifecycle ---------------------------------------------------------

    def _init(self, userdata, conn):
        info = conn.contents
        want = info.want
        # The kernel applies the caller's umask (creating requests run with
        # a umask of 0, see fusecore); no READDIRPLUS (see module doc).
        want &= ~(binding_module.CAP_DONT_MASK | binding_module.CAP_READDIRPLUS
                  | binding_module.CAP_READDIRPLUS_AUTO)
        info.want = want
        if self.on_ready is not None:
            self.on_ready()

    # -- names -------------------------------------------------------------

    def _lookup(self, req, parent, name):
        record = self.record(parent)
        children = record.node.children
        if children is None:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        if len(name) > NAME_MAX:
            # The kernel allows FUSE names of up to 1024 bytes.
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        text = _name(name)
        child = children.get(text)
        if child is not None and child.children is not None \
                and self.table.get(child.ino) is None:
            # A directory's first record must name where it is: found again
            # under the lock renames hold, so none moves it meanwhile.
            with self.upper.lock:
                child = children.get(text)
                if child is not None:
                    self.reply_entry(req, record, text, child)
                    return
        if child is None:
            # ino 0: a negative entry the kernel may keep for its timeout.
            param = fuse_entry_param(ino=0, entry_timeout=self.negative_timeout)
            _reply_entry(req, ctypes.byref(param))
            return
        self.reply_entry(req, record, text, child)

    # (If the table fails, the guard answers: FORGET is answered "none".)
    def _forget(self, req, ino, nlookup):
        self.table.forget(ino, nlookup)
        _reply_none(req)

    def _forget_multi(self, req, count, forgets):
        pairs = ctypes.cast(forgets, POINTER(ctypes.c_uint64))   # fuse_forget_data[count]
        for index in range(count):
            self.table.forget(pairs[2 * index], pairs[2 * index + 1])
        _reply_none(req)

    def _mknod(self, req, parent, name, mode, rdev):
        _caller_of(req)
        with self.upper.lock:
            self.operations.mknod(self.child_path(parent, name), mode, rdev)
            self.created(req, parent, name)

    def _mkdir(self, req, parent, name, mode):
        _caller_of(req)
        with self.upper.lock:
            self.operations.mkdir(self.child_path(parent, name), mode)
            self.created(req, parent, name)

    def _symlink(self, req, target, parent, name):
        _caller_of(req)
        with self.upper.lock:
            self.operations.symlink(self.child_path(parent, name), _name(target))
            self.created(req, parent, name)

    def _link(self, req, ino, parent, name):
        with self.upper.lock:
            self.operations.link(self.child_path(parent, name), self.path(ino))
            self.created(req, parent, name)

    def _unlink(self, req, parent, name):
        with self.upper.lock:
            self.operations.unlink(self.child_path(parent, name))
        _reply_err(req, 0)

    def _rmdir(self, req, parent, name):
        with self.upper.lock:
            self.operations.rmdir(self.child_path(parent, name))
        _reply_err(req, 0)

    def _rename(self, req, parent, name, new_parent, new_name, flags):
        if flags & ~RENAME_NOREPLACE:
            # RENAME_EXCHANGE (and RENAME_WHITEOUT): not supported.
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        with self.upper.lock:
            source = self.child_path(parent, name)
            destination = self.child_path(new_parent, new_name)
            if flags & RENAME_NOREPLACE and self.fs.lexists(destination):
                raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
            self.operations.rename(source, destination)
            self.renamed(source, destination, new_parent, new_name)
        _reply_err(req, 0)

    def renamed(self, source: str, destination: str, new_parent: int, new_name: bytes) -> None:
        """The inode table follows a rename just done (under the upper's lock)."""
        moved = self.node(new_parent).children.get(_name(new_name))
        if moved is not None:
            self.table.moved(moved, self.record(new_parent), _name(new_name))

    # -- attributes --------------------------------------------------------

    def _getattr(self, req, ino, fi):
        handle = self.handles.get(fi.contents.fh) if fi else None
        node = handle.node if handle is not None else self.node(ino)
        _reply_attr_bytes(req, PACKER.node(node), self.timeout)

    def _setattr(self, req, ino, attr, to_set, fi):
        # libfuse's high-level order: mode, owner, size, times.
        handle = self.handles.get(fi.contents.fh) if fi else None
        wanted = attr.contents
        operations = self.operations
        times = to_set & (SET_ATIME | SET_MTIME | SET_ATIME_NOW | SET_MTIME_NOW)
        with self.upper.lock:
            record = self.record(ino)
            node = record.node
            # An inode no name reaches (fchmod of an unlinked open file)
            # is changed as itself.
            path = self.table.path(record) or writable.Unnamed(node)
            self.set_mode_and_owner(path, wanted, to_set)
            if to_set & SET_SIZE:
                if handle is None and isinstance(path, writable.Unnamed):
                    handle = writable.open_unnamed(self.fs, node, os.O_WRONLY)
                    try:
                        handle.truncate(wanted.st_size)
                    finally:
                        handle.close()
                        handle = None
                elif handle is not None:
                    handle.truncate(wanted.st_size)
                else:
                    operations.truncate(path, wanted.st_size)
            if times:
                self.fs.utime(path, ns=self.wanted_times(wanted, to_set, node.stat),
                              follow_symlinks=False)
            node = handle.node if handle is not None else self.node(ino)
            result = c_stat.from_buffer_copy(PACKER.node(node))
        _reply_attr(req, ctypes.byref(result), self.timeout)

    def set_mode_and_owner(self, path, wanted, to_set: int) -> None:
        """A SETATTR's mode, then owner (libfuse's high-level order)."""
        if to_set & SET_MODE:
            self.operations.chmod(path, wanted.st_mode & 0o7777)
        if to_set & (SET_UID | SET_GID):
            self.operations.chown(path, wanted.st_uid if to_set & SET_UID else -1,
                                  wanted.st_gid if to_set & SET_GID else -1)

    def wanted_times(self, wanted, to_set: int, current: Callable) -> tuple:
        """A SETATTR's (atime, mtime) in ns, *current()* giving the stat of
        what it leaves alone."""
        return resolve_times(
            (self._time(to_set, SET_ATIME, SET_ATIME_NOW, wanted.st_atimespec),
             self._time(to_set, SET_MTIME, SET_MTIME_NOW, wanted.st_mtimespec)),
            current)

    @staticmethod
    def _time(to_set: int, given: int, now: int, spec) -> int:
        if to_set & now:
            return UTIME_NOW
        if to_set & given:
            return spec.tv_sec * 1_000_000_000 + spec.tv_nsec
        return UTIME_OMIT

    def _setxattr(self, req, ino, name, value, size, flags):
        data = ctypes.string_at(value, size) if size else b""
        with self.upper.lock:
            self.operations.setxattr(self.target(ino), _name(name), data, flags)
        _reply_err(req, 0)

    def _removexattr(self, req, ino, name):
        with self.upper.lock:
            self.operations.removexattr(self.target(ino), _name(name))
        _reply_err(req, 0)

    # -- files -------------------------------------------------------------

    def _open(self, req, ino, fi):
        info = fi.contents
        with self.upper.lock:
            record = self.record(ino)
            path = self.table.path(record)
            if path is not None:
                self.operations.open(path, info)
            else:
                # No name reaches it (a process reopens an unlinked file
                # through /proc/PID/fd): the node itself.
                handle = writable.open_unnamed(self.fs, record.node, info.flags)
                info.fh = self.operations._add_handle(handle)
                info.keep_cache = handle.node.nlink <= 1
        if _reply_open(req, fi) != 0:
            self.operations.release(None, info)

    def _create(self, req, parent, name, mode, fi):
        info = fi.contents
        _caller_of(req)
        with self.upper.lock:
            self.operations.create(self.child_path(parent, name), mode, info)
            node = self.handles[info.fh].node
            record = self.table.looked_up(self.record(parent), _name(name), node)
        param = self.entry_param(node)
        if _reply_create(req, ctypes.byref(param), fi) != 0:
            self.table.unlooked(record)
            self.operations.release(None, info)

    def _read(self, req, ino, size, offset, fi):
        handle = self.operations.handle(fi.contents)
        if not handle.readable:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        node = handle.node
        if node.children is not None:
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        extent = (handle.fd, offset, size) if handle.fd is not None else \
            lower_extent(self.fs, node, offset, size)
        if extent is not None:
            reply_extent(req, extent)
            return
        data = handle.pread(size, offset)
        _reply_buf(req, data, len(data))

    def _write(self, req, ino, buf, size, offset, fi):
        handle = self.operations.handle(fi.contents)
        count = handle.pwrite(ctypes.string_at(buf, size), offset)
        _reply_write(req, count)

    def _fsync(self, req, ino, datasync, fi):
        self.operations.handle(fi.contents).fsync(bool(datasync))
        _reply_err(req, 0)

    def _fallocate(self, req, ino, mode, offset, length, fi):
        self.operations.handle(fi.contents).allocate(mode, offset, length)
        _reply_err(req, 0)

    def _release(self, req, ino, fi):
        self.operations.release(None, fi.contents)
        _reply_err(req, 0)

    # -- directories -------------------------------------------------------

    def _opendir(self, req, ino, fi):
        if not self.is_directory(ino):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        fh = next(self._next_listing)
        self.listings[fh] = [None]
        fi.contents.fh = fh
        if _reply_open(req, fi) != 0:
            self.listings.pop(fh, None)

    def is_directory(self, ino: int) -> bool:
        return self.node(ino).children is not None

    def _releasedir(self, req, ino, fi):
        self.listings.pop(fi.contents.fh, None)
        _reply_err(req, 0)

    def _fsyncdir(self, req, ino, datasync, fi):
        self.fs.sync()
        _reply_err(req, 0)

    def _readdir(self, req, ino, size, offset, fi):
        """Entries from *offset* on ("." and ".." are 0 and 1, then the
        children as the directory held them at offset 0), as many as fit
        in *size* bytes."""
        listing = self.listings.get(fi.contents.fh)
        if listing is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        if offset == 0 or listing[0] is None:
            listing[0] = self.packed_listing(ino)
        entries = listing[0]
        chosen = []
        used = 0
        for entry in itertools.islice(entries, offset, None):
            if used + len(entry) > size:
                break
            chosen.append(entry)
            used += len(entry)
        data = b"".join(chosen)
        _reply_buf(req, data, used)

    def packed_listing(self, ino: int) -> list:
        """The entries of directory *ino* as READDIR gives them."""
        return _packed_listing(ino, self.node(ino).children)

    _readdirplus = None


# A listing as the kernel reads it (fuse_kernel.h's struct fuse_dirent, what
# libfuse's fuse_add_direntry writes): inode, offset of the next entry, name
# length, type, then the name, padded to 8 bytes.  Packed here, once per
# listing, instead of one ctypes call per entry (measured: 138 us a READDIR
# of a 25-entry directory that way).
_DIRENT = struct.Struct("=QQII")


def _dirent(ino: int, next_offset: int, mode: int, name: bytes) -> bytes:
    entry = _DIRENT.pack(ino, next_offset, len(name), (mode & 0o170000) >> 12) + name
    return entry + b"\0" * (-len(entry) % 8)


def _packed_listing(ino: int, children) -> list:
    entries = [_dirent(ino, 1, 0o040000, b"."), _dirent(UNKNOWN_INO, 2, 0o040000, b"..")]
    for index, (name, child) in enumerate(list(children.items()), 3):
        entries.append(_dirent(child.ino, index, child.mode, _name_bytes(name)))
    return entries


def _name_bytes(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")
