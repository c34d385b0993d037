"""Seekable spans: random access to a layer's decompressed tar without a
whole decompressed copy.

Everything about the ``spans/`` cache files lives here.  When a layer's
whole copy does not fit the cache budget, its decompressed stream is cut
into spans of ``span`` bytes (default :data:`DEFAULT_SPAN`), each compressed
as an independent zstd frame (level 1, with a content checksum), so that any
byte range is read by decompressing the one or two spans that hold it.  The
same form serves gzip and zstd layers (a single-frame zstd blob has no
resumable decoder state, so it must be re-framed anyway; a gzip blob could
instead keep zran checkpoints into the original blob: see docs/cache.md for
the measurements behind this choice).

File layout::

    frame 0 | frame 1 | ... | trailer (marshal) | trailer length (8, LE) | MAGIC

The trailer is ``{"format", "version", "span", "size", "offsets"}``:
``offsets[i]`` is where frame *i* starts; ``size`` the uncompressed size.  A
file whose trailer does not read back is not trusted (it is rebuilt).

:class:`SpanReader` keeps recently decompressed spans in memory (64 MiB
for the whole process, :class:`_RecentSpans`), so a scan (file after file,
in walk order) decompresses most spans once instead of once per file.
"""

from __future__ import annotations

import bisect
import collections
import io
import marshal
import os
import threading
from typing import Optional

import zstandard

from .errors import InvalidLayerError

FORMAT = "layerfs-spans"
VERSION = 1
MAGIC = b"LFSPANS1"
DEFAULT_SPAN = 1 << 20
SPAN_ENV = "LAYERFS_SPAN_SIZE"
MEMORY = 64 << 20         # decompressed spans kept in memory, all readers together


class _RecentSpans:
    """The most recently decompressed spans of every :class:`SpanReader`
    in the process, least recently used dropped beyond :data:`MEMORY`
    bytes: a scan whose order differs from the tar's (a walk sorted by
    name) still finds most spans decompressed, and many open layers share
    one bound."""

    def __init__(self, limit: int):
        self.limit = limit
        self._spans: collections.OrderedDict = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key) -> Optional[bytes]:
        with self._lock:
            data = self._spans.get(key)
            if data is not None:
                self._spans.move_to_end(key)
            return data

    def put(self, key, data: bytes) -> None:
        with self._lock:
            if key in self._spans:
                return
            self._spans[key] = data
            self._bytes += len(data)
            while self._bytes > self.limit and self._spans:
                _, old = self._spans.popitem(last=False)
                self._bytes -= len(old)


_recent = _RecentSpans(MEMORY)
_next_reader = iter(range(1 << 62))


def span_size(span: Optional[int] = None) -> int:
    """*span*, else ``$LAYERFS_SPAN_SIZE`` (bytes, or ``4M``), else 1 MiB."""
    if span is not None:
        return span
    text = os.environ.get(SPAN_ENV, "").strip()
    if not text:
        return DEFAULT_SPAN
    from .cache import parse_size
    return parse_size(text)


class SpanWriter:
    """Writes the spans of a stream to *file* (binary, positioned at 0).
    ``write(chunk)`` in stream order; ``finish()`` writes the trailer.
    *before_write(n)* is called before *n* more bytes go to disk; it may
    raise to stop (the cache budget)."""

    def __init__(self, file, span: Optional[int] = None, before_write=None):
        self._file = file
        self.span = span_size(span)
        self._compressor = zstandard.ZstdCompressor(level=1, write_checksum=True)
        self._pending = bytearray()
        self.offsets: list[int] = []
        self.written = 0          # compressed bytes so far
        self.size = 0             # uncompressed bytes so far
        self._before_write = before_write

    def write(self, chunk) -> None:
        self._pending += chunk
        self.size += len(chunk)
        span = self.span
        if len(self._pending) >= span:
            view = memoryview(self._pending)
            start = 0
            while len(view) - start >= span:
                self._emit(view[start:start + span])
                start += span
            del view
            del self._pending[:start]

    def _emit(self, data) -> None:
        frame = self._compressor.compress(data)
        if self._before_write is not None:
            self._before_write(len(frame))
        self.offsets.append(self.written)
        self._file.write(frame)
        self._file.flush()        # on disk now: the budget counts what is on disk
        self.written += len(frame)

    def finish(self) -> int:
        """Writes the last span and the trailer; returns the file size."""
        if self._pending:
            self._emit(bytes(self._pending))
            self._pending = bytearray()
        trailer = marshal.dumps({"format": FORMAT, "version": VERSION, "span": self.span,
                                 "size": self.size, "offsets": self.offsets})
        if self._before_write is not None:
            self._before_write(len(trailer) + 16)
        self._file.write(trailer + len(trailer).to_bytes(8, "little") + MAGIC)
        self._file.flush()
        return self.written + len(trailer) + 16


