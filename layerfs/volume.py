"""Volumes: host directories bound into a mounted view, and named volumes
kept in a store.

A mount's volume is served one of two ways, by the caller's rights
(:func:`can_bind`: ``CAP_SYS_ADMIN`` in the effective set):

* with it (root), bound by the kernel, as a container engine binds one,
  here: once the FUSE mount is ready, the host directory is bind-mounted
  (``MS_BIND``) onto the mount point's PATH, and made read-only with a
  remount for ``:ro``;
* without it, served by the writable mount's own FUSE server
  (:mod:`layerfs.fusevolume`, over :mod:`layerfs.volumefs`), which needs
  an upper.

Every rule the issue asks of a volume holds either way:

* reads and writes at PATH go to the host directory: no copy-up, no
  whiteouts, nothing in the upper, so ``diff`` and ``commit`` leave the
  volume out;
* ``:ro`` gives ``EROFS``;
* the image's content beneath PATH is hidden;
* layerfs never follows a symlink inside a volume: a symlink there
  resolves as the caller's kernel resolves it, inside a ``chroot`` the
  container's root, as for any bind mount of a container engine;
* no FUSE caching applies to the volume's entries (a bind's are not
  FUSE's; a served volume's replies carry timeouts of 0).

For a bind, PATH itself is opened component by component from the mount
point with ``O_NOFOLLOW`` (:class:`layerfs.hostdir.HostDir`), and the bind
is made onto that descriptor (``/proc/self/fd/N``): a symlink in the image
at or above PATH (``/var/run -> /run``) cannot redirect the bind onto the
host's own directories; it is refused.  A PATH missing from the image is
created through the mount as an empty directory (it is then in the upper,
as the mount point of a volume is in Docker's container layer); a served
volume gets the directories above PATH made (:func:`make_volume_parents`).
Unmounting a mount unbinds what is beneath it first
(:func:`unbind_beneath`).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
from typing import Optional

import attrs

from .errors import MountError, StoreError
from .hostdir import HostDir
from .paths import is_canonical, parents

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MNT_DETACH = 2


@attrs.frozen
class Volume:
    """The host directory ``source`` at the view's canonical ``path``;
    ``readonly`` for ``:ro``."""

    source: str
    path: str
    readonly: bool = False


def parse_volume(text: str, store=None) -> Volume:
    """``SOURCE:PATH[:ro|:rw]``: SOURCE is a host directory (it contains a
    ``/`` or starts with ``.``) or the name of a volume of *store*."""
    parts = text.split(":")
    readonly = False
    if len(parts) == 3 and parts[2] in ("ro", "rw"):
        readonly = parts.pop() == "ro"
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise StoreError(errno.EINVAL, f"--volume {text!r}: expected SOURCE:PATH[:ro]")
    source, path = parts
    if not path.startswith("/") or not is_canonical(path) or path == "/":
        raise StoreError(errno.EINVAL, f"--volume {text!r}: PATH must be an absolute path "
                                       "inside the image, without . or .. (not /)")
    if "/" in source or source.startswith("."):
        source = os.path.abspath(source)
        if not os.path.isdir(source):
            raise StoreError(errno.ENOENT, f"--volume {text!r}: {source} is not a directory")
    else:
        if store is None:
            raise StoreError(errno.EINVAL, f"--volume {text!r}: a named volume needs a store")
        source = volume_path(store, source)
        if not os.path.isdir(source):
            raise StoreError(errno.ENOENT, f"no volume {parts[0]!r} in {store.path} "
                                           f"(layerfs volume create {parts[0]})")
    return Volume(source, path, readonly)


CAP_SYS_ADMIN = 21


def can_bind() -> bool:
    """May this process bind volumes with the kernel (``CAP_SYS_ADMIN`` in
    its effective set, as root has it)?  Otherwise a mount's server serves
    them itself (:mod:`layerfs.fusevolume`)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    except OSError:
        pass
    return os.geteuid() == 0


# -- binding into a mount ----------------------------------------------------------

def bind_volumes(mountpoint: str, volumes) -> None:
    """Bind every volume into the mounted view at *mountpoint*, in order;
    if one fails, the ones bound are unbound and the error raised."""
    bound = []
    try:
        for volume in volumes:
            bind_volume(mountpoint, volume)
            bound.append(volume)
    except BaseException:
        for volume in reversed(bound):
            _umount2(os.path.join(mountpoint, volume.path.lstrip("/")), MNT_DETACH)
        raise


