"""What a FUSE request means for a layerfs filesystem, whatever the binding.

Everything here is independent of libfuse and of the Python binding that
reaches it (:mod:`layerfs.fuse` is the small binding-specific part): the
errno of a failure (:func:`errno_of`, the one place errors are mapped), the
``struct stat`` bytes of an inode, times as libfuse passes them, the table
of open handles, the packed directory listings, and :class:`Operations`,
which turns each request into one call on a :class:`layerfs.fs.FileSystem`.
It decides nothing the facade does not.

Importing this module loads no libfuse: the tests call it directly.

Locking: the lower view is immutable, so reads need no lock; a writable
filesystem serialises its own changes.  The shared state here is the table
of open handles, whose single dict operations are atomic, and the listings
kept per tree version.

Who creates: every request that creates an entry (create, mkdir, mknod,
symlink) runs inside :func:`layerfs.caller.acting_as` with the ids of the
process that asked (from the request context) and a umask of 0: the kernel
has already applied that process's umask to the mode (the binding makes
sure it does, see :mod:`layerfs.fuse`).
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import struct
import threading
import time
from collections import OrderedDict
from typing import Callable, Optional

from .caller import Caller, acting_as

log = logging.getLogger("layerfs.fuse")

# libfuse passes "leave this time alone" and "set it to now" as timespecs of
# 0 s and these nanoseconds, which the bindings fold into nanosecond counts.
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

# The kernel hands POSIX ACLs of a FUSE mount to the filesystem as these
# xattrs, and applies nothing itself.  Stored as plain xattrs they would
# claim success while the mode bits stayed unchanged: ``cp -a`` and ``tar``
# set a file's permissions with one of them and then skip chmod.  Refused
# with ENOTSUP, callers fall back to chmod, as on a filesystem without ACLs.
ACL_XATTRS = frozenset({"system.posix_acl_access", "system.posix_acl_default"})

# What a union view reports for every inode (see layerfs.union).
BLOCK_SIZE = 4096
_NS = 1_000_000_000


def errno_of(error: BaseException, op: str, args: tuple) -> int:
    """The errno a failed request answers: an ``OSError``'s own; anything
    else (or an ``OSError`` without errno) is a bug, logged with its
    traceback, and answers ``EIO``."""
    if isinstance(error, OSError) and error.errno and error.errno > 0:
        return error.errno
    log.error("FUSE %s%r failed", op, args, exc_info=error)
    return errno.EIO


def refuse_acl(name: str) -> None:
    if name in ACL_XATTRS:
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))


def stat_to_attrs(st: os.stat_result) -> dict:
    """An ``os.stat_result`` as the bindings' attribute dict (times in ns;
    ``st_blocks`` in 512-byte units)."""
    return {
        "st_mode": st.st_mode, "st_ino": st.st_ino, "st_nlink": st.st_nlink,
        "st_uid": st.st_uid, "st_gid": st.st_gid, "st_size": st.st_size,
        "st_rdev": st.st_rdev, "st_blksize": st.st_blksize, "st_blocks": st.st_blocks,
        "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns,
    }


def statvfs_to_attrs(sv: os.statvfs_result) -> dict:
    return {key: getattr(sv, key) for key in (
        "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
        "f_files", "f_ffree", "f_favail", "f_flag", "f_namemax")}


def resolve_times(times: Optional[tuple], current: Callable[[], os.stat_result]) -> tuple:
    """``(atime_ns, mtime_ns)`` to set, from what libfuse passed (None: both
    now; either may be UTIME_NOW or UTIME_OMIT).  *current* gives the
    entry's stat, asked only when a time is to be left alone."""
    now = time.time_ns()
    atime, mtime = times if times is not None else (now, now)
    if UTIME_OMIT in (atime, mtime):
        st = current()
        atime = st.st_atime_ns if atime == UTIME_OMIT else atime
        mtime = st.st_mtime_ns if mtime == UTIME_OMIT else mtime
    atime = now if atime == UTIME_NOW else atime
    mtime = now if mtime == UTIME_NOW else mtime
    return atime, mtime


# -- struct stat, packed -------------------------------------------------

