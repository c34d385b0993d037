"""The writable upper layer: copy-on-write into a directory on disk.

Layout of an upper directory (``docs/upper-format.md``)::

    UPPER/layerfs-upper.json  marks the directory as ours, with a format version
    UPPER/diff/               the changes: a plain tree with OCI whiteouts and
                              opaque markers, i.e. an OCI changeset
    UPPER/work/               scratch space for copy-up and renames; emptied on open
    UPPER/attrs.json          the sidecar: what diff/ cannot hold (see Sidecar)

Every change keeps the view correct at each instant, so a crash leaves the
old state or the new one.  The orderings that make that so:

* an entry is built in ``work/`` and renamed into ``diff/`` (atomic);
* a whiteout is created *before* the upper entry it replaces is moved away,
  and removed only *after* the entry that replaces it is in place: within one
  layer a whiteout hides lower layers only, so it is harmless beside its entry;
* deleted upper trees are first renamed into ``work/`` and removed there.

All host changes go through :class:`~layerfs.hostdir.HostDir` (no symlink is
ever followed), and all changes to the view go through the tree's mutators,
both under one lock.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import json
import os
import stat as _stat
import threading
import time
from typing import Optional

from . import whiteout
from .entry import DIRECTORY, HARDLINK, REGULAR, Entry
from .errors import InvalidLayerError
from .hostdir import HostDir, copy_fd
from .paths import is_within, join, split
from .union import (ORIGIN_LOWER, ORIGIN_MERGED, ORIGIN_METACOPY, ORIGIN_NEW,
                    S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, UPPER_SOURCE, Node, Tree)

FORMAT_VERSION = 1
MARKER_FILE = "layerfs-upper.json"
SIDECAR_FILE = "attrs.json"
READ_FD_CACHE = 256


def diff_path(path: str) -> str:
    """A view path's place in the upper directory."""
    return "/diff" if path == "/" else "/diff" + path


def check_name(path: str) -> None:
    """Names with the marker prefix cannot exist in a view."""
    if whiteout.is_marker_name(split(path)[1]):
        raise OSError(errno.EINVAL, f"names beginning with {whiteout.PREFIX!r} are "
                      f"reserved for whiteouts", path)


def now_ns() -> int:
    return time.time_ns()


