"""zstd:chunked: a zstd layer whose every file chunk is its own zstd frame.

The format (containers/storage ``pkg/chunked``), as layerfs writes and
reads it:

- the blob is an ordinary multi-frame zstd stream of an ordinary tar: the
  TOC and the footer sit in *skippable* frames, which every zstd decoder
  passes over, so the tar inside is exactly the plain tar;
- each chunk of regular-file data starts a new frame; its TOC entry gives
  the frame's compressed ``offset`` and ``endOffset``;
- the TOC (the "manifest", ``{"version": 1, "entries": [...]}``) is
  zstd-compressed inside a skippable frame after the tar's last frame;
- the blob ends with a skippable frame of 64 bytes, little-endian:
  manifest offset, compressed length, uncompressed length, manifest type
  (1, CRFS), tar-split offset, compressed and uncompressed length (0 here:
  layerfs writes no tar-split, so containers/storage reads such a layer by
  an ordinary download rather than partially), then ``GNUlInUx``;
- the layer descriptor carries
  ``io.github.containers.zstd-chunked.manifest-checksum`` (the sha256 of
  the *compressed* manifest) and ``...manifest-position`` =
  ``offset:length:uncompressed_length:type``, so one ranged read fetches it.
"""

from __future__ import annotations

import json
import struct
from typing import Optional

import zstandard

from .errors import InvalidLayerError
from .toc import MAX_TOC_SIZE

CHECKSUM_ANNOTATION = "io.github.containers.zstd-chunked.manifest-checksum"
POSITION_ANNOTATION = "io.github.containers.zstd-chunked.manifest-position"
SKIPPABLE_MAGIC = 0x184D2A50
FOOTER_MAGIC = b"GNUlInUx"
FOOTER_DATA_SIZE = 64
FOOTER_SIZE = 8 + FOOTER_DATA_SIZE
MANIFEST_TYPE_CRFS = 1


def compress_frame(data: bytes, level: int) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(data)


def skippable_frame(data: bytes) -> bytes:
    return struct.pack("<II", SKIPPABLE_MAGIC, len(data)) + data


def footer(offset: int, length: int, uncompressed: int) -> bytes:
    data = struct.pack("<7Q", offset, length, uncompressed, MANIFEST_TYPE_CRFS, 0, 0, 0)
    return skippable_frame(data + FOOTER_MAGIC)


def parse_footer(data: bytes) -> Optional[tuple[int, int, int, int]]:
    """(offset, length, uncompressed length, type) from the blob's last 72
    bytes, or None where they are no zstd:chunked footer."""
    if len(data) != FOOTER_SIZE or data[-8:] != FOOTER_MAGIC:
        return None
    magic, size = struct.unpack_from("<II", data)
    if magic != SKIPPABLE_MAGIC or size != FOOTER_DATA_SIZE:
        return None
    return struct.unpack_from("<4Q", data, 8)


def parse_position(text: str, label: str) -> tuple[int, int, int, int]:
    """The manifest-position annotation ``offset:length:uncompressed:type``."""
    try:
        values = tuple(int(part) for part in text.split(":"))
    except (ValueError, AttributeError):
        values = ()
    if len(values) != 4 or min(values) < 0:
        raise InvalidLayerError(f"{POSITION_ANNOTATION} {text!r} is not "
                                "offset:length:uncompressed_length:type", layer=label)
    return values  # type: ignore[return-value]


def decompress_frames(raw: bytes, limit: int) -> bytes:
    """The zstd frames of *raw*, decompressed (at most *limit* bytes)."""
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        parts, size = [], 0
        while size < limit:
            part = reader.read(limit - size)
            if not part:
                break
            parts.append(part)
            size += len(part)
        return b"".join(parts)
    except zstandard.ZstdError as error:
        raise InvalidLayerError(f"corrupt zstd frame ({error})") from None


def read_manifest(raw: bytes, uncompressed: int, label: str) -> dict:
    if uncompressed > MAX_TOC_SIZE:
        raise InvalidLayerError(f"the zstd:chunked manifest is larger than {MAX_TOC_SIZE} "
                                "bytes", layer=label)
    try:
        data = decompress_frames(raw, uncompressed + 1)
    except InvalidLayerError as error:
        raise InvalidLayerError(f"manifest: {error.reason}", layer=label) from None
    if len(data) != uncompressed:
        raise InvalidLayerError(f"the manifest is {len(data)} bytes, not the "
                                f"{uncompressed} its position says", layer=label)
    try:
        return json.loads(data)
    except ValueError as error:
        raise InvalidLayerError(f"the manifest is not JSON ({error})", layer=label) from None


def chunk_ranges(chunks: list) -> list:
    """A ``ranges`` function for :func:`layerfs.toc.build_entries`."""
    out = []
    for chunk in chunks:
        start, end = chunk.get("offset"), chunk.get("endOffset")
        if chunk.get("chunkType") == "zeros":
            out.append((0, 0))
        elif isinstance(start, int) and isinstance(end, int) and 0 <= start < end:
            out.append((start, end))
        else:
            out.append((-1, -1))
    return out
