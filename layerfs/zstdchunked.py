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
- a tar-split (containers/storage writes one, in a skippable frame between
  the manifest and the footer): zstd-compressed JSON lines, each either a
  segment of raw tar bytes (headers, padding) or a reference to a member's
  contents by name; with the files' bytes from their chunks it gives back
  the tar byte for byte, so the layer's diff_id can be checked
  (:meth:`layerfs.toc.TocLayer.verify_diff_id`).  Its annotations
  ``...tarsplit-checksum`` / ``...tarsplit-position`` mirror the manifest's;
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
TARSPLIT_CHECKSUM_ANNOTATION = "io.github.containers.zstd-chunked.tarsplit-checksum"
TARSPLIT_POSITION_ANNOTATION = "io.github.containers.zstd-chunked.tarsplit-position"
SKIPPABLE_MAGIC = 0x184D2A50
FOOTER_MAGIC = b"GNUlInUx"
FOOTER_DATA_SIZE = 64
FOOTER_SIZE = 8 + FOOTER_DATA_SIZE
MANIFEST_TYPE_CRFS = 1


def compress_frame(data: bytes, level: int) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(data)


def skippable_frame(data: bytes) -> bytes:
    return struct.pack("<II", SKIPPABLE_MAGIC, len(data)) + data


def footer(offset: int, length: int, uncompressed: int,
           tarsplit: tuple[int, int, int] = (0, 0, 0)) -> bytes:
    """The 72-byte footer; *tarsplit*: the tar-split's (offset, compressed
    length, uncompressed length), zeros where there is none."""
    data = struct.pack("<7Q", offset, length, uncompressed, MANIFEST_TYPE_CRFS, *tarsplit)
    return skippable_frame(data + FOOTER_MAGIC)


def parse_footer_tarsplit(data: bytes) -> Optional[tuple[int, int, int]]:
    """The tar-split's (offset, compressed length, uncompressed length) a
    footer gives, or None (no footer, or no tar-split: length 0)."""
    if parse_footer(data) is None:
        return None
    offset, length, uncompressed = struct.unpack_from("<3Q", data, 8 + 32)
    return (offset, length, uncompressed) if length else None


def parse_tarsplit_position(text: str, label: str) -> tuple[int, int, int]:
    """The tarsplit-position annotation ``offset:length:uncompressed``."""
    return _parse_numbers(text, TARSPLIT_POSITION_ANNOTATION,
                          ("offset", "length", "uncompressed_length"), label)


def tarsplit_records(data: bytes, label: str):
    """The records of a tar-split (vbatts/tar-split, JSON lines): each
    ``("segment", raw bytes)`` (type 2: tar headers and padding, inline) or
    ``("file", name, size)`` (type 1: a member's contents, kept elsewhere;
    its ``payload`` is a CRC-64 that the caller may ignore when it checks
    the whole tar's digest instead)."""
    import base64
    import binascii
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            kind = record["type"]
            if kind == 2:
                yield "segment", base64.b64decode(record.get("payload") or b"", validate=True)
            elif kind == 1:
                name = record.get("name")
                if name is None and record.get("name_raw"):
                    name = base64.b64decode(record["name_raw"]).decode("utf-8",
                                                                       "surrogateescape")
                size = record.get("size", 0) or 0
                if not isinstance(name, str) or not isinstance(size, int) or size < 0:
                    raise ValueError("a file record needs a name and a size")
                yield "file", name, size
            else:
                raise ValueError(f"unknown record type {kind!r}")
        except (ValueError, KeyError, TypeError, binascii.Error) as error:
            raise InvalidLayerError(f"tar-split line {number}: {error}",
                                    layer=label) from None


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
    return _parse_numbers(text, POSITION_ANNOTATION,
                          ("offset", "length", "uncompressed_length", "type"), label)


def _parse_numbers(text: str, annotation: str, fields: tuple, label: str) -> tuple:
    """The annotation *text*: one non-negative integer per field, joined by ``:``."""
    try:
        values = tuple(int(part) for part in text.split(":"))
    except (ValueError, AttributeError):
        values = ()
    if len(values) != len(fields) or min(values) < 0:
        raise InvalidLayerError(f"{annotation} {text!r} is not {':'.join(fields)}",
                                layer=label)
    return values


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
