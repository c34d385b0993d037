"""eStargz: a gzip layer whose every file chunk is its own gzip member.

The format (stargz-snapshotter's ``docs/estargz.md``), as layerfs writes
and reads it:

- the blob is an ordinary multi-member gzip of an ordinary tar, so any
  reader sees a valid ``.tar.gz``;
- each chunk of regular-file data (files are cut every ``chunkSize``,
  4 MiB by default) starts a new gzip member; tar headers between files
  share members;
- the tar's last entry is ``stargz.index.json``, the TOC
  (``{"version": 1, "entries": [...]}``), in a member of its own that also
  holds the tar's end blocks;
- the blob ends with a 51-byte footer: an empty gzip member whose header's
  extra field (subfield ``SG``) holds ``%016xSTARGZ``, the TOC member's
  offset in hex;
- the layer descriptor carries ``containerd.io/snapshot/stargz/toc.digest``,
  the sha256 of the TOC JSON (uncompressed).

The original stargz (Google's CRFS, before eStargz) ends with a 47-byte
footer instead: the same empty gzip member, but its extra field is the bare
22 bytes ``%016xSTARGZ`` (XLEN 22), not wrapped in an RFC 1952 subfield;
eStargz added the ``SG`` subfield header (4 bytes) to conform.  Both are
read (:func:`parse_legacy_footer`); a stargz TOC may lack ``chunkDigest``
for the chunks of a file cut in several (CRFS recorded a digest per file
only), which :func:`layerfs.tocopen.open_toc_layer` handles.

A chunk's compressed range runs from its ``offset`` to the next larger
offset in the TOC (the TOC member's offset for the last); within the
decompressed member, its bytes start at ``innerOffset`` (0 unless several
small files share a member).  The prioritised-files landmarks are optional
and not written; on reading, the files before a ``.prefetch.landmark``
entry (a one-byte file, ``0x0f``) are fetched when a registry layer is
opened (:func:`layerfs.tocopen.prefetch_prioritised`).
"""

from __future__ import annotations

import bisect
import io
import json
import struct
import tarfile
import zlib
from typing import Optional

from .errors import InvalidLayerError
from .toc import MAX_TOC_SIZE

TOC_NAME = "stargz.index.json"
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"
FOOTER_SIZE = 51
PREFETCH_LANDMARK = ".prefetch.landmark"         # ends the prioritised files
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"   # says there are none
LANDMARK_CONTENTS = b"\x0f"                      # what a landmark file holds
LEGACY_FOOTER_SIZE = 47        # the original stargz footer (CRFS)


def compress_member(data: bytes, level: int) -> bytes:
    """*data* as one gzip member (zlib's header: mtime 0, no name)."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


def footer(toc_offset: int) -> bytes:
    """The 51-byte footer: an empty gzip member (stored block) whose extra
    field names the TOC member's offset."""
    payload = b"%016xSTARGZ" % toc_offset
    extra = b"SG" + struct.pack("<H", len(payload)) + payload
    header = b"\x1f\x8b\x08\x04" + bytes(4) + b"\x00\xff" + struct.pack("<H", len(extra))
    return header + extra + b"\x01\x00\x00\xff\xff" + bytes(8)


def parse_footer(data: bytes) -> Optional[int]:
    """The TOC offset a footer gives, or None where *data* (the blob's last
    51 bytes) is no eStargz footer."""
    if len(data) != FOOTER_SIZE or data[:4] != b"\x1f\x8b\x08\x04":
        return None
    (xlen,) = struct.unpack_from("<H", data, 10)
    extra = data[12:12 + xlen]
    if xlen != 26 or extra[:2] != b"SG" or extra[-6:] != b"STARGZ":
        return None
    try:
        return int(extra[4:20], 16)
    except ValueError:
        return None


