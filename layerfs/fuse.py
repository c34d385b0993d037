"""The libfuse 3 binding: mfusepy's high-level API, with the hot requests
answered straight into libfuse's buffers.  It translates; it decides nothing.

What a request means is :mod:`layerfs.fusecore`'s business; this module is
what depends on the binding (mfusepy, a maintained ctypes binding of
libfuse's high-level API) and on libfuse 3's behaviour:

- libfuse 3 is chosen explicitly: mfusepy loads libfuse 2 first when both
  are installed, unless told otherwise before it is imported
  (:func:`load_binding`).
- ``getattr``, ``readdir`` and ``read`` are answered here, into libfuse's
  buffers (one ``struct.pack`` per stat, from the view's node), and every
  request's errors are mapped by :func:`layerfs.fusecore.errno_of` in
  :meth:`FUSE._wrapper` (mfusepy ignores ``Operations.__call__``, and would
  answer EINVAL to a bug).
- ``init`` sets what libfuse 3 takes only there: inode numbers, no
  ``hard_remove``, the kernel capabilities (READDIRPLUS, symlink caching,
  the umask applied by the kernel).
- READDIRPLUS on read-only mounts: libfuse 3.14's high-level layer passes a
  listing's attributes to the kernel only in "offset mode" (each entry
  given its own non-zero offset, the listing served in chunks); with
  offsets of 0 it sends an inode of 0 and the kernel drops the attributes.
  So read-only listings are given with offsets, and with their full stats.
  Writable mounts cache no attributes (timeouts of 0): they get plain
  listings, whole (offset 0: libfuse keeps the listing for the open
  directory, so entries removed meanwhile shift nothing).

Mounts are served by libfuse 3's low-level API (:mod:`layerfs.fusell` for
read-only ones, which lets the kernel keep listings; :mod:`layerfs.fusewrite`
for writable ones, which keeps inodes reachable after their names go); here
only with ``LAYERFS_FUSE_API=high``, kept for comparison and as a fallback.
:func:`context` and the constants and structures above are shared with the
low-level servers.

Importing this module loads libfuse: only :mod:`layerfs.mount` imports it
(and :mod:`layerfs.fusell`, its library), and only when mounting.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import sys
from typing import Optional

from .errors import MountError
from .fusecore import Listings, Operations, StatPacker, errno_of, lower_extent

log = logging.getLogger("layerfs.fuse")

# libfuse 3's capability bits (fuse_common.h, unchanged since 3.0).
CAP_DONT_MASK = 1 << 6
CAP_READDIRPLUS = 1 << 13
CAP_READDIRPLUS_AUTO = 1 << 14
CAP_CACHE_SYMLINKS = 1 << 23
FILL_DIR_PLUS = 1 << 1
# fuse_buf flags: the buffer is a descriptor, read at .pos, short reads retried.
BUF_FD_SEEK_RETRY = (1 << 1) | (1 << 2) | (1 << 3)


class fuse_buf(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int),
                ("mem", ctypes.c_void_p), ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]


class fuse_bufvec(ctypes.Structure):
    """libfuse's struct fuse_bufvec, with its one inline buffer (mfusepy
    declares a pointer there)."""
    _fields_ = [("count", ctypes.c_size_t), ("idx", ctypes.c_size_t),
                ("off", ctypes.c_size_t), ("buf", fuse_buf * 1)]


_libc = ctypes.CDLL(None)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]


def load_binding():
    """mfusepy on libfuse 3, or :class:`MountError` saying what is missing."""
    if "mfusepy" not in sys.modules:
        # mfusepy picks its library at import: ask for libfuse 3 by name
        # (find_library("fuse") would find libfuse 2 first).
        saved = os.environ.get("FUSE_LIBRARY_NAME")
        if not os.environ.get("FUSE_LIBRARY_PATH"):
            os.environ["FUSE_LIBRARY_NAME"] = "fuse3"
        try:
            import mfusepy
        except ImportError:
            raise MountError("cannot mount: the mfusepy package is not installed "
                             "(pip install mfusepy)", errno.ENOPKG) from None
        except (OSError, AttributeError) as error:
            raise MountError(f"cannot mount: libfuse 3 is not installed (Debian: "
                             f"apt-get install fuse3) ({error})", errno.ENOPKG) from None
        finally:
            if saved is None:
                os.environ.pop("FUSE_LIBRARY_NAME", None)
            else:
                os.environ["FUSE_LIBRARY_NAME"] = saved
    import mfusepy
    if mfusepy.fuse_version_major != 3:
        raise MountError(f"cannot mount: layerfs needs libfuse 3, and "
                         f"{mfusepy._libfuse._name} is libfuse "
                         f"{mfusepy.fuse_version_major}.{mfusepy.fuse_version_minor}",
                         errno.ENOPKG)
    return mfusepy


binding = load_binding()
c_stat = binding.c_stat
PACKER = StatPacker(c_stat)
_STAT_SIZE = PACKER.size
FuseOSError = binding.FuseOSError


def context() -> tuple:
    """``(uid, gid, pid)`` of the request this thread serves."""
    return binding.fuse_get_context()


def _decode(path: Optional[bytes]) -> Optional[str]:
    return None if path is None else path.decode("utf-8", "surrogateescape")


class FUSE(binding.FUSE):
    """mfusepy's ``FUSE`` serving an :class:`~layerfs.fusecore.Operations`
    until unmounted.  *readdirplus* is set in ``init``; other keyword
    arguments are mfusepy's (``-o`` options among them)."""

    def __init__(self, operations: Operations, mountpoint: str, *,
                 readdirplus: bool = False, **kwargs):
        self._fs = operations.fs
        self._handles = operations.handles
        self._readonly = operations.readonly
        self._plus = readdirplus
        self._listings = Listings(operations.fs)
        super().__init__(operations, mountpoint, raw_fi=True, encoding="utf-8",
                         errors="surrogateescape", **kwargs)

    # -- the error boundary ---------------------------------------------

    def _wrapper(self, func, *args, **kwargs):
        try:
            return func(*args, **kwargs) or 0
        except Exception as error:
            return -errno_of(error, func.__name__, args)
        except BaseException:
            # SystemExit or KeyboardInterrupt in a libfuse thread: stop serving.
            log.critical("FUSE %s interrupted; unmounting", func.__name__, exc_info=True)
            binding.fuse_exit()
            return -errno.EIO

    # -- lifecycle ------------------------------------------------------

    def init_fuse_3(self, conn, config) -> None:
        if config:
            cfg = config.contents
            cfg.use_ino = 1
            # No hard_remove: with it libfuse 3.14 forgets an unlinked open
            # file's path at once, and fstat() of it then fails with ESTALE
            # (the kernel's GETATTR for fstat carries no handle, so libfuse
            # needs the path).  Without it libfuse renames such a file to
            # .fuse_hidden* until the last close (docs/mount.md).
            cfg.hard_remove = 0
            cfg.nullpath_ok = 0
        if conn:
            info = conn.contents
            want = info.want
            # The kernel applies the caller's umask (creating requests run
            # with a umask of 0, see fusecore).
            want &= ~CAP_DONT_MASK
            if self._plus:
                want |= CAP_READDIRPLUS & info.capable
                want &= ~CAP_READDIRPLUS_AUTO      # attributes with every listing
            else:
                want &= ~(CAP_READDIRPLUS | CAP_READDIRPLUS_AUTO)
            if self._readonly:
                want |= CAP_CACHE_SYMLINKS & info.capable
            info.want = want
        self.operations.init("/")

    # -- the hot requests -----------------------------------------------

    def getattr_fuse_3(self, path, buf, fip):
        # With a handle (ftruncate's and some other getattrs; fstat has
        # none), the handle's inode.
        if fip:
            handle = self._handles.get(fip.contents.fh)
            if handle is not None:
                ctypes.memmove(buf, PACKER.node(handle.node), _STAT_SIZE)
                return 0
        node = self._fs.node(_decode(path), False)
        ctypes.memmove(buf, PACKER.node(node), _STAT_SIZE)
        return 0

    def readdir_fuse_3(self, path, buf, filler, offset, fip, flags):
        names, nodes = self._listings.get(_decode(path))
        entry = c_stat()
        address = ctypes.addressof(entry)
        pack = PACKER.node
        if not self._plus:
            # Offsets of 0: libfuse takes the whole listing at once and
            # serves the kernel's getdents from it; only the type bits and
            # the inode of each entry are read.
            filler(buf, b".", None, 0, 0)
            filler(buf, b"..", None, 0, 0)
            for name, node in zip(names, nodes):
                ctypes.memmove(address, pack(node), _STAT_SIZE)
                if filler(buf, name, entry, 0, 0):
                    break
            return 0
        # Offset mode: entry i (counting "." and "..") has offset i + 1 and
        # the kernel asks again from the last offset it took.
        index = offset
        while index < 2:
            if filler(buf, b"." * (index + 1), None, index + 1, 0):
                return 0
            index += 1
        count = len(names)
        while index - 2 < count:
            ctypes.memmove(address, pack(nodes[index - 2]), _STAT_SIZE)
            if filler(buf, names[index - 2], entry, index + 1, FILL_DIR_PLUS):
                break
            index += 1
        return 0

    def read_buf(self, path, bufpp, size, offset, fip):
        """Answer a read with a buffer libfuse fills and frees itself: for
        bytes in a file (a layer's uncompressed data, an open upper file)
        the descriptor and position, so libfuse reads them in C without the
        GIL and no Python copy is made; otherwise the bytes, copied once
        into memory libfuse frees."""
        handle = self._handles.get(fip.contents.fh) if fip else None
        if handle is not None:
            if not handle.readable or handle.node.children is not None:
                return -(errno.EBADF if not handle.readable else errno.EISDIR)
            node = handle.node
            extent = (handle.fd, offset, size) if handle.fd is not None else \
                lower_extent(self._fs, node, offset, size)
        elif self._readonly:
            # No OPEN was sent (open answers ENOSYS): read by path.
            node = self._fs.node(_decode(path), False)
            extent = lower_extent(self._fs, node, offset, size)
        else:
            return -errno.EBADF
        vector = _libc.malloc(ctypes.sizeof(fuse_bufvec))
        if not vector:
            return -errno.ENOMEM
        bufvec = fuse_bufvec.from_address(vector)
        bufvec.count, bufvec.idx, bufvec.off = 1, 0, 0
        buffer = bufvec.buf[0]
        if extent is not None:
            buffer.fd, buffer.pos, buffer.size = extent
            buffer.flags, buffer.mem = BUF_FD_SEEK_RETRY, None
        else:
            try:
                data = (handle.pread(size, offset) if handle is not None
                        else self._fs.read_node(node, offset, size))
            except BaseException:
                _libc.free(ctypes.c_void_p(vector))
                raise
            buffer.fd, buffer.pos, buffer.flags = -1, 0, 0
            buffer.size = len(data)
            buffer.mem = _libc.malloc(max(1, len(data)))
            if not buffer.mem:
                _libc.free(ctypes.c_void_p(vector))
                return -errno.ENOMEM
            ctypes.memmove(buffer.mem, data, len(data))
        ctypes.cast(bufpp, ctypes.POINTER(ctypes.c_void_p))[0] = vector
        return 0

    def read(self, path, buf, size, offset, fip):
        handle = self._handles.get(fip.contents.fh) if fip else None
        if handle is not None:
            data = handle.pread(size, offset)
        elif self._readonly:
            # No OPEN was sent (open answers ENOSYS): read by path.
            data = self._fs.read_node(self._fs.node(_decode(path), False), offset, size)
        else:
            return -errno.EBADF
        count = len(data)
        ctypes.memmove(buf, data, count)
        return count