class StatPacker:
    """Inodes as the bytes of the platform's ``struct stat``, in one
    ``struct.pack`` (a ctypes struct filled field by field costs several
    times the lookup itself).

    Built from the binding's ctypes ``struct stat`` class (fields named as
    in C, times as ``st_atimespec``... ``timespec`` structs at the end), so
    the layout is the one the binding hands to libfuse.  Packs straight
    from a view's node (:meth:`node`): no ``os.stat_result`` is built or
    kept for a request.
    """

    TIMES = {"st_atimespec": "atime_ns", "st_mtimespec": "mtime_ns",
             "st_ctimespec": "ctime_ns"}
    # What each field is, from a view's node and from an os.stat_result.
    FIELDS = {"st_ino": ("n.ino", "s.st_ino"), "st_nlink": ("n.nlink", "s.st_nlink"),
              "st_mode": ("n.mode", "s.st_mode"), "st_uid": ("n.uid", "s.st_uid"),
              "st_gid": ("n.gid", "s.st_gid"), "st_rdev": ("n.rdev", "s.st_rdev"),
              "st_size": ("n.size", "s.st_size"),
              "st_blksize": (str(BLOCK_SIZE), "s.st_blksize"),
              "st_blocks": ("(n.size + 511) // 512", "s.st_blocks")}

    def __init__(self, c_stat):
        import ctypes
        fields = sorted(((getattr(c_stat, name).offset, name, kind)
                         for name, kind, *_ in c_stat._fields_), key=lambda f: f[0])
        if not set(self.TIMES) <= {name for _, name, _ in fields}:
            raise ImportError("layerfs.fusecore: struct stat without timespecs")
        pack, position = "=", 0
        from_node, from_stat = [], []
        for offset, name, kind in fields:
            pack += "x" * (offset - position)
            size = ctypes.sizeof(kind)
            position = offset + size
            if name in self.TIMES:
                if size != 16:
                    raise ImportError("layerfs.fusecore: unexpected struct timespec")
                pack += "qq"
                field = self.TIMES[name]
                from_node += [f"n.{field} // NS", f"n.{field} % NS"]
                from_stat += [f"s.st_{field} // NS", f"s.st_{field} % NS"]
            elif name in self.FIELDS:
                # st_dev is the kernel's business; pads and spares are zero.
                code = {1: "b", 2: "h", 4: "i", 8: "q"}[size]
                pack += code if kind._type_.islower() else code.upper()
                from_node.append(self.FIELDS[name][0])
                from_stat.append(self.FIELDS[name][1])
            else:
                pack += "x" * size
        pack += "x" * (ctypes.sizeof(c_stat) - position)
        self.layout = struct.Struct(pack)
        if self.layout.size != ctypes.sizeof(c_stat):
            raise ImportError("layerfs.fusecore: cannot lay out struct stat")
        self.size = self.layout.size
        # The fields in the layout's order, as code: one call, no loop.
        scope = {"pack": self.layout.pack, "NS": _NS}
        self.node: Callable = eval(  # noqa: S307 (built above from known names)
            f"lambda n: pack({', '.join(from_node)})", scope)
        self.stat: Callable = eval(  # noqa: S307
            f"lambda s: pack({', '.join(from_stat)})", scope)


def lower_extent(fs, node, offset: int, length: int) -> Optional[tuple]:
    """``(fd, position, length)`` of a regular file's bytes still in a lower
    layer (see :meth:`layerfs.layer.Layer.extent`), or None where they are
    elsewhere (the upper layer, a sparse file's holes, no data at all)."""
    source = node.source
    if source is None or source < 0:
        return None
    return fs.layers[source].extent(node.data, node.size, offset, length)


# -- directory listings --------------------------------------------------

class Listings:
    """Directory listings, kept while the tree's version holds.

    A listing is the entries' names (bytes, as the kernel gets them) and
    their nodes (references to the view's own inodes: a ``struct stat`` is
    packed from one when the listing is sent, so nothing per entry is kept
    twice).  Every change of a name (create, unlink, rename, copy-up of a
    directory) gives the tree a new version, and then all are dropped; a
    chmod or a write changes no name, and the stats are packed afresh at
    each listing.  At most *limit* directories are kept (least recently
    listed dropped first): about 60 bytes an entry.
    """

    def __init__(self, fs, limit: int = 4096):
        self._fs = fs
        self._limit = limit
        self._kept: OrderedDict = OrderedDict()
        self._version = None
        self._lock = threading.Lock()

    def get(self, path: str) -> tuple:
        """``(names, nodes)`` of the directory *path*: tuples of the names
        as bytes and of the view's nodes, in the same order."""
        version = self._fs.tree.version
        with self._lock:
            if version != self._version:
                self._kept.clear()
                self._version = version
            listing = self._kept.get(path)
            if listing is not None:
                self._kept.move_to_end(path)
                return listing
        names, nodes = [], []
        for entry in self._fs.scandir(path):
            names.append(entry.name.encode("utf-8", "surrogateescape"))
            nodes.append(entry._node)
        listing = (tuple(names), tuple(nodes))
        with self._lock:
            # Only if no change came meanwhile (a writable mount's threads).
            if self._fs.tree.version == version == self._version:
                self._kept[path] = listing
                if len(self._kept) > self._limit:
                    self._kept.popitem(last=False)
        return listing


