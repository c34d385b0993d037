"""The writable upper layer: every change to an upper directory, in one place.

The family of changes (each logged on ``layerfs.upper`` at debug level, so
there is one place to audit them, as overlayfs has its ``ovl_do_*``):

* :meth:`Upper.copy_up` a lower entry (or only its metadata: a metacopy);
* :meth:`Upper.place` a new entry, :meth:`Upper.link` a new name;
* :meth:`Upper.rename`, :meth:`Upper.remove`;
* :meth:`Upper.set_metadata`, :meth:`Upper.write_data`, :meth:`Upper.truncate_data`
  (and :meth:`Upper.set_unnamed_metadata`, of an unlinked inode, in memory);
* beneath them, the markers: :meth:`Upper._whiteout`, :meth:`Upper._unwhiteout`
  and :meth:`Upper._opaque`.

:mod:`layerfs.writable` decides (checks, errnos, order of checks) and calls
these; nothing else changes an upper.  The store knows the view only through
narrow interfaces: the tree it changes, the lower view (path -> mode of what
the image's layers show) and a callable reading a lower file's bytes.  The
on-disk format is :mod:`layerfs.upperformat`'s, the sidecar
:mod:`layerfs.sidecar`'s, reopening :mod:`layerfs.upperload`'s.

Every change keeps the view correct at each instant, so a crash leaves the
old state or the new one.  The orderings that make that so:

* an entry is built in ``work/`` and renamed into ``diff/`` (atomic);
* a whiteout is created *before* the upper entry it replaces is moved away,
  and removed only *after* the entry that replaces it is in place: within one
  layer a whiteout hides lower layers only, so it is harmless beside its entry;
* deleted upper trees are first renamed into ``work/`` and removed there.

Every name is checked before the first host change, so a call that fails
for a reason of its arguments has changed nothing.  Everything an
operation writes is on the host (a ``write(2)`` done) before it returns.

Times: an upper entry's ctime is its host entry's, read back after each
change (so it survives a reopen); a metacopy's and the root's are recorded
in the sidecar.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import errno
import functools
import itertools
import logging
import os
import stat as _stat
import threading
import time
from typing import Callable, Iterator, Mapping, Optional

from . import caller as _caller
from . import upperformat, whiteout
from .errors import path_error
from .hostdir import copy_fd
from .paths import NAME_MAX, encode_name, is_within, join, split
from .sidecar import Sidecar
from .union import (ORIGIN_LOWER, ORIGIN_MERGED, ORIGIN_METACOPY, ORIGIN_NEW,
                    S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, UPPER_SOURCE, Node, Tree)
from .upperformat import Binding
from .upperload import load_upper, long_whiteout

READ_FD_CACHE = 256

log = logging.getLogger("layerfs.upper")

ReadLower = Callable[[Node, int, int], bytes]


def diff_path(path: str) -> str:
    """A view path's place in the upper directory."""
    return "/diff" if path == "/" else "/diff" + path


def check_name(path: str) -> None:
    """A name a new entry may have: at most NAME_MAX bytes (ENAMETOOLONG),
    not beginning with the marker prefix (EINVAL)."""
    name = split(path)[1]
    if len(encode_name(name)) > NAME_MAX:
        raise path_error(errno.ENAMETOOLONG, path)
    if whiteout.is_marker_name(name):
        raise OSError(errno.EINVAL, f"names beginning with {whiteout.PREFIX!r} are "
                      f"reserved for whiteouts", path)


def now_ns() -> int:
    return time.time_ns()


