"""The container store: named containers (an image plus one upper each)
and named volumes, under one directory.

Everything about where containers live and what a container records is
here; opening one is :func:`layerfs.open` with the container's upper, so a
container is the same writable filesystem as ``open(image, upper=DIR)``.

Layout (``docs/containers.md``)::

    STORE/containers/NAME/container.json   image reference, manifest digest,
                                           ChainID, created (written once)
    STORE/containers/NAME/upper/           the container's upper directory
    STORE/volumes/NAME/                    a named volume's files

A container is built under a temporary name and renamed into place, so a
crash never leaves half a container under its name; removal renames it
aside first for the same reason.  The upper's own lock (one writer) and its
binding to an image (``docs/upper-format.md``) are what keep a container
from being opened twice for writing or over another image; the record lets
the store say so before the image is even read.

No FUSE module is imported here at import time (``layerfs.mount`` is
imported by the calls that look for mounts).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from typing import Optional

import attrs

from .errors import StoreError, UpperError
from .reference import Reference, as_reference

STORE_VARIABLE = "LAYERFS_STORE"
RECORD_FILE = "container.json"
RECORD_FORMAT = "layerfs-container"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")


def default_path() -> str:
    """``$LAYERFS_STORE``, else ``$XDG_DATA_HOME/layerfs``, else
    ``~/.local/share/layerfs``."""
    if os.environ.get(STORE_VARIABLE):
        return os.environ[STORE_VARIABLE]
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(data_home, "layerfs")


def check_name(name: str, what: str = "container") -> str:
    """*name* if it may name a container or volume: 1 to 128 characters
    of ``[A-Za-z0-9_.-]``, starting with a letter or digit (as Docker)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise StoreError(errno.EINVAL, f"invalid {what} name {name!r}: use 1 to 128 of "
                                       f"A-Z a-z 0-9 _ . -, starting with a letter or digit")
    return name


@attrs.frozen
class Container:
    """What the store records of a container.  ``image`` is the reference
    it was created from (``str`` of it in ``reference``), ``manifest_digest``
    and ``chain_id`` the image it was bound to, ``created`` seconds since
    the epoch; ``directory`` its place in the store, ``upper`` its upper."""

    name: str
    reference: Reference
    tag: Optional[str]
    platform: Optional[str]
    manifest_digest: Optional[str]
    chain_id: Optional[str]
    created: float
    directory: str

    @property
    def image(self) -> str:
        return str(self.reference) + (f" ({self.tag})" if self.tag else "")

    @property
    def upper(self) -> str:
        return os.path.join(self.directory, "upper")

    def to_json(self) -> dict:
        return {"format": RECORD_FORMAT, "version": 1, "name": self.name,
                "reference": attrs.asdict(self.reference),
                "tag": self.tag, "platform": self.platform,
                "manifest_digest": self.manifest_digest, "chain_id": self.chain_id,
                "created": self.created}

    @classmethod
    def from_json(cls, value: dict, directory: str) -> "Container":
        if value.get("format") != RECORD_FORMAT or value.get("version") != 1:
            raise ValueError("not a layerfs container record of version 1")
        fields = dict(value["reference"])
        fields["layers"] = tuple(fields.get("layers") or ())
        return cls(value["name"], Reference(**fields), value.get("tag"),
                   value.get("platform"), value.get("manifest_digest"),
                   value.get("chain_id"), float(value["created"]), directory)


