"""Layers with a table of contents (eStargz, zstd:chunked): the shared model.

Everything the two formats have in common lives here: the TOC entry JSON
(both descend from CRFS's ``stargz.index.json``: ``name``, ``type``,
``mode``, ``uid``, ``gid``, ``modtime``, ``linkName``, ``devMajor``,
``devMinor``, ``xattrs`` (base64), ``digest``, ``offset``, ``chunkOffset``,
``chunkSize``, ``chunkDigest``), the writer's sink that compresses the tar
one member (gzip) or frame (zstd) at a time so that every chunk of file data
starts one, and :class:`TocLayer`, a layer read from its TOC alone.  The
format modules (:mod:`layerfs.estargz`, :mod:`layerfs.zstdchunked`) say
where the TOC is, how it is verified and how a member is (de)compressed.

Trust: nothing is used before a digest covers it.  The TOC is checked
against the digest the layer descriptor's annotation gives (or, without the
annotation, the whole blob against the layer digest); every chunk read is
checked against its ``chunkDigest`` in the TOC before a byte of it is
returned.  A layer opened this way never checks its ``diff_id`` (that would
mean decompressing it all): its contents are covered by the chunk digests.
"""

from __future__ import annotations

import base64
import bisect
import binascii
import datetime
import errno
import hashlib
import os
import re
import threading
from collections import OrderedDict
from typing import Any, Callable, Optional

from .entry import (BLOCKDEV, CHARDEV, DIRECTORY, FIFO, HARDLINK, REGULAR, SYMLINK,
                    Entry)
from .errors import DigestMismatchError, InvalidLayerError, path_error
from .paths import BadMemberName, normalize_member_name

DEFAULT_CHUNK_SIZE = 4 << 20     # stargz-snapshotter's and containers/storage's default
CHUNK_CACHE_BYTES = 32 << 20     # decompressed chunks kept per open layer
MAX_TOC_SIZE = 256 << 20         # uncompressed; a bigger TOC is refused, not inflated
PREFETCH_LIMIT = 32 << 20        # compressed bytes of prioritised files fetched on open

_TYPES = {"reg": REGULAR, "dir": DIRECTORY, "symlink": SYMLINK, "hardlink": HARDLINK,
          "char": CHARDEV, "block": BLOCKDEV, "fifo": FIFO}
TYPE_NAMES = {kind: name for name, kind in _TYPES.items()}
_TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?"
                   r"(?:[Zz]|([+-])(\d\d):(\d\d))$")


# -- times and digests ---------------------------------------------------------

def format_time(mtime_ns: int) -> str:
    """RFC 3339 in UTC, with a fraction only where there is one (Go's
    ``time.RFC3339Nano``, which both formats' writers use)."""
    seconds, nanos = divmod(mtime_ns, 1_000_000_000)
    moment = datetime.datetime(1970, 1, 1) + datetime.timedelta(seconds=seconds)
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if nanos:
        text += "." + f"{nanos:09d}".rstrip("0")
    return text + "Z"


def parse_time(text: Any) -> int:
    """Nanoseconds since 1970 of an RFC 3339 date (0 where absent); raises
    ValueError for anything else."""
    if text in (None, ""):
        return 0
    match = _TIME.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"modtime {text!r} is not an RFC 3339 date")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction, sign, off_h, off_m = match.groups()[6:]
    moment = datetime.datetime(year, month, day, hour, minute, min(second, 59))
    seconds = (moment - datetime.datetime(1970, 1, 1)) // datetime.timedelta(seconds=1)
    if sign:
        offset = int(off_h) * 3600 + int(off_m) * 60
        seconds -= offset if sign == "+" else -offset
    nanos = int((fraction or "0").ljust(9, "0"))
    return seconds * 1_000_000_000 + nanos


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- writing -------------------------------------------------------------------

