"""Turning abstract layers into real tar files and images.

Tars are written with Python's :mod:`tarfile`, member by member in the
described order, names exactly as described (no normalisation), so that
readers meet the spellings and orderings of the description.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile

import zstandard

from layerfs.testing import layers as L

COMPRESSIONS = ("none", "gzip", "zstd")
FORMATS = {"pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT, "ustar": tarfile.USTAR_FORMAT}
IMAGE_KINDS = ("layers", "oci-layout", "oci-archive", "docker-archive")

_TYPES = {L.FILE: tarfile.REGTYPE, L.DIR: tarfile.DIRTYPE, L.SYMLINK: tarfile.SYMTYPE,
          L.HARDLINK: tarfile.LNKTYPE, L.FIFO: tarfile.FIFOTYPE,
          L.CHARDEV: tarfile.CHRTYPE, L.BLOCKDEV: tarfile.BLKTYPE}


def tar_bytes(layer: L.Layer, format: str = "pax") -> bytes:
    """The uncompressed tar of *layer*.  Only the pax format can hold
    xattrs: asking for another one with xattrs raises ``ValueError``, as
    does a name the format cannot hold (tarfile's own check)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=FORMATS[format],
                      encoding="utf-8", errors="surrogateescape") as tar:
        for member in layer:
            _add(tar, member, format)
    return out.getvalue()


def _add(tar: tarfile.TarFile, member: L.Member, format: str) -> None:
    info = tarfile.TarInfo(member.name)
    info.type = _TYPES[member.kind]
    info.mode, info.uid, info.gid, info.mtime = member.mode, member.uid, member.gid, member.mtime
    info.uname = info.gname = ""
    if member.kind in (L.SYMLINK, L.HARDLINK):
        info.linkname = member.target
    if member.kind in L.DEVICE_KINDS:
        info.devmajor, info.devminor = member.devmajor, member.devminor
    if member.xattrs:
        if format != "pax":
            raise ValueError(f"{member.name!r}: only the pax format holds xattrs")
        info.pax_headers = {"SCHILY.xattr." + name: value.decode("utf-8", "surrogateescape")
                            for name, value in member.xattrs}
    if member.kind == L.FILE:
        info.size = len(member.content)
        tar.addfile(info, io.BytesIO(member.content))
    else:
        tar.addfile(info)


def compress(data: bytes, compression: str) -> bytes:
    if compression == "none":
        return data
    if compression == "gzip":
        return gzip.compress(data, compresslevel=1, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=1).compress(data)
    raise ValueError(f"unknown compression {compression!r}; expected one of {COMPRESSIONS}")


def write_layer(layer: L.Layer, path, compression: str = "none", format: str = "pax") -> str:
    """Write *layer* as a tar file at *path*; return the path."""
    path = os.fspath(path)
    with open(path, "wb") as f:
        f.write(compress(tar_bytes(layer, format), compression))
    return path


def write_image(stack, dest, kind: str = "oci-layout", compression: str = "gzip",
                format: str = "pax"):
    """Write *stack* (layers, base first) below the directory *dest* as an
    image of *kind* and return what to pass to :func:`layerfs.open`.

    ``"layers"`` gives the list of layer files itself; ``"oci-layout"`` a
    layout directory; ``"oci-archive"`` and ``"docker-archive"`` a tar.
    """
    if kind not in IMAGE_KINDS:
        raise ValueError(f"unknown image kind {kind!r}; expected one of {IMAGE_KINDS}")
    dest = os.fspath(dest)
    blob_dir = os.path.join(dest, "layer-files")
    os.makedirs(blob_dir, exist_ok=True)
    blobs = [write_layer(layer, os.path.join(blob_dir, f"layer{i}.tar"), compression, format)
             for i, layer in enumerate(stack)]
    if kind == "layers":
        return blobs
    from layerfs import imagewrite      # only images need the rest of layerfs
    if kind == "oci-layout":
        target = os.path.join(dest, "oci-layout")
        imagewrite.write_oci_layout(target, blobs, tag="latest")
    elif kind == "oci-archive":
        target = os.path.join(dest, "image.oci.tar")
        imagewrite.write_oci_archive(target, blobs, tag="latest")
    else:
        target = os.path.join(dest, "image.docker.tar")
        imagewrite.write_docker_archive(target, blobs, ["layerfs-testing:latest"])
    return target
