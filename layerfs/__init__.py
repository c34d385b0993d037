"""layerfs: container image layers as one filesystem, without extracting them.

    >>> import layerfs
    >>> with layerfs.open("image-oci-layout/") as fs:
    ...     fs.listdir("/etc")

The public API is what this module names; everything else is private.
"""

from .errors import (DigestMismatchError, ImageError, InvalidLayerError,
                     InvalidReferenceError, MountError, ReadOnlyError,
                     UnsupportedImageError, UpperError)
from .fs import DirEntry, FileSystem, open

__all__ = [
    "open", "FileSystem", "DirEntry",
    "ImageError", "InvalidLayerError", "DigestMismatchError",
    "UnsupportedImageError", "InvalidReferenceError", "ReadOnlyError", "MountError",
    "UpperError",
]

__version__ = "0.1.0"
