"""libfuse 3's low-level API, where requests name inodes: the server of
read-only mounts, and the plumbing :mod:`layerfs.fusewrite` serves writable
ones with.

libfuse 3.14's high-level layer (:mod:`layerfs.fuse`) cannot let the kernel
keep directory listings: it crashes when ``opendir`` answers ENOSYS and drops
``cache_readdir``.  The low-level API can: here ``opendir`` answers ENOSYS,
so the kernel stops sending OPENDIR/RELEASEDIR and caches every listing it
reads (as if opened with ``FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR``), and
``open`` answers ENOSYS, so it keeps file pages without OPEN/RELEASE.  A warm
walk then reaches the daemon not at all.

:class:`Server` serves read-only views: their nodes never change and never
go away, so an inode number is the node id (the root's is 1), the lookup
count needs no bookkeeping (``forget`` has nothing to free), and every reply
may be cached by the kernel for the mount's timeouts.  Writable views change
and lose names while the kernel holds their inodes: their server
(:class:`layerfs.fusewrite.WritableServer`, a subclass) counts lookups and
turns inodes into the paths the facade takes.

The library is the one :mod:`layerfs.fuse` loaded (libfuse 3, through
mfusepy's handle); the structures are libfuse 3's (``fuse_lowlevel.h``),
declared here up to ``readdirplus`` and handed to libfuse with that size.
Every request is answered: errors map through
:func:`layerfs.fusecore.errno_of`, as everywhere, and anything else a
request method raises answers EIO, logged.  :meth:`Server.serve` may run in
any thread (signal handlers only in the main one), one server per thread.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import threading
from ctypes import CFUNCTYPE, POINTER, c_char_p, c_double, c_int, c_size_t, c_uint64, c_void_p
from typing import Callable, Optional

from . import fuse as binding_module
from .fusecore import errno_of, lower_extent

log = logging.getLogger("layerfs.fuse")

_lib = binding_module.binding._libfuse
c_stat = binding_module.c_stat
fuse_file_info = binding_module.binding.fuse_file_info
fuse_conn_info = binding_module.binding.fuse_conn_info
PACKER = binding_module.PACKER

CAP_NO_OPENDIR_SUPPORT = 1 << 24
UNKNOWN_INO = 0xFFFFFFFF        # what libfuse's high-level layer gives ".."
CAP_NO_OPEN_SUPPORT = 1 << 17


class fuse_entry_param(ctypes.Structure):
    _fields_ = [("ino", c_uint64), ("generation", c_uint64), ("attr", c_stat),
                ("attr_timeout", c_double), ("entry_timeout", c_double)]


class fuse_args(ctypes.Structure):
    _fields_ = [("argc", c_int), ("argv", POINTER(c_char_p)), ("allocated", c_int)]


req_t = c_void_p
ino_t = c_uint64
mode_t = ctypes.c_uint32
off_t = ctypes.c_int64
fi_p = POINTER(fuse_file_info)
# Every member up to readdirplus, in fuse_lowlevel.h's order (3.0-3.17);
# a server answers those it has a ``_name`` method for, the others stay
# NULL (libfuse answers ENOSYS).
_OPS = [
    ("init", CFUNCTYPE(None, c_void_p, POINTER(fuse_conn_info))),
    ("destroy", CFUNCTYPE(None, c_void_p)),
    ("lookup", CFUNCTYPE(None, req_t, ino_t, c_char_p)),
    ("forget", CFUNCTYPE(None, req_t, ino_t, c_uint64)),
    ("getattr", CFUNCTYPE(None, req_t, ino_t, fi_p)),
    ("setattr", CFUNCTYPE(None, req_t, ino_t, POINTER(c_stat), c_int, fi_p)),
    ("readlink", CFUNCTYPE(None, req_t, ino_t)),
    ("mknod", CFUNCTYPE(None, req_t, ino_t, c_char_p, mode_t, c_uint64)),
    ("mkdir", CFUNCTYPE(None, req_t, ino_t, c_char_p, mode_t)),
    ("unlink", CFUNCTYPE(None, req_t, ino_t, c_char_p)),
    ("rmdir", CFUNCTYPE(None, req_t, ino_t, c_char_p)),
    ("symlink", CFUNCTYPE(None, req_t, c_char_p, ino_t, c_char_p)),
    ("rename", CFUNCTYPE(None, req_t, ino_t, c_char_p, ino_t, c_char_p, ctypes.c_uint)),
    ("link", CFUNCTYPE(None, req_t, ino_t, ino_t, c_char_p)),
    ("open", CFUNCTYPE(None, req_t, ino_t, fi_p)),
    ("read", CFUNCTYPE(None, req_t, ino_t, c_size_t, off_t, fi_p)),
    ("write", CFUNCTYPE(None, req_t, ino_t, c_void_p, c_size_t, off_t, fi_p)),
    ("flush", c_void_p),
    ("release", CFUNCTYPE(None, req_t, ino_t, fi_p)),
    ("fsync", CFUNCTYPE(None, req_t, ino_t, c_int, fi_p)),
    ("opendir", CFUNCTYPE(None, req_t, ino_t, fi_p)),
    ("readdir", CFUNCTYPE(None, req_t, ino_t, c_size_t, off_t, fi_p)),
    ("releasedir", CFUNCTYPE(None, req_t, ino_t, fi_p)),
    ("fsyncdir", CFUNCTYPE(None, req_t, ino_t, c_int, fi_p)),
    ("statfs", CFUNCTYPE(None, req_t, ino_t)),
    ("setxattr", CFUNCTYPE(None, req_t, ino_t, c_char_p, c_void_p, c_size_t, c_int)),
    ("getxattr", CFUNCTYPE(None, req_t, ino_t, c_char_p, c_size_t)),
    ("listxattr", CFUNCTYPE(None, req_t, ino_t, c_size_t)),
    ("removexattr", CFUNCTYPE(None, req_t, ino_t, c_char_p)),
    ("access", c_void_p),
    ("create", CFUNCTYPE(None, req_t, ino_t, c_char_p, mode_t, fi_p)),
    ("getlk", c_void_p), ("setlk", c_void_p), ("bmap", c_void_p), ("ioctl", c_void_p),
    ("poll", c_void_p), ("write_buf", c_void_p), ("retrieve_reply", c_void_p),
    ("forget_multi", CFUNCTYPE(None, req_t, c_size_t, c_void_p)),
    ("flock", c_void_p),
    ("fallocate", CFUNCTYPE(None, req_t, ino_t, c_int, off_t, off_t, fi_p)),
    ("readdirplus", CFUNCTYPE(None, req_t, ino_t, c_size_t, off_t, fi_p)),
]


class fuse_lowlevel_ops(ctypes.Structure):
    _fields_ = _OPS


# The same library, called with the GIL held: for the functions that only
# fill memory (a directory entry, the request's context), where releasing
# and taking back the GIL would cost more than the call.  Replies write to
# /dev/fuse and wake the caller, whose next request another libfuse thread
# serves: they release the GIL, so that thread need not wait for this one
# (measured, 20,000 lstat through a writable mount, 3 runs alternated:
# replies holding the GIL took 6.6-9.3 s and 5.3-6.5 s of the daemon's CPU,
# releasing it 6.2-7.9 s and 4.9-5.6 s).
_lib_held = ctypes.PyDLL(_lib._name)


def _declare(name, restype, *argtypes, held: bool = False):
    """The function *name* of libfuse, typed (a new object each time, so
    that one function can be declared twice with different argtypes)."""
    function = (_lib_held if held else _lib)[name]
    function.restype = restype
    function.argtypes = list(argtypes)
    return function


_reply_err = _declare("fuse_reply_err", c_int, req_t, c_int)
_reply_none = _declare("fuse_reply_none", None, req_t)
_reply_entry = _declare("fuse_reply_entry", c_int, req_t, POINTER(fuse_entry_param))
_reply_attr = _declare("fuse_reply_attr", c_int, req_t, POINTER(c_stat), c_double)
_reply_readlink = _declare("fuse_reply_readlink", c_int, req_t, c_char_p)
_reply_buf = _declare("fuse_reply_buf", c_int, req_t, c_char_p, c_size_t)
_reply_data = _declare("fuse_reply_data", c_int, req_t,
                       POINTER(binding_module.fuse_bufvec), c_int)
_reply_xattr = _declare("fuse_reply_xattr", c_int, req_t, c_size_t)
_reply_statfs = _declare("fuse_reply_statfs", c_int, req_t, c_void_p)
_reply_open = _declare("fuse_reply_open", c_int, req_t, fi_p)
_reply_create = _declare("fuse_reply_create", c_int, req_t, POINTER(fuse_entry_param), fi_p)
_reply_write = _declare("fuse_reply_write", c_int, req_t, c_size_t)
_add_direntry = _declare("fuse_add_direntry", c_size_t, req_t, c_char_p, c_size_t,
                         c_char_p, POINTER(c_stat), ctypes.c_int64, held=True)
_add_direntry_plus = _declare("fuse_add_direntry_plus", c_size_t, req_t, c_char_p, c_size_t,
                              c_char_p, POINTER(fuse_entry_param), ctypes.c_int64, held=True)
_session_new = _declare("fuse_session_new", c_void_p, POINTER(fuse_args),
                        POINTER(fuse_lowlevel_ops), c_size_t, c_void_p)
_session_mount = _declare("fuse_session_mount", c_int, c_void_p, c_char_p)
_session_unmount = _declare("fuse_session_unmount", None, c_void_p)
_session_destroy = _declare("fuse_session_destroy", None, c_void_p)
_session_loop_mt = _declare("fuse_session_loop_mt", c_int, c_void_p, c_void_p)
_loop_cfg_create = _declare("fuse_loop_cfg_create", c_void_p)
_loop_cfg_destroy = _declare("fuse_loop_cfg_destroy", None, c_void_p)
_loop_cfg_set_max_threads = _declare("fuse_loop_cfg_set_max_threads", None, c_void_p,
                                     ctypes.c_uint)
_set_signal_handlers = _declare("fuse_set_signal_handlers", c_int, c_void_p)
_remove_signal_handlers = _declare("fuse_remove_signal_handlers", None, c_void_p)

# Options libfuse's low-level session takes (the mount's, and debug);
# attr/entry timeouts are layerfs's own here, given with each reply.
SESSION_OPTIONS = {"debug", "allow_root"}


def reply_extent(req, extent: tuple) -> None:
    """Answer a READ with the byte range ``(fd, offset, size)`` of a file:
    libfuse reads the bytes from the descriptor itself, in C."""
    bufvec = binding_module.fuse_bufvec(count=1, idx=0, off=0)
    buffer = bufvec.buf[0]
    buffer.fd, buffer.pos, buffer.size = extent
    buffer.flags, buffer.mem = binding_module.BUF_FD_SEEK_RETRY, None
    _reply_data(req, ctypes.byref(bufvec), 0)


class Server:
    """Serves the read-only filesystem *fs* on *mountpoint* (a path, or
    ``/dev/fd/N`` for a descriptor fusermount3 handed back) until
    unmounted; :meth:`serve` returns libfuse's loop status.  Writable
    filesystems are :class:`layerfs.fusewrite.WritableServer`'s."""

    def __init__(self, fs, mountpoint: str, options: dict,
                 on_ready: Optional[Callable[[], None]] = None):
        if not fs.readonly:
            raise ValueError("this server serves read-only filesystems only "
                             "(writable ones: layerfs.fusewrite)")
        self._setup(fs, mountpoint, options, on_ready)
        self.nodes = {1: fs.node("/")}

    def _setup(self, fs, mountpoint: str, options: dict, on_ready) -> None:
        self.fs = fs
        self.mountpoint = mountpoint
        # Whether libfuse mounted (a /dev/fd/N mount point is then its own).
        self.session_mounted = False
        self.on_ready = on_ready
        self.timeout = float(options.get("attr_timeout", 86400))
        self.entry_timeout = float(options.get("entry_timeout", 86400))
        self.negative_timeout = float(options.get("negative_timeout", 86400))
        self.max_threads = int(options.get("max_threads", 10))
        self.options = options
        self.ops = fuse_lowlevel_ops()
        self._callbacks = []
        for name, prototype in _OPS:
            method = getattr(self, f"_{name}", None)
            if method is None or prototype is c_void_p:
                continue
            callback = prototype(self._guarded(name, method))
            self._callbacks.append(callback)
            setattr(self.ops, name, callback)

    # -- plumbing ----------------------------------------------------------

    def _guarded(self, name, method):
        """A callback that answers the request with the errno of whatever
        the method raised (a bug: EIO, logged).  A method replies last, so
        nothing it does can fail after its reply."""
        unanswered = name in ("init", "destroy", "forget", "forget_multi")

        def call(*args):
            try:
                method(*args)
            except BaseException as error:
                if not isinstance(error, Exception):
                    # SystemExit, KeyboardInterrupt in a libfuse thread.
                    log.critical("FUSE %s interrupted", name, exc_info=error)
                    code = errno.EIO
                elif unanswered:
                    log.error("FUSE %s failed", name, exc_info=error)
                else:
                    code = errno_of(error, name, args[1:])
                if name in ("forget", "forget_multi"):
                    _reply_none(args[0])
                elif not unanswered:
                    _reply_err(args[0], code)
        return call

    def node(self, ino: int):
        try:
            return self.nodes[ino]
        except KeyError:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE)) from None

    def entry(self, node) -> fuse_entry_param:
        self.nodes[node.ino] = node
        return self.entry_param(node)

    def entry_param(self, node) -> fuse_entry_param:
        param = fuse_entry_param(ino=node.ino, generation=0,
                                 attr_timeout=self.timeout, entry_timeout=self.entry_timeout)
        ctypes.memmove(ctypes.addressof(param.attr), PACKER.node(node), PACKER.size)
        return param

    # -- lifecycle ---------------------------------------------------------

    def _init(self, userdata, conn):
        info = conn.contents
        want = info.want
        want |= binding_module.CAP_READDIRPLUS & info.capable
        want &= ~binding_module.CAP_READDIRPLUS_AUTO
        want |= (binding_module.CAP_CACHE_SYMLINKS | CAP_NO_OPENDIR_SUPPORT
                 | CAP_NO_OPEN_SUPPORT) & info.capable
        info.want = want
        if self.on_ready is not None:
            self.on_ready()

    def _destroy(self, userdata):
        pass

    def serve(self) -> int:
        """Mount, serve until unmounted, return libfuse's loop status.

        In the main thread, SIGINT, SIGTERM and SIGHUP end the loop
        (libfuse's handlers); in any other thread no signal handler is
        touched, so several servers can run side by side, each in its
        thread, each ending when its mount goes (``fusermount3 -u``).
        """
        argv = [b"layerfs"]
        mount = ",".join(name if value is True else f"{name}={value}"
                         for name, value in self.options.items()
                         if (name in binding_module_kernel_options() or name in SESSION_OPTIONS)
                         and value is not False)
        if mount:
            argv += [b"-o", mount.encode("utf-8", "surrogateescape")]
        array = (c_char_p * len(argv))(*argv)
        args = fuse_args(len(argv), array, 0)
        session = _session_new(ctypes.byref(args), ctypes.byref(self.ops),
                               ctypes.sizeof(self.ops), None)
        if not session:
            raise RuntimeError(1)
        main = threading.current_thread() is threading.main_thread()
        previous = None
        if main:
            # libfuse takes over SIGINT only from its default action (as
            # mfusepy does): Python's handler would wait for a main thread
            # that is in C.
            previous = signal.signal(signal.SIGINT, signal.SIG_DFL)
        try:
            if main and _set_signal_handlers(session) != 0:
                raise RuntimeError(6)
            try:
                if _session_mount(session, os.fsencode(self.mountpoint)) != 0:
                    raise RuntimeError(4)
                self.session_mounted = True
                try:
                    config = _loop_cfg_create()
                    _loop_cfg_set_max_threads(config, self.max_threads)
                    try:
                        return _session_loop_mt(session, config)
                    finally:
                        _loop_cfg_destroy(config)
                finally:
                    _session_unmount(session)
            finally:
                if main:
                    _remove_signal_handlers(session)
        finally:
            _session_destroy(session)
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    # -- requests ----------------------------------------------------------

    def _lookup(self, req, parent, name):
        directory = self.node(parent)
        children = directory.children
        if children is None:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        child = children.get(name.decode("utf-8", "surrogateescape"))
        if child is None:
            # ino 0: a negative entry the kernel may keep for its timeout.
            param = fuse_entry_param(ino=0, entry_timeout=self.negative_timeout)
            _reply_entry(req, ctypes.byref(param))
            return
        _reply_entry(req, ctypes.byref(self.entry(child)))

    def _forget(self, req, ino, nlookup):
        _reply_none(req)            # nodes of a read-only view live as long as it

    def _forget_multi(self, req, count, forgets):
        _reply_none(req)

    def _getattr(self, req, ino, fi):
        attr = c_stat.from_buffer_copy(PACKER.node(self.node(ino)))
        _reply_attr(req, ctypes.byref(attr), self.timeout)

    def _readlink(self, req, ino):
        node = self.node(ino)
        if node.mode & 0o170000 != 0o120000:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        _reply_readlink(req, node.target.encode("utf-8", "surrogateescape"))

    def _open(self, req, ino, fi):
        _reply_err(req, errno.ENOSYS)

    def _opendir(self, req, ino, fi):
        _reply_err(req, errno.ENOSYS)

    def _read(self, req, ino, size, offset, fi):
        node = self.node(ino)
        extent = lower_extent(self.fs, node, offset, size)
        if extent is not None:
            reply_extent(req, extent)
            return
        data = self.fs.read_node(node, offset, size)
        _reply_buf(req, data, len(data))

    def _listing(self, ino):
        directory = self.node(ino)
        if directory.children is None:
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return list(directory.children.items())

    def _readdir(self, req, ino, size, offset, fi):
        self._fill(req, ino, size, offset, plus=False)

    def _readdirplus(self, req, ino, size, offset, fi):
        self._fill(req, ino, size, offset, plus=True)

    def _fill(self, req, ino, size, offset, plus):
        """Entries from *offset* on ("." and ".." are 0 and 1, then the
        children in the view's order), as many as fit in *size* bytes."""
        entries = self._listing(ino)
        buffer = ctypes.create_string_buffer(size)
        address = ctypes.addressof(buffer)
        used = 0
        index = offset
        while index < len(entries) + 2:
            if index < 2:
                name = b"." * (index + 1)
                node = self.node(ino) if index == 0 else None
            else:
                text, node = entries[index - 2]
                name = text.encode("utf-8", "surrogateescape")
            place = ctypes.cast(address + used, c_char_p)
            if plus and node is not None and index >= 2:
                needed = _add_direntry_plus(req, place, size - used, name,
                                            ctypes.byref(self.entry(node)), index + 1)
            elif plus:
                # "." and "..": a node id of 0 leaves the kernel's dentries
                # alone; the inode number must not be 0 (readdir(3) skips those).
                param = fuse_entry_param(ino=0)
                param.attr.st_mode = 0o040000
                param.attr.st_ino = ino if index == 0 else UNKNOWN_INO
                needed = _add_direntry_plus(req, place, size - used, name,
                                            ctypes.byref(param), index + 1)
            else:
                attr = c_stat()
                attr.st_mode = node.mode if index >= 2 else 0o040000
                attr.st_ino = node.ino if index >= 2 else (ino if index == 0 else UNKNOWN_INO)
                needed = _add_direntry(req, place, size - used, name, ctypes.byref(attr),
                                       index + 1)
            if needed > size - used:
                break
            used += needed
            index += 1
        _reply_buf(req, ctypes.string_at(address, used), used)

    def _statfs(self, req, ino):
        sv = self.fs.statvfs()
        out = binding_module.binding.c_statvfs()
        for key in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                    "f_ffree", "f_favail", "f_flag", "f_namemax"):
            if hasattr(out, key):
                setattr(out, key, getattr(sv, key))
        _reply_statfs(req, ctypes.byref(out))

    def _getxattr(self, req, ino, name, size):
        xattrs = self.node(ino).xattrs or {}
        try:
            value = xattrs[name.decode("utf-8", "surrogateescape")]
        except KeyError:
            raise OSError(errno.ENODATA, os.strerror(errno.ENODATA)) from None
        self._reply_sized(req, value, size)

    def _listxattr(self, req, ino, size):
        node = self.node(ino)
        names = list(node.xattrs or ())
        if (node.mode & 0o170000) not in (0o100000, 0o040000):
            # The kernel answers ENODATA to any read of a user.* xattr of a
            # symlink, fifo or device: listing one would promise too much.
            names = [n for n in names if not n.startswith("user.")]
        data = b"".join(n.encode("utf-8", "surrogateescape") + b"\0" for n in names)
        self._reply_sized(req, data, size)

    @staticmethod
    def _reply_sized(req, data: bytes, size: int) -> None:
        if size == 0:
            _reply_xattr(req, len(data))
        elif len(data) > size:
            _reply_err(req, errno.ERANGE)
        else:
            _reply_buf(req, data, len(data))


def binding_module_kernel_options():
    from .mount import KERNEL_OPTIONS
    return KERNEL_OPTIONS
