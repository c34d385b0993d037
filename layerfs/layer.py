"""One layer blob, opened: its entries, and random access to file contents.

:func:`open_layer` reads a blob once, front to back, through its blob source
(:mod:`layerfs.blobsource`: a local file, a byte range of one, a remote
blob): it hashes it (digest of the blob as stored, diff_id of the tar
inside), checks both against what the caller expects, lists its members
(:mod:`layerfs.tarindex`) and, if the blob is compressed, keeps its
decompressed tar in the cache (:mod:`layerfs.cache`) in one of these forms:

* a **whole copy**, while it fits the cache budget: a read is one
  ``pread`` (and the FUSE adapter lets libfuse read it in C);
* when it does not (:mod:`layerfs.seekpoints`, docs/cache.md): gzip
  **checkpoints** into the blob, the **frames** of a multi-frame zstd blob,
  **spans** (the stream cut into independently compressed 1 MiB spans), or
  the **stream** itself when not even those fit.  A decompression bomb or a
  layer larger than the budget never costs more than the budget.

A plain tar is read in place, at the offsets its entries record.

While a layer is open it *pins* its blob in the cache (a shared flock on
``pins/<hex>.lock``): its copy or spans are never evicted under it.  An
evicted copy is rebuilt (one more pass over the blob) the next time the
layer is opened; the index (entries) is kept.

Memory: the entries only (one small tuple per member); contents are never
held, indexing holds about one 1 MiB chunk at a time.

``cache=False`` turns caching off: nothing is written to the cache
directory, the index lives in memory and the copy of a compressed blob goes
to an anonymous temporary file (:func:`tempfile.TemporaryFile`, in
``$TMPDIR``) that disappears when the layer is closed, or the process dies.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import os
import tempfile
from typing import Callable, Optional, Union

import attrs

from .blobsource import Blob, FileRange, RangeBlob, VerifiedBlob, is_blob
from .cache import INDEX_FORMAT, INDEX_VERSION, IndexCache
from .cache import _remove
from .cache import temp_file as _temp_file
from .compression import (NONE, SUM_CHUNK, BlobStream, detect_compression,
                          least_uncompressed_size)
from .errors import (DigestMismatchError, ImageError, InvalidLayerError,
                     UnsupportedImageError, path_error)
from .seekpoints import (GzipCheckpointReader, SpanReader, SpanWriter, StreamReader,
                         ZstdFrameReader, frame_table, write_frame_table,
                         estimate_gzip_index, gzip_spacing, has_gzip_checkpoints,
                         write_gzip_checkpoints, write_gzip_index)
from .tarindex import iter_entries

RESERVE_STEP = 64 << 20    # bytes of cache space asked for at a time


@attrs.frozen
class BlobSource:
    """A blob that is a byte range of a file: *size* bytes (default: up to
    the end) from *offset*, e.g. a layer stored inside an uncompressed
    OCI-layout or ``docker save`` tar.  (A description; :func:`open_layer`
    reads it through a :class:`layerfs.blobsource.FileRange`.)"""
    path: str
    offset: int = 0
    size: Optional[int] = None

    def open(self, label: Optional[str] = None) -> FileRange:
        return FileRange(self.path, self.offset, self.size, label=label)


class Layer:
    """An opened layer (see :func:`open_layer`).  Attributes: ``label``,
    ``path``, ``source``, ``digest`` and ``diff_id`` (``"sha256:<hex>"``),
    ``media_type``, ``compression`` (``"none"``, ``"gzip"``, ``"zstd"``),
    ``size`` (bytes of the blob), ``uncompressed_size``, ``entries`` (tar
    order, loaded from the index cache when first needed) and
    ``entry_count``; ``cache`` is the :class:`IndexCache` it came from, or
    None."""

    def __init__(self, *, source, label: str, header: dict,
                 entries: Optional[list], media_type: Optional[str], data: Blob,
                 closers: list, cache: Optional[IndexCache] = None):
        self.source = source
        self.path = getattr(source, "path", label)
        self.label = label
        self.digest = "sha256:" + header["digest"]
        self.diff_id = "sha256:" + header["diff_id"]
        self.media_type = media_type
        self.compression = header["compression"]
        self.size = header["size"]
        self.uncompressed_size = header["uncompressed_size"]
        self._entries = entries
        self._entry_count = header["entry_count"]
        self.cache = cache
        self._data = data       # the uncompressed tar: the blob, a copy or spans
        self._extent = getattr(data, "extent", None)
        self._closers = closers
        self._closed = False

    @property
    def entry_count(self) -> int:
        return self._entry_count

    @property
    def entries(self) -> list:
        """The layer's entries, in tar order (reloaded from the index cache
        if :meth:`release_entries` dropped them)."""
        if self._entries is not None:
            return self._entries
        loaded = self.cache.load_index(self.digest.partition(":")[2])
        if loaded is not None:
            return loaded[1]
        # The index went away (or rotted) since the header was read: list
        # the tar again, from the uncompressed data this layer reads from.
        stream = BlobStream(self._data, label=self.label)
        self._entries = list(iter_entries(stream, self.label))
        return self._entries

    def release_entries(self) -> None:
        """Let the entries go from memory once the union tree holds what it
        needs; they stay readable through :attr:`entries`, from the index
        cache.  Without a cache they are kept."""
        if self.cache is not None:
            self._entries = None

    def read(self, data, size: int, offset: int, length: int) -> bytes:
        """Up to *length* bytes at *offset* of the regular file whose entry
        has *data* and *size*; holes of sparse files read as zeros."""
        if self._closed:
            raise path_error(errno.EBADF, self.label)
        if length <= 0 or offset >= size:
            return b""
        length = min(length, size - offset)
        if isinstance(data, int):
            return self._pread(length, data + offset)
        return self._read_sparse(data, offset, length)

    def extent(self, data, size: int, offset: int, length: int) -> Optional[tuple]:
        """Where :meth:`read` would read: ``(fd, position, length)`` in this
        layer's uncompressed data (the blob, or its uncompressed copy), for
        a caller that reads the bytes itself (the FUSE adapter lets libfuse
        do it); None for a sparse file, whose holes exist in no file, and
        where the data is in no local file (spans, a remote blob)."""
        if self._closed:
            raise path_error(errno.EBADF, self.label)
        if not isinstance(data, int) or self._extent is None:
            return None
        length = max(0, min(length, size - offset))
        return self._extent(data + offset, length)

    def _read_sparse(self, segments: tuple, offset: int, length: int) -> bytes:
        out = bytearray(length)
        end = offset + length
        first = max(bisect.bisect_right(segments, offset, key=_segment_start) - 1, 0)
        for start, seg_length, tar_offset in segments[first:]:
            if start >= end:
                break
            low = max(start, offset)
            high = min(start + seg_length, end)
            if low < high:
                out[low - offset:high - offset] = self._pread(
                    high - low, tar_offset + low - start)
        return bytes(out)

    def _pread(self, n: int, position: int) -> bytes:
        data = self._data.read_at(position, n)
        if len(data) != n:
            raise InvalidLayerError("blob is shorter than its index says "
                                    "(changed since it was indexed?)",
                                    path=self.path, layer=self.label)
        return data

    def read_data(self, offset: int, length: int) -> bytes:
        """Up to *length* bytes at *offset* of the layer's uncompressed tar."""
        if self._closed:
            raise path_error(errno.EBADF, self.label)
        return self._data.read_at(offset, length)

    def data_blob(self, offset: int, size: int, label: str) -> RangeBlob:
        """*size* bytes at *offset* of the uncompressed tar as a blob source
        (a member of a compressed archive, read as a layer of its own)."""
        return RangeBlob(self._data, offset, size, label)

    @property
    def storage(self) -> str:
        """How the uncompressed tar is read: ``"blob"`` (a plain tar, in
        place), ``"copy"`` (a whole decompressed copy) or ``"spans"``."""
        if self.compression == NONE:
            return "blob"
        if isinstance(self._data, GzipCheckpointReader):
            return "checkpoints"
        if isinstance(self._data, StreamReader):
            return "stream"
        if isinstance(self._data, ZstdFrameReader):
            return "frames"
        return "spans" if isinstance(self._data, SpanReader) else "copy"

    def data_location(self) -> tuple[str, int]:
        """A path the layer's uncompressed tar can be opened at, and the
        offset where the tar starts in it: the blob itself when it is a
        plain tar, else its uncompressed copy (in the cache, or the
        anonymous one through ``/proc/self/fd`` while this layer is open).
        Lets a compressed archive be read as the image it holds."""
        if isinstance(self._data, FileRange):
            return self._data.path, self._data.offset
        raise InvalidLayerError("the decompressed data is not in one file (the cache "
                                "budget is too small to keep it whole)", layer=self.label)

    def close(self) -> None:
        self._closed = True
        closers, self._closers = self._closers, []
        for close in closers:
            close()

    def __enter__(self) -> "Layer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Layer {self.label} {self.digest} {self.entry_count} entries>"

