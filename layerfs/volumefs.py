"""Volumes in the library: ``layerfs.open(..., volumes=[...])``.

Everything about serving a volume through the facade lives here.  A
mounted view gets its volumes from the kernel for root (:mod:`layerfs.volume`),
else from its FUSE server over this class (:mod:`layerfs.fusevolume`);
a :class:`FileSystem` opened with ``volumes=`` is a
:class:`VolumeFileSystem`, whose every public path operation goes through
one dispatch point, :meth:`VolumeFileSystem._route`:

* a path whose canonical form is at or below a volume's PATH is answered
  by that volume's host directory through :class:`~layerfs.hostdir.HostDir`
  (every component opened with ``O_NOFOLLOW`` from the volume's root
  descriptor), never by the image or the upper: no copy-up, no whiteout,
  nothing in the upper, so ``diff`` and ``commit`` leave volumes out;
* any other path goes to the ordinary :class:`FileSystem` method.

:meth:`_route` resolves a path component by component itself, so that
symlinks and ``..`` are resolved in the *view*, as a container's kernel
resolves them over a bind mount: a symlink in a volume to ``/etc`` means
the image's ``/etc``, never the host's, and ``..`` at a volume's root is
the view's parent of PATH.  The host path handed to HostDir then holds no
symlink; one swapped in meanwhile makes HostDir fail (``ELOOP``,
``ENOTDIR``), never escape.

The hot path stays one check: a path that starts with no volume's PATH
and is a node of the tree that is not a symlink to follow (a canonical
path of the image) goes straight to the :class:`FileSystem` method.  A
filesystem opened without volumes is a plain :class:`FileSystem` and pays
nothing.

A volume's PATH needs its parent as a directory of the view (not a
symlink, not missing), checked at open; PATH itself need not exist in the
image: it is listed in its parent's listing as the volume's directory,
and nothing is written to the upper for it (a mount, by contrast, creates
it in the upper: see :mod:`layerfs.volume`).
"""

from __future__ import annotations

import builtins
import errno
import os
import stat as _stat
import time
from typing import Optional

from .errors import ReadOnlyError, path_error
from .fs import RESOLVED_CACHE_SIZE, DirEntry, FileSystem, PathLike
from .hostdir import HostDir
from .paths import split
from .union import S_IFLNK, S_IFMT
from .volume import Volume, parse_volume
from .writable import flags_for_mode

MAX_SYMLINKS = 40
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def as_volumes(volumes, store=None) -> list[Volume]:
    """:class:`Volume` objects from *volumes* (``Volume`` or
    ``"SOURCE:PATH[:ro]"``); two volumes at one PATH are refused."""
    out = [volume if isinstance(volume, Volume) else parse_volume(volume, store)
           for volume in volumes]
    paths = [volume.path for volume in out]
    if len(set(paths)) != len(paths):
        raise ValueError(f"two volumes at one path: {paths}")
    return out


class Mounted:
    """A volume bound into a :class:`VolumeFileSystem`: the volume and its
    open host directory."""

    __slots__ = ("volume", "path", "host", "readonly")

    def __init__(self, volume: Volume):
        self.volume = volume
        self.path = volume.path
        self.readonly = volume.readonly
        self.host = HostDir(volume.source)

    def check_writable(self, path: str) -> None:
        if self.readonly:
            raise ReadOnlyError(path)

    def close(self) -> None:
        self.host.close()