class Sidecar:
    """What the host cannot store in ``diff/``, kept in ``attrs.json``.

    A record per view path, with any of: ``metacopy`` (a lower file whose
    metadata changed: its data still comes from the lower layer), ``mode``,
    ``uid``, ``gid``, ``atime_ns``, ``mtime_ns``, ``rdev`` (a device node stored
    as an empty file, when not root) and ``xattrs`` (hex values).  The file
    is rewritten atomically after each change.
    """

    def __init__(self, host: HostDir):
        self.host = host
        self.records: dict[str, dict] = {}
        try:
            fd = host.open_file("/" + SIDECAR_FILE, os.O_RDONLY)
        except FileNotFoundError:
            return
        with os.fdopen(fd, "rb") as stream:
            try:
                self.records = json.loads(stream.read() or b"{}")
            except ValueError as error:
                raise self.corrupt(str(error)) from None
        if not (isinstance(self.records, dict)
                and all(isinstance(r, dict) for r in self.records.values())):
            raise self.corrupt("expected an object of objects")

    def corrupt(self, reason: str) -> InvalidLayerError:
        return InvalidLayerError(f"corrupt sidecar: {reason}",
                                 path=os.path.join(self.host.root, SIDECAR_FILE))

    def save(self) -> None:
        temporary = f"/work/{SIDECAR_FILE}.tmp"
        fd = self.host.open_file(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as stream:
            stream.write(json.dumps(self.records, sort_keys=True).encode())
            stream.flush()
            os.fsync(stream.fileno())
        self.host.rename(temporary, "/" + SIDECAR_FILE)

    def forget(self, path: str) -> None:
        """Drop the records of *path* and everything beneath it."""
        gone = [p for p in self.records if is_within(p, path)]
        if gone:
            for p in gone:
                del self.records[p]
            self.save()

    def move(self, source: str, destination: str) -> None:
        moved = {p: r for p, r in self.records.items() if is_within(p, source)}
        if moved:
            for p in moved:
                del self.records[p]
            cut = len(source)
            for p, record in moved.items():
                self.records[destination + p[cut:]] = record
            self.save()


class Upper:
    """The writable layer of one :class:`~layerfs.fs.FileSystem`."""

    def __init__(self, fs, directory: str):
        self.fs = fs
        self.tree: Tree = fs.tree
        self.directory = os.path.abspath(directory)
        self.lock = threading.RLock()
        self.host = open_upper_directory(self.directory)
        self.sidecar = Sidecar(self.host)
        # What the image's layers show, path -> st_mode, before any change:
        # decides whether a deletion needs a whiteout.
        self.lower_paths = {path: node.mode for path, node in self.tree.nodes.items()}
        self.umask = current_umask()
        self.owner = (os.geteuid(), os.getegid())
        self.is_root = os.geteuid() == 0
        self._read_fds: dict[int, int] = {}
        self._fd_lock = threading.Lock()
        # Open handles per inode, and a descriptor kept for each upper file
        # whose last name went while a handle had it open (as unlink(2)).
        self.open_counts: dict[int, int] = {}
        self.orphans: dict[int, int] = {}
        self._temporary = itertools.count()
        load_upper(self)

    def sync(self) -> None:
        """Flush the filesystem holding the upper directory (syncfs(2); the
        whole machine's, where the C library has no syncfs)."""
        syncfs = getattr(_libc(), "syncfs", None)
        if syncfs is None or syncfs(self.host.fd) != 0:
            os.sync()

    def close(self) -> None:
        with self._fd_lock:
            for fd in [*self._read_fds.values(), *self.orphans.values()]:
                os.close(fd)
            self._read_fds.clear()
            self.orphans.clear()
        self.host.close()

    # -- reading upper files ---------------------------------------------

    def read(self, node: Node, offset: int, length: int) -> bytes:
        return os.pread(self.read_fd(node), length, offset)

    def read_fd(self, node: Node) -> int:
        """A cached read descriptor for an upper file (by inode, so renames
        and unlinks of names do not matter)."""
        fd = self._read_fds.get(node.ino) or self.orphans.get(node.ino)
        if fd is not None:
            return fd
        with self._fd_lock:
            fd = self._read_fds.get(node.ino)
            if fd is None:
                if len(self._read_fds) >= READ_FD_CACHE:
                    oldest = next(iter(self._read_fds))
                    os.close(self._read_fds.pop(oldest))
                fd = self.host.open_file(diff_path(node.data), os.O_RDONLY)
                self._read_fds[node.ino] = fd
        return fd

    def opened(self, node: Node) -> None:
        self.open_counts[node.ino] = self.open_counts.get(node.ino, 0) + 1

    def closed(self, node: Node) -> None:
        count = self.open_counts.pop(node.ino) - 1
        if count:
            self.open_counts[node.ino] = count
        elif node.ino in self.orphans:
            os.close(self.orphans.pop(node.ino))

    def keep_if_open(self, node: Node, path: str) -> None:
        """Before *path*, the last name of *node*, goes away: keep the data
        reachable for the handles that have it open."""
        if (node.ino in self.open_counts and node.nlink == 1
                and node.source == UPPER_SOURCE and node.ino not in self.orphans):
            self.orphans[node.ino] = self.host.open_file(diff_path(path), os.O_RDONLY)

    # -- copy-up -----------------------------------------------------------

    def temporary_path(self) -> str:
        return f"/work/tmp{os.getpid()}-{next(self._temporary)}"

    def copy_up(self, path: str, node: Node, with_data: bool = True) -> None:
        """Make *node* (at *path*) live in the upper layer.

        Parents first.  A regular file's data is copied only when
        *with_data*; otherwise it becomes a metacopy (metadata in the sidecar,
        data still read from its lower layer).
        """
        if node.origin >= ORIGIN_MERGED:
            return
        if node.origin == ORIGIN_METACOPY and not with_data:
            return
        if path == "/":
            node.origin = ORIGIN_METACOPY
            return
        kind = node.mode & S_IFMT
        if kind == S_IFREG and not with_data:
            self._metacopy(path, node)
            return
        names = self.tree.names_of(node) if node.nlink > 1 else [path]
        for name in names:
            self.copy_up_parent(name)
        temporary = self.temporary_path()
        self._materialize(temporary, node)
        self.host.rename(temporary, diff_path(names[0]))
        for other in names[1:]:
            self.host.link(diff_path(names[0]), diff_path(other))
        for name in names:
            self.restore_times(split(name)[0])
        if kind == S_IFREG:
            node.source = UPPER_SOURCE
            node.data = names[0]
        node.origin = ORIGIN_MERGED
        if any(name in self.sidecar.records for name in names):
            for name in names:
                self.sidecar.records.pop(name, None)
            self.sidecar.save()
        self.record_unstorable(names[0], node)
        node.stat_cache = None

    def restore_times(self, directory: str) -> None:
        """Copy-up adds entries to a host directory without changing the
        view's: put the view's times back on the host copy."""
        node = self.tree.nodes[directory]
        if directory != "/" and node.origin >= ORIGIN_MERGED:
            self.host.utime(diff_path(directory), node.atime_ns, node.mtime_ns)

    def copy_up_parent(self, path: str) -> None:
        parent_path = split(path)[0]
        parent = self.tree.nodes[parent_path]
        if parent.origin < ORIGIN_MERGED:
            self.copy_up(parent_path, parent)

    def _metacopy(self, path: str, node: Node) -> None:
        node.origin = ORIGIN_METACOPY
        self.record_metadata(path, node)

    def record_metadata(self, path: str, node: Node) -> None:
        """Write a metacopy node's (or the root's) metadata to the sidecar,
        under every name of the node: records are per path, and any name
        may be the one that survives."""
        fields = dict(metacopy=True, mode=node.mode & 0o7777, uid=node.uid, gid=node.gid,
                      atime_ns=node.atime_ns, mtime_ns=node.mtime_ns,
                      xattrs={k: v.hex() for k, v in (node.xattrs or {}).items()})
        several = node.children is None and node.nlink > 1
        for name in self.tree.names_of(node) if several else [path]:
            self.sidecar.records[name] = dict(fields)
        self.sidecar.save()

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
                copy_fd(lambda offset, length: self.fs.read_node(node, offset, length),
                        fd, node.size)
                os.fsync(fd)
            finally:
                os.close(fd)
        elif kind == S_IFLNK:
            host.symlink(node.target, host_path)
        elif self.is_root or kind == _stat.S_IFIFO:
            host.mknod(host_path, kind | 0o600, node.rdev)
        else:
            os.close(host.open_file(host_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self.apply_metadata(host_path, node)

    def apply_metadata(self, host_path: str, node: Node) -> None:
        """Make the host entry's metadata *node*'s (xattrs, owner, mode, times)."""
        host = self.host
        wanted = {name: value for name, value in (node.xattrs or {}).items()
                  if self.host_stores_xattr(name)}
        for name in host.listxattr(host_path):
            if name not in wanted and self.host_stores_xattr(name):
                host.removexattr(host_path, name)
        for name, value in wanted.items():
            host.setxattr(host_path, name, value)
        if self.is_root:
            host.chown(host_path, node.uid, node.gid)
        host.chmod(host_path, node.mode & 0o7777)
        host.utime(host_path, node.atime_ns, node.mtime_ns)

    # -- whiteouts -----------------------------------------------------------

    def lower_shows(self, path: str) -> bool:
        """Would something of the image's layers show at *path* if the
        upper layer had no entry there?  True only beneath directories that
        merge with a lower one."""
        if path not in self.lower_paths:
            return False
        parent = self.tree.nodes.get(split(path)[0])
        return parent is not None and parent.origin in (ORIGIN_LOWER, ORIGIN_METACOPY,
                                                        ORIGIN_MERGED)

    def add_whiteout(self, path: str) -> None:
        parent, name = split(path)
        marker = diff_path(join(parent, whiteout.whiteout_name(name)))
        if not self.host.exists(marker):
            os.close(self.host.open_file(marker, os.O_WRONLY | os.O_CREAT, 0o600))

    def drop_whiteout(self, path: str) -> None:
        parent, name = split(path)
        try:
            self.host.unlink(diff_path(join(parent, whiteout.whiteout_name(name))))
        except FileNotFoundError:
            pass

    def discard(self, path: str) -> None:
        """Remove the upper entry at *path* (and beneath) from disk: renamed
        into work/ first, so the view changes in one step."""
        trash = self.temporary_path()
        self.host.rename(diff_path(path), trash)
        self.host.remove_tree(trash)

    # -- entering new entries ------------------------------------------------

    def place(self, path: str, node: Node, build) -> None:
        """Create a new entry: *build(host_path)* makes it in work/, then it
        is renamed into place and any whiteout of the name is dropped."""
        self.copy_up_parent(path)
        hidden_lower = self.lower_shows(path) or self.host.exists(
            diff_path(join(split(path)[0], whiteout.whiteout_name(split(path)[1]))))
        temporary = self.temporary_path()
        build(temporary)
        if node.children is not None and hidden_lower:
            os.close(self.host.open_file(join(temporary, whiteout.OPAQUE_NAME),
                                         os.O_WRONLY | os.O_CREAT, 0o600))
            self.host.utime(temporary, node.atime_ns, node.mtime_ns)   # the marker moved it
        self.host.rename(temporary, diff_path(path))
        if hidden_lower:
            self.drop_whiteout(path)
        node.origin = ORIGIN_NEW
        self.tree.insert(path, node)
        self.record_unstorable(path, node)
        self.touch_parent(path)

    def touch_parent(self, path: str) -> None:
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
            self.record_metadata(parent_path, parent)
        else:
            host_stat = self.host.lstat(diff_path(parent_path))
            self.host.utime(diff_path(parent_path), host_stat.st_atime_ns, stamp)

    # -- removing, moving, metadata ----------------------------------------

    def delete(self, path: str, node: Node) -> None:
        """Remove *path* from the view (the caller checked it may go)."""
        self.copy_up_parent(path)
        if node.origin >= ORIGIN_MERGED:
            self.keep_if_open(node, path)
            if self.lower_shows(path):
                self.add_whiteout(path)
            self.discard(path)
        else:
            self.add_whiteout(path)
        self.sidecar.forget(path)
        self.tree.remove(path)
        self.rehome(node, path)
        node.ctime_ns = now_ns()
        node.stat_cache = None
        self.touch_parent(path)

    def rehome(self, node: Node, gone: str) -> None:
        """An upper file's data is found through one of its names: when that
        name goes away and others remain, use another."""
        if node.source == UPPER_SOURCE and node.data == gone and node.nlink > 0:
            node.data = self.tree.names_of(node)[0]

    def move(self, source: str, node: Node, destination: str,
             replaced: Optional[Node]) -> None:
        """Rename *source* to *destination* (checked by the caller)."""
        if node.children is not None:
            self.prepare_directory_move(source, node)
        else:
            self.copy_up(source, node, with_data=True)
        self.copy_up_parent(destination)
        if replaced is not None and replaced.children is not None:
            self.empty_replaced_directory(destination, replaced)
        elif replaced is not None and replaced.origin >= ORIGIN_MERGED:
            self.keep_if_open(replaced, destination)
        if self.lower_shows(source):
            self.add_whiteout(source)
        self.host.rename(diff_path(source), diff_path(destination))
        self.drop_whiteout(destination)
        self.tree.move(source, destination)
        self.sidecar.move(source, destination)
        cut = len(source)
        for _, moved in self.tree.walk_nodes(destination):
            if moved.source == UPPER_SOURCE and is_within(moved.data, source):
                moved.data = destination + moved.data[cut:]
        if replaced is not None:
            self.rehome(replaced, destination)
        node.ctime_ns = now_ns()
        node.stat_cache = None
        self.touch_parent(source)
        self.touch_parent(destination)

    def empty_replaced_directory(self, path: str, node: Node) -> None:
        """A directory about to be replaced by a rename is empty in the view,
        but its upper copy may hold markers, and rename(2) wants it empty.
        A whiteout beside it first (harmless: it hides only the lower
        directory, as the markers did), then the markers go; so the one
        host rename that follows changes the view in one step."""
        if node.origin < ORIGIN_MERGED:
            return
        if self.lower_shows(path):
            self.add_whiteout(path)
        for name, _ in self.host.listdir(diff_path(path)):
            self.host.remove_tree(join(diff_path(path), name))

    def prepare_directory_move(self, path: str, node: Node) -> None:
        """Make the directory at *path* self-contained, so that it can be
        renamed on the host: everything beneath it copied up, an opaque
        marker at its top, no marker inside.  The view does not change."""
        for child_path, child in list(self.tree.walk_nodes(path)):
            self.copy_up(child_path, child, with_data=True)
        top_marker = join(diff_path(path), whiteout.OPAQUE_NAME)
        if not self.host.exists(top_marker):
            os.close(self.host.open_file(top_marker, os.O_WRONLY | os.O_CREAT, 0o600))
        for host_path, _ in list(self.host.walk(diff_path(path))):
            if whiteout.is_marker_name(split(host_path)[1]) and host_path != top_marker:
                self.host.unlink(host_path)
        for child_path, child in self.tree.walk_nodes(path):
            if child.children is not None:
                child.origin = ORIGIN_NEW
                self.restore_times(child_path)

    def store_metadata(self, path: str, node: Node) -> None:
        """Persist *node*'s metadata after a change at *path*."""
        if node.origin == ORIGIN_METACOPY or path == "/":
            self.record_metadata(path, node)
        else:
            self.apply_metadata(diff_path(path), node)
            self.record_unstorable(path, node)

    def host_stores_xattr(self, name: str) -> bool:
        """Without root, only ``user.*`` xattrs can be set on the host."""
        return self.is_root or name.startswith("user.")

    def record_unstorable(self, path: str, node: Node) -> None:
        """Without root, the host entry cannot carry another owner, a device
        node is stored as an empty file, and xattrs outside ``user.`` cannot
        be set: the sidecar keeps owner, type and device number, and those
        xattrs (under every name of the inode)."""
        if self.is_root:
            return
        fields = {"uid": node.uid, "gid": node.gid, "host_xattrs_missing": {
            name: value.hex() for name, value in (node.xattrs or {}).items()
            if not self.host_stores_xattr(name)}}
        kind = node.mode & S_IFMT
        if kind in (_stat.S_IFCHR, _stat.S_IFBLK):
            fields.update(kind=kind, rdev=node.rdev)
        several = node.children is None and node.nlink > 1
        for name in self.tree.names_of(node) if several else [path]:
            self.sidecar.records[name] = dict(fields)
        self.sidecar.save()

    def new_node(self, mode: int, path: str) -> Node:
        """A new inode for *path*, owned as the kernel would own it: by us,
        or by the parent's group when the parent is set-group-ID (a new
        directory then inherits the bit)."""
        uid, gid = self.owner
        parent = self.tree.nodes[split(path)[0]]
        if parent.mode & _stat.S_ISGID:
            gid = parent.gid
            if mode & S_IFMT == S_IFDIR:
                mode |= _stat.S_ISGID
        return self.tree.new_node(mode, uid, gid, now_ns())


@functools.lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def open_upper_directory(directory: str) -> HostDir:
    """Create or check an upper directory; empty its work/ area."""
    os.makedirs(directory, exist_ok=True)
    marker = os.path.join(directory, MARKER_FILE)
    if os.path.exists(marker):
        try:
            with open(marker, "rb") as stream:
                version = json.load(stream).get("format")
        except (ValueError, AttributeError):
            version = None
        if version != FORMAT_VERSION:
            raise InvalidLayerError(f"not a layerfs upper directory of format "
                                    f"{FORMAT_VERSION} ({MARKER_FILE} says {version!r})",
                                    path=directory)
    elif os.listdir(directory):
        raise InvalidLayerError(f"directory is not empty and has no {MARKER_FILE}: "
                                f"refusing to use it as an upper layer", path=directory)
    host = HostDir(directory)
    for name in ("diff", "work"):
        if not host.exists("/" + name):
            host.mkdir("/" + name, 0o755)
    for name, _ in host.listdir("/work"):
        host.remove_tree("/work/" + name)
    if not os.path.exists(marker):
        fd = host.open_file("/" + MARKER_FILE, os.O_WRONLY | os.O_CREAT, 0o644)
        with os.fdopen(fd, "w") as stream:
            json.dump({"format": FORMAT_VERSION}, stream)
    return host


def load_upper(upper: Upper) -> None:
    """Apply an existing ``diff/`` to the view, as the top layer, then the
    sidecar; repair what a crash can leave (whiteouts beside their entry)."""
    entries, opaque_dirs = read_diff(upper)
    label = f"upper {upper.directory}"
    upper.tree.apply_layer(entries, UPPER_SOURCE, label)
    nodes = upper.tree.nodes
    whited_out = {join(split(e.path)[0], whiteout.classify(split(e.path)[1])[1])
                  for e in entries if whiteout.classify(split(e.path)[1])[0] == whiteout.WHITEOUT}
    for entry in entries:          # parents before children
        name = split(entry.path)[1]
        if whiteout.is_marker_name(name):
            continue
        node = nodes[entry.path]
        if entry.kind == DIRECTORY:
            parent = nodes[split(entry.path)[0]]
            merged = (parent.origin != ORIGIN_NEW and entry.path in upper.lower_paths
                      and entry.path not in opaque_dirs and entry.path not in whited_out)
            node.origin = ORIGIN_MERGED if merged else ORIGIN_NEW
        else:
            node.origin = ORIGIN_MERGED
    apply_sidecar(upper)
    remove_redundant_whiteouts(upper, entries)


def read_diff(upper: Upper) -> tuple[list[Entry], set[str]]:
    """``diff/`` as a list of entries (hardlinks found by host inode)."""
    entries = []
    opaque_dirs = set()
    first_name: dict[tuple[int, int], str] = {}
    host = upper.host
    for host_path, st in host.walk("/diff"):
        path = host_path[len("/diff"):]
        name = split(path)[1]
        if name == whiteout.OPAQUE_NAME:
            opaque_dirs.add(split(path)[0])
        kind = _stat.S_IFMT(st.st_mode)
        xattrs = host.listxattr(host_path) or None
        common = dict(mode=_stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                      mtime_ns=st.st_mtime_ns, xattrs=xattrs)
        if kind != S_IFDIR and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            if key in first_name:
                entries.append(Entry(path, HARDLINK, linkname=first_name[key], **common))
                continue
            first_name[key] = path
        if kind == S_IFREG:
            entries.append(Entry(path, REGULAR, size=st.st_size, data=path, **common))
        elif kind == S_IFLNK:
            entries.append(Entry(path, kind, linkname=host.readlink(host_path), **common))
        else:
            entries.append(Entry(path, kind, rdev=st.st_rdev, **common))
    return entries, opaque_dirs


def apply_sidecar(upper: Upper) -> None:
    try:
        _apply_sidecar(upper)
    except (TypeError, ValueError, AttributeError) as error:
        raise upper.sidecar.corrupt(f"bad record: {error}") from None


def _apply_sidecar(upper: Upper) -> None:
    nodes = upper.tree.nodes
    stale = []
    for path, record in upper.sidecar.records.items():
        node = nodes.get(path)
        if node is None or (record.get("metacopy") and node.origin >= ORIGIN_MERGED
                            and path != "/"):
            stale.append(path)     # the entry went away or was copied up since
            continue
        if record.get("metacopy"):
            node.origin = ORIGIN_METACOPY
        if "mode" in record:
            node.mode = (node.mode & S_IFMT) | record["mode"]
        for field in ("uid", "gid", "atime_ns", "mtime_ns", "rdev"):
            if field in record:
                setattr(node, field, record[field])
        if "rdev" in record and "kind" in record:
            node.mode = record["kind"] | (node.mode & 0o7777)
        if "xattrs" in record:
            node.xattrs = {k: bytes.fromhex(v) for k, v in record["xattrs"].items()} or None
        if record.get("host_xattrs_missing"):
            node.xattrs = {**(node.xattrs or {}), **{
                k: bytes.fromhex(v) for k, v in record["host_xattrs_missing"].items()}}
        node.stat_cache = None
    if stale:
        for path in stale:
            del upper.sidecar.records[path]
        upper.sidecar.save()


def remove_redundant_whiteouts(upper: Upper, entries: list[Entry]) -> None:
    """Bring what a crash can leave back to the usual form, view unchanged:
    a whiteout beside its own entry, or inside a directory that nothing
    lower shows through, hides nothing more; a whiteout beside a directory
    becomes that directory's opaque marker."""
    present = {entry.path for entry in entries}
    for entry in entries:
        parent, name = split(entry.path)
        kind, target = whiteout.classify(name)
        if kind != whiteout.WHITEOUT:
            continue
        victim = join(parent, target)
        node = upper.tree.nodes.get(victim)
        parent_node = upper.tree.nodes.get(parent)
        if victim in present and node is not None and node.children is not None:
            opaque = diff_path(join(victim, whiteout.OPAQUE_NAME))
            if not upper.host.exists(opaque):
                os.close(upper.host.open_file(opaque, os.O_WRONLY | os.O_CREAT, 0o600))
        elif not (victim in present or (parent_node is not None
                                        and parent_node.origin == ORIGIN_NEW)):
            continue
        upper.host.unlink(diff_path(entry.path))