class Store:
    """A directory of containers and volumes (default :func:`default_path`)."""

    def __init__(self, path=None):
        self.path = os.path.abspath(os.fspath(path) if path is not None else default_path())

    # -- containers --------------------------------------------------------

    def _containers(self) -> str:
        return os.path.join(self.path, "containers")

    def create(self, image, name: str, *, tag: Optional[str] = None,
               platform: Optional[str] = None, cache=None, registry=None) -> Container:
        """A new container *name* of *image* (what :func:`layerfs.open`
        takes), with an empty upper bound to the image.  Raises
        :class:`StoreError` (``EEXIST``) if the name is taken."""
        from . import fs as layerfs_fs
        check_name(name)
        final = os.path.join(self._containers(), name)
        if os.path.lexists(final):
            raise StoreError(errno.EEXIST, f"container {name!r} exists already")
        reference = as_reference(image).absolute()
        os.makedirs(self._containers(), exist_ok=True)
        building = os.path.join(self._containers(), f".new-{name}-{os.getpid()}")
        shutil.rmtree(building, ignore_errors=True)
        os.mkdir(building, 0o700)
        try:
            with layerfs_fs.open(reference, tag=tag, platform=platform, cache=cache,
                                 registry=registry,
                                 upper=os.path.join(building, "upper")) as fs:
                container = Container(name, reference, tag, platform,
                                      fs.image.manifest_digest, fs.image.chain_id(),
                                      time.time(), final)
                hold_image(container, fs.image)
            _write_json(os.path.join(building, RECORD_FILE), container.to_json())
            try:
                os.rename(building, final)
            except OSError as error:
                if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise StoreError(errno.EEXIST,
                                     f"container {name!r} exists already") from None
                raise
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        return container

    def get(self, name: str) -> Container:
        """The container *name*; :class:`StoreError` (``ENOENT``) if none."""
        check_name(name)
        directory = os.path.join(self._containers(), name)
        try:
            with open(os.path.join(directory, RECORD_FILE), encoding="utf-8") as stream:
                value = json.load(stream)
        except (FileNotFoundError, NotADirectoryError):
            raise StoreError(errno.ENOENT, f"no container {name!r} in {self.path}") from None
        try:
            return Container.from_json(value, directory)
        except (ValueError, KeyError, TypeError) as error:
            raise StoreError(errno.EINVAL, f"container {name!r}: unreadable record "
                                           f"{RECORD_FILE} ({error})") from None

    def list(self) -> list[Container]:
        """Every container, by name."""
        try:
            names = sorted(os.listdir(self._containers()))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            if _NAME.match(name):
                try:
                    found.append(self.get(name))
                except StoreError:
                    continue        # being removed meanwhile, or not a container
        return found

    def open(self, name: str, *, readonly: bool = False, cache=None, registry=None,
             progress=None, volumes=()):
        """The container's writable :class:`~layerfs.fs.FileSystem` (as
        ``layerfs.open(image, upper=...)``); with *readonly*, its upper read
        as it is, beside a writer.  Refused (:class:`UpperError`) if another
        process writes it, or if the image is no longer the one the
        container was created from.  *volumes* as for :func:`layerfs.open`;
        a SOURCE without ``/`` names a volume of this store."""
        from . import fs as layerfs_fs
        container = self.get(name)
        try:
            fs = layerfs_fs.open(container.reference, tag=container.tag,
                                 platform=container.platform, cache=cache,
                                 registry=registry, progress=progress,
                                 upper=container.upper, readonly=readonly,
                                 volumes=volumes, store=self)
        except UpperError as error:
            if "another image" in str(error):
                raise StoreError(errno.EINVAL, f"container {name!r} was created from "
                                 f"{container.image} as ChainID {container.chain_id}, "
                                 "which that reference no longer names") from None
            raise
        image = fs.image
        if (image.chain_id(), image.manifest_digest) != (container.chain_id,
                                                         container.manifest_digest):
            fs.close()
            raise StoreError(errno.EINVAL, f"container {name!r} was created from "
                             f"{container.image} as manifest {container.manifest_digest}, "
                             f"which that reference no longer names (it names "
                             f"{image.manifest_digest})")
        hold_image(container, image)     # again: the cache may be another one now
        return fs

    def remove(self, name: str, *, force: bool = False) -> None:
        """Remove the container *name* and its upper.  Refused
        (``EBUSY``) while it is mounted, unless *force* (which unmounts it
        first), and while another process writes it through the library."""
        from .upperformat import lock_holder
        container = self.get(name)
        mountpoint = mounted_at(container)
        if mountpoint is not None:
            if not force:
                raise StoreError(errno.EBUSY, f"container {name!r} is mounted on "
                                              f"{mountpoint}: unmount it, or use --force")
            from .mount import umount
            umount(mountpoint)
        holder = lock_holder(container.upper)
        if holder is not None:
            raise StoreError(errno.EBUSY, f"container {name!r} is in use by {holder}")
        trash = os.path.join(self._containers(), f".rm-{name}-{os.getpid()}")
        os.rename(container.directory, trash)     # its holds are stale from here
        shutil.rmtree(trash)

    def upper_size(self, name: str) -> int:
        """Bytes the container's upper takes on disk (read beside a writer)."""
        return directory_size(self.get(name).upper)


# -- what the store needs from elsewhere ---------------------------------------

def hold_image(container: Container, image) -> None:
    """Keeps the image's layer data and indexes in the cache for as long as
    the container exists (a hold on its record file, see
    :mod:`layerfs.cache`): a prune, or another image's open under a small
    budget, evicts none of it.  Removing the container (or its directory)
    releases the holds."""
    record = os.path.join(container.directory, RECORD_FILE)
    for layer in image.layers:
        cache = getattr(layer, "cache", None)     # a TOC layer keeps no data there
        if cache is not None:
            cache.hold(layer.digest.partition(":")[2], record)


def mounted_at(container: Container) -> Optional[str]:
    """The mount point where a layerfs daemon serves *container*, or None:
    the mount whose server holds the container's upper lock."""
    from .mount import list_mounts, served_upper, server_pid
    from .upperformat import lock_holder_pid
    pid = lock_holder_pid(container.upper)
    if pid is None:
        return None
    for mountpoint, _source in list_mounts(every=True):
        # One process (the store's daemon) may serve several containers.
        if server_pid(mountpoint) == pid and served_upper(mountpoint) in (None,
                                                                          container.upper):
            return mountpoint
    return None


def directory_size(top: str) -> int:
    """Bytes allocated under *top* (no symlink followed; hardlinks once)."""
    total, seen = 0, set()
    for directory, names, files in os.walk(top):
        for name in names + files:
            try:
                st = os.lstat(os.path.join(directory, name))
            except FileNotFoundError:
                continue            # changed meanwhile by the writer
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def _write_json(path: str, value: dict) -> None:
    with open(path, "x", encoding="utf-8") as stream:
        json.dump(value, stream, indent=1)
        stream.write("\n")
        stream.flush()
        os.fsync(stream.fileno())
