"""The FUSE adapter: kernel requests in, facade calls out.  It decides nothing.

Every request is translated into one call on a :class:`layerfs.fs.FileSystem`
and every answer back into what fusepy expects.  This is the only module that
produces errno values for the kernel, in one place (:func:`errno_of`, used by
:meth:`Operations.__call__` and by the fast paths of :class:`FUSE`): an
``OSError`` answers with its own errno, anything else is a bug, logged with
its traceback on the ``layerfs.fuse`` logger and answered with ``EIO``
(fusepy itself would answer ``EINVAL`` or ``EFAULT``, which mislead).

Importing this module imports fusepy, which loads libfuse: only
:mod:`layerfs.mount` imports it, and only when mounting.

Locking: the lower view is immutable, so reads need no lock; a writable
filesystem serialises its own changes.  The adapter's shared state is the
table of open handles, whose single dict operations are atomic, and the
directory listings :class:`FUSE` keeps per tree version.

Names: the view keeps non-UTF-8 bytes of names as surrogate escapes
(:mod:`layerfs.paths`), so paths cross the FUSE boundary through a codec
that is UTF-8 with ``surrogateescape`` (:data:`PATH_ENCODING`).
"""

from __future__ import annotations

import array
import codecs
import ctypes
import errno
import itertools
import logging
import operator
import os
import stat
import struct
import threading
import time
from typing import Callable, Optional

import fuse as fusepy

from . import caller

log = logging.getLogger("layerfs.fuse")

PATH_ENCODING = "layerfs_surrogateescape"


def _find_codec(name: str) -> Optional[codecs.CodecInfo]:
    if name != PATH_ENCODING:
        return None
    # Straight to the C codec functions: fusepy decodes every path of every
    # request with this codec.
    encode, decode = codecs.utf_8_encode, codecs.utf_8_decode
    return codecs.CodecInfo(
        name=PATH_ENCODING,
        encode=lambda text, errors=None: encode(text, "surrogateescape"),
        decode=lambda data, errors=None: decode(data, "surrogateescape", True))


codecs.register(_find_codec)

def stat_to_attrs(st: os.stat_result) -> dict:
    """An ``os.stat_result`` as fusepy's attribute dict (times in ns,
    since the operations declare ``use_ns``; ``st_blocks`` in 512-byte units)."""
    return {
        "st_mode": st.st_mode, "st_ino": st.st_ino, "st_nlink": st.st_nlink,
        "st_uid": st.st_uid, "st_gid": st.st_gid, "st_size": st.st_size,
        "st_rdev": st.st_rdev, "st_blksize": st.st_blksize, "st_blocks": st.st_blocks,
        "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns,
    }


# libfuse passes "leave this time alone" and "set it to now" as timespecs of
# 0 s and these nanoseconds, which fusepy folds into nanosecond counts.
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

# The kernel hands POSIX ACLs of a FUSE mount to the filesystem as these
# xattrs, and applies nothing itself.  Stored as plain xattrs they would
# claim success while the mode bits stayed unchanged: ``cp -a`` and ``tar``
# set a file's permissions with one of them and then skip chmod.  Refused
# with ENOTSUP, callers fall back to chmod, as on a filesystem without ACLs.
ACL_XATTRS = frozenset({"system.posix_acl_access", "system.posix_acl_default"})


def refuse_acl(name: str) -> None:
    if name in ACL_XATTRS:
        raise fusepy.FuseOSError(errno.ENOTSUP)


def statvfs_to_attrs(sv: os.statvfs_result) -> dict:
    return {key: getattr(sv, key) for key in (
        "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
        "f_files", "f_ffree", "f_favail", "f_flag", "f_namemax")}


def as_requester():
    """Run a creating request on behalf of the process that sent it: its
    ids from the request context, and a umask of 0, since the kernel has
    already applied that process's umask to the mode."""
    uid, gid, _ = fusepy.fuse_get_context()
    return caller.acting_as(caller.Caller(uid, gid, umask=0))


def errno_of(error: Exception, op: str, args: tuple) -> int:
    """The errno a failed request answers: an ``OSError``'s own; anything
    else (or an ``OSError`` without errno) is a bug, logged with its
    traceback, and answers ``EIO``."""
    if isinstance(error, OSError) and error.errno:
        return error.errno
    log.error("FUSE %s%r failed", op, args, exc_info=error)
    return errno.EIO