def open_layer(source: Union[str, os.PathLike, BlobSource, Blob], *,
               digest: Optional[str] = None, diff_id: Optional[str] = None,
               media_type: Optional[str] = None,
               cache: Union[IndexCache, None, bool] = None,
               label: Optional[str] = None,
               progress: Optional[Callable[[int, int], None]] = None,
               max_size: Optional[int] = None, whole: bool = False) -> Layer:
    """Opens a layer blob: a path, a :class:`BlobSource` or any blob source
    (:mod:`layerfs.blobsource`; it stays the caller's to close).

    *digest* / *diff_id*, if given, must match (else
    :class:`DigestMismatchError`).  *cache*: an :class:`IndexCache`, None for
    the default one, False for none.  *progress(done, total)* is called every
    few MiB while indexing.  *max_size* bounds the uncompressed size of a
    compressed blob (see :mod:`layerfs.compression`).  *whole* keeps a
    whole decompressed copy even beyond the cache budget (for a compressed
    archive whose members are read as files: :meth:`Layer.data_location`).
    """
    owned = not is_blob(source)
    if owned:
        if not isinstance(source, BlobSource):
            source = BlobSource(os.fspath(source))
        label = label or source.path
    else:
        label = label or source.label
    path = getattr(source, "path", label)
    for expected in (digest, diff_id):
        if expected is not None and not expected.startswith("sha256:"):
            raise UnsupportedImageError(f"digest {expected!r}: only sha256 "
                                        "is supported", path=path, layer=label)
    if cache is None or cache is True:
        cache = IndexCache()
    try:
        blob = source.open(label) if owned else source
    except ImageError as error:
        raise error.located(path) from None
    opener = _Opener(source, blob, owned, label, digest, diff_id, media_type, None, whole)
    try:
        identity = blob.identity() if hasattr(blob, "identity") else None
        known = (digest or getattr(blob, "digest", None) or "").partition(":")[2]
        layer = None
        if cache:
            if known:
                opener.take_pin(cache, known)     # before anything of it is read
            layer = opener.from_cache(cache, identity, known)
        if layer is None:
            layer = opener.index(cache or None, identity, progress, max_size)
    except ImageError as error:
        _close_all(blob if owned else None, opener.pin)
        raise error.located(path) from None
    except BaseException:
        _close_all(blob if owned else None, opener.pin)
        raise
    return layer


