"""Every error layerfs raises, in one place.

All of them are ``OSError`` subclasses carrying an ``errno``, so generic code
that already catches ``OSError`` handles them, the FUSE adapter can answer with
``e.errno`` and the CLI can print ``str(e)``.  Path errors use the builtin
subclasses (``FileNotFoundError``...) through :func:`path_error`; problems with
an image or a layer use the classes below, whose message names the file, the
layer and the entry concerned.
"""

from __future__ import annotations

import errno as _errno
import os


def path_error(code: int, path: str) -> OSError:
    """The builtin ``OSError`` subclass for *code* (``ENOENT`` gives
    ``FileNotFoundError``...), naming *path* the way ``os`` functions do."""
    return OSError(code, os.strerror(code), path)


class ImageError(OSError):
    """An image or a layer cannot be read as one.

    The message says which file, which layer and, where there is one, which
    entry; ``errno`` is ``EINVAL`` unless a subclass says otherwise.  Fix or
    replace the image: retrying will not help.
    """

    default_errno = _errno.EINVAL

    def __init__(self, message: str, *, path: str | None = None,
                 layer: str | None = None, entry: str | None = None):
        parts = []
        if path:
            parts.append(str(path))
        if layer and layer != path:
            parts.append(f"layer {layer}")
        if entry is not None:
            parts.append(f"entry {entry!r}")
        where = ": ".join(parts)
        text = f"{where}: {message}" if where else message
        super().__init__(self.default_errno, text)
        self.path = path
        self.layer = layer
        self.entry = entry
        self.reason = message

    def __str__(self) -> str:
        return self.args[1]

    def located(self, path: str) -> "ImageError":
        """This error naming the file *path* too, if it named none."""
        if self.path:
            return self
        return type(self)(self.reason, path=path, layer=self.layer, entry=self.entry)


class InvalidLayerError(ImageError):
    """A layer blob is not a valid tar (or compressed tar), or contains an
    entry that layerfs refuses: a name escaping the root, a hardlink to a
    missing file, a malformed whiteout, a corrupt header or stream."""


class DigestMismatchError(ImageError):
    """A blob's content does not match the digest its manifest or config
    gives for it: the file is corrupt or was replaced."""


class UnsupportedImageError(ImageError):
    """The source is not an image layout, archive or layer list that layerfs
    understands, or no manifest in it matches the requested tag/platform."""

    default_errno = _errno.ENOTSUP


class ReadOnlyError(OSError):
    """A write was attempted on a filesystem opened without an upper layer."""

    def __init__(self, path: str):
        super().__init__(_errno.EROFS, os.strerror(_errno.EROFS), path)


class MountError(OSError):
    """Mounting is impossible here: no ``/dev/fuse``, no libfuse, a busy or
    missing mount point, or no permission.  The message says which."""

    def __init__(self, message: str, code: int = _errno.ENODEV):
        super().__init__(code, message)

    def __str__(self) -> str:
        return self.args[1]


class InvalidReferenceError(UnsupportedImageError, ValueError):
    """An image reference that cannot be read: a transport prefix followed
    by something it cannot mean (``docker://UPPER``, ``oci:`` with no
    path), or a tag given twice.  Also a ``ValueError``: correct the
    argument; see :mod:`layerfs.reference` for the grammar."""

    default_errno = _errno.EINVAL


class RegistryError(ImageError):
    """A registry could not give what was asked: unreachable, a 404 for a
    repository, tag or blob, a server error, or a download that kept
    breaking.  The message names the registry and the reference or digest.
    Check the reference and the network; ``--offline`` reads what is cached."""

    default_errno = _errno.EIO


class RegistryAuthError(RegistryError):
    """The registry refused access (401/403) or is rate-limiting (429).  The
    message says what to do: log in (``layerfs login HOST``), check the
    credentials or the repository's scope, or wait for the rate limit."""

    default_errno = _errno.EACCES


class UpperError(OSError):
    """An upper directory cannot be used as asked: it does not exist (opened
    for reading), is not a layerfs upper, belongs to another image, or is in
    use by another writer.  The message names the directory and, for a busy
    one, the process holding it."""

    def __init__(self, code: int, message: str):
        super().__init__(code, message)

    def __str__(self) -> str:
        return self.args[1]


class StoreError(UpperError):
    """A container or volume of a store cannot be used as asked: no such
    name (``ENOENT``), the name is taken (``EEXIST``) or invalid
    (``EINVAL``), it is in use (``EBUSY``: unmount it, or remove it with
    ``force``), or its image reference no longer names the image it was
    created from.  The message is one line naming it."""
