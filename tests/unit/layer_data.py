"""Layer blobs for the cache and seek-point tests: a pax tar of regular
files, compressed as a registry would serve it."""

from __future__ import annotations

import gzip

import zstandard

from layerfs.testing import layers as L
from layerfs.testing.writers import tar_bytes


def make_tar(files: dict) -> bytes:
    """A pax tar of regular files, name -> contents."""
    return tar_bytes(L.Layer([L.file(name, data) for name, data in files.items()]))


def compress(kind: str, data: bytes) -> bytes:
    """*data* as ``gzip``, ``zstd`` (one frame), ``zstd-frames`` (a frame
    per 100,000 bytes, as some writers do: not aligned to anything), or
    as it is for any other *kind*."""
    if kind == "gzip":
        return gzip.compress(data, compresslevel=1)
    compressor = zstandard.ZstdCompressor(level=3)
    if kind == "zstd":
        return compressor.compress(data)
    if kind == "zstd-frames":
        return b"".join(compressor.compress(data[i:i + 100_000])
                        for i in range(0, len(data), 100_000))
    return data