class DescriptorCache:
    """Read descriptors of upper files, by inode number, at most *size*.

    A descriptor is lent for the length of one read (:meth:`borrow`): one
    that is evicted while lent is closed by its last borrower, never under
    it, so a read can never use a number that a later open reused for
    another file.
    """

    def __init__(self, size: int = READ_FD_CACHE):
        self.size = size
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._retired: dict[int, list] = {}     # fd -> entry, evicted while lent

    def borrow(self, key: int, open_fd: Callable[[int], int], argument) -> list:
        """The entry ``[fd, borrowers]`` of *key*, opened with
        ``open_fd(argument)`` if absent; give it back with :meth:`give_back`.
        (Two calls rather than a context manager: this is every read's path.)"""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = [open_fd(argument), 0]
                self._entries[key] = entry
                while len(self._entries) > self.size:
                    self._retire(self._entries.popitem(last=False)[1])
            entry[1] += 1
        return entry

    def give_back(self, entry: list) -> None:
        with self._lock:
            entry[1] -= 1
            if entry[1] == 0 and self._retired.get(entry[0]) is entry:
                del self._retired[entry[0]]
                os.close(entry[0])

    def _retire(self, entry: list) -> None:
        if entry[1] == 0:
            os.close(entry[0])
        else:
            self._retired[entry[0]] = entry

    def forget(self, key: int) -> None:
        """Close the descriptor of an inode that is gone (once unlent)."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._retire(entry)

    def close(self) -> None:
        with self._lock:
            for entry in self._entries.values():
                self._retire(entry)
            self._entries.clear()


class Upper:
    """The writable layer over one view (or, with ``writable=False``, an
    upper read as it is, for ``diff`` and ``commit``)."""

    def __init__(self, tree: Tree, lower: Mapping[str, int], read_lower: ReadLower,
                 directory: str, binding: Binding = Binding(None), *,
                 writable: bool = True):
        self.tree = tree
        # What the image's layers show, path -> st_mode, before any change:
        # decides whether a deletion needs a whiteout.
        self.lower_paths = lower       # shared by every filesystem of the image
        self.read_lower = read_lower
        self.directory = os.path.abspath(directory)
        self.writable = writable
        self.binding = binding
        self.lock = threading.RLock()
        opener = upperformat.open_for_writing if writable else upperformat.open_for_reading
        self.opened = opener(self.directory, binding)
        self.host = self.opened.host
        try:
            self.sidecar = Sidecar(self.host, writable=writable)
            self.is_root = os.geteuid() == 0
            self.descriptors = DescriptorCache()
            # Open handles per inode, and a descriptor kept for each upper file
            # whose last name went while a handle had it open, or while the
            # kernel still referenced its inode (as unlink(2)): no name on
            # the host, so a crash leaves nothing behind.
            self.open_counts: dict[int, int] = {}
            self.orphans: dict[int, int] = {}
            # Does the kernel still reference inode *ino* (an O_PATH
            # descriptor, a cwd)?  Set by a FUSE server that counts them
            # (layerfs.fusell); without one, nothing outlives its handles.
            self.referenced: Callable[[int], bool] = _nothing_referenced
            self._temporary = itertools.count()
            load_upper(self)
        except BaseException:
            self.opened.close()
            raise

    def sync(self) -> None:
        """Flush the filesystem holding the upper directory (syncfs(2); the
        whole machine's, where the C library has no syncfs)."""
        self.sidecar.flush()
        syncfs = getattr(_libc(), "syncfs", None)
        if syncfs is None or syncfs(self.host.fd) != 0:
            os.sync()

    def statvfs(self) -> os.statvfs_result:
        return self.host.statvfs()

    def flush_records(self) -> None:
        """What ``fsync`` of a file owes beyond its data: the sidecar."""
        self.sidecar.flush()

    def close(self) -> None:
        self.descriptors.close()
        with self.lock:
            for fd in self.orphans.values():
                os.close(fd)
            self.orphans.clear()
        self.sidecar.close()
        self.opened.close()

    # -- reading upper files ---------------------------------------------

    def read(self, node: Node, offset: int, length: int) -> bytes:
        orphan = self.orphans.get(node.ino)
        if orphan is not None:
            # Closed only once no handle has the file open: no read is running.
            return os.pread(orphan, length, offset)
        entry = self.descriptors.borrow(node.ino, self._open_for_reading, node)
        try:
            return os.pread(entry[0], length, offset)
        finally:
            self.descriptors.give_back(entry)

    def _open_for_reading(self, node: Node) -> int:
        return self.host.open_file(diff_path(node.data), os.O_RDONLY)

    def open_data(self, node: Node) -> int:
        """A new read-write descriptor on an upper file's data."""
        return self.host.open_file(diff_path(node.data), os.O_RDWR)

    def opened_handle(self, node: Node) -> None:
        with self.lock:
            self.open_counts[node.ino] = self.open_counts.get(node.ino, 0) + 1

    def closed_handle(self, node: Node) -> None:
        with self.lock:
            count = self.open_counts.pop(node.ino) - 1
            if count:
                self.open_counts[node.ino] = count
            elif node.ino in self.orphans and not self.referenced(node.ino):
                os.close(self.orphans.pop(node.ino))

    def forgotten(self, node: Node) -> None:
        """The kernel no longer references *node*: an unlinked file's data
        goes once no handle has it open either.  Closed outside the lock:
        the host frees the file then (about 100 us on ext4, measured), and
        nothing else needs to wait for that."""
        with self.lock:
            if node.ino in self.open_counts:
                return
            fd = self.orphans.pop(node.ino, None)
        if fd is not None:
            os.close(fd)

    def reopen_orphan(self, node: Node) -> int:
        """A new read-write descriptor on the data of *node*, an upper file
        whose names are all gone (reopened through ``/proc/self/fd``, as
        the kernel reopens an unlinked file).  ``ESTALE`` if no data was
        kept for it (a lower file has nothing of its own in the upper)."""
        fd = self.orphans.get(node.ino)
        if fd is None:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)

    def _keep_if_open(self, node: Node, path: str) -> None:
        """Before *path*, the last name of *node*, goes away: keep the data
        reachable for the handles that have it open and for the kernel's
        references to the inode."""
        if node.nlink == 1 and node.source == UPPER_SOURCE:
            if ((node.ino in self.open_counts or self.referenced(node.ino))
                    and node.ino not in self.orphans):
                self.orphans[node.ino] = self.host.open_file(diff_path(path), os.O_RDONLY)
            self.descriptors.forget(node.ino)

    def markers(self) -> Iterator[str]:
        """The view paths of the markers in ``diff/`` (``.../.wh.NAME``,
        long whiteouts included, and ``.../.wh..wh..opq``), parents first."""
        for host_path, st in self.host.walk(diff_path("/")):
            parent, name = split(host_path[len("/diff"):])
            if upperformat.is_long_whiteout(name) and _stat.S_ISREG(st.st_mode):
                yield join(parent, whiteout.PREFIX + long_whiteout(self, host_path))
            elif whiteout.is_marker_name(name):
                yield join(parent, name)

    # -- the family of changes -----------------------------------------------

    def copy_up(self, path: str, node: Node, with_data: bool = True) -> Node:
        """Make *node* (at *path*) live in the upper layer; the view does not
        change.  Parents first.  A regular file's data is copied only when
        *with_data*; otherwise it becomes a metacopy (metadata in the
        sidecar, data still read from its lower layer).  Returns the node
        as it is now (the tree's own copy of an image's node)."""
        node = self.tree.current(node)      # another name's copy-up may have copied it
        if node.origin >= ORIGIN_MERGED:
            return node
        if node.origin == ORIGIN_METACOPY and not with_data:
            return node
        node = self.tree.own(path, node)
        if path == "/":
            node.origin = ORIGIN_METACOPY
            return node
        kind = node.mode & S_IFMT
        if kind == S_IFREG and not with_data:
            # The caller records the metadata (it is about to change it).
            log.debug("copy-up %s (metadata only)", path)
            node.origin = ORIGIN_METACOPY
            return node
        log.debug("copy-up %s", path)
        names = self.tree.names_of(node) if node.nlink > 1 else [path]
        for name in names:
            self._copy_up_parent(name)
        temporary = self._temporary_path()
        self._materialize(temporary, node)
        self.host.rename(temporary, diff_path(names[0]))
        for other in names[1:]:
            self.host.link(diff_path(names[0]), diff_path(other))
        for name in names:
            self._restore_times(split(name)[0])
        if kind == S_IFREG:
            node.source = UPPER_SOURCE
            node.data = names[0]
        node.origin = ORIGIN_MERGED
        for name in names:
            self.sidecar.forget(name, subtree=False)
        self._record_unstorable(names[0], node)
        self._settle(names[0], node)
        return node

    def place(self, path: str, node: Node) -> None:
        """Enter the new, empty entry *node* at the free name *path*: built in
        ``work/`` with its type and metadata, renamed into place, then any
        whiteout of the name goes."""
        check_name(path)
        log.debug("place %s (mode %o)", path, node.mode)
        self._copy_up_parent(path)
        hidden_lower = self._lower_shows(path) or self._has_whiteout(path)
        temporary = self._temporary_path()
        self._materialize(temporary, node)
        if node.children is not None and hidden_lower:
            self._opaque(temporary)
            self.host.utime(temporary, node.atime_ns, node.mtime_ns)   # the marker moved it
        self.host.rename(temporary, diff_path(path))
        if hidden_lower:
            self._unwhiteout(path)
        node.origin = ORIGIN_NEW
        if node.mode & S_IFMT == S_IFREG:
            node.source = UPPER_SOURCE
            node.data = path
        self.tree.insert(path, node)
        self._record_unstorable(path, node)
        self._settle(path, node)
        self._touch_parent(path)

    def link(self, source: str, node: Node, destination: str) -> None:
        """Give the non-directory *node* (at *source*) the new name *destination*."""
        check_name(destination)
        log.debug("link %s -> %s", source, destination)
        node = self.copy_up(source, node, with_data=True)
        self._copy_up_parent(destination)
        self.host.link(diff_path(source), diff_path(destination))
        self._unwhiteout(destination)
        self.tree.insert(destination, node)
        self._record_unstorable(destination, node)
        self._settle(destination, node)
        self._touch_parent(destination)

    def remove(self, path: str, node: Node) -> None:
        """Remove *path* from the view (the caller checked it may go)."""
        log.debug("remove %s", path)
        node = self.tree.own(path, node)
        self._copy_up_parent(path)
        if node.origin >= ORIGIN_MERGED:
            self._keep_if_open(node, path)
            if self._lower_shows(path):
                self._whiteout(path)
            self._discard(path)
        else:
            self._whiteout(path)
        self.sidecar.forget(path, subtree=node.children is not None)
        self.tree.remove(path)
        self._after_name_lost(node, path)
        self._touch_parent(path)

    def rename(self, source: str, node: Node, destination: str,
               replaced: Optional[Node]) -> None:
        """Rename *source* to *destination* (checked by the caller)."""
        check_name(destination)
        log.debug("rename %s -> %s", source, destination)
        if replaced is not None:
            replaced = self.tree.own(destination, replaced)
        if node.children is not None:
            self._prepare_directory_move(source, node)
        else:
            node = self.copy_up(source, node, with_data=True)
        self._copy_up_parent(destination)
        if replaced is not None and replaced.children is not None:
            self._empty_replaced_directory(destination, replaced)
        elif replaced is not None and replaced.origin >= ORIGIN_MERGED:
            self._keep_if_open(replaced, destination)
        if self._lower_shows(source):
            self._whiteout(source)
        self.host.rename(diff_path(source), diff_path(destination))
        self._unwhiteout(destination)
        self.tree.move(source, destination)
        if replaced is not None:
            self.sidecar.forget(destination, subtree=replaced.children is not None)
        self.sidecar.move(source, destination, subtree=node.children is not None)
        cut = len(source)
        for _, moved in self.tree.walk_nodes(destination):
            if moved.source == UPPER_SOURCE and is_within(moved.data, source):
                moved.data = destination + moved.data[cut:]
        if replaced is not None:
            self._after_name_lost(replaced, destination)
        self._settle(destination, node)
        self._touch_parent(source)
        self._touch_parent(destination)

    def set_metadata(self, path: str, node: Node, change: Callable[[Node], None]) -> None:
        """Apply *change(node)* to the inode at *path* and store the result;
        if *change* or storing fails, the node is as it was.  A metadata
        change never copies a file's data."""
        log.debug("set metadata %s", path)
        node = self.tree.own(path, node)
        with _undone_on_error(node):
            change(node)
            if node.origin == ORIGIN_LOWER:
                self.copy_up(path, node, with_data=False)
            node.ctime_ns = now_ns()
            if node.origin == ORIGIN_METACOPY or path == "/":
                self._record_metadata(path, node)
            else:
                after = self._apply_metadata(diff_path(path), node)
                self._record_unstorable(path, node)
                node.ctime_ns = after.st_ctime_ns

    def set_unnamed_metadata(self, node: Node, change: Callable[[Node], None]) -> None:
        """Apply *change(node)* to *node*, which no name reaches any more:
        in memory only, as there is nothing on the host to store it under
        (it goes with the inode's last reference)."""
        log.debug("set metadata of unlinked inode %d", node.ino)
        node = self.tree.current(node)
        with _undone_on_error(node):
            change(node)
            node.ctime_ns = now_ns()

    def write_data(self, node: Node, fd: int, data: bytes, offset: int,
                   append: bool) -> int:
        """Write *data* to the upper file *node* through its descriptor *fd*
        (at its end if *append*); returns the count written."""
        if append:
            offset = os.fstat(fd).st_size
        log.debug("write %d bytes at %d to inode %d", len(data), offset, node.ino)
        count = os.pwrite(fd, data, offset)
        self.data_changed(node, fd)
        return count

    def truncate_data(self, node: Node, fd: int, length: int) -> None:
        log.debug("truncate inode %d to %d", node.ino, length)
        os.ftruncate(fd, length)
        self.data_changed(node, fd)

    def allocate_data(self, node: Node, fd: int, mode: int, offset: int, length: int) -> None:
        """``fallocate(2)`` of the upper file *node* through *fd* (the host
        filesystem decides which modes it supports: EOPNOTSUPP otherwise)."""
        log.debug("fallocate inode %d mode %#x at %d, %d bytes", node.ino, mode, offset, length)
        libc = _libc()
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        if libc.fallocate(fd, mode, offset, length) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        self.data_changed(node, fd)

    def data_changed(self, node: Node, fd: int) -> None:
        """After a write or truncate through *fd*: the host file's size and
        times are the node's."""
        st = os.fstat(fd)
        node.size = st.st_size
        node.mtime_ns = st.st_mtime_ns
        node.ctime_ns = st.st_ctime_ns
        node.stat_cache = None

    # -- markers ---------------------------------------------------------------

    def _whiteout(self, path: str) -> None:
        """Hide what the lower layers show at *path*."""
        parent, name = split(path)
        host_name = upperformat.host_whiteout_name(name)
        marker = diff_path(join(parent, host_name))
        if self.host.exists(marker):
            return
        log.debug("whiteout %s", path)
        if upperformat.is_long_whiteout(host_name):
            # Built aside and renamed in, so that it never exists half-written.
            temporary = self._temporary_path()
            fd = self.host.open_file(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, upperformat.long_whiteout_content(name))
            finally:
                os.close(fd)
            self.host.rename(temporary, marker)
        else:
            os.close(self.host.open_file(marker, os.O_WRONLY | os.O_CREAT, 0o600))

    def _unwhiteout(self, path: str) -> None:
        parent, name = split(path)
        marker = diff_path(join(parent, upperformat.host_whiteout_name(name)))
        try:
            self.host.unlink(marker)
        except FileNotFoundError:
            return
        log.debug("unwhiteout %s", path)

    def _has_whiteout(self, path: str) -> bool:
        parent, name = split(path)
        return self.host.exists(diff_path(join(parent, upperformat.host_whiteout_name(name))))

    def _opaque(self, host_directory: str) -> None:
        """Make the host directory *host_directory* opaque."""
        marker = join(host_directory, whiteout.OPAQUE_NAME)
        if not self.host.exists(marker):
            log.debug("opaque %s", host_directory)
            os.close(self.host.open_file(marker, os.O_WRONLY | os.O_CREAT, 0o600))

    def _discard(self, path: str) -> None:
        """Remove the upper entry at *path* (and beneath) from disk: renamed
        into work/ first, so the view changes in one step."""
        trash = self._temporary_path()
        self.host.rename(diff_path(path), trash)
        self.host.remove_tree(trash)

    # -- helpers of the family ---------------------------------------------------

    def _temporary_path(self) -> str:
        return f"/work/tmp{os.getpid()}-{next(self._temporary)}"

    def _lower_shows(self, path: str) -> bool:
        """Would something of the image's layers show at *path* if the
        upper layer had no entry there?  True only beneath directories that
        merge with a lower one."""
        if path not in self.lower_paths:
            return False
        parent = self.tree.nodes.get(split(path)[0])
        return parent is not None and parent.origin in (ORIGIN_LOWER, ORIGIN_METACOPY,
                                                        ORIGIN_MERGED)

    def _copy_up_parent(self, path: str) -> None:
        parent_path = split(path)[0]
        parent = self.tree.nodes[parent_path]
        if parent.origin < ORIGIN_MERGED:
            self.copy_up(parent_path, parent)

    def _restore_times(self, directory: str) -> None:
        """Copy-up adds entries to a host directory without changing the
        view's: put the view's times back on the host copy."""
        node = self.tree.nodes[directory]
        if directory != "/" and node.origin >= ORIGIN_MERGED:
            after = self.host.utime(diff_path(directory), node.atime_ns, node.mtime_ns)
            node.ctime_ns = after.st_ctime_ns
            node.stat_cache = None

    def _settle(self, path: str, node: Node) -> None:
        """After a host change of the upper entry at *path*: its ctime is the
        host entry's (what a reopen reads)."""
        node.ctime_ns = self.host.lstat(diff_path(path)).st_ctime_ns
        node.stat_cache = None

    def _after_name_lost(self, node: Node, gone: str) -> None:
        """*node* lost the name *gone*: an upper file's data is found through
        another name if it has one; its link count and ctime changed."""
        if node.nlink > 0 and node.source == UPPER_SOURCE and node.data == gone:
            node.data = self.tree.names_of(node)[0]
        if node.nlink > 0 and node.origin >= ORIGIN_MERGED and node.children is None:
            self._settle(self.tree.names_of(node)[0], node)
            return
        node.ctime_ns = now_ns()
        node.stat_cache = None
        if node.nlink > 0 and node.origin == ORIGIN_METACOPY:
            self._record_metadata(self.tree.names_of(node)[0], node)

    def _touch_parent(self, path: str) -> None:
        """A directory's mtime and ctime change with its entries."""
        parent_path = split(path)[0]
        parent = self.tree.nodes[parent_path]
        stamp = now_ns()
        parent.mtime_ns = parent.ctime_ns = stamp
        parent.stat_cache = None
        if parent_path == "/" or parent.origin == ORIGIN_METACOPY:
            # The root's metadata lives in the sidecar, whatever its origin
            # says (after a reopen it may not have been "copied up" yet).
            self.copy_up(parent_path, parent, with_data=False)
            self._record_metadata(parent_path, parent)
        else:
            host_stat = self.host.lstat(diff_path(parent_path))
            after = self.host.utime(diff_path(parent_path), host_stat.st_atime_ns, stamp)
            parent.ctime_ns = after.st_ctime_ns
            parent.stat_cache = None

    def _empty_replaced_directory(self, path: str, node: Node) -> None:
        """A directory about to be replaced by a rename is empty in the view,
        but its upper copy may hold markers, and rename(2) wants it empty.
        A whiteout beside it first (harmless: it hides only the lower
        directory, as the markers did), then the markers go; so the one
        host rename that follows changes the view in one step."""
        if node.origin < ORIGIN_MERGED:
            return
        if self._lower_shows(path):
            self._whiteout(path)
        for name, _ in self.host.listdir(diff_path(path)):
            self.host.remove_tree(join(diff_path(path), name))

    def _prepare_directory_move(self, path: str, node: Node) -> None:
        """Make the directory at *path* self-contained, so that it can be
        renamed on the host: everything beneath it copied up, an opaque
        marker at its top, no marker inside.  The view does not change."""
        for child_path, child in list(self.tree.walk_nodes(path)):
            self.copy_up(child_path, child, with_data=True)
        self._opaque(diff_path(path))
        top_marker = join(diff_path(path), whiteout.OPAQUE_NAME)
        for host_path, _ in list(self.host.walk(diff_path(path))):
            if whiteout.is_marker_name(split(host_path)[1]) and host_path != top_marker:
                self.host.unlink(host_path)
        for child_path, child in self.tree.walk_nodes(path):
            if child.children is not None:
                child.origin = ORIGIN_NEW
                self._restore_times(child_path)

    def _materialize(self, host_path: str, node: Node) -> None:
        """Create, at *host_path* in the work directory, an entry with
        *node*'s type, content and metadata."""
        kind = node.mode & S_IFMT
        host = self.host
        if kind == S_IFDIR:
            host.mkdir(host_path, 0o700)
        elif kind == S_IFREG:
            fd = host.open_file(host_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                if node.size:       # a copy-up's data, durable before it is renamed in
                    copy_fd(lambda offset, length: self.read_lower(node, offset, length),
                            fd, node.size)
                    os.fsync(fd)
            finally:
                os.close(fd)
        elif kind == S_IFLNK:
            host.symlink(node.target, host_path)
        elif self.is_root or kind in (_stat.S_IFIFO, _stat.S_IFSOCK):
            host.mknod(host_path, kind | 0o600, node.rdev)
        else:
            os.close(host.open_file(host_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._apply_metadata(host_path, node)

    def _apply_metadata(self, host_path: str, node: Node) -> os.stat_result:
        """Make the host entry's metadata *node*'s (xattrs, owner, mode, times);
        returns the entry's lstat after."""
        host = self.host
        wanted = {name: value for name, value in (node.xattrs or {}).items()
                  if self._host_stores_xattr(name)}
        for name in host.listxattr(host_path):
            if name not in wanted and self._host_stores_xattr(name):
                host.removexattr(host_path, name)
        for name, value in wanted.items():
            host.setxattr(host_path, name, value)
        if self.is_root:
            host.chown(host_path, node.uid, node.gid)
        host.chmod(host_path, node.mode & 0o7777)
        return host.utime(host_path, node.atime_ns, node.mtime_ns)

    def _host_stores_xattr(self, name: str) -> bool:
        """Without root, only ``user.*`` xattrs can be set on the host."""
        return self.is_root or name.startswith("user.")

    def _record_metadata(self, path: str, node: Node) -> None:
        """Write a metacopy node's (or the root's) metadata to the sidecar,
        under every name of the node: records are per path, and any name
        may be the one that survives."""
        fields = dict(metacopy=True, mode=node.mode & 0o7777, uid=node.uid, gid=node.gid,
                      atime_ns=node.atime_ns, mtime_ns=node.mtime_ns,
                      ctime_ns=node.ctime_ns,
                      xattrs={k: v.hex() for k, v in (node.xattrs or {}).items()})
        several = node.children is None and node.nlink > 1
        for name in self.tree.names_of(node) if several else [path]:
            self.sidecar.set(name, dict(fields))

    def _record_unstorable(self, path: str, node: Node) -> None:
        """Without root, the host entry cannot carry another owner, a device
        node is stored as an empty file, and xattrs outside ``user.`` cannot
        be set: the sidecar keeps owner, type and device number, and those
        xattrs (under every name of the inode)."""
        if self.is_root:
            return
        fields = {"uid": node.uid, "gid": node.gid, "host_xattrs_missing": {
            name: value.hex() for name, value in (node.xattrs or {}).items()
            if not self._host_stores_xattr(name)}}
        kind = node.mode & S_IFMT
        if kind in (_stat.S_IFCHR, _stat.S_IFBLK):
            fields.update(kind=kind, rdev=node.rdev)
        several = node.children is None and node.nlink > 1
        for name in self.tree.names_of(node) if several else [path]:
            self.sidecar.set(name, dict(fields))

    # -- new inodes --------------------------------------------------------------

    def new_node(self, mode: int, path: str) -> Node:
        """A new inode for *path*, owned as the kernel would own it: by the
        caller (:mod:`layerfs.caller`), or by the parent's group when the
        parent is set-group-ID (a new directory then inherits the bit).
        The caller's umask is applied to the permission bits here, once;
        symlinks keep 0777."""
        who = _caller.current()
        uid, gid = who.uid, who.gid
        parent = self.tree.nodes[split(path)[0]]
        if mode & S_IFMT != S_IFLNK:
            mode &= ~(who.umask & 0o777)
        if parent.mode & _stat.S_ISGID:
            gid = parent.gid
            if mode & S_IFMT == S_IFDIR:
                mode |= _stat.S_ISGID
        return self.tree.new_node(mode, uid, gid, now_ns())


@contextlib.contextmanager
def _undone_on_error(node: Node):
    """A metadata change of *node*: if it fails, the node is as it was; its
    stat cache is dropped either way."""
    before = (node.mode, node.uid, node.gid, node.atime_ns, node.mtime_ns,
              node.ctime_ns, node.xattrs)
    try:
        yield
    except BaseException:
        (node.mode, node.uid, node.gid, node.atime_ns, node.mtime_ns,
         node.ctime_ns, node.xattrs) = before
        raise
    finally:
        node.stat_cache = None


def _nothing_referenced(ino: int) -> bool:
    return False


@functools.lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(None, use_errno=True)
