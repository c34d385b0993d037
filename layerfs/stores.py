"""Where an image's files are: an OCI layout's directory, an uncompressed
tar archive read in place, or a compressed one read from its indexed copy.

Each store answers the same four questions about a file of the image, by
its name inside the layout or archive (``index.json``,
``blobs/sha256/<hex>``): :meth:`where` it is (for messages), its
:meth:`size`, its bytes (:meth:`read`, for the small JSON files, at most
:data:`MAX_JSON_SIZE` + 1 bytes) and a :meth:`source` to open it as a layer.
An archive is never extracted.  Which files make up an image is
:mod:`layerfs.image`'s business; a registry is :class:`layerfs.remote.RemoteStore`.
"""

from __future__ import annotations

import json
import os
import stat
import tarfile
from typing import Any

from .entry import HARDLINK, REGULAR
from .errors import InvalidLayerError, UnsupportedImageError
from .layer import BlobSource, Layer
from .paths import BadMemberName, normalize_member_name

MAX_JSON_SIZE = 64 << 20   # an index, manifest or config larger than this is refused


class DirStore:
    """Files of an OCI layout directory."""

    def __init__(self, root: str):
        self.label = root

    def where(self, name: str) -> str:
        return os.path.join(self.label, name)

    def size(self, name: str) -> int | None:
        """Size of the regular file *name*, or None if there is none."""
        try:
            st = os.stat(self.where(name))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def read(self, name: str) -> bytes:
        with open(self.where(name), "rb") as f:
            return f.read(MAX_JSON_SIZE + 1)

    def source(self, name: str) -> str | BlobSource:
        return self.where(name)


class TarStore:
    """Regular files of an uncompressed tar, read in place: ``members``
    maps a name to its ``(offset, size)`` in the file at ``data_path``."""

    def __init__(self, path: str):
        self.label = self.data_path = path
        self.members = _tar_members(path)

    def where(self, name: str) -> str:
        return f"{self.label}:{name}"

    def size(self, name: str) -> int | None:
        member = self.members.get(name)
        return None if member is None else member[1]

    def read(self, name: str) -> bytes:
        offset, size = self.members[name]
        with open(self.data_path, "rb") as f:
            f.seek(offset)
            return f.read(min(size, MAX_JSON_SIZE + 1))

    def source(self, name: str) -> BlobSource:
        offset, size = self.members[name]
        return BlobSource(self.data_path, offset, size)


_COMPRESSED_MAGIC = {
    b"\x1f\x8b": "gzip", b"\x28\xb5\x2f\xfd": "zstd", b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
}


def _tar_members(path: str) -> dict[str, tuple[int, int]]:
    """``{name: (data offset, size)}`` for the regular files of the tar at
    *path*, names normalised (``./blobs/x`` is ``blobs/x``), symlinks and
    hardlinks resolved to the file they name (old ``docker save`` archives
    link identical layers)."""
    with open(path, "rb") as f:
        head = f.read(8)
        file_size = os.fstat(f.fileno()).st_size
        for magic, name in _COMPRESSED_MAGIC.items():
            if head.startswith(magic):
                raise UnsupportedImageError(
                    f"{name}-compressed archive: layerfs reads image archives in "
                    "place and needs an uncompressed tar; decompress it first",
                    path=path)
        f.seek(0)
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                infos = tar.getmembers()
        except tarfile.TarError as e:
            raise UnsupportedImageError(
                f"not an OCI layout, OCI archive or docker archive ({e})", path=path) from None
    files: dict[str, tuple[int, int]] = {}
    links: dict[str, str] = {}
    for info in infos:
        try:
            name = normalize_member_name(info.name)[1:]
        except BadMemberName as e:
            raise UnsupportedImageError(f"archive member {info.name!r}: {e}", path=path) from None
        if info.isreg() and info.sparse is None:
            if info.size < 0 or info.offset_data + info.size > file_size:
                raise UnsupportedImageError(f"archive member {name!r} is truncated", path=path)
            files[name] = (info.offset_data, info.size)
        elif info.issym() or info.islnk():
            base = os.path.dirname(name) if info.issym() else ""
            links[name] = os.path.join(base, info.linkname)
    for name in links:
        target = _resolve_link(name, links, files)
        if target is not None:
            files[name] = files[target]
    return files


def _resolve_link(name: str, links: dict[str, str], files: dict) -> str | None:
    for _ in range(8):
        try:
            name = normalize_member_name(links[name])[1:]
        except BadMemberName:
            return None
        if name in files:
            return name
        if name not in links:
            return None
    return None


class CompressedTarStore(TarStore):
    """The regular files of a gzip- or zstd-compressed tar, read in place
    from its uncompressed copy: a ``docker save | gzip`` archive is indexed
    once like a layer, then its members are byte ranges of that copy."""

    def __init__(self, path: str, outer: Layer):     # members from the index, not a tar walk
        self.label = path
        self.outer = outer
        try:
            self.data_path, base = outer.data_location()
        except InvalidLayerError:     # beyond the cache budget: read through the layer
            self.data_path, base = None, 0
        files: dict[str, tuple[int, int]] = {}
        for entry in outer.entries:
            if entry.kind == REGULAR and isinstance(entry.data, int):
                files[entry.path[1:]] = (base + entry.data, entry.size)
        for entry in outer.entries:       # hardlinks: a second name for a file
            if entry.kind == HARDLINK and entry.linkname[1:] in files:
                files[entry.path[1:]] = files[entry.linkname[1:]]
        self.members = files

    def read(self, name: str) -> bytes:
        if self.data_path is not None:
            return super().read(name)
        offset, size = self.members[name]
        return self.outer.read_data(offset, min(size, MAX_JSON_SIZE + 1))

    def source(self, name: str) -> Any:
        if self.data_path is not None:
            return super().source(name)
        offset, size = self.members[name]
        return self.outer.data_blob(offset, size, f"{self.label}:{name}")

    def is_archive(self) -> bool:
        if "index.json" in self.members and "oci-layout" in self.members:
            return True
        if "manifest.json" not in self.members:
            return False
        try:
            entries = json.loads(self.read("manifest.json"))
        except ValueError:
            return False
        return isinstance(entries, list) and bool(entries) and all(
            isinstance(e, dict) and "Config" in e and "Layers" in e for e in entries)
