"""layerfs: container image layers as one filesystem, without extracting them.

    >>> import layerfs
    >>> with layerfs.open("image-oci-layout/") as fs:
    ...     fs.listdir("/etc")

The public API is what this module names; everything else is private.
"""

from .errors import (DigestMismatchError, ImageError, InvalidLayerError,
                     InvalidReferenceError, MountError, ReadOnlyError,
                     StoreError, UnsupportedImageError, UpperError)
from .fs import DirEntry, FileSystem, open
from .store import Container, Store

__all__ = [
    "open", "FileSystem", "DirEntry",
    "ImageError", "InvalidLayerError", "DigestMismatchError",
    "UnsupportedImageError", "InvalidReferenceError", "ReadOnlyError", "MountError",
    "UpperError", "StoreError", "Store", "Container",
]

__version__ = "0.1.0"