class ChunkedSink:
    """The stream :mod:`tarfile` writes the uncompressed tar into.  Bytes
    gather in a buffer; :meth:`cut` compresses the buffer as one member
    (gzip) or frame (zstd) with *compress* and writes it to *out* (which
    has ``write`` and ``tell``).  The writer cuts before every chunk of file
    data and after a file's last chunk, so each chunk is one member whose
    compressed range the TOC records; headers between files share members."""

    def __init__(self, out, compress: Callable[[bytes], bytes], chunk_size: int):
        self._out = out
        self._compress = compress
        self._buffer = bytearray()
        self._written = 0
        self._chunk_size = chunk_size
        self.in_chunk = False

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        self._buffer += data
        self._written += size
        if not self.in_chunk and len(self._buffer) >= self._chunk_size:
            self.cut()      # a long run of headers: bound the memory it holds
        return size

    def tell(self) -> int:
        return self._written

    def flush(self) -> None:
        pass

    def cut(self) -> int:
        """End the current member (if it holds anything); returns the
        compressed offset where the next one starts."""
        if self._buffer:
            self._out.write(self._compress(bytes(self._buffer)))
            self._buffer.clear()
        return self._out.tell()


class ChunkReader:
    """A file-like view of a regular file's bytes for ``tarfile.addfile``
    that cuts the sink at every chunk boundary and records each chunk's
    compressed offsets and digest in the TOC entries it appends.

    ``tarfile`` copies in reads of exactly 16 KiB (``copyfileobj``), so a
    chunk size that is a multiple of it puts every boundary between reads."""

    def __init__(self, sink: ChunkedSink, read: Callable[[int, int], bytes], size: int,
                 entry: dict, toc_entries: list, chunk_size: int, with_end: bool):
        self._sink = sink
        self._read = read
        self._size = size
        self._entry = entry
        self._toc = toc_entries
        self._chunk_size = chunk_size
        self._with_end = with_end         # zstd:chunked records endOffset too
        self._offset = 0
        self._file_hash = hashlib.sha256()
        self._chunk_hash = None
        self._current: Optional[dict] = None

    def read(self, length: int = -1) -> bytes:
        if length is None or length < 0:
            length = self._size - self._offset
        if self._offset % self._chunk_size == 0 and self._offset < self._size:
            self._start_chunk()
        in_chunk = self._chunk_size - self._offset % self._chunk_size
        length = min(length, self._size - self._offset, in_chunk)
        data = self._read(self._offset, length)
        if len(data) != length:
            raise OSError(errno.EIO, f"{self._entry['name']}: file changed while "
                                     f"it was written ({len(data)} of {length} bytes)")
        self._offset += len(data)
        self._file_hash.update(data)
        self._chunk_hash.update(data)
        return data

    def _start_chunk(self) -> None:
        start = self._sink.cut()
        self._end_chunk(start)
        self._sink.in_chunk = True
        if self._offset == 0:
            chunk = self._entry
        else:
            chunk = {"name": self._entry["name"], "type": "chunk"}
            self._toc.append(chunk)
        chunk["offset"] = start
        chunk["chunkOffset"] = self._offset
        chunk["chunkSize"] = min(self._chunk_size, self._size - self._offset)
        self._chunk_hash = hashlib.sha256()
        self._current = chunk

    def _end_chunk(self, end: int) -> None:
        if self._current is not None:
            self._current["chunkDigest"] = "sha256:" + self._chunk_hash.hexdigest()
            if self._with_end:
                self._current["endOffset"] = end
            self._current = None

    def finish(self) -> None:
        """After the file's data: end its last member, fill its digest."""
        if self._offset != self._size:
            raise OSError(errno.EIO, f"{self._entry['name']}: {self._offset} of "
                                     f"{self._size} bytes written")
        self._sink.in_chunk = False
        self._end_chunk(self._sink.cut())
        if self._size:
            self._entry["digest"] = "sha256:" + self._file_hash.hexdigest()