def _close_all(blob, pin) -> None:
    if blob is not None:
        blob.close()
    if pin is not None:
        pin.release()


@attrs.define
class _Opener:
    """The two ways to open a layer: from the cache, or by indexing it."""
    source: object
    blob: Blob
    owned: bool
    label: str
    digest: Optional[str]
    diff_id: Optional[str]
    media_type: Optional[str]
    pin: object
    whole: bool

    def from_cache(self, cache: IndexCache, identity: Optional[tuple],
                   known: str) -> Optional[Layer]:
        if identity is not None:
            memo = cache.lookup_memo(identity)
            if memo is None:
                return None
            self.verify(*memo)
            hex_ = memo[0]
        elif known:
            hex_ = known
        else:
            return None
        header = cache.load_header(hex_)
        if header is None:
            return None
        if identity is None:
            self.verify(header["digest"], header["diff_id"])
            if "chunk_sums" not in header:
                return None      # indexed from a local file: no way to check ranges
            self.blob = _verified(self.blob, header)
        self.take_pin(cache, hex_)
        if header["compression"] == NONE:
            return self.layer(header, None, self.blob, [], cache)
        _keep_fetched(self.blob, cache)      # before a reader is built (and reads)
        data = self.open_cached(cache, header)
        if not isinstance(data, _READS_THE_BLOB) and isinstance(self.blob, VerifiedBlob):
            self.blob.stop_keeping()          # read elsewhere, or indexed again
        if data is None:
            return None
        return self.layer(header, None, data, [data.close], cache,
                          release_blob=not isinstance(data, _READS_THE_BLOB))

    def open_cached(self, cache: IndexCache, header: dict):
        """The copy or the spans of a blob, if the cache has a usable one."""
        hex_, size = header["digest"], header["uncompressed_size"]
        try:
            copy = FileRange(cache.blob_path(hex_), label=self.label)
        except (FileNotFoundError, InvalidLayerError):
            copy = None
        if copy is not None:
            if copy.size == size:
                cache.touch(copy.path)
                return copy
            copy.close()
        if self.whole:
            return None
        for path, kind in ((cache.spans_path(hex_), _OwnedSpans),
                           (cache.checkpoints_path(hex_), _checkpoints),
                           (cache.frames_path(hex_), _frames)):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                reader = kind(fd, size, self.label, self.blob)
            except InvalidLayerError:
                _remove(path)
                continue
            finally:
                if kind is not _OwnedSpans:
                    os.close(fd)
            cache.touch(path)
            return reader
        # Nothing cached: index again if a lazy form would fit now, else read
        # from the blob itself (the entries are in the cache already).
        if cache.reserve(self.blob.size):
            return None
        return StreamReader(self.blob, size, self.label)

    def take_pin(self, cache: IndexCache, hex_: str) -> None:
        if self.pin is None:
            self.pin = cache.pin(hex_)

    def index(self, cache: Optional[IndexCache], identity: Optional[tuple],
              progress, max_size) -> Layer:
        """One pass over the blob: hashes, entries and (if compressed) the
        decompressed data, a whole copy or spans, written under a temp name
        and renamed when whole."""
        compression = detect_compression(self.blob.read_at(0, 4))
        sink = (_DataSink(cache, self.label, self.whole, compression, self.blob)
                if compression != NONE else None)
        spacing = sink.pass_checkpoints() if sink is not None else None
        stream = None
        try:
            # A blob that is not a local file may be re-read by ranges
            # later: record a checksum per chunk to verify those reads.
            if sink is not None and identity is None and spacing is None:
                sink.keep_raw()    # a remote blob: not fetched twice for checkpoints
            stream = BlobStream(self.blob, label=self.label, max_size=max_size,
                                sink=sink.write if sink else None, progress=progress,
                                chunk_sums=identity is None,
                                raw_sink=sink.write_raw if sink else None,
                                gzip_checkpoints=spacing)
            if sink is not None:
                sink.stream = stream
            entries = list(iter_entries(stream, self.label))
            stream.drain()
            self.verify(stream.digest, stream.diff_id)
            header = {"format": INDEX_FORMAT, "version": INDEX_VERSION,
                      "digest": stream.digest, "diff_id": stream.diff_id,
                      "compression": stream.compression, "size": self.blob.size,
                      "uncompressed_size": stream.uncompressed_size,
                      "entry_count": len(entries)}
            if stream.chunk_sums is not None:
                header["chunk_sums"] = stream.chunk_sums
                header["sum_chunk"] = SUM_CHUNK
                self.blob = _verified(self.blob, header)
                self.blob.remember(0, stream.head_chunk)   # the reader reads the head
                if sink is not None:
                    sink.blob = self.blob
            if cache is not None:
                self.take_pin(cache, stream.digest)
            data = (sink.finish(stream.digest, stream.uncompressed_size, stream.data_end)
                    if sink else None)
            if isinstance(data, _READS_THE_BLOB):
                _keep_fetched(self.blob, cache, last=True)
            if cache is not None:
                cache.store_index(header, entries)
                if identity is not None:
                    cache.store_memo(identity, stream.digest, stream.diff_id)
        except BaseException:
            if sink is not None:
                sink.abort()
            raise
        finally:
            if stream is not None:
                stream.close()
        if data is None:
            return self.layer(header, entries, self.blob, [], cache)
        return self.layer(header, entries, data, [data.close], cache,
                          release_blob=not isinstance(data, _READS_THE_BLOB))

    def verify(self, digest_hex: str, diff_id_hex: str) -> None:
        for what, expected, actual in (("digest", self.digest, digest_hex),
                                       ("diff_id", self.diff_id, diff_id_hex)):
            if expected is not None and expected != "sha256:" + actual:
                raise DigestMismatchError(
                    f"{what} is sha256:{actual}, expected {expected}",
                    path=getattr(self.source, "path", self.label), layer=self.label)

    def layer(self, header, entries, data, closers, cache=None,
              release_blob=False) -> Layer:
        closers = list(closers)
        if self.owned:
            if release_blob:          # the data is elsewhere: the blob is not needed
                self.blob.close()
            else:
                closers.append(self.blob.close)
        if self.pin is not None:
            closers.append(self.pin.release)
        return Layer(source=self.source, label=self.label, header=header,
                     entries=entries, media_type=self.media_type,
                     data=data, closers=closers, cache=cache)


