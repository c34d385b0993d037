"""The abstract description of a layer: what a tar would say, member by member.

A :class:`Layer` is the list of its :class:`Member` records in tar order, and a
stack is a sequence of layers, base first.  Names are kept exactly as they
would appear in the tar (``"./a/b/"``, ``"a/.wh.b"``...): normalising them is
the job of whoever reads the layer, so the description can also express
awkward spellings and invalid layers.
"""

from __future__ import annotations

from typing import Sequence

import attrs

FILE = "file"
DIR = "dir"
SYMLINK = "symlink"
HARDLINK = "hardlink"
FIFO = "fifo"
CHARDEV = "chardev"
BLOCKDEV = "blockdev"

KINDS = (FILE, DIR, SYMLINK, HARDLINK, FIFO, CHARDEV, BLOCKDEV)
DEVICE_KINDS = (CHARDEV, BLOCKDEV)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"


def _freeze_xattrs(value) -> tuple:
    """xattrs as a sorted tuple of ``(name, bytes)`` pairs, so members stay
    hashable; a dict is accepted for convenience."""
    items = value.items() if isinstance(value, dict) else value
    return tuple(sorted((str(k), bytes(v)) for k, v in items))


def _short_repr(content: bytes) -> str:
    if len(content) <= 64:
        return repr(content)
    return f"{content[:16]!r} + ... ({len(content)} bytes)"


@attrs.frozen
class Member:
    """One tar member.

    ``mtime`` is in whole seconds (what every tar format can hold).  ``target``
    is the link name: the symlink's target as stored, or the hardlink's target
    as a tar name.  For a hardlink, mode/uid/gid/mtime/xattrs are ignored by
    readers (the link is one more name of an existing file).
    """

    name: str
    kind: str = FILE
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    content: bytes = attrs.field(default=b"", repr=_short_repr)
    target: str = ""
    xattrs: tuple = attrs.field(default=(), converter=_freeze_xattrs)
    devmajor: int = 0
    devminor: int = 0

    @property
    def xattr_dict(self) -> dict:
        return dict(self.xattrs)


@attrs.frozen
class Layer:
    members: tuple = attrs.field(converter=tuple)

    def __iter__(self):
        return iter(self.members)

    def __len__(self):
        return len(self.members)


Stack = Sequence[Layer]


# Small constructors so hand-written cases read like a listing.

def file(name: str, content: bytes = b"", mode: int = 0o644, **kw) -> Member:
    return Member(name, FILE, mode=mode, content=content, **kw)


def directory(name: str, mode: int = 0o755, **kw) -> Member:
    return Member(name, DIR, mode=mode, **kw)


def symlink(name: str, target: str, **kw) -> Member:
    kw.setdefault("mode", 0o777)
    return Member(name, SYMLINK, target=target, **kw)


def hardlink(name: str, target: str, **kw) -> Member:
    return Member(name, HARDLINK, target=target, **kw)


def fifo(name: str, mode: int = 0o644, **kw) -> Member:
    return Member(name, FIFO, mode=mode, **kw)


def device(name: str, major: int, minor: int, *, block: bool = False,
           mode: int = 0o600, **kw) -> Member:
    kind = BLOCKDEV if block else CHARDEV
    return Member(name, kind, mode=mode, devmajor=major, devminor=minor, **kw)


def whiteout(path: str, **kw) -> Member:
    """The marker hiding *path* (``"a/b"`` -> ``"a/.wh.b"``)."""
    head, _, base = path.rstrip("/").rpartition("/")
    return Member(f"{head}/{WHITEOUT_PREFIX}{base}" if head
                  else WHITEOUT_PREFIX + base, FILE, **kw)


def opaque(directory_path: str, **kw) -> Member:
    """The marker hiding every lower child of *directory_path*."""
    head = directory_path.strip("/")
    return Member(f"{head}/{OPAQUE_MARKER}" if head else OPAQUE_MARKER,
                  FILE, **kw)