class Operations(fusepy.Operations):
    """fusepy operations over a layerfs filesystem.

    Mount with ``raw_fi=True`` (``create`` needs the open flags),
    ``use_ino=True`` and ``encoding=PATH_ENCODING``.  *on_ready* is called
    once the kernel has sent ``INIT``, that is once the mount is usable.

    Served by :class:`FUSE` (as ``layerfs mount`` does), ``getattr``,
    ``readdir`` and ``read`` here are not called: that class answers them
    itself.  They stay, because fusepy registers a request with libfuse only
    if the operations define it, and they are what plain ``fusepy.FUSE``
    calls (the tests compare the two).
    """

    use_ns = True
    # fusepy copies this attribute into libfuse's operations struct.
    # Without it, libfuse 2 silently drops a request that sets only one of
    # atime/mtime (``touch -m``, ``tar -x``); with it, the other arrives as
    # UTIME_OMIT (see utimens).
    flag_utime_omit_ok = 1
    # fusepy's defaults answer 0 and keep nothing; undefined, libfuse answers
    # the same without a call into Python for every directory listed.
    opendir = None
    releasedir = None
    # Every close() sends a FLUSH.  Handle.flush has nothing to do (writes
    # go straight to the host file): undefined, the first FLUSH answers
    # ENOSYS and the kernel sends no more, a round trip saved per close.
    flush = None

    def __init__(self, fs, on_ready: Optional[Callable[[], None]] = None):
        self.fs = fs
        self.readonly = fs.readonly
        self._on_ready = on_ready
        self._handles: dict = {}
        self._next_handle = itertools.count(1)
        self._closed = False
        self._close_lock = threading.Lock()

    # -- the error boundary ---------------------------------------------

    def __call__(self, op: str, *args):
        try:
            return getattr(self, op)(*args)
        except fusepy.FuseOSError:
            raise
        except Exception as error:
            raise fusepy.FuseOSError(errno_of(error, op, args)) from error

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
        for fh in list(self._handles):
            handle = self._handles.pop(fh, None)
            if handle is not None:
                handle.close()
        if not self.readonly:
            self.fs.sync()
        self.fs.close()

    # -- metadata -------------------------------------------------------

    def getattr(self, path, fi=None):
        # Without an open file fusepy passes a NULL pointer, which is false.
        if fi and fi.fh in self._handles:
            return stat_to_attrs(self._handles[fi.fh].fstat())
        return stat_to_attrs(self.fs.lstat(path))

    def readlink(self, path):
        return self.fs.readlink(path)

    def readdir(self, path, fh):
        yield ".", None, 0
        yield "..", None, 0
        for entry in self.fs.scandir(path):
            st = entry.stat(follow_symlinks=False)
            # The type bits give readdir's d_type; the inode its d_ino.
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
    # change goes through this kernel, so what it caches for a name stays
    # true, except for a file with several names: libfuse 2 gives each name
    # its own kernel inode and page cache, and a write through one name
    # leaves the others' pages as they were.  Those pages are dropped at
    # the next open, as before.
    def open(self, path, fi):
        handle = self.fs.open_handle(path, fi.flags)
        fi.fh = self._add_handle(handle)
        fi.keep_cache = handle.node.nlink <= 1
        return 0

    def create(self, path, mode, fi):
        with as_requester():
            handle = self.fs.open_handle(path, fi.flags | os.O_CREAT, mode)
        fi.fh = self._add_handle(handle)
        fi.keep_cache = handle.node.nlink <= 1
        return 0

    def _add_handle(self, handle) -> int:
        fh = next(self._next_handle)
        self._handles[fh] = handle
        return fh

    def _handle(self, fi):
        try:
            return self._handles[fi.fh]
        except KeyError:
            raise fusepy.FuseOSError(errno.EBADF) from None

    def read(self, path, size, offset, fi):
        return self._handle(fi).pread(size, offset)

    def write(self, path, data, offset, fi):
        return self._handle(fi).pwrite(data, offset)

    def truncate(self, path, length, fi=None):
        if fi and fi.fh in self._handles:
            self._handles[fi.fh].truncate(length)
        else:
            self.fs.truncate(path, length)

    def fsync(self, path, datasync, fi):
        self._handle(fi).fsync(bool(datasync))

    def release(self, path, fi):
        handle = self._handles.pop(fi.fh, None)
        if handle is not None:
            handle.close()

    def fsyncdir(self, path, datasync, fh):
        if not self.readonly:
            self.fs.sync()

    # -- namespace changes ----------------------------------------------

    def mkdir(self, path, mode):
        with as_requester():
            self.fs.mkdir(path, mode)

    def rmdir(self, path):
        self.fs.rmdir(path)

    def unlink(self, path):
        self.fs.unlink(path)

    def rename(self, old, new):
        self.fs.rename(old, new)

    def symlink(self, target, source):
        # fusepy's order: *target* is the new link's path, *source* its content.
        with as_requester():
            self.fs.symlink(source, target)

    def link(self, target, source):
        # fusepy's order: *target* is the new name, *source* the existing file.
        self.fs.link(source, target)

    def mknod(self, path, mode, dev):
        with as_requester():
            self.fs.mknod(path, mode, dev)

    def chmod(self, path, mode):
        self.fs.chmod(path, mode, follow_symlinks=False)

    def chown(self, path, uid, gid):
        self.fs.chown(path, uid, gid, follow_symlinks=False)

    def utimens(self, path, times=None):
        now = time.time_ns()
        atime, mtime = times if times is not None else (now, now)
        if UTIME_OMIT in (atime, mtime):
            st = self.fs.lstat(path)
            atime = st.st_atime_ns if atime == UTIME_OMIT else atime
            mtime = st.st_mtime_ns if mtime == UTIME_OMIT else mtime
        atime = now if atime == UTIME_NOW else atime
        mtime = now if mtime == UTIME_NOW else mtime
        self.fs.utime(path, ns=(atime, mtime), follow_symlinks=False)


