"""A small example image that layerfs builds itself (``layerfs example DIR``).

Three layers that show what a union of layers does: a base, a layer that
changes, deletes (whiteout) and replaces a directory (opaque marker), and a
layer compressed with gzip (zstd on request) that adds hardlinks and symlinks.  The quickstart
mounts it; tests use it as a known image.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import tempfile

import zstandard

from .imagewrite import write_oci_layout
from .tarwrite import GZIP_LEVEL

EXAMPLE_TAG = "example"
MTIME = 1_700_000_000

# (member name, kind, content or link target, mode); kind: f d l h
BASE = [
    ("etc/", "d", None, 0o755),
    ("etc/os-release", "f", b'NAME="layerfs example"\nID=layerfs\n', 0o644),
    ("etc/motd", "f", b"Welcome to the base layer.\n", 0o644),
    ("etc/old.conf", "f", b"# deleted by layer 1\n", 0o644),
    ("usr/", "d", None, 0o755),
    ("usr/bin/", "d", None, 0o755),
    ("usr/bin/hello", "f", b"#!/bin/sh\necho hello from layerfs\n", 0o755),
    ("var/", "d", None, 0o755),
    ("var/cache/", "d", None, 0o755),
    ("var/cache/stale-1", "f", b"stale\n", 0o644),
    ("var/cache/stale-2", "f", b"stale\n", 0o644),
]
CHANGES = [
    ("etc/motd", "f", b"Welcome: layer 1 replaced this file.\n", 0o644),
    ("etc/.wh.old.conf", "f", b"", 0o644),
    ("var/cache/.wh..wh..opq", "f", b"", 0o644),
    ("var/cache/fresh", "f", b"only this survives the opaque marker\n", 0o644),
]
LINKS = [
    ("bin", "l", "usr/bin", 0o777),
    ("usr/bin/hi", "h", "usr/bin/hello", 0o755),
    ("README", "f", b"This image was built by `layerfs example`.\n"
                    b"Try: ls -la, cat etc/motd, stat usr/bin/hi.\n", 0o644),
]


def layer_tar(members) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload, mode in members:
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = mode, MTIME
            data = None
            if kind == "d":
                info.type = tarfile.DIRTYPE
            elif kind == "l":
                info.type, info.linkname = tarfile.SYMTYPE, payload
            elif kind == "h":
                info.type, info.linkname = tarfile.LNKTYPE, payload
            else:
                info.size = len(payload)
                data = io.BytesIO(payload)
            tar.addfile(info, data)
    return buffer.getvalue()


def build_example(dest: str, zstd: bool = False) -> str:
    """Write the example image as an OCI layout at *dest*; returns *dest*.

    The last layer is gzip-compressed, which every tool reads, or
    zstd-compressed where *zstd* is true (Debian 12's umoci and skopeo
    refuse zstd layers)."""
    last = layer_tar(LINKS)
    compressed = (zstandard.ZstdCompressor().compress(last) if zstd
                  else gzip.compress(last, compresslevel=GZIP_LEVEL, mtime=0))
    blobs = [layer_tar(BASE), layer_tar(CHANGES), compressed]
    with tempfile.TemporaryDirectory(prefix="layerfs-example-") as scratch:
        paths = []
        for number, blob in enumerate(blobs):
            path = os.path.join(scratch, f"layer{number}")
            with open(path, "wb") as stream:
                stream.write(blob)
            paths.append(path)
        write_oci_layout(dest, paths, tag=EXAMPLE_TAG)
    return dest