class VolumeFileSystem(FileSystem):
    """A :class:`FileSystem` with volumes; see the module's docstring."""

    def bind_volumes(self, volumes: list[Volume]) -> None:
        """Bind *volumes* (called once, by :func:`layerfs.open`)."""
        self._mounted: dict[str, Mounted] = {}
        try:
            for volume in sorted(volumes, key=lambda volume: volume.path):
                self._check_parent(volume.path)
                self._mounted[volume.path] = Mounted(volume)
        except BaseException:
            self._close_volumes()
            raise
        # Conservative: "/database" starts with "/data" too and takes the
        # slow path, which answers right anyway.
        self._prefixes = tuple(self._mounted)
        self._outside: set[str] = set()
        self._children: dict[str, list[str]] = {}
        for path in self._mounted:
            parent, name = split(path)
            self._children.setdefault(parent, []).append(name)

    @property
    def volume_paths(self) -> tuple:
        """The PATH of every volume, sorted."""
        return self._prefixes

    def _check_parent(self, path: str) -> None:
        parent = split(path)[0]
        if self._mounted_at(parent) is not None:
            return
        node = self._nodes.get(parent)
        if node is None or node.children is None:
            raise ValueError(f"volume at {path}: {parent} is not a directory of the view "
                             "(missing, a file or a symlink): a volume's parent must be one")

    @property
    def volumes(self) -> list[Volume]:
        return [mounted.volume for mounted in self._mounted.values()]

    def close(self) -> None:
        self._close_volumes()
        super().close()

    def _close_volumes(self) -> None:
        for mounted in getattr(self, "_mounted", {}).values():
            mounted.close()
        self._mounted = {}      # a closed filesystem then answers ValueError

    # -- the dispatch point ------------------------------------------------

    def _mounted_at(self, path: str) -> Optional[Mounted]:
        """The innermost volume holding the canonical *path*, or None."""
        best = None
        for where, mounted in self._mounted.items():
            if path == where or path.startswith(where + "/"):
                if best is None or len(where) > len(best.path):
                    best = mounted
        return best

    def in_volume(self, path: str) -> bool:
        """The one filter of ``diff``, ``commit``, ``export`` and
        ``extract``: is the canonical *path* at or below a volume's PATH?
        What the upper holds there (written before the volume was bound) is
        hidden by the volume and left out, as ``docker commit`` and ``docker
        export`` leave volumes out."""
        return self._mounted_at(path) is not None

    def _route(self, path, follow: bool) -> tuple[Optional[Mounted], str]:
        """``(None, canonical path)`` for a path of the image or the upper;
        ``(volume, path inside its host directory)`` for a volume's.  The
        last component may be missing (for creating it); symlinks before it
        are always followed, it only with *follow*."""
        if path in self._outside or self._is_outside(path):
            node = self._nodes.get(path)
            if node is not None and not (follow and node.mode & S_IFMT == S_IFLNK):
                return None, path
        return self._walk(os.fsdecode(path), follow)

    def _is_outside(self, path) -> bool:
        """Does the string *path* start with no volume's PATH?  Remembered
        in ``_outside``: a set lookup costs a third of ``str.startswith``
        with a tuple, and the answer, lexical, never changes."""
        if path.__class__ is not str or path.startswith(self._prefixes):
            return False
        if len(self._outside) >= RESOLVED_CACHE_SIZE:
            self._outside.clear()
        self._outside.add(path)
        return True

    def _walk(self, path: str, follow: bool) -> tuple[Optional[Mounted], str]:
        pending = [name for name in reversed(path.split("/")) if name]
        current: list[str] = []
        links = 0
        # A trailing "/" (or "/." ...) names a directory: its symlink is
        # followed and a non-directory is ENOTDIR, as the kernel answers.
        trailing = bool(pending) and (path.endswith("/") or path.endswith("/."))
        follow = follow or trailing
        is_dir = True
        while pending:
            name = pending.pop()
            if name == ".":
                continue
            if name == "..":
                if current:
                    current.pop()
                continue
            current.append(name)
            here = "/" + "/".join(current)
            mounted = self._mounted_at(here)
            if mounted is None:
                node = self._nodes.get(here)
                if node is None:
                    if pending:
                        raise path_error(errno.ENOENT, path)
                    return None, here
                is_link = node.mode & S_IFMT == S_IFLNK
                is_dir = node.children is not None
                target = node.target if is_link else None
            else:
                inside = here[len(mounted.path):] or "/"
                try:
                    st = mounted.host.lstat(inside)
                except FileNotFoundError:
                    if pending:
                        raise path_error(errno.ENOENT, path) from None
                    return mounted, inside
                except OSError as error:
                    raise path_error(error.errno, path) from None
                is_link = _stat.S_ISLNK(st.st_mode)
                is_dir = _stat.S_ISDIR(st.st_mode)
                target = mounted.host.readlink(inside) if is_link else None
            if is_link and (pending or follow):
                links += 1
                if links > MAX_SYMLINKS:
                    raise path_error(errno.ELOOP, path)
                current.pop()
                if target.startswith("/"):
                    current = []        # the view's root, never the host's
                pending.extend(name for name in reversed(target.split("/")) if name)
                continue
            if pending and not is_dir:
                raise path_error(errno.ENOTDIR, path)
        if trailing and not is_dir:
            raise path_error(errno.ENOTDIR, path)
        here = "/" + "/".join(current)
        mounted = self._mounted_at(here)
        if mounted is None:
            return None, here
        return mounted, here[len(mounted.path):] or "/"

    def _route_writable(self, path, follow: bool = False) -> tuple[Optional[Mounted], str]:
        mounted, real = self._route(path, follow)
        if mounted is not None:
            mounted.check_writable(os.fsdecode(path))
        return mounted, real

    # -- queries ---------------------------------------------------------

    def node(self, path: PathLike, follow_symlinks: bool = True):
        mounted, real = self._route(path, follow_symlinks)
        if mounted is None:
            return FileSystem.node(self, real, follow_symlinks)
        # A volume's entries are host files, not nodes of the view.
        raise path_error(errno.EXDEV, os.fsdecode(path))

    def realpath(self, path: PathLike) -> str:
        mounted, real = self._route(path, True)
        if mounted is None:
            return FileSystem.realpath(self, os.fsencode(real) if isinstance(path, bytes)
                                       else real)
        mounted.host.lstat(real)
        full = mounted.path if real == "/" else mounted.path + real
        return os.fsencode(full) if isinstance(path, bytes) else full

    def stat(self, path: PathLike, *, follow_symlinks: bool = True) -> os.stat_result:
        # The hot path, inlined.  A read-only view's answers kept by path
        # are all of image paths: only those reach FileSystem.stat.
        result = (self._stats if follow_symlinks else self._lstats).get(path)
        if result is not None:
            return result
        # A canonical path of the image or the upper.
        if path in self._outside or self._is_outside(path):
            node = self._nodes.get(path)
            if node is not None and not (follow_symlinks and node.mode & S_IFMT == S_IFLNK):
                result = node.stat_cache or node.stat()
                if self._upper is None:
                    (self._stats if follow_symlinks else self._lstats)[path] = result
                return result
        mounted, real = self._route(path, follow_symlinks)
        if mounted is None:
            # FileSystem.stat without following calls self.lstat: not here.
            return FileSystem.stat(self, real) if follow_symlinks else \
                FileSystem.lstat(self, real)
        return mounted.host.lstat(real)

    def lstat(self, path: PathLike) -> os.stat_result:
        return self.stat(path, follow_symlinks=False)

    def _stat_or_none(self, path, follow: bool) -> Optional[os.stat_result]:
        try:
            return self.stat(path, follow_symlinks=follow)
        except OSError:
            return None

    def exists(self, path: PathLike) -> bool:
        return self._stat_or_none(path, True) is not None

    def lexists(self, path: PathLike) -> bool:
        return self._stat_or_none(path, False) is not None

    def is_dir(self, path: PathLike) -> bool:
        st = self._stat_or_none(path, True)
        return st is not None and _stat.S_ISDIR(st.st_mode)

    def is_file(self, path: PathLike) -> bool:
        st = self._stat_or_none(path, True)
        return st is not None and _stat.S_ISREG(st.st_mode)

    def is_symlink(self, path: PathLike) -> bool:
        st = self._stat_or_none(path, False)
        return st is not None and _stat.S_ISLNK(st.st_mode)

    def readlink(self, path: PathLike) -> str:
        mounted, real = self._route(path, False)
        if mounted is None:
            return FileSystem.readlink(self, os.fsencode(real) if isinstance(path, bytes)
                                       else real)
        try:
            target = mounted.host.readlink(real)
        except OSError as error:
            raise path_error(error.errno, os.fsdecode(path)) from None
        return os.fsencode(target) if isinstance(path, bytes) else target

    def listdir(self, path: PathLike = "/") -> list:
        mounted, real = self._route(path, True)
        if mounted is None:
            names = FileSystem.listdir(self, real)
            extra = self._children.get(real)
            if extra:
                names += [name for name in extra if name not in names]
        else:
            fd = mounted.host.open_dir(real)
            try:
                names = os.listdir(fd)
            finally:
                os.close(fd)
            nested = self._children.get(mounted.path + real if real != "/" else mounted.path)
            if nested:
                names += [name for name in nested if name not in names]
        if isinstance(path, bytes):
            return [os.fsencode(name) for name in names]
        return names

    def scandir(self, path: PathLike = "/"):
        path = os.fsdecode(path)
        mounted, real = self._route(path, True)
        prefix = path.rstrip("/")
        if mounted is not None:
            for name in self.listdir(path):
                yield VolumeDirEntry(self, name, f"{prefix}/{name}")
            return
        volume_names = self._children.get(real, ())
        for entry in FileSystem.scandir(self, real):
            if entry.name not in volume_names:
                yield DirEntry(self, entry.name, f"{prefix}/{entry.name}", entry._node)
        for name in volume_names:
            yield VolumeDirEntry(self, name, f"{prefix}/{name}")

    def listxattr(self, path: PathLike, *, follow_symlinks: bool = True) -> list[str]:
        mounted, real = self._route(path, follow_symlinks)
        if mounted is None:
            return FileSystem.listxattr(self, real, follow_symlinks=follow_symlinks)
        return list(mounted.host.listxattr(real))

    def getxattr(self, path: PathLike, attribute: str, *,
                 follow_symlinks: bool = True) -> bytes:
        mounted, real = self._route(path, follow_symlinks)
        if mounted is None:
            return FileSystem.getxattr(self, real, attribute, follow_symlinks=follow_symlinks)
        with mounted.host.xattr_path(real) as proc_path:
            return os.getxattr(proc_path, attribute, follow_symlinks=False)

    # -- contents ----------------------------------------------------------

    def _open_fd(self, path, flags: int, mode: int = 0o666) -> tuple[Optional[Mounted], object]:
        """``(None, canonical path)`` for the image; ``(volume, fd)`` for a
        volume's file, opened through HostDir."""
        follow = not (flags & os.O_NOFOLLOW or (flags & os.O_CREAT and flags & os.O_EXCL))
        mounted, real = self._route(path, follow)
        if mounted is None:
            return None, real
        if flags & WRITE_FLAGS:
            mounted.check_writable(os.fsdecode(path))
        if real == "/":
            return mounted, mounted.host.open_dir("/")
        try:
            return mounted, mounted.host.open_file(real, flags, mode)
        except OSError as error:
            raise path_error(error.errno, os.fsdecode(path)) from None

    def open(self, path: PathLike, mode: str = "rb", buffering: int = -1,
             encoding: Optional[str] = None, errors: Optional[str] = None,
             newline: Optional[str] = None):
        mounted, opened = self._open_fd(path, flags_for_mode(mode))
        if mounted is None:
            return FileSystem.open(self, opened, mode, buffering, encoding, errors, newline)
        try:
            return builtins.open(opened, mode, buffering, encoding, errors, newline)
        except BaseException:
            os.close(opened)
            raise

    def open_handle(self, path: PathLike, flags: int, mode: int = 0o666):
        mounted, opened = self._open_fd(path, flags, mode)
        if mounted is None:
            return FileSystem.open_handle(self, opened, flags, mode)
        return VolumeHandle(opened, os.fsdecode(path), flags)

    def read_bytes(self, path: PathLike) -> bytes:
        mounted, real = self._route(path, True)
        if mounted is None:
            return FileSystem.read_bytes(self, real)
        with self.open(path, "rb") as stream:
            return stream.read()

    # -- writes --------------------------------------------------------------

    def mkdir(self, path: PathLike, mode: int = 0o777) -> None:
        mounted, real = self._route_writable(path)
        if mounted is None:
            return FileSystem.mkdir(self, real, mode)
        if real == "/":
            raise path_error(errno.EEXIST, os.fsdecode(path))
        mounted.host.mkdir(real, mode)

    def _check_not_above_a_volume(self, real: str, path) -> None:
        """A directory holding a volume's PATH stays while the volume is
        bound (``EBUSY``, as for a mount point's parent being removed)."""
        for where in self._mounted:
            if where.startswith(real.rstrip("/") + "/"):
                raise path_error(errno.EBUSY, os.fsdecode(path))

    def _remove(self, path, method: str) -> None:
        mounted, real = self._route_writable(path)
        if mounted is None:
            if method == "rmdir":
                self._check_not_above_a_volume(real, path)
            return getattr(FileSystem, method)(self, real)
        if real == "/":
            raise path_error(errno.EBUSY, os.fsdecode(path))
        getattr(mounted.host, method)(real)

    def rmdir(self, path: PathLike) -> None:
        self._remove(path, "rmdir")

    def unlink(self, path: PathLike) -> None:
        self._remove(path, "unlink")

    remove = unlink

    def symlink(self, target: str, path: PathLike) -> None:
        mounted, real = self._route_writable(path)
        if mounted is None:
            return FileSystem.symlink(self, target, real)
        mounted.host.symlink(os.fsdecode(target), real)

    def mknod(self, path: PathLike, mode: int = 0o600, device: int = 0) -> None:
        mounted, real = self._route_writable(path)
        if mounted is None:
            return FileSystem.mknod(self, real, mode, device)
        mounted.host.mknod(real, mode, device)

    def _two(self, source, destination, method: str) -> None:
        from_volume, source_real = self._route(source, False)
        to_volume, destination_real = self._route(destination, False)
        if from_volume is None and to_volume is None:
            if method == "rename":
                self._check_not_above_a_volume(source_real, source)
                self._check_not_above_a_volume(destination_real, destination)
            return getattr(FileSystem, method)(self, source_real, destination_real)
        if from_volume is not None and source_real == "/" and method == "rename":
            # A volume's PATH is a mount point: EBUSY before EXDEV, or mv
            # would copy the volume out and empty the host directory.
            raise path_error(errno.EBUSY, os.fsdecode(source))
        if from_volume is not to_volume:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), os.fsdecode(source),
                          None, os.fsdecode(destination))
        from_volume.check_writable(os.fsdecode(destination))
        if "/" in (source_real, destination_real):
            raise path_error(errno.EBUSY, os.fsdecode(source))
        getattr(from_volume.host, method)(source_real, destination_real)

    def rename(self, source: PathLike, destination: PathLike) -> None:
        self._two(source, destination, "rename")

    replace = rename

    def link(self, source: PathLike, destination: PathLike) -> None:
        self._two(source, destination, "link")

    def chmod(self, path: PathLike, mode: int, *, follow_symlinks: bool = True) -> None:
        mounted, real = self._route_writable(path, follow_symlinks)
        if mounted is None:
            return FileSystem.chmod(self, real, mode, follow_symlinks=follow_symlinks)
        mounted.host.chmod(real, mode)

    def chown(self, path: PathLike, uid: int, gid: int, *,
              follow_symlinks: bool = True) -> None:
        mounted, real = self._route_writable(path, follow_symlinks)
        if mounted is None:
            return FileSystem.chown(self, real, uid, gid, follow_symlinks=follow_symlinks)
        mounted.host.chown(real, uid, gid)

    def utime(self, path: PathLike, times=None, *, ns=None,
              follow_symlinks: bool = True) -> None:
        mounted, real = self._route_writable(path, follow_symlinks)
        if mounted is None:
            return FileSystem.utime(self, real, times, ns=ns, follow_symlinks=follow_symlinks)
        if ns is None:
            if times is None:
                now = time.time_ns()
                ns = (now, now)
            else:
                ns = (int(times[0] * 1e9), int(times[1] * 1e9))
        mounted.host.utime(real, ns[0], ns[1])

    def truncate(self, path: PathLike, length: int) -> None:
        mounted, opened = self._open_fd(path, os.O_WRONLY)
        if mounted is None:
            return FileSystem.truncate(self, opened, length)
        try:
            os.ftruncate(opened, length)
        finally:
            os.close(opened)

    def setxattr(self, path: PathLike, attribute: str, value: bytes, flags: int = 0, *,
                 follow_symlinks: bool = True) -> None:
        mounted, real = self._route_writable(path, follow_symlinks)
        if mounted is None:
            return FileSystem.setxattr(self, real, attribute, value, flags,
                                       follow_symlinks=follow_symlinks)
        mounted.host.setxattr(real, attribute, value, flags)

    def removexattr(self, path: PathLike, attribute: str, *,
                    follow_symlinks: bool = True) -> None:
        mounted, real = self._route_writable(path, follow_symlinks)
        if mounted is None:
            return FileSystem.removexattr(self, real, attribute,
                                          follow_symlinks=follow_symlinks)
        mounted.host.removexattr(real, attribute)