# -- the operations ------------------------------------------------------

class Operations:
    """FUSE requests over a layerfs filesystem, in the shape fusepy and
    mfusepy share (paths as ``str``, handles in ``fi.fh`` with ``raw_fi``).

    Each method raises ``OSError`` with the errno to answer; the binding
    maps it (and anything unexpected, through :func:`errno_of`) at its
    boundary.  *on_ready* is called once the kernel's ``INIT`` has arrived;
    *context* gives ``(uid, gid, pid)`` of the request being served.

    A read-only filesystem answers ``open`` with ENOSYS: the kernel then
    stops sending OPEN and RELEASE for regular files and keeps their pages,
    and reads arrive without a handle, answered by path (see the binding).
    """

    use_ns = True
    # Undefined, libfuse answers these itself without a call into Python.
    opendir = None
    releasedir = None
    # Every close() sends a FLUSH.  Handle.flush has nothing to do (writes
    # go straight to the host file): undefined, the first FLUSH answers
    # ENOSYS and the kernel sends no more, a round trip saved per close.
    flush = None

    def __init__(self, fs, on_ready: Optional[Callable[[], None]] = None,
                 context: Optional[Callable[[], tuple]] = None):
        self.fs = fs
        self.readonly = fs.readonly
        self._on_ready = on_ready
        self._context = context or (lambda: (os.geteuid(), os.getegid(), os.getpid()))
        self.handles: dict = {}
        self._next_handle = itertools.count(1)
        self._closed = False
        self._close_lock = threading.Lock()

    def call(self, op: str, *args):
        """Run request *op*; a failure as ``OSError`` with the errno to
        answer (what a binding's boundary does, for tests and fallbacks)."""
        try:
            return getattr(self, op)(*args)
        except Exception as error:
            code = errno_of(error, op, args)
            raise OSError(code, os.strerror(code)) from error

    # -- lifecycle ------------------------------------------------------

    def init(self, path):
        if self._on_ready is not None:
            self._on_ready()

    def destroy(self, path):
        self.shutdown()

    def shutdown(self) -> None:
        """Flush and close the filesystem, once, whoever asks first
        (``destroy``, or the mount code when the loop returns)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        for fh in list(self.handles):
            handle = self.handles.pop(fh, None)
            if handle is not None:
                handle.close()
        if not self.readonly:
            self.fs.sync()
        self.fs.close()

    def acting_caller(self):
        """The context in which a creating request runs (see module doc)."""
        uid, gid, _pid = self._context()
        return acting_as(Caller(uid, gid, umask=0))

    # -- metadata -------------------------------------------------------

    def getattr(self, path, fi=None):
        if fi and fi.fh in self.handles:
            return stat_to_attrs(self.handles[fi.fh].fstat())
        return stat_to_attrs(self.fs.lstat(path))

    def readlink(self, path):
        return self.fs.readlink(path)

    def readdir(self, path, fh):
        yield ".", None, 0
        yield "..", None, 0
        for entry in self.fs.scandir(path):
            st = entry.stat(follow_symlinks=False)
            yield entry.name, {"st_mode": st.st_mode, "st_ino": st.st_ino}, 0

    def statfs(self, path):
        return statvfs_to_attrs(self.fs.statvfs())

    # -- extended attributes --------------------------------------------
    # An undefined xattr operation would answer ENOSYS, after which the
    # kernel never asks again; so all four exist and refuse with ENOTSUP.

    def listxattr(self, path):
        names = self.fs.listxattr(path, follow_symlinks=False)
        kind = stat.S_IFMT(self.fs.lstat(path).st_mode) if names else stat.S_IFREG
        if kind not in (stat.S_IFREG, stat.S_IFDIR):
            # The kernel answers ENODATA to any read of a user.* xattr of a
            # symlink, fifo or device, so listing one would promise what
            # cannot be read (an image may carry them: OCI does not forbid it).
            names = [name for name in names if not name.startswith("user.")]
        return names

    def getxattr(self, path, name, *position):
        return self.fs.getxattr(path, name, follow_symlinks=False)

    def setxattr(self, path, name, value, options, *position):
        refuse_acl(name)
        self.fs.setxattr(path, name, value, options, follow_symlinks=False)

    def removexattr(self, path, name):
        refuse_acl(name)
        self.fs.removexattr(path, name, follow_symlinks=False)

    # -- open files -----------------------------------------------------

    # keep_cache: without it the kernel drops a file's cached pages at every
    # open.  Writes to a FUSE file put their data in the page cache before
    # the daemon has it; a drop in between, then a read, caches the old
    # (shorter) content padded with zeros, which readers then see once the
    # write lands (concurrent O_APPEND writers and readers did).  Every
    # change goes through this kernel, so what it caches for an inode stays
    # true.  A file with several names is the exception kept from libfuse 2
    # (each name had its own kernel inode there); with use_ino on libfuse 3
    # they share one, but dropping their pages at open costs little.
    def open(self, path, fi):
        if self.readonly:
            # The kernel remembers this (no_open) for the mount's lifetime.
            raise OSError(errno.ENOSYS, "open is not needed on a read-only mount")
        handle = self.fs.open_handle(path, fi.flags)
        fi.fh = self._add_handle(handle)
        fi.keep_cache = handle.node.nlink <= 1
        return 0

    def create(self, path, mode, fi):
        with self.acting_caller():
            handle = self.fs.open_handle(path, fi.flags | os.O_CREAT, mode)
        fi.fh = self._add_handle(handle)
        fi.keep_cache = handle.node.nlink <= 1
        return 0

    def _add_handle(self, handle) -> int:
        fh = next(self._next_handle)
        self.handles[fh] = handle
        return fh

    def handle(self, fi):
        try:
            return self.handles[fi.fh]
        except KeyError:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF)) from None

    # Not called when the binding answers read_buf itself (layerfs.fuse);
    # defined so that the binding registers reads at all.
    read_buf = True

    def read(self, path, size, offset, fi):
        if self.readonly and fi.fh not in self.handles:
            return self.fs.read_node(self.fs.node(path, False), offset, size)
        return self.handle(fi).pread(size, offset)

    def write(self, path, data, offset, fi):
        return self.handle(fi).pwrite(data, offset)

    def truncate(self, path, length, fi=None):
        if fi and fi.fh in self.handles:
            self.handles[fi.fh].truncate(length)
        else:
            self.fs.truncate(path, length)

    def fsync(self, path, datasync, fi):
        self.handle(fi).fsync(bool(datasync))

    def fallocate(self, path, mode, offset, length, fi):
        # The kernel passes KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE only; it has
        # checked that the file is open for writing.
        self.handle(fi).allocate(mode, offset, length)

    def release(self, path, fi):
        handle = self.handles.pop(fi.fh, None)
        if handle is not None:
            handle.close()

    def fsyncdir(self, path, datasync, fh):
        if not self.readonly:
            self.fs.sync()

    # -- namespace changes ----------------------------------------------

    def mkdir(self, path, mode):
        with self.acting_caller():
            self.fs.mkdir(path, mode)

    def rmdir(self, path):
        self.fs.rmdir(path)

    def unlink(self, path):
        self.fs.unlink(path)

    def rename(self, old, new):
        self.fs.rename(old, new)

    def symlink(self, target, source):
        # The bindings' order: *target* is the new link's path, *source* its content.
        with self.acting_caller():
            self.fs.symlink(source, target)

    def link(self, target, source):
        # The bindings' order: *target* is the new name, *source* the existing file.
        self.fs.link(source, target)

    def mknod(self, path, mode, dev):
        with self.acting_caller():
            self.fs.mknod(path, mode, dev)

    def chmod(self, path, mode):
        self.fs.chmod(path, mode, follow_symlinks=False)

    def chown(self, path, uid, gid):
        self.fs.chown(path, uid, gid, follow_symlinks=False)

    def utimens(self, path, times=None):
        atime, mtime = resolve_times(times, lambda: self.fs.lstat(path))
        self.fs.utime(path, ns=(atime, mtime), follow_symlinks=False)