def bind_volume(mountpoint: str, volume: Volume) -> None:
    view = HostDir(mountpoint)
    try:
        _make_directories(view, volume.path)
        source_fd = os.open(volume.source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            target_fd = view.open_dir(volume.path)
            try:
                _mount(f"/proc/self/fd/{source_fd}", f"/proc/self/fd/{target_fd}",
                       MS_BIND, volume)
            finally:
                os.close(target_fd)
        finally:
            os.close(source_fd)
        # A bind ignores these flags: remount the new mount (reached again
        # without following anything) nosuid and nodev as the view is, and
        # read-only for :ro.
        flags = MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV
        target_fd = view.open_dir(volume.path)
        try:
            _mount(None, f"/proc/self/fd/{target_fd}",
                   flags | (MS_RDONLY if volume.readonly else 0), volume)
        finally:
            os.close(target_fd)
    finally:
        view.close()


def make_volume_parents(fs, volumes) -> None:
    """Create, in the writable *fs*, the directories above each volume's
    PATH that it lacks, as a kernel bind's mount point is made in the
    upper (a served volume's PATH itself needs no directory:
    :mod:`layerfs.volumefs`)."""
    for volume in volumes:
        for ancestor in parents(volume.path):
            if not fs.lexists(ancestor):
                fs.mkdir(ancestor, 0o755)


def _make_directories(view: HostDir, path: str) -> None:
    for directory in (*parents(path), path):
        try:
            view.mkdir(directory, 0o755)
        except FileExistsError:
            pass


def unbind_beneath(mountpoint: str) -> list:
    """Unmount every mount strictly beneath *mountpoint* (volumes), newest
    first; returns their paths."""
    from .mount import unescape_mountinfo
    prefix = os.path.abspath(mountpoint).rstrip("/") + "/"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
            lines = info.read().splitlines()
    except FileNotFoundError:
        return []
    beneath = [unescape_mountinfo(line.split(" ")[4]) for line in lines]
    beneath = [path for path in beneath if path.startswith(prefix)]
    for path in reversed(beneath):
        _umount2(path, 0)
    return beneath


@functools.lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _mount(source: Optional[str], target: str, flags: int, volume: Volume) -> None:
    libc = _libc()
    result = libc.mount(None if source is None else os.fsencode(source),
                        os.fsencode(target), None, ctypes.c_ulong(flags), None)
    if result != 0:
        code = ctypes.get_errno()
        hint = " (binding a volume needs root)" if code == errno.EPERM else ""
        raise MountError(f"cannot bind {volume.source} at {volume.path}: "
                         f"{os.strerror(code)}{hint}", code)


def _umount2(path: str, flags: int) -> None:
    if _libc().umount2(os.fsencode(path), flags) != 0:
        code = ctypes.get_errno()
        raise MountError(f"{path}: cannot unmount: {os.strerror(code)}", code)


# -- named volumes ----------------------------------------------------------------

def volume_path(store, name: str) -> str:
    from .store import check_name
    return os.path.join(store.path, "volumes", check_name(name, "volume"))


def create_volume(store, name: str) -> str:
    """Create the named volume *name* in *store*; returns its directory."""
    path = volume_path(store, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        raise StoreError(errno.EEXIST, f"volume {name!r} exists already") from None
    return path


def list_volumes(store) -> list[tuple[str, str]]:
    """``(name, directory)`` of every named volume, by name."""
    top = os.path.join(store.path, "volumes")
    try:
        names = sorted(os.listdir(top))
    except FileNotFoundError:
        return []
    return [(name, os.path.join(top, name)) for name in names
            if os.path.isdir(os.path.join(top, name))]


def remove_volume(store, name: str) -> None:
    """Remove the named volume and its files (refused while it is bound
    somewhere: ``EBUSY``)."""
    path = volume_path(store, name)
    if not os.path.isdir(path):
        raise StoreError(errno.ENOENT, f"no volume {name!r} in {store.path}")
    if is_bound(path):
        raise StoreError(errno.EBUSY, f"volume {name!r} is bound in a mount: unmount it")
    trash = os.path.join(os.path.dirname(path), f".rm-{name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash)


def is_bound(directory: str) -> bool:
    """Is *directory* the source of a bind mount (same device and root)?"""
    st = os.stat(directory)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
            lines = info.read().splitlines()
    except FileNotFoundError:
        return False
    from .mount import unescape_mountinfo
    for line in lines:
        fields = line.split(" ")
        try:
            here = os.stat(unescape_mountinfo(fields[4]))
        except OSError:
            continue
        if (here.st_dev, here.st_ino) == (st.st_dev, st.st_ino) and fields[3] != "/":
            return True
    return False