class VolumeDirEntry:
    """What :meth:`VolumeFileSystem.scandir` yields for a volume's entry,
    shaped like ``os.DirEntry``; it asks the filesystem each time."""

    __slots__ = ("_fs", "name", "path")

    def __init__(self, fs: VolumeFileSystem, name: str, path: str):
        self._fs = fs
        self.name = name
        self.path = path

    def inode(self) -> int:
        return self._fs.lstat(self.path).st_ino

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        return self._fs.is_dir(self.path) if follow_symlinks else \
            _is(self._fs, self.path, _stat.S_ISDIR)

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        return self._fs.is_file(self.path) if follow_symlinks else \
            _is(self._fs, self.path, _stat.S_ISREG)

    def is_symlink(self) -> bool:
        return self._fs.is_symlink(self.path)

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        return self._fs.stat(self.path, follow_symlinks=follow_symlinks)

    def __fspath__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"<VolumeDirEntry {self.name!r}>"


def _is(fs, path: str, test) -> bool:
    try:
        return test(fs.lstat(path).st_mode)
    except OSError:
        return False


class VolumeHandle:
    """:meth:`VolumeFileSystem.open_handle` of a volume's file: a host
    descriptor, with the methods of :class:`~layerfs.writable.Handle`."""

    def __init__(self, fd: int, path: str, flags: int):
        self.fd = fd
        self.path = path
        self.flags = flags
        self.append = bool(flags & os.O_APPEND)

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def pwrite(self, data: bytes, offset: int) -> int:
        if self.append:
            return os.write(self.fd, data)
        return os.pwrite(self.fd, data, offset)

    def truncate(self, length: int) -> None:
        os.ftruncate(self.fd, length)

    def allocate(self, mode: int, offset: int, length: int) -> None:
        os.posix_fallocate(self.fd, offset, length)

    def fsync(self, datasync: bool = False) -> None:
        (os.fdatasync if datasync else os.fsync)(self.fd)

    def flush(self) -> None:
        """Writes go straight to the host file."""

    def fstat(self) -> os.stat_result:
        return os.fstat(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
