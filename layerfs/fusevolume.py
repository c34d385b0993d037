"""Volumes served by a writable mount's own FUSE server, for a caller who
cannot bind (no ``CAP_SYS_ADMIN``): see :mod:`layerfs.volume`.

:class:`VolumeServer` is :class:`layerfs.fusewrite.WritableServer` for a
:class:`~layerfs.volumefs.VolumeFileSystem`.  A volume's entries have no
node in the view: they get node ids of their own (:class:`VolumeInodes`,
from :data:`FIRST_VOLUME_ID` up, above every view inode number), one per
host ``(st_dev, st_ino)`` while the kernel holds it, and every request on
one is served through the path operations of the VolumeFileSystem, which
reach the host through :class:`~layerfs.hostdir.HostDir` (``O_NOFOLLOW``
per component, never escaping).  A symlink in a volume is given to the
kernel as a symlink: the caller's kernel resolves it, as over a bind.

The host directory changes behind the mount: every reply for a volume's
entry carries timeouts of 0 (whatever the mount's options say) and files
are opened without ``keep_cache``.  A mount without volumes is served by
WritableServer itself and pays nothing for this.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import stat as _stat
import threading

from .fusell import (PACKER, _reply_attr, _reply_create, _reply_entry,
                     _reply_open, _reply_readlink, _reply_none, c_stat,
                     fuse_entry_param, reply_extent, UNKNOWN_INO)
from .fusewrite import (SET_ATIME, SET_ATIME_NOW, SET_MTIME, SET_MTIME_NOW, SET_SIZE,
                        WritableServer, _caller_of, _dirent, _name, _name_bytes, _stale)

# View inode numbers count up from 1: these never meet them.
FIRST_VOLUME_ID = 1 << 62


def is_volume_id(ino: int) -> bool:
    return ino >= FIRST_VOLUME_ID


class VolumeInodes:
    """Node ids of volume entries: one per host ``(st_dev, st_ino)`` in
    each volume, with the kernel's lookup count and the view path it was
    last reached by; forgotten when the count falls to 0.  (Per volume: one
    host directory bound at two PATHs, one ``:ro``, must not share ids, or
    a request on one would be served at the other's path.)"""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_host: dict = {}          # (st_dev, st_ino) -> node id
        self._records: dict = {}          # node id -> [path, lookups, host key]
        self._next = itertools.count(FIRST_VOLUME_ID)

    def looked_up(self, volume: str, path: str, st: os.stat_result) -> int:
        """The node id of the entry *st* at *path* in the volume at
        *volume*, its count raised by one."""
        key = (volume, st.st_dev, st.st_ino)
        with self._lock:
            ino = self._by_host.get(key)
            if ino is None:
                ino = next(self._next)
                self._by_host[key] = ino
                self._records[ino] = [path, 0, key]
            record = self._records[ino]
            record[0] = path
            record[1] += 1
            return ino

    def forget(self, ino: int, count: int) -> None:
        with self._lock:
            record = self._records.get(ino)
            if record is None:
                return
            record[1] -= count
            if record[1] <= 0:
                del self._records[ino]
                del self._by_host[record[2]]

    def path(self, ino: int) -> str:
        record = self._records.get(ino)
        if record is None:
            raise _stale()
        return record[0]

    def moved(self, source: str, destination: str) -> None:
        """*source* was renamed to *destination*: so were the paths below it."""
        prefix = source + "/"
        with self._lock:
            for record in self._records.values():
                if record[0] == source:
                    record[0] = destination
                elif record[0].startswith(prefix):
                    record[0] = destination + record[0][len(source):]

    def __len__(self) -> int:
        return len(self._records)


class VolumeServer(WritableServer):
    """A writable mount whose filesystem has volumes (see the module doc)."""

    def __init__(self, operations, mountpoint: str, options: dict, on_ready=None):
        super().__init__(operations, mountpoint, options, on_ready)
        self.volume_inodes = VolumeInodes()
        self.volume_paths = frozenset(self.fs.volume_paths)
        self._innermost_first = sorted(self.volume_paths, key=len, reverse=True)
        self.volume_names = frozenset(path.rsplit("/", 1)[1] for path in self.volume_paths)
        # A view directory's path -> the names of the volumes' PATHs in it.
        self.volumes_in: dict = {}
        for path in self.volume_paths:
            parent, name = path.rsplit("/", 1)
            self.volumes_in.setdefault(parent or "/", []).append(name)

    # -- paths and replies -------------------------------------------------

    def path(self, ino: int) -> str:
        if is_volume_id(ino):
            return self.volume_inodes.path(ino)
        return super().path(ino)

    def target(self, ino: int):
        if is_volume_id(ino):
            return self.volume_inodes.path(ino)
        return super().target(ino)

    def _volume_attr(self, ino: int, st: os.stat_result) -> c_stat:
        attr = c_stat.from_buffer_copy(PACKER.stat(st))
        attr.st_ino = ino
        return attr

    def _volume_of(self, path: str) -> str:
        """The PATH of the (innermost) volume holding *path*."""
        for volume in self._innermost_first:
            if path == volume or path.startswith(volume + "/"):
                return volume
        raise _stale()

    def _volume_entry(self, path: str) -> fuse_entry_param:
        """The entry at *path* of a volume, counted (timeouts 0)."""
        st = self.fs.lstat(path)
        ino = self.volume_inodes.looked_up(self._volume_of(path), path, st)
        param = fuse_entry_param(ino=ino, generation=0, attr_timeout=0, entry_timeout=0)
        param.attr = self._volume_attr(ino, st)
        return param

    def _reply_volume_entry(self, req, path: str) -> None:
        param = self._volume_entry(path)
        if _reply_entry(req, ctypes.byref(param)) != 0:
            self.volume_inodes.forget(param.ino, 1)

    def created(self, req, parent: int, name: bytes) -> None:
        if is_volume_id(parent):
            self._reply_volume_entry(req, self.child_path(parent, name))
            return
        super().created(req, parent, name)

    # -- names -------------------------------------------------------------

    def _lookup(self, req, parent, name):
        if is_volume_id(parent):
            # The host's answer: no lock of the view's needed.
            self._reply_volume_entry(req, self.child_path(parent, name))
            return
        if _name(name) in self.volume_names:
            with self.upper.lock:       # the view's path of *parent* holds meanwhile
                path = self.child_path(parent, name)
                if path in self.volume_paths:
                    self._reply_volume_entry(req, path)
                    return
        super()._lookup(req, parent, name)

    def _forget(self, req, ino, nlookup):
        if is_volume_id(ino):
            self.volume_inodes.forget(ino, nlookup)
            _reply_none(req)
            return
        super()._forget(req, ino, nlookup)

    def _forget_multi(self, req, count, forgets):
        pairs = ctypes.cast(forgets, ctypes.POINTER(ctypes.c_uint64))
        for index in range(count):
            ino, nlookup = pairs[2 * index], pairs[2 * index + 1]
            if is_volume_id(ino):
                self.volume_inodes.forget(ino, nlookup)
            else:
                self.table.forget(ino, nlookup)
        _reply_none(req)

    def _link(self, req, ino, parent, name):
        if not (is_volume_id(ino) or is_volume_id(parent)):
            return super()._link(req, ino, parent, name)
        with self.upper.lock:
            # The filesystem refuses a link across a volume's boundary (EXDEV).
            self.operations.link(self.child_path(parent, name), self.path(ino))
            self.created(req, parent, name)

    def renamed(self, source: str, destination: str, new_parent: int, new_name: bytes) -> None:
        # The filesystem refused a rename across a volume's boundary (EXDEV)
        # and of a volume's PATH (EBUSY): this one stayed in a volume, or out.
        if is_volume_id(new_parent):
            self.volume_inodes.moved(source, destination)
        else:
            super().renamed(source, destination, new_parent, new_name)

    # -- attributes --------------------------------------------------------

    def _getattr(self, req, ino, fi):
        if not is_volume_id(ino):
            return super()._getattr(req, ino, fi)
        handle = self.handles.get(fi.contents.fh) if fi else None
        st = handle.fstat() if handle is not None else self.fs.lstat(self.path(ino))
        _reply_attr(req, ctypes.byref(self._volume_attr(ino, st)), 0)

    def _setattr(self, req, ino, attr, to_set, fi):
        if not is_volume_id(ino):
            return super()._setattr(req, ino, attr, to_set, fi)
        handle = self.handles.get(fi.contents.fh) if fi else None
        wanted = attr.contents
        path = self.path(ino)
        self.set_mode_and_owner(path, wanted, to_set)
        if to_set & SET_SIZE:
            if handle is not None:
                handle.truncate(wanted.st_size)
            else:
                self.operations.truncate(path, wanted.st_size)
        if to_set & (SET_ATIME | SET_MTIME | SET_ATIME_NOW | SET_MTIME_NOW):
            self.fs.utime(path, ns=self.wanted_times(wanted, to_set, lambda: self.fs.lstat(path)),
                          follow_symlinks=False)
        st = handle.fstat() if handle is not None else self.fs.lstat(path)
        _reply_attr(req, ctypes.byref(self._volume_attr(ino, st)), 0)

    def _readlink(self, req, ino):
        if not is_volume_id(ino):
            return super()._readlink(req, ino)
        target = self.fs.readlink(self.path(ino))
        _reply_readlink(req, target.encode("utf-8", "surrogateescape"))

    def _getxattr(self, req, ino, name, size):
        if not is_volume_id(ino):
            return super()._getxattr(req, ino, name, size)
        value = self.fs.getxattr(self.path(ino), _name(name), follow_symlinks=False)
        self._reply_sized(req, value, size)

    def _listxattr(self, req, ino, size):
        if not is_volume_id(ino):
            return super()._listxattr(req, ino, size)
        names = self.fs.listxattr(self.path(ino), follow_symlinks=False)
        self._reply_sized(req, b"".join(_name_bytes(n) + b"\0" for n in names), size)

    # -- files -------------------------------------------------------------

    def _open(self, req, ino, fi):
        if not is_volume_id(ino):
            return super()._open(req, ino, fi)
        info = fi.contents
        handle = self.fs.open_handle(self.path(ino), info.flags)
        info.fh = self.operations._add_handle(handle)
        info.keep_cache = 0         # the host file changes behind the mount
        if _reply_open(req, fi) != 0:
            self.operations.release(None, info)

    def _create(self, req, parent, name, mode, fi):
        if not is_volume_id(parent):
            return super()._create(req, parent, name, mode, fi)
        info = fi.contents
        _caller_of(req)
        path = self.child_path(parent, name)
        handle = self.fs.open_handle(path, info.flags | os.O_CREAT, mode)
        info.fh = self.operations._add_handle(handle)
        info.keep_cache = 0
        try:
            param = self._volume_entry(path)
        except BaseException:
            self.operations.release(None, info)
            raise
        if _reply_create(req, ctypes.byref(param), fi) != 0:
            self.volume_inodes.forget(param.ino, 1)
            self.operations.release(None, info)

    def _read(self, req, ino, size, offset, fi):
        if not is_volume_id(ino):
            return super()._read(req, ino, size, offset, fi)
        reply_extent(req, (self.operations.handle(fi.contents).fd, offset, size))

    # -- directories -------------------------------------------------------

    def is_directory(self, ino: int) -> bool:
        if is_volume_id(ino):
            return _stat.S_ISDIR(self.fs.lstat(self.path(ino)).st_mode)
        return super().is_directory(ino)

    def packed_listing(self, ino: int) -> list:
        """A volume's directory from the host; a view's directory with the
        volumes' PATHs it holds (listed whether or not the image has them)."""
        if not is_volume_id(ino):
            packed = super().packed_listing(ino)
            with self.upper.lock:
                record = self.record(ino)
                path = self.table.path(record)
                children = record.node.children
            extra = [name for name in self.volumes_in.get(path, ()) if name not in children]
            return packed + [_dirent(UNKNOWN_INO, index, 0o040000, _name_bytes(name))
                             for index, name in enumerate(extra, len(packed) + 1)]
        with self.upper.lock:
            path = self.path(ino)
            names = self.fs.listdir(path)
        packed = [_dirent(ino, 1, 0o040000, b"."), _dirent(UNKNOWN_INO, 2, 0o040000, b"..")]
        for index, name in enumerate(names, 3):
            packed.append(_dirent(UNKNOWN_INO, index, self._mode_or_zero(path, name),
                                  _name_bytes(name)))
        return packed

    def _mode_or_zero(self, directory: str, name: str) -> int:
        try:
            return self.fs.lstat(directory.rstrip("/") + "/" + name).st_mode
        except OSError:
            return 0
