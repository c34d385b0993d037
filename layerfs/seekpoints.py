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

The forms that read the blob itself (the stream, zstd frames) go through
:class:`_ForwardReader`: decoders that keep running between reads, shared
by the reading threads, their output kept in the same memory in 256 KiB
blocks, so that a scan decompresses the stream once (see docs/cache.md,
"Reading forward").  Gzip checkpoints keep one rapidgzip reader, which
does that by itself; they are rapidgzip's index, written by
:func:`write_gzip_index`, built by the indexing pass itself when it
decodes with rapidgzip (``BlobStream(gzip_checkpoints=...)``), else by a
second pass (:func:`write_gzip_checkpoints`).
"""

from __future__ import annotations

import bisect
import collections
import io
import marshal
import os
import threading
import zlib
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


def _read_table(fd: int, magic: bytes) -> tuple:
    """The marshalled table at the end of a seek-point file (before its
    16-byte trailer: the table's length, then *magic*) and where the table
    starts; ``ValueError`` if the file does not end so."""
    file_size = os.fstat(fd).st_size
    tail = os.pread(fd, 16, max(0, file_size - 16))
    if len(tail) != 16 or tail[8:] != magic:
        raise ValueError("no trailer")
    length = int.from_bytes(tail[:8], "little")
    table_start = file_size - 16 - length
    if table_start < 0:
        raise ValueError("a table longer than the file")
    return marshal.loads(os.pread(fd, length, table_start)), table_start


class SpanReader:
    """Random access to the stream stored in a spans file (open descriptor
    *fd*, owned by the caller).  Raises :class:`InvalidLayerError` (naming
    *label*) if the file is not a whole spans file of *size* bytes."""

    def __init__(self, fd: int, size: int, label: str):
        self._fd = fd
        self.label = label
        try:
            table, table_start = _read_table(fd, MAGIC)
            if (table["format"] != FORMAT or table["version"] != VERSION
                    or table["size"] != size):
                raise ValueError("another format or size")
            self.span = int(table["span"])
            self._offsets = list(table["offsets"]) + [table_start]
            if len(self._offsets) - 1 != -(-size // self.span):
                raise ValueError("wrong number of spans")
        except (ValueError, TypeError, KeyError, EOFError) as error:
            raise InvalidLayerError(f"unusable spans file ({error})", layer=label) from None
        self.size = size
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
            # A decompressor per span: one shared by the FUSE daemon's
            # threads corrupted spans ("Destination buffer is too small").
            data = zstandard.ZstdDecompressor().decompress(frame)
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


# -- reading forward: decoders that keep running between reads -----------------

CURSORS = 4               # decoders one reader keeps between reads (one per thread)
IDLE_CURSORS = 12         # idle decoders kept in the process, all readers together
BLOCK = 256 << 10         # bytes a decoder produces at a time, aligned in the stream
IN_CHUNK = 64 << 10       # compressed bytes a decoder reads at a time
KEEP = 1 << 20            # bytes a decoder keeps behind where it stands


class _Cursor:
    """A decoder standing at *position* of the decompressed stream, with
    the last :data:`KEEP` bytes it produced.  *produce(n)* gives the next
    *n* bytes (fewer only at the end); the cursor asks for what reaches the
    next multiple of :data:`BLOCK`, so that its blocks line up with the
    reader's memory of recent blocks (*publish(start, block)*).  Used by
    one read at a time (the reader lends it out)."""

    __slots__ = ("position", "produced", "publish", "_produce", "_close",
                 "_kept", "_kept_bytes")

    def __init__(self, produce, close, *, position: int):
        self.position = position
        self.produced = 0               # bytes decompressed, all told
        self.publish = None
        self._produce = produce
        self._close = close
        self._kept: collections.deque = collections.deque()   # (offset, chunk)
        self._kept_bytes = 0

    @property
    def kept_from(self) -> int:
        """The first stream offset this cursor can still give."""
        return self.position - self._kept_bytes

    def cost(self, offset: int) -> Optional[int]:
        """Bytes to decompress before *offset* can be read here; None if
        *offset* lies behind what this cursor kept."""
        if offset < self.kept_from:
            return None
        return max(0, offset - self.position)

    def read(self, offset: int, length: int) -> bytes:
        parts = []
        while length > 0:
            if offset >= self.position:
                chunk = self._produce(BLOCK - self.position % BLOCK)
                if not chunk:
                    break           # the stream ended early: the caller sees it short
                self._keep(chunk)
                continue
            for start, chunk in self._kept:
                if start <= offset < start + len(chunk):
                    piece = chunk[offset - start:offset - start + length]
                    parts.append(piece)
                    offset += len(piece)
                    length -= len(piece)
                    break
            else:
                raise AssertionError("read behind what the cursor kept")
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _keep(self, chunk: bytes) -> None:
        if self.publish is not None and self.position % BLOCK == 0:
            self.publish(self.position, chunk)
        self._kept.append((self.position, chunk))
        self._kept_bytes += len(chunk)
        self.position += len(chunk)
        self.produced += len(chunk)
        while self._kept_bytes - len(self._kept[0][1]) >= KEEP:
            self._kept_bytes -= len(self._kept.popleft()[1])

    def close(self) -> None:
        self._kept.clear()
        close, self._close = self._close, None
        if close is not None:
            close()


_idle_lock = threading.Lock()
_idle: collections.OrderedDict = collections.OrderedDict()   # id -> (reader, cursor), LRU first


class _ForwardReader:
    """Random access to a decompressed stream through decoders (cursors)
    that keep running between reads.  A read goes to the cursor that gets
    there cheapest (one that stands at or before it, or kept the bytes),
    if that is no dearer than starting one at the seek point before it
    (:meth:`_restart_cost`); it waits for that cursor if another read has
    it (two threads reading neighbouring files share one decoder rather
    than decompress the same bytes twice).  Else it starts one
    (:meth:`_start`).  Reads far apart run at once, each on a cursor of
    its own: zlib and zstandard decompress outside the GIL.  Every whole
    :data:`BLOCK` a cursor produces goes to the process's memory of recent
    blocks (:data:`MEMORY` for all readers and spans), where any read of
    this reader finds it first.  At most :data:`CURSORS` cursors per
    reader and :data:`IDLE_CURSORS` idle ones in the process are kept,
    least recently used dropped first."""

    max_cursors = CURSORS

    def __init__(self, size: int, label: str):
        self.size = size
        self.label = label
        self._cursors: list = []          # idle, least recently used first
        self._busy: list = []             # lent to a read
        self._returned = threading.Condition(_idle_lock)
        self._closed = False
        self.started = 0                  # cursors started (tests)
        self.produced = 0                 # bytes decompressed by returned cursors
        self._key = next(_next_reader)

    def read_at(self, offset: int, length: int) -> bytes:
        length = min(length, self.size - offset)
        if length <= 0 or offset < 0:
            return b""
        while True:
            data = self._recent(offset, length)
            if data is not None:
                return data
            cursor = self._take(offset)
            if cursor is not None:
                break
        before = cursor.produced
        try:
            data = cursor.read(offset, length)
        except BaseException:
            self._give(cursor, cursor.produced - before, broken=True)
            raise
        self._give(cursor, cursor.produced - before)
        return data

    def _recent(self, offset: int, length: int) -> Optional[bytes]:
        """The bytes, if every block they lie in was decompressed lately
        (by any cursor of this reader), else None."""
        parts = []
        while length > 0:
            index, within = divmod(offset, BLOCK)
            block = _recent.get((self._key, index))
            if block is None:
                return None
            piece = block[within:within + length]
            if not piece:
                return None
            parts.append(piece)
            offset += len(piece)
            length -= len(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _publish(self, start: int, block: bytes) -> None:
        if len(block) == BLOCK or start + len(block) == self.size:
            _recent.put((self._key, start // BLOCK), block)

    def _take(self, offset: int) -> Optional[_Cursor]:
        """A cursor for a read at *offset*, lent to the caller; None after
        waiting for one that another read had (the bytes may be in memory
        by now: look again)."""
        with _idle_lock:
            best, best_cost = None, self._restart_cost(offset)
            for cursor in self._busy + self._cursors:    # the most recent idle wins a tie
                cost = cursor.cost(offset)
                if cost is not None and cost <= best_cost:
                    best, best_cost = cursor, cost
            if best is not None and best in self._cursors:
                self._lend(best)
                return best
            if best is not None or not (self._cursors
                                        or len(self._busy) < self.max_cursors):
                self._returned.wait()     # for the best cursor, or for any
                return None
            spare = None
            if self._cursors and len(self._busy) + len(self._cursors) >= self.max_cursors:
                spare = self._cursors[0]  # replaced: the least recently used
                self._lend(spare)
            self.started += 1
            placeholder = _Cursor(None, None, position=self.size)   # counts as busy
            self._busy.append(placeholder)
        try:
            cursor = self._start(offset, spare)
        except BaseException:
            with _idle_lock:
                self._busy.remove(placeholder)
                if spare is not None:
                    self._busy.remove(spare)
                self._returned.notify_all()
            if spare is not None:
                spare.close()
            raise
        cursor.publish = self._publish
        with _idle_lock:
            self._busy.remove(placeholder)
            if spare is not None and spare is not cursor:
                self._busy.remove(spare)
            if cursor not in self._busy:
                self._busy.append(cursor)
            self._returned.notify_all()
        return cursor

    def _lend(self, cursor: _Cursor) -> None:
        self._cursors.remove(cursor)
        del _idle[id(cursor)]
        self._busy.append(cursor)

    def _give(self, cursor: _Cursor, produced: int = 0, broken: bool = False) -> None:
        dropped = []
        with _idle_lock:
            self.produced += produced
            if cursor in self._busy:
                self._busy.remove(cursor)
            if self._closed or broken:
                dropped.append(cursor)
            else:
                self._cursors.append(cursor)
                _idle[id(cursor)] = (self, cursor)
                if len(self._cursors) > self.max_cursors:
                    dropped.append(self._cursors.pop(0))
                    del _idle[id(dropped[-1])]
                while len(_idle) > IDLE_CURSORS:
                    reader, old = _idle.popitem(last=False)[1]
                    reader._cursors.remove(old)
                    dropped.append(old)
            self._returned.notify_all()
        for old in dropped:
            old.close()

    def close(self) -> None:
        with _idle_lock:
            self._closed = True
            dropped, self._cursors = self._cursors, []
            for cursor in dropped:
                del _idle[id(cursor)]
        for cursor in dropped:
            cursor.close()

    def _restart_cost(self, offset: int) -> int:
        """Bytes a new cursor decompresses before it reaches *offset*."""
        raise NotImplementedError

    def _start(self, offset: int, spare: Optional[_Cursor]) -> _Cursor:
        """A cursor at or before *offset*, from the seek point before it;
        *spare* (if any) is an idle cursor it replaces, to close."""
        raise NotImplementedError


class _Sequential:
    """Bytes *start* to *end* of a blob as a file read front to back (what
    zstandard's stream reader pulls from)."""

    def __init__(self, blob, start: int, end: int):
        self._blob, self._pos, self._end = blob, start, end

    def read(self, n: int) -> bytes:
        n = min(n, self._end - self._pos)
        if n <= 0:
            return b""
        data = self._blob.read_at(self._pos, n)
        self._pos += len(data)
        return data


class _ZstdStream:
    """The decompressed stream of the zstd frames from blob offset *start*."""

    def __init__(self, blob, start: int, end: int, label: str):
        self._label = label
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            _Sequential(blob, start, end), read_size=IN_CHUNK, read_across_frames=True,
            closefd=False)

    def read(self, n: int) -> bytes:
        try:
            return self._reader.read(n)
        except zstandard.ZstdError as error:
            raise InvalidLayerError(f"corrupt zstd stream ({error})",
                                    layer=self._label) from None

    def close(self) -> None:
        self._reader = None


class _GzipStream:
    """The decompressed stream of a gzip blob (its members in a row; zero
    padding after the last ends it, as the indexing pass accepted)."""

    def __init__(self, blob, label: str):
        self._blob, self._label = blob, label
        self._obj = zlib.decompressobj(31)
        self._read = 0            # blob bytes read
        self._pending = b""
        self._done = False

    def read(self, n: int) -> bytes:
        parts, have = [], 0
        while have < n and not self._done:
            chunk = self._next(n - have)
            parts.append(chunk)
            have += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _more(self, n: int) -> bytes:
        data = self._blob.read_at(self._read, n)
        self._read += len(data)
        return data

    def _next(self, n: int) -> bytes:
        if not self._pending:
            self._pending = self._more(4 * IN_CHUNK)
            if not self._pending:     # cut short: what zlib still holds
                self._done = True
                return self._obj.flush()
        try:
            chunk = self._obj.decompress(self._pending, n)
        except zlib.error as error:
            raise InvalidLayerError(f"corrupt gzip stream ({error})",
                                    layer=self._label) from None
        self._pending = self._obj.unconsumed_tail
        if self._obj.eof:
            rest = self._obj.unused_data
            while len(rest) < 2:
                more = self._more(IN_CHUNK)
                if not more:
                    break
                rest += more
            if rest.startswith(b"\x1f\x8b"):
                self._obj, self._pending = zlib.decompressobj(31), rest
            else:
                self._done = True
        return chunk

    def close(self) -> None:
        self._obj = None


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
    writes its checkpoints to *file*, with a trailer naming *size* (for a
    blob whose indexing pass could not build them itself)."""
    import rapidgzip
    spacing = gzip_spacing(spacing)
    reader = rapidgzip.RapidgzipFile(_BlobFile(blob, data_end), parallelization=1,
                                     chunk_size=spacing)
    try:
        reader.seek(0, io.SEEK_END)
        if reader.tell() != size:
            raise InvalidLayerError(f"rapidgzip read {reader.tell()} bytes, the "
                                    f"indexing pass {size}", layer=blob.label)
        write_gzip_index(reader.export_index, data_end, size, file)
    finally:
        reader.close()


def write_gzip_index(export_index, data_end: int, size: int, file) -> None:
    """Writes the checkpoints that *export_index(file)* writes (rapidgzip's
    index) to *file*, then the trailer naming *size* and *data_end*: a
    reader trusts the file only whole.  (Through memory: given a real file,
    rapidgzip writes to its descriptor, behind Python's buffer.)"""
    buffer = io.BytesIO()
    export_index(buffer)
    index = buffer.getvalue()
    trailer = marshal.dumps({"format": GZIP_FORMAT, "version": GZIP_VERSION,
                             "size": size, "data_end": data_end, "length": len(index)})
    file.write(index + trailer + len(trailer).to_bytes(8, "little") + GZIP_MAGIC)
    file.flush()


class GzipCheckpointReader:
    """Random access to a gzip blob's stream through its checkpoints (file
    descriptor *fd*, read whole here), with one rapidgzip reader: it is
    itself a decoder that keeps running (a read that continues where the
    last one stopped goes on; one nearby is served from the chunks it
    keeps decompressed; another starts from the checkpoint before it).
    Cursors of :class:`_ForwardReader` gained nothing here: rapidgzip's
    read holds the GIL, so two readers in two threads do not run at once,
    and a second reader decompresses its chunk again (measured: the
    two-thread scan took 0.36-0.58 s with up to four readers against
    0.18-0.34 s with one); copying its output into blocks cost 10% of a
    forward scan."""

    def __init__(self, fd: int, blob, size: int, label: str):
        import rapidgzip
        self.label = label
        self.size = size
        self.blob = blob
        try:
            table, table_start = _read_table(fd, GZIP_MAGIC)
            if (table["format"] != GZIP_FORMAT or table["version"] != GZIP_VERSION
                    or table["size"] != size or table["length"] != table_start):
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


class StreamReader(_ForwardReader):
    """The decompressed stream read from the blob itself, with no cache
    space at all (when not even spans fit the budget): a read at or after
    where a cursor stands continues that decoder; a read behind every
    cursor starts one more from the blob's first byte.  Good for a
    forward scan, slow for random reads; what a budget too small for a
    layer costs."""

    def __init__(self, blob, size: int, label: str):
        super().__init__(size, label)
        self.blob = blob
        self._gzip = blob.read_at(0, 2) == b"\x1f\x8b"

    @property
    def restarts(self) -> int:
        return self.started

    def _restart_cost(self, offset: int) -> int:
        return offset

    def _start(self, offset: int, spare: Optional[_Cursor]) -> _Cursor:
        if spare is not None:
            spare.close()
        if self._gzip:
            stream = _GzipStream(self.blob, self.label)
        else:
            stream = _ZstdStream(self.blob, 0, self.blob.size, self.label)
        return _Cursor(stream.read, stream.close, position=0)


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


class ZstdFrameReader(_ForwardReader):
    """Random access to a multi-frame zstd blob through its frame table
    (file descriptor *fd*): a read continues a cursor standing at or
    before it in the same frame or the one before, else starts one at the
    first byte of its frame.  No frame is held whole: a cursor keeps the
    last :data:`KEEP` bytes it produced."""

    def __init__(self, fd: int, blob, size: int, label: str):
        super().__init__(size, label)
        self.blob = blob
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

    def _frame(self, offset: int) -> int:
        return bisect.bisect_right(self._starts, offset) - 1

    def _restart_cost(self, offset: int) -> int:
        return offset - self._starts[self._frame(offset)]

    def _start(self, offset: int, spare: Optional[_Cursor]) -> _Cursor:
        if spare is not None:
            spare.close()
        index = self._frame(offset)
        stream = _ZstdStream(self.blob, self._offsets[index], self._offsets[-1],
                             self.label)
        return _Cursor(stream.read, stream.close, position=self._starts[index])