class SpanReader:
    """Random access to the stream stored in a spans file (open descriptor
    *fd*, owned by the caller).  Raises :class:`InvalidLayerError` (naming
    *label*) if the file is not a whole spans file of *size* bytes."""

    def __init__(self, fd: int, size: int, label: str):
        self._fd = fd
        self.label = label
        file_size = os.fstat(fd).st_size
        tail = os.pread(fd, 16, max(0, file_size - 16))
        try:
            if len(tail) != 16 or tail[8:] != MAGIC:
                raise ValueError("no trailer")
            length = int.from_bytes(tail[:8], "little")
            table = marshal.loads(os.pread(fd, length, file_size - 16 - length))
            if (table["format"] != FORMAT or table["version"] != VERSION
                    or table["size"] != size):
                raise ValueError("another format or size")
            self.span = int(table["span"])
            self._offsets = list(table["offsets"]) + [file_size - 16 - length]
            if len(self._offsets) - 1 != -(-size // self.span):
                raise ValueError("wrong number of spans")
        except (ValueError, TypeError, KeyError, EOFError) as error:
            raise InvalidLayerError(f"unusable spans file ({error})", layer=label) from None
        self.size = size
        self._decompressor = zstandard.ZstdDecompressor()
        self._key = next(_next_reader)
        self._lock = threading.Lock()
        self.decompressed = 0     # spans decompressed so far (tests, benchmarks)

    def read_at(self, offset: int, length: int) -> bytes:
        length = min(length, self.size - offset)
        if length <= 0 or offset < 0:
            return b""
        span = self.span
        parts = []
        while length > 0:
            index, within = divmod(offset, span)
            data = self._span(index)
            piece = data[within:within + length]
            if not piece:
                raise InvalidLayerError("spans file is shorter than its table",
                                        layer=self.label)
            parts.append(piece)
            offset += len(piece)
            length -= len(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _span(self, index: int) -> bytes:
        data = _recent.get((self._key, index))
        if data is not None:
            return data
        start, end = self._offsets[index], self._offsets[index + 1]
        frame = os.pread(self._fd, end - start, start)
        try:
            data = self._decompressor.decompress(frame)
        except zstandard.ZstdError as error:
            raise InvalidLayerError(f"corrupt span {index} in the cache ({error})",
                                    layer=self.label) from None
        expected = min(self.span, self.size - index * self.span)
        if len(data) != expected:
            raise InvalidLayerError(f"span {index} has {len(data)} bytes, expected "
                                    f"{expected}", layer=self.label)
        with self._lock:
            self.decompressed += 1
        _recent.put((self._key, index), data)
        return data


# -- gzip: zran-style checkpoints into the blob itself (rapidgzip) -------------

GZIP_FORMAT = "layerfs-gzip-checkpoints"
GZIP_VERSION = 1
GZIP_MAGIC = b"LFGZIDX1"
DEFAULT_GZIP_SPACING = 4 << 20
WINDOW = 32 << 10          # what one checkpoint costs on disk, at most


def gzip_spacing(spacing: Optional[int] = None) -> int:
    """*spacing*, else ``$LAYERFS_SPAN_SIZE``, else 4 MiB."""
    if spacing is None and not os.environ.get(SPAN_ENV, "").strip():
        return DEFAULT_GZIP_SPACING
    return span_size(spacing)


def has_gzip_checkpoints() -> bool:
    try:
        import rapidgzip  # noqa: F401
    except ImportError:
        return False
    return True


def estimate_gzip_index(size: int, spacing: int) -> int:
    """An upper bound of the checkpoints' size for *size* uncompressed bytes."""
    return (size // spacing + 2) * (WINDOW + 64) + 4096


class _BlobFile(io.RawIOBase):
    """The first *end* bytes of a blob source as a read-only seekable file,
    for rapidgzip (which reads through a Python file object)."""

    def __init__(self, blob, end: int):
        self._blob = blob
        self._end = end
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._end - self._pos)
        if n <= 0:
            return 0
        data = self._blob.read_at(self._pos, n)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, self._end)[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def write_gzip_checkpoints(blob, data_end: int, size: int, file,
                           spacing: Optional[int] = None) -> None:
    """Decompresses the gzip blob once more (rapidgzip, one thread) and
    writes its checkpoints to *file*, with a trailer naming *size*."""
    import rapidgzip
    spacing = gzip_spacing(spacing)
    reader = rapidgzip.RapidgzipFile(_BlobFile(blob, data_end), parallelization=1,
                                     chunk_size=spacing)
    try:
        reader.seek(0, io.SEEK_END)
        if reader.tell() != size:
            raise InvalidLayerError(f"rapidgzip read {reader.tell()} bytes, the "
                                    f"indexing pass {size}", layer=blob.label)
        buffer = io.BytesIO()
        reader.export_index(buffer)
    finally:
        reader.close()
    index = buffer.getvalue()
    trailer = marshal.dumps({"format": GZIP_FORMAT, "version": GZIP_VERSION,
                             "size": size, "data_end": data_end, "length": len(index)})
    file.write(index + trailer + len(trailer).to_bytes(8, "little") + GZIP_MAGIC)
    file.flush()


class GzipCheckpointReader:
    """Random access to a gzip blob's stream through its checkpoints (file
    descriptor *fd*, read whole here): a read decompresses from the nearest
    checkpoint before it; reads that go forward continue the same decoder."""

    def __init__(self, fd: int, blob, size: int, label: str):
        import rapidgzip
        self.label = label
        self.size = size
        self.blob = blob
        file_size = os.fstat(fd).st_size
        tail = os.pread(fd, 16, max(0, file_size - 16))
        try:
            if len(tail) != 16 or tail[8:] != GZIP_MAGIC:
                raise ValueError("no trailer")
            length = int.from_bytes(tail[:8], "little")
            table = marshal.loads(os.pread(fd, length, file_size - 16 - length))
            if (table["format"] != GZIP_FORMAT or table["version"] != GZIP_VERSION
                    or table["size"] != size
                    or table["length"] != file_size - 16 - length):
                raise ValueError("another format or size")
            index = os.pread(fd, table["length"], 0)
            self._reader = rapidgzip.RapidgzipFile(_BlobFile(blob, table["data_end"]),
                                                   parallelization=1)
            self._reader.import_index(io.BytesIO(index))
        except (ValueError, TypeError, KeyError, EOFError, RuntimeError) as error:
            raise InvalidLayerError(f"unusable gzip checkpoints ({error})",
                                    layer=label) from None
        self._lock = threading.Lock()

    def read_at(self, offset: int, length: int) -> bytes:
        length = min(length, self.size - offset)
        if length <= 0 or offset < 0:
            return b""
        with self._lock:
            if self._reader.tell() != offset:
                self._reader.seek(offset)
            return self._reader.read(length)

    def close(self) -> None:
        with self._lock:
            self._reader.close()


class StreamReader:
    """The decompressed stream read from the blob itself, with no cache
    space at all (when not even spans fit the budget): a read at or after
    the previous one continues the same decoder; a read behind it starts
    again from the blob's first byte.  Good for a forward scan, slow for
    random reads; what a budget too small for a layer costs."""

    def __init__(self, blob, size: int, label: str):
        self.blob = blob
        self.size = size
        self.label = label
        self._stream = None
        self._lock = threading.Lock()
        self.restarts = 0

    def read_at(self, offset: int, length: int) -> bytes:
        from .compression import BlobStream
        length = min(length, self.size - offset)
        if length <= 0 or offset < 0:
            return b""
        with self._lock:
            if self._stream is None or offset < self._stream.tell():
                self._stream = BlobStream(self.blob, label=self.label)
                self.restarts += 1
            self._stream.skip(offset - self._stream.tell())
            return self._stream.read(length)

    def close(self) -> None:
        self._stream = None


# -- zstd: the frame boundaries of a multi-frame blob --------------------------

FRAMES_FORMAT = "layerfs-zstd-frames"
FRAMES_VERSION = 1
MAX_FRAME = 64 << 20      # a frame larger than this is no useful seek point


def frame_table(frames: Optional[list], size: int) -> Optional[list]:
    """``[(blob offset, stream offset)]`` of a zstd blob's data frames, if
    they make seek points: two frames or more, each declaring its content
    size (at most :data:`MAX_FRAME`), the sizes adding up to *size*."""
    if not frames or len(frames) < 2:
        return None
    table, position = [], 0
    for offset, content in frames:
        if content is None or content > MAX_FRAME:
            return None
        table.append((offset, position))
        position += content
    return table if position == size else None


def write_frame_table(file, table: list, size: int, blob_end: int) -> None:
    payload = marshal.dumps({"format": FRAMES_FORMAT, "version": FRAMES_VERSION,
                             "size": size, "end": blob_end, "frames": table})
    file.write(payload)
    file.flush()


class ZstdFrameReader:
    """Random access to a multi-frame zstd blob through its frame table
    (file descriptor *fd*): a read fetches and decompresses the frame (or
    frames) that hold it; decompressed frames share the process's
    recent-spans memory."""

    def __init__(self, fd: int, blob, size: int, label: str):
        self.blob = blob
        self.size = size
        self.label = label
        try:
            table = marshal.loads(os.pread(fd, os.fstat(fd).st_size, 0))
            if (table["format"] != FRAMES_FORMAT or table["version"] != FRAMES_VERSION
                    or table["size"] != size or len(table["frames"]) < 2):
                raise ValueError("another format or size")
            frames = [tuple(f) for f in table["frames"]]
            self._starts = [f[1] for f in frames] + [size]
            self._offsets = [f[0] for f in frames] + [int(table["end"])]
        except (ValueError, TypeError, KeyError, EOFError) as error:
            raise InvalidLayerError(f"unusable zstd frame table ({error})",
                                    layer=label) from None
        self._key = next(_next_reader)

    def read_at(self, offset: int, length: int) -> bytes:
        length = min(length, self.size - offset)
        if length <= 0 or offset < 0:
            return b""
        parts = []
        while length > 0:
            index = bisect.bisect_right(self._starts, offset) - 1
            data = self._frame(index)
            piece = data[offset - self._starts[index]:offset - self._starts[index] + length]
            if not piece:
                raise InvalidLayerError("zstd frame shorter than its header said",
                                        layer=self.label)
            parts.append(piece)
            offset += len(piece)
            length -= len(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _frame(self, index: int) -> bytes:
        data = _recent.get((self._key, index))
        if data is not None:
            return data
        start, end = self._offsets[index], self._offsets[index + 1]
        compressed = self.blob.read_at(start, end - start)
        try:
            data = zstandard.ZstdDecompressor().decompressobj().decompress(compressed)
        except zstandard.ZstdError as error:
            raise InvalidLayerError(f"corrupt zstd frame {index} ({error})",
                                    layer=self.label) from None
        if len(data) != self._starts[index + 1] - self._starts[index]:
            raise InvalidLayerError(f"zstd frame {index} has {len(data)} bytes, its "
                                    "header said otherwise", layer=self.label)
        _recent.put((self._key, index), data)
        return data

    def close(self) -> None:
        pass