def legacy_footer(toc_offset: int) -> bytes:
    """The original stargz's 47-byte footer: an empty gzip member (stored
    block) whose whole extra field is ``%016xSTARGZ``.  layerfs does not
    write such layers; tests build them with it."""
    extra = b"%016xSTARGZ" % toc_offset
    header = b"\x1f\x8b\x08\x04" + bytes(4) + b"\x00\xff" + struct.pack("<H", len(extra))
    return header + extra + b"\x01\x00\x00\xff\xff" + bytes(8)


def parse_legacy_footer(data: bytes) -> Optional[int]:
    """The TOC offset an original stargz footer gives, or None where *data*
    (the blob's last 47 bytes) is no such footer."""
    if len(data) != LEGACY_FOOTER_SIZE or data[:4] != b"\x1f\x8b\x08\x04":
        return None
    (xlen,) = struct.unpack_from("<H", data, 10)
    extra = data[12:12 + xlen]
    if xlen != 22 or extra[-6:] != b"STARGZ":
        return None
    try:
        return int(extra[:16], 16)
    except ValueError:
        return None


def find_footer(tail: bytes) -> Optional[tuple[int, int]]:
    """(TOC offset, footer size) from the blob's last bytes (at least 51),
    for an eStargz footer or, failing that, an original stargz one."""
    offset = parse_footer(tail[-FOOTER_SIZE:])
    if offset is not None:
        return offset, FOOTER_SIZE
    offset = parse_legacy_footer(tail[-LEGACY_FOOTER_SIZE:])
    if offset is not None:
        return offset, LEGACY_FOOTER_SIZE
    return None


def decompress_member(raw: bytes, limit: int) -> bytes:
    """The first gzip member of *raw*, decompressed (at most *limit* bytes)."""
    decompressor = zlib.decompressobj(31)
    try:
        out = decompressor.decompress(raw, limit)
    except zlib.error as error:
        raise InvalidLayerError(f"corrupt gzip member ({error})") from None
    if not decompressor.eof and len(out) < limit:
        raise InvalidLayerError("gzip member is truncated")
    return out


def read_toc_member(member: bytes, label: str) -> tuple[bytes, tarfile.TarInfo]:
    """The TOC JSON bytes and their tar header, from the TOC member
    (already decompressed: the ``stargz.index.json`` header, its data and
    the tar's end)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(member), mode="r:") as tar:
            info = tar.next()
            if info is None or info.name != TOC_NAME or not info.isfile():
                raise InvalidLayerError(f"the footer's TOC offset points to no "
                                        f"{TOC_NAME}", layer=label)
            data = tar.extractfile(info).read()
    except tarfile.TarError as error:
        raise InvalidLayerError(f"the TOC member is not a tar ({error})",
                                layer=label) from None
    if len(data) != info.size:
        raise InvalidLayerError(f"{TOC_NAME} is truncated", layer=label)
    return data, info


def chunk_ranges(toc: dict, toc_offset: int):
    """A ``ranges`` function for :func:`layerfs.toc.build_entries`: each
    chunk's range ends where the next larger offset begins."""
    offsets = sorted({e.get("offset") for e in toc["entries"]
                      if isinstance(e, dict) and isinstance(e.get("offset"), int)
                      and e.get("offset", 0) > 0} | {toc_offset})

    def ranges(chunks: list) -> list:
        out = []
        for chunk in chunks:
            start = chunk.get("offset")
            if not isinstance(start, int) or start <= 0 or start >= toc_offset:
                out.append((-1, -1))
                continue
            out.append((start, offsets[bisect.bisect_right(offsets, start)]))
        return out
    return ranges


def parse_toc(data: bytes, label: str) -> dict:
    if len(data) > MAX_TOC_SIZE:
        raise InvalidLayerError(f"{TOC_NAME} is larger than {MAX_TOC_SIZE} bytes",
                                layer=label)
    try:
        return json.loads(data)
    except ValueError as error:
        raise InvalidLayerError(f"{TOC_NAME} is not JSON ({error})", layer=label) from None