def toc_entry(info, kind: int, mtime_ns: int, xattrs: Optional[dict]) -> dict:
    """The TOC entry of a tar member (``tarfile.TarInfo``) of *kind*."""
    entry: dict = {"name": info.name, "type": TYPE_NAMES[kind], "mode": info.mode,
                   "uid": info.uid, "gid": info.gid, "modtime": format_time(mtime_ns)}
    if kind == REGULAR:
        entry["size"] = info.size
    if kind in (SYMLINK, HARDLINK):
        entry["linkName"] = info.linkname
    if kind in (CHARDEV, BLOCKDEV):
        entry["devMajor"], entry["devMinor"] = info.devmajor, info.devminor
    if xattrs:
        entry["xattrs"] = {name: base64.b64encode(value).decode("ascii")
                           for name, value in sorted(xattrs.items())}
    return entry


# -- reading -------------------------------------------------------------------

class Chunk(tuple):
    """Where one chunk of a file is: ``(file_offset, length, start, end,
    inner, digest, zeros)``: its bytes are *length* bytes from *inner* of
    the decompressed blob range [*start*, *end*); *zeros* for a hole."""
    __slots__ = ()


def build_entries(toc: Any, label: str, ranges: Callable[[list], list]) -> tuple[list, list]:
    """Entries (:class:`~layerfs.entry.Entry`, in TOC order) and the chunk
    lists they point at (``Entry.data`` is an index into the second list)
    from a parsed TOC.  *ranges(chunk_dicts)* gives each chunk's compressed
    ``(start, end)``: the formats differ there.  Malformed TOCs raise
    :class:`InvalidLayerError` naming the entry."""
    if not isinstance(toc, dict) or not isinstance(toc.get("entries"), list):
        raise InvalidLayerError("the table of contents has no entries list", layer=label)
    entries: list = []
    files: list = []
    chunk_dicts: list = []         # per file: its chunk dicts, in file order
    by_name: dict = {}
    for item in toc["entries"]:
        if not isinstance(item, dict):
            raise InvalidLayerError("a TOC entry is not an object", layer=label)
        name = item.get("name")
        kind_name = item.get("type")
        if kind_name == "chunk":
            owner = by_name.get(name)
            if owner is None:
                raise InvalidLayerError("a chunk follows no regular file",
                                        layer=label, entry=str(name))
            chunk_dicts[owner].append(item)
            continue
        try:
            entry = _entry(item, label)
        except (ValueError, TypeError, KeyError, binascii.Error, BadMemberName) as error:
            raise InvalidLayerError(f"bad TOC entry: {error}", layer=label,
                                    entry=str(name)) from None
        if entry.kind == REGULAR:
            by_name[name] = len(files)
            entry = entry._replace(data=len(files))
            files.append(entry)
            chunk_dicts.append([item] if entry.size else [])
        entries.append(entry)
    spans = ranges([c for chunks in chunk_dicts for c in chunks])
    where = iter(spans)
    chunk_lists = []
    for entry, chunks in zip(files, chunk_dicts):
        chunk_lists.append(_chunks(entry, chunks, where, label))
    return entries, chunk_lists


def _entry(item: dict, label: str) -> Entry:
    kind = _TYPES.get(item["type"])
    if kind is None:
        raise ValueError(f"unknown type {item['type']!r}")
    path = normalize_member_name(_string(item["name"]))
    linkname = _string(item.get("linkName") or "")
    if kind == HARDLINK:
        linkname = normalize_member_name(linkname)
    size = _number(item, "size") if kind == REGULAR else 0
    rdev = (os.makedev(_number(item, "devMajor"), _number(item, "devMinor"))
            if kind in (CHARDEV, BLOCKDEV) else 0)
    xattrs = None
    if item.get("xattrs"):
        xattrs = {_string(k): base64.b64decode(v, validate=True)
                  for k, v in item["xattrs"].items()}
    return Entry(path, kind, _number(item, "mode") & 0o7777, _number(item, "uid"),
                 _number(item, "gid"), parse_time(item.get("modtime")), size,
                 linkname, rdev, xattrs, None)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value


