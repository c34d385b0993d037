"""What a layer says about one path: the :class:`Entry` record.

Entries are made by the tar reader (``tarindex``), stored in the on-disk index
cache and consumed by the union core.  A layer can hold millions of them, so
an entry is a ``NamedTuple``: cheap to create, compact, and marshal-able as a
plain tuple for the cache.  Marker files (``.wh.*``) are ordinary entries
here; only the union core gives them meaning.
"""

from __future__ import annotations

import stat
from typing import NamedTuple, Optional, Union

# Entry kinds are the file-type bits of st_mode, plus one for hardlinks, which
# are not a file type but a second name for an existing file.
REGULAR = stat.S_IFREG
DIRECTORY = stat.S_IFDIR
SYMLINK = stat.S_IFLNK
CHARDEV = stat.S_IFCHR
BLOCKDEV = stat.S_IFBLK
FIFO = stat.S_IFIFO
HARDLINK = 0

KIND_NAMES = {
    REGULAR: "file", DIRECTORY: "directory", SYMLINK: "symlink",
    CHARDEV: "char device", BLOCKDEV: "block device", FIFO: "fifo",
    HARDLINK: "hardlink",
}



def kind_name(mode: int) -> str:
    """``"file"``, ``"directory"``... for the type bits of an ``st_mode``."""
    return KIND_NAMES.get(stat.S_IFMT(mode), "unknown")


# Where a regular file's bytes are, inside the layer's uncompressed tar
# stream.  The union core never looks inside; the layer reader does.
#   int:    the file's bytes are contiguous at this offset (``size`` of them);
#   tuple:  a sparse file: ``((file_offset, length, tar_offset), ...)``, the
#           stored segments in file order; everything else reads as zeros.
DataRef = Union[int, tuple]


class Entry(NamedTuple):
    path: str              # canonical path (see layerfs.paths), markers included
    kind: int              # one of the kinds above
    mode: int              # permission bits, 0o7777
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0          # regular files: logical size (sparse: real size)
    linkname: str = ""     # symlink: target as stored; hardlink: canonical path
    rdev: int = 0          # device nodes: os.makedev(major, minor)
    xattrs: Optional[dict] = None   # {name: bytes value}, or None
    data: Optional[DataRef] = None  # regular files only