# -- the hot requests, straight into libfuse's buffers ----------------------
#
# fusepy answers getattr by building a dict (our stat_to_attrs) and setting
# each field of a ctypes struct from it with hasattr/setattr, readdir by
# building such a struct per entry, and decodes every path through the codec
# machinery; that cost several times the lookup itself (see
# docs/benchmarks.md).  These requests are answered below without the dict:
# the stat is packed in one call into bytes laid out as fusepy's ``c_stat``
# (the platform's ``struct stat``) and copied into libfuse's buffer.

def _stat_layout() -> tuple[struct.Struct, Callable]:
    """The ``struct.Struct`` with ``c_stat``'s layout, and a function giving
    the values it packs from an ``os.stat_result``, in layout order."""
    times = ("st_atimespec", "st_mtimespec", "st_ctimespec")
    fields = sorted(((getattr(fusepy.c_stat, name).offset, name, kind)
                     for name, kind, *_ in fusepy.c_stat._fields_),
                    key=lambda field: field[0])
    if [name for _, name, _ in fields[-3:]] != list(times):
        raise ImportError("layerfs.fuse: unexpected struct stat layout in fusepy")
    pack = "="
    position = 0
    names = []
    for offset, name, kind in fields[:-3]:
        pack += "x" * (offset - position)
        size = ctypes.sizeof(kind)
        position = offset + size
        # st_dev is the kernel's business (fusepy never set it); pads are zero.
        if name.startswith("__") or name == "st_dev":
            pack += "x" * size
            continue
        code = {1: "b", 2: "h", 4: "i", 8: "q"}[size]
        pack += code if kind._type_.islower() else code.upper()
        names.append(name)
    for offset, name, kind in fields[-3:]:
        pack += "x" * (offset - position) + "qq"
        position = offset + ctypes.sizeof(kind)
    layout = struct.Struct(pack)
    if layout.size != position or ctypes.sizeof(fusepy.c_stat) < layout.size:
        raise ImportError("layerfs.fuse: cannot lay out struct stat")
    scalars = operator.attrgetter(*names)
    return layout, scalars


_STAT, _stat_scalars = _stat_layout()
_STAT_SIZE = _STAT.size
_NS = 1_000_000_000