def _number(item: dict, key: str) -> int:
    value = item.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key} {value!r} is not a number")
    return value


def _chunks(entry: Entry, chunks: list, spans, label: str) -> tuple:
    """The :class:`Chunk` tuple of one file, checked to cover it exactly."""
    out = []
    position = 0
    for item in chunks:
        start, end = next(spans)
        offset = item.get("chunkOffset", 0) or 0
        length = item.get("chunkSize") or (entry.size - offset)
        zeros = item.get("chunkType") == "zeros"
        digest = item.get("chunkDigest") or (item.get("digest") if len(chunks) == 1 else None)
        inner = item.get("innerOffset", 0) or 0
        if offset != position or length <= 0 or offset + length > entry.size or (
                not zeros and not (0 <= start < end)):
            raise InvalidLayerError(f"chunk at {offset} does not continue the file "
                                    f"at {position}", layer=label, entry=entry.path)
        if not zeros and not (isinstance(digest, str) and digest.startswith("sha256:")):
            raise InvalidLayerError("a chunk has no sha256 digest to verify it by",
                                    layer=label, entry=entry.path)
        out.append(Chunk((offset, length, start, end, inner, digest, zeros)))
        position = offset + length
    if position != entry.size:
        raise InvalidLayerError(f"chunks cover {position} of {entry.size} bytes",
                                layer=label, entry=entry.path)
    return tuple(out)