class _OwnedSpans(SpanReader):
    """A :class:`SpanReader` that closes its descriptor."""

    def __init__(self, fd: int, size: int, label: str, blob=None):
        super().__init__(fd, size, label)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


_READS_THE_BLOB = (GzipCheckpointReader, StreamReader, ZstdFrameReader)


def _verified(blob, header: dict) -> VerifiedBlob:
    return VerifiedBlob(blob, header["chunk_sums"], header["sum_chunk"])


def _keep_fetched(blob, cache: Optional[IndexCache], last: bool = False) -> None:
    """A blob re-read by ranges once the layer is open (checkpoints, frames,
    the stream form) keeps the verified chunks it fetches in the cache
    (:mod:`layerfs.rangestore`); the indexing passes do not."""
    if cache is not None and isinstance(blob, VerifiedBlob):
        blob.keep_in(cache, last)


def _frames(fd: int, size: int, label: str, blob) -> ZstdFrameReader:
    return ZstdFrameReader(fd, blob, size, label)


def _checkpoints(fd: int, size: int, label: str, blob) -> GzipCheckpointReader:
    return GzipCheckpointReader(fd, blob, size, label)


class _DataSink:
    """Where the decompressed stream goes while a compressed layer is
    indexed: a whole copy while the cache budget has room for it, else
    (zstd) spans or (gzip) checkpoints into the blob.  Switching to spans
    re-reads the partial copy into spans, then goes on with the stream;
    switching to checkpoints drops the partial copy.  Gzip checkpoints come
    from the pass itself when it decodes with rapidgzip
    (:meth:`pass_checkpoints`: the blob said at the start that its copy
    cannot fit), else from a second pass after it.  At no time does more
    than the budget sit in the cache (see :meth:`IndexCache.reserve`)."""

    def __init__(self, cache: Optional[IndexCache], label: str, whole: bool,
                 compression: str = "", blob=None):
        self._cache = cache
        self._label = label
        self._whole = whole or cache is None
        self._reserved = 0
        self._spans: Optional[SpanWriter] = None
        self._checkpoints = False
        self._stream = False
        self.stream = None        # the BlobStream being indexed
        self.blob = blob
        self._gzip = compression == "gzip" and has_gzip_checkpoints()
        if cache is None:
            self._file, self._temp = tempfile.TemporaryFile(prefix="layerfs-"), None
        else:
            self._file, self._temp = _temp_file(cache.blob_path("x"))
        self._written = 0
        self._raw_file = self._raw_temp = None    # the blob as read (keep_raw)
        self._raw_written = self._raw_reserved = 0
        self._raw = False
        # A blob whose header or trailer already says its copy cannot fit
        # goes straight to a lazy form: no partial copy crowds out layers
        # indexed beside it.
        self._least_size = (0 if self._whole or blob is None
                            else least_uncompressed_size(blob, compression))
        self._copy_fits = self._whole or blob is None or self._least_size <= cache.budget

    def write(self, chunk: bytes) -> None:
        if self._stream or self._checkpoints and self._spans is None:
            return
        try:
            if self._spans is not None:
                self._spans.write(chunk)
                return
            if not self._whole and not (self._copy_fits and self._room(len(chunk))):
                if self._gzip or self._has_frames():
                    self._drop_file()     # seek points into the blob, after the pass
                    self._checkpoints = True
                    return
                self._switch_to_spans()
                self._spans.write(chunk)
                return
        except _NoRoom:
            self._to_stream()
            return
        self._file.write(chunk)
        self._written += len(chunk)

    def pass_checkpoints(self) -> Optional[int]:
        """The checkpoint spacing, if the pass itself should build gzip
        checkpoints (:class:`BlobStream`'s *gzip_checkpoints*): the blob's
        last bytes say its copy cannot fit, and not that it is a bomb
        (whose checkpoints would outgrow the blob: spans instead), nor that
        its checkpoints cannot fit either (the stream form: zlib's pass
        holds less memory and runs outside the GIL).  A blob
        whose last bytes do not say (zero padding, a small last member, a
        copy beyond 4 GiB) is decoded by zlib, and gets its checkpoints
        from a second pass if the copy turns out not to fit."""
        if not self._gzip or self._copy_fits:
            return None
        spacing = gzip_spacing()
        estimate = estimate_gzip_index(self._least_size, spacing)
        if estimate > self.blob.size or estimate > self._cache.budget:
            return None
        return spacing

    def keep_raw(self) -> None:
        """Keep the blob's bytes as the pass reads them, in a temp file
        within the budget, so that gzip checkpoints are built from it
        rather than by fetching a remote blob a second time.  The copy
        comes first: the temp file goes as soon as the copy needs its room,
        or the budget has none for it."""
        self._raw = self._gzip and not self._whole

    def write_raw(self, data: bytes) -> None:
        if not self._raw:
            return
        if self._raw_file is None:
            self._raw_file, self._raw_temp = _temp_file(self._cache.spans_path("x"))
        n = len(data)
        if self._raw_written + n > self._raw_reserved:
            # Room a step ahead (each ask lists the cache's files), beside
            # what the copy has asked for and not yet written: the budget
            # counts only what is on disk.
            outstanding = (max(0, self._reserved - self._written)
                           if self._file is not None and self._spans is None else 0)
            self._raw_file.flush()
            if self._file is not None:
                self._file.flush()
            granted = self._cache.reserve(n + outstanding, ahead=max(0, RESERVE_STEP - n))
            if not granted:
                self._drop_raw()
                return
            self._raw_reserved = self._raw_written + granted - outstanding
        self._raw_file.write(data)
        self._raw_written += n

    def _raw_outstanding(self) -> int:
        """Room asked for the blob's temp copy and not yet written."""
        if self._raw_file is None:
            return 0
        self._raw_file.flush()
        return max(0, self._raw_reserved - self._raw_written)

    def _drop_raw(self) -> None:
        self._raw = False
        if self._raw_file is not None:
            self._raw_file.close()
            _remove(self._raw_temp)
        self._raw_file = self._raw_temp = None

    def _has_frames(self) -> bool:
        """A zstd blob already seen to have several frames (each declaring
        its size so far): its frame boundaries may serve as seek points."""
        frames = self.stream.zstd_frames if self.stream is not None else None
        return bool(frames) and len(frames) >= 2 and all(f[1] is not None for f in frames)

    def _drop_file(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._temp is not None:
            _remove(self._temp)
        self._file = self._temp = None

    def _to_stream(self) -> None:
        """Not even spans fit: keep nothing, read from the blob itself."""
        self._drop_file()
        self._spans = None
        self._stream = True

    def _room(self, n: int) -> bool:
        """Whether *n* more bytes fit (asks the cache for room in steps)."""
        if self._written + n <= self._reserved:
            return True
        self._file.flush()        # the budget counts what is on disk
        # A step ahead if the budget has it; else just these bytes, before
        # and after giving up the blob's temp copy (the copy comes first).
        for _ in range(2):
            outstanding = self._raw_outstanding()
            granted = self._cache.reserve(n + outstanding, ahead=max(0, RESERVE_STEP - n))
            if granted:
                self._reserved = self._written + granted - outstanding
                return True
            if self._raw_file is None:
                return False
            self._drop_raw()
        return False

    def _before_span(self, n: int) -> None:
        if not self._cache.reserve(n + self._raw_outstanding()):
            raise _NoRoom()

    def _switch_to_spans(self) -> None:
        old, old_temp = self._file, self._temp
        old.flush()
        self._file, self._temp = _temp_file(self._cache.spans_path("x"))
        self._spans = SpanWriter(self._file, before_write=self._before_span)
        done = 0
        fd = old.fileno()
        while done < self._written:
            chunk = os.pread(fd, min(1 << 20, self._written - done), done)
            if not chunk:
                break
            _punch_hole(fd, done, len(chunk))   # give the copy's space back first
            self._spans.write(chunk)
            done += len(chunk)
        old.close()
        _remove(old_temp)

    def finish(self, hex_: str, size: int, data_end: int):
        """The data as the layer will read it, its file renamed into place."""
        try:
            return self._finish(hex_, size, data_end)
        finally:
            self._drop_raw()

    def _finish(self, hex_: str, size: int, data_end: int):
        self._raw_reserved = self._raw_written      # the pass is over: no more comes
        if self._checkpoints and self._spans is None and not self._stream:
            try:
                return self._finish_checkpoints(hex_, size, data_end)
            except _NoRoom:
                self._to_stream()
        if self._spans is not None and not self._stream:
            try:
                self._spans.finish()
            except _NoRoom:
                self._to_stream()
        if self._stream:
            return StreamReader(self.blob, size, self._label)
        if self._spans is not None:
            self._file.flush()
            final = self._cache.spans_path(hex_)
        else:
            self._file.flush()
            if self._temp is None:            # no cache: the anonymous file
                file = self._file
                data = FileRange(f"/proc/self/fd/{file.fileno()}", label=self._label)
                close = data.close

                def close_both() -> None:
                    close()
                    file.close()
                data.close = close_both
                return data
            final = self._cache.blob_path(hex_)
        self._publish(final)
        if self._spans is not None:
            fd = os.open(final, os.O_RDONLY | os.O_CLOEXEC)
            try:
                return _OwnedSpans(fd, size, self._label)
            except BaseException:
                os.close(fd)
                raise
        return FileRange(final, label=self._label)

    def _finish_checkpoints(self, hex_: str, size: int, data_end: int):
        """Checkpoints cost a 32 KiB window per spacing of output whatever
        the data; spans cost about the compressed size.  For a layer that
        compresses 1:128 or better (a bomb), spans are smaller: made by a
        second decompression pass."""
        if not self._gzip:
            return self._finish_frames(hex_, size)
        estimate = estimate_gzip_index(size, gzip_spacing())
        if estimate > self.blob.size:
            self._drop_raw()
            return self._second_pass_spans(hex_, size)
        if self._raw_file is not None:
            self._raw_file.flush()        # the budget counts what is on disk
        try:
            self._before_span(estimate)
        except _NoRoom:
            if self._raw_file is None:
                raise
            self._drop_raw()      # the checkpoints come first
            self._before_span(estimate)
        final = self._cache.checkpoints_path(hex_)
        self._file, self._temp = _temp_file(final)
        if self.stream.has_gzip_index:
            # Built by the pass, from the bytes whose digest was checked.
            write_gzip_index(self.stream.export_gzip_index, data_end, size, self._file)
        else:
            self._second_pass_checkpoints(data_end, size)
        self._drop_raw()
        return self._published_reader(
            final, lambda fd: GzipCheckpointReader(fd, self.blob, size, self._label))

    def _second_pass_checkpoints(self, data_end: int, size: int) -> None:
        source = None
        if self._raw_file is not None and self._raw_written == self.blob.size:
            # The bytes the pass read and verified: no second fetch.
            self._raw_file.flush()
            source = FileRange(self._raw_temp, label=self._label)
        try:
            write_gzip_checkpoints(source or self.blob, data_end, size, self._file)
        finally:
            if source is not None:
                source.close()

    def _finish_frames(self, hex_: str, size: int):
        """A multi-frame zstd blob: its frame table, if every frame declared
        its size; else spans, from a second pass."""
        table = frame_table(self.stream.zstd_frames, size)
        if table is None:
            return self._second_pass_spans(hex_, size)
        self._before_span(len(table) * 24 + 4096)
        final = self._cache.frames_path(hex_)
        self._file, self._temp = _temp_file(final)
        write_frame_table(self._file, table, size, self.stream.data_end)
        return self._published_reader(
            final, lambda fd: ZstdFrameReader(fd, self.blob, size, self._label))

    def _publish(self, final: str) -> None:
        """What was written under the temporary name becomes *final*."""
        os.replace(self._temp, final)
        self._temp = None
        self._file.close()

    def _published_reader(self, final: str, reader: Callable[[int], object]):
        """*reader(fd)* of *final*, once published (the reader keeps what it
        needs of the descriptor, which is closed here)."""
        self._publish(final)
        fd = os.open(final, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return reader(fd)
        finally:
            os.close(fd)

    def _second_pass_spans(self, hex_: str, size: int):
        self._file, self._temp = _temp_file(self._cache.spans_path("x"))
        self._spans = SpanWriter(self._file, before_write=self._before_span)
        stream = BlobStream(self.blob, label=self._label, sink=self._spans.write)
        stream.drain()       # _NoRoom goes to finish()
        return self.finish(hex_, size, 0)

    def abort(self) -> None:
        self._drop_raw()
        if self._file is None:
            return
        self._file.close()
        if self._temp is not None:
            _remove(self._temp)
            self._temp = None


class _NoRoom(Exception):
    """The cache budget has no room for what was about to be written."""


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """Frees the disk blocks of a byte range of a file (Linux
    ``fallocate(FALLOC_FL_PUNCH_HOLE)``); does nothing where unsupported."""
    global _fallocate
    if _fallocate is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            _fallocate = libc.fallocate
            _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64,
                                   ctypes.c_int64]
        except (OSError, AttributeError):
            _fallocate = False
    if _fallocate:
        _fallocate(fd, 0x01 | 0x02, offset, length)   # KEEP_SIZE | PUNCH_HOLE


_fallocate = None


def _segment_start(segment: tuple) -> int:
    return segment[0]