def pack_stat(st: os.stat_result) -> bytes:
    """*st* as the bytes of a ``struct stat`` (times to the nanosecond,
    ``st_blocks`` in 512-byte units as ``os.stat_result`` has them)."""
    a, m, c = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
    return _STAT.pack(*_stat_scalars(st), a // _NS, a % _NS, m // _NS, m % _NS,
                      c // _NS, c % _NS)


def _decode(path: bytes) -> str:
    return path.decode("utf-8", "surrogateescape")


class FUSE(fusepy.FUSE):
    """fusepy's ``FUSE`` with ``getattr``, ``readdir`` and ``read`` answered
    from here, into libfuse's buffers; every other request goes through
    fusepy to :class:`Operations`.  Same translations, same errors.

    Takes the same arguments as ``fusepy.FUSE`` and, like it, serves until
    unmounted.  *operations* must be an :class:`Operations`.
    """

    def __init__(self, operations: Operations, mountpoint: str, **kwargs):
        self._fs = operations.fs
        self._handles = operations._handles
        self._listings: dict = {}
        self._listings_version = None
        super().__init__(operations, mountpoint, **kwargs)

    def _decode_optional_path(self, path):
        return None if path is None else path.decode("utf-8", "surrogateescape")

    def getattr(self, path, buf):
        try:
            ctypes.memmove(buf, pack_stat(self._fs.lstat(_decode(path))), _STAT_SIZE)
            return 0
        except Exception as error:
            return -errno_of(error, "getattr", (path,))

    def fgetattr(self, path, buf, fip):
        # Without an open file libfuse passes a NULL pointer, which is false.
        handle = self._handles.get(fip.contents.fh) if fip else None
        if handle is None:
            return self.getattr(path, buf)
        try:
            ctypes.memmove(buf, pack_stat(handle.fstat()), _STAT_SIZE)
            return 0
        except Exception as error:
            return -errno_of(error, "fgetattr", (path,))

    def readdir(self, path, buf, filler, offset, fip):
        # Offsets of 0: libfuse takes the whole listing at once and serves
        # the kernel's getdents from it.  Only the type bits (d_type) and the
        # inode number (d_ino) of each entry are read.
        try:
            names, modes, inodes = self._listing(path)
            entry_stat = fusepy.c_stat()
            filler(buf, b".", None, 0)
            filler(buf, b"..", None, 0)
            # An empty directory: b"" splits into one name, zip stops at once.
            for name, mode, ino in zip(names.split(b"/"), modes, inodes):
                entry_stat.st_mode = mode
                entry_stat.st_ino = ino
                if filler(buf, name, entry_stat, 0):
                    break
            return 0
        except Exception as error:
            return -errno_of(error, "readdir", (path,))

    def _listing(self, path: bytes) -> tuple:
        """The directory *path*'s entries: their names joined by "/" (the one
        byte no name holds), their modes and their inode numbers, packed
        (30-odd bytes an entry).

        The kernel caches no listing (libfuse 2), so every ``getdents``
        lands here.  Listings are kept while the tree's version stays the
        same: every change of a name (create, unlink, rename, copy-up of a
        directory) gives the tree a new version, and then all are dropped.
        A chmod or a write changes no name, type or inode.
        """
        version = self._fs.tree.version
        if version != self._listings_version:
            self._listings = {}
            self._listings_version = version
        listing = self._listings.get(path)
        if listing is None:
            names, modes, inodes = [], array.array("I"), array.array("Q")
            for entry in self._fs.scandir(_decode(path)):
                names.append(entry.name)
                modes.append(entry.stat(follow_symlinks=False).st_mode)
                inodes.append(entry.inode())
            listing = ("/".join(names).encode("utf-8", "surrogateescape"), modes, inodes)
            # Only if no change came meanwhile (a writable mount's threads).
            if self._fs.tree.version == version:
                self._listings[path] = listing
        return listing

    def read(self, path, buf, size, offset, fip):
        handle = self._handles.get(fip.contents.fh)
        if handle is None:
            return -errno.EBADF
        try:
            data = handle.pread(size, offset)
        except Exception as error:
            return -errno_of(error, "read", (path, size, offset))
        count = len(data)
        ctypes.memmove(buf, data, count)
        return count