class TocLayer:
    """A layer read from its table of contents (see the module docstring):
    the same reading interface as :class:`layerfs.layer.Layer`.  Attributes:
    ``label``, ``path``, ``source`` (the blob source), ``digest``,
    ``diff_id`` (from the config, not verified), ``media_type``,
    ``compression`` (``"gzip"`` or ``"zstd"``: what any reader sees),
    ``toc_format`` (``"estargz"``, ``"zstd:chunked"``), ``size``,
    ``uncompressed_size`` (None: not known without decompressing it all),
    ``entries``, ``entry_count``; ``cache`` is None (its entries' ``data``
    are chunk lists, which the index and view caches must not mix with
    tar offsets)."""

    cache = None
    uncompressed_size = None

    def __init__(self, *, blob, label: str, digest: str, diff_id: Optional[str],
                 media_type: Optional[str], compression: str, toc_format: str,
                 entries: list, chunk_lists: list,
                 decompress: Callable[[bytes, int], bytes], closers: list,
                 store=None, tar_split: Optional[Callable[[], Any]] = None):
        self.source = blob
        self.path = getattr(blob, "path", None) or blob.label
        self.label = label
        self.digest = digest
        self.diff_id = diff_id
        self.media_type = media_type
        self.compression = compression
        self.toc_format = toc_format
        self.size = blob.size
        self._entries = entries
        self._chunk_lists = chunk_lists
        self._decompress = decompress
        self._closers = closers
        self._closed = False
        # fetched chunks kept on disk (layerfs.rangestore), for a registry blob
        self._store = store
        # () -> the tar-split's records (zstd:chunked), where the format has one
        self._tar_split = tar_split
        self._lock = threading.Lock()
        self._cache: OrderedDict = OrderedDict()
        self._cached_bytes = 0

    @property
    def entries(self) -> list:
        return self._entries

    @property
    def entry_count(self) -> int:
        return len(self._entries)

    def release_entries(self) -> None:
        """Kept: they came from the TOC, which is not stored anywhere else."""

    def read(self, data, size: int, offset: int, length: int) -> bytes:
        """Up to *length* bytes at *offset* of the file whose entry has *data*:
        only the chunks that hold them are fetched, each verified."""
        if self._closed:
            raise path_error(errno.EBADF, self.label)
        if length <= 0 or offset >= size:
            return b""
        end = min(offset + length, size)
        chunks = self._chunk_lists[data]
        first = max(bisect.bisect_right(chunks, (offset, float("inf"))) - 1, 0)
        parts = []
        for chunk in chunks[first:]:
            file_offset, chunk_length = chunk[0], chunk[1]
            if file_offset >= end:
                break
            payload = self._chunk_bytes(chunk, data)
            low = max(offset, file_offset) - file_offset
            high = min(end, file_offset + chunk_length) - file_offset
            parts.append(payload[low:high])
        return b"".join(parts)

    def extent(self, data, size: int, offset: int, length: int) -> None:
        """None: a chunk's bytes are in no file a caller could read itself."""
        return None

    def _chunk_bytes(self, chunk: Chunk, data: int) -> bytes:
        file_offset, length, start, end, inner, digest, zeros = chunk
        if zeros:
            return bytes(length)
        key = (start, inner, length)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        payload = None
        stored = self._store.load_range(start, end - start) if self._store else None
        if stored is not None:
            try:             # checked as a fetched chunk is; a bad one is fetched again
                payload = self._verified_payload(stored, chunk, data)
            except (InvalidLayerError, DigestMismatchError):
                payload = None
        if payload is None:
            raw = self.source.read_at(start, end - start)
            if len(raw) != end - start:
                raise InvalidLayerError(f"blob ends before the chunk at {start} "
                                        f"({len(raw)} of {end - start} bytes)",
                                        layer=self._where(), entry=self._name(data))
            payload = self._verified_payload(raw, chunk, data)
            if self._store is not None:
                self._store.save_range(start, raw)
        self._remember(chunk, payload)
        return payload

    def _remember(self, chunk: Chunk, payload: bytes) -> None:
        """Keep a verified chunk's bytes in memory (the last CHUNK_CACHE_BYTES)."""
        key = (chunk[2], chunk[4], chunk[1])
        with self._lock:
            if key in self._cache:
                return
            self._cache[key] = payload
            self._cached_bytes += len(payload)
            while self._cached_bytes > CHUNK_CACHE_BYTES and len(self._cache) > 1:
                _, dropped = self._cache.popitem(last=False)
                self._cached_bytes -= len(dropped)

    def tar_stream(self, piece: int = 1 << 20):
        """The layer's uncompressed tar, byte for byte, rebuilt from its
        tar-split (headers and padding) and its files' chunks (each verified
        against the TOC as for any read): what a zstd:chunked layer written
        by containers/storage carries.  :class:`UnsupportedImageError` for a
        layer with no tar-split."""
        from .errors import UnsupportedImageError
        if self._tar_split is None:
            raise UnsupportedImageError(f"a {self.toc_format} layer has no tar-split to "
                                        "rebuild its tar from", layer=self.label)
        records = self._tar_split()
        files: dict = {}
        for entry in self._entries:
            if entry.kind == REGULAR:
                files.setdefault(entry.path, []).append(entry)
        for record in records:
            if record[0] == "segment":
                yield record[1]
                continue
            _, name, size = record
            if size == 0:
                continue
            try:
                found = files.get(normalize_member_name(name)) or []
            except BadMemberName:
                found = []
            entry = found.pop(0) if found else None
            if entry is None or entry.size != size:
                raise InvalidLayerError(f"the tar-split names {name!r} ({size} bytes), "
                                        "which the table of contents does not have",
                                        layer=self.label)
            for offset in range(0, size, piece):
                yield self.read(entry.data, size, offset, min(piece, size - offset))

    def verify_diff_id(self) -> str:
        """Checks the layer's ``diff_id`` (from the image config) against
        the sha256 of :meth:`tar_stream`, which reads every file of the layer;
        returns the digest, or raises :class:`DigestMismatchError`."""
        hasher = hashlib.sha256()
        for part in self.tar_stream():
            hasher.update(part)
        actual = "sha256:" + hasher.hexdigest()
        if self.diff_id is not None and actual != self.diff_id:
            raise DigestMismatchError(f"diff_id is {actual}, expected {self.diff_id} (the "
                                      "tar rebuilt from the tar-split and the chunks)",
                                      layer=self._where())
        return actual

    def chunk_start(self, data: int) -> Optional[int]:
        """Where the first chunk of the file whose entry has *data* starts
        in the blob (None for an empty file or a hole)."""
        chunks = self._chunk_lists[data]
        return chunks[0][2] if chunks and not chunks[0][6] else None

    def prefetch(self, before: int, limit: int = PREFETCH_LIMIT) -> int:
        """Fetch, in one request, the chunks whose compressed ranges end at
        or before *before* (eStargz: the prioritised files, before the
        landmark), at most *limit* bytes of them in blob order; each is
        verified, kept in memory (within its bound) and in the range store.
        Chunks already kept are not fetched.  Returns the bytes fetched."""
        wanted = []
        for data, chunks in enumerate(self._chunk_lists):
            for chunk in chunks:
                if not chunk[6] and chunk[3] <= before:
                    wanted.append((chunk[2], chunk, data))
        wanted.sort(key=lambda item: item[0])
        missing = []
        for start, chunk, data in wanted:
            key = (start, chunk[4], chunk[1])
            with self._lock:
                if key in self._cache:
                    continue
            stored = self._store.load_range(start, chunk[3] - start) if self._store else None
            if stored is not None:
                continue             # checked when it is read
            if missing and chunk[3] - missing[0][0] > limit:
                break
            missing.append((start, chunk, data))
        if not missing:
            return 0
        first, last = missing[0][0], max(item[1][3] for item in missing)
        raw = self.source.read_at(first, last - first)
        for start, chunk, data in missing:
            piece = raw[start - first:chunk[3] - first]
            try:
                payload = self._verified_payload(piece, chunk, data)
            except (InvalidLayerError, DigestMismatchError):
                continue             # a read of it will fetch it again, and say why
            self._remember(chunk, payload)
            if self._store is not None:
                self._store.save_range(start, piece)
        return len(raw)

    def _verified_payload(self, raw: bytes, chunk: Chunk, data: int) -> bytes:
        """The chunk's bytes from its compressed range *raw*, checked against
        its digest (else :class:`DigestMismatchError`, or InvalidLayerError
        for a range that does not decompress)."""
        file_offset, length, start, end, inner, digest, _ = chunk
        try:
            payload = self._decompress(raw, inner + length)[inner:inner + length]
        except InvalidLayerError as error:
            raise InvalidLayerError(error.reason, layer=self._where(),
                                    entry=self._name(data)) from None
        if len(payload) != length or sha256_digest(payload) != digest:
            raise DigestMismatchError(
                f"chunk at file offset {file_offset} (blob bytes {start}-{end}) does not "
                f"match its digest {digest} in the table of contents",
                layer=self._where(), entry=self._name(data))
        return payload

    def _where(self) -> str:
        return self.label if self.digest in self.label else f"{self.label} {self.digest}"

    def _name(self, data: int) -> str:
        for entry in self._entries:
            if entry.data == data and entry.kind == REGULAR:
                return entry.path
        return f"#{data}"

    def data_location(self):
        raise InvalidLayerError("a layer read from its table of contents has no "
                                "uncompressed copy", layer=self.label)

    def close(self) -> None:
        self._closed = True
        closers, self._closers = self._closers, []
        for close in closers:
            close()
        with self._lock:
            self._cache.clear()
            self._cached_bytes = 0
        if self._store is not None:
            self._store.close()

    def __enter__(self) -> "TocLayer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<TocLayer {self.toc_format} {self.label} {self.digest} {self.entry_count} entries>"
