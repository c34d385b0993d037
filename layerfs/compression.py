"""How a layer blob is stored, and its uncompressed tar stream.

Everything about compression lives here.  The compression of a blob is told by
its first bytes only (gzip ``1f 8b``, zstd ``28 b5 2f fd``, anything else is a
plain tar), never by a file name or a media type, which are often wrong.

:class:`BlobStream` reads a blob once, from front to back, and gives the
uncompressed tar stream with ``read(n)``, ``skip(n)`` and ``tell()``.  In the
same single pass it hashes the blob as stored (the *digest*) and the
uncompressed stream (the *diff_id*), and can hand every uncompressed chunk to
a *sink* (the layer reader writes its decompressed copy that way).  Memory is
bounded: at most about one chunk (1 MiB) of input and of output is held,
whatever the size of the blob or of a member inside it.

Checks, each an :class:`~layerfs.errors.InvalidLayerError` naming the blob:

* gzip: every member's CRC-32 and length (zlib does it with ``wbits=31``);
  several members in a row are one stream (as ``gzip -d`` reads them); zero
  bytes after the last member are padding and accepted; anything else after
  it is an error, and so is a stream that stops inside a member.  A blob
  decoded by rapidgzip to build its checkpoints in the same pass
  (*gzip_checkpoints*, :class:`_IndexingGzipDecoder`) gets the same checks
  from rapidgzip, but no padding (rapidgzip refuses it), and up to 9 bytes
  of anything after the last member pass unnoticed (measured with
  rapidgzip 0.16.2; the digest covers them all the same).
* zstd: frames are decoded across frame boundaries; skippable frames are
  allowed.  The zstandard stream reader says nothing when its input stops in
  the middle of a frame, so :class:`_ZstdFrames` follows the frame and block
  headers as the compressed bytes pass and reports a truncated stream.
* decompression bombs: the uncompressed size of a *compressed* blob may not
  exceed a limit (default 64 GiB; the ``max_size`` argument, else the
  ``LAYERFS_MAX_LAYER_SIZE`` environment variable, in bytes).  A plain tar has
  no limit: its size on disk already is its uncompressed size.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import zlib
from typing import Callable, Optional, Union

import zstandard

from layerfs.blobsource import Blob
from layerfs.errors import InvalidLayerError

NONE = "none"
GZIP = "gzip"
ZSTD = "zstd"

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

DEFAULT_MAX_SIZE = 64 << 30
MAX_SIZE_ENV = "LAYERFS_MAX_LAYER_SIZE"

CHUNK = 1 << 20            # bytes read or produced per step
SUM_CHUNK = 1 << 20        # blob bytes per recorded checksum (chunk_sums=True)
PROGRESS_STEP = 4 << 20    # call progress() about this often (blob bytes)

Progress = Callable[[int, int], None]
Sink = Callable[[bytes], object]


def detect_compression(head: bytes) -> str:
    """``"gzip"``, ``"zstd"`` or ``"none"`` from the first bytes of a blob."""
    if head.startswith(GZIP_MAGIC):
        return GZIP
    if head.startswith(ZSTD_MAGIC):
        return ZSTD
    return NONE


def least_uncompressed_size(blob: Blob, compression: str) -> int:
    """A lower bound on the decompressed size of *blob*, read from a few
    header or trailer bytes (0 when the blob does not say): a gzip blob's
    last ISIZE field (the last member's size modulo 2**32, never more than
    the whole), a zstd blob's first frame's declared content size.  Used to
    skip a whole copy that cannot fit the cache budget."""
    try:
        if compression == GZIP and blob.size >= 18:
            return int.from_bytes(blob.read_at(blob.size - 4, 4), "little")
        if compression == ZSTD:
            size = zstandard.frame_content_size(blob.read_at(0, 18))
            return max(size, 0)
    except zstandard.ZstdError:
        pass
    return 0


def max_layer_size(max_size: Optional[int] = None) -> int:
    """The limit on the uncompressed size of a compressed blob, in bytes:
    *max_size* if given, else ``$LAYERFS_MAX_LAYER_SIZE``, else 64 GiB."""
    if max_size is not None:
        return max_size
    text = os.environ.get(MAX_SIZE_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_SIZE
    try:
        from .cache import parse_size
        value = parse_size(text)
    except ValueError:
        raise ValueError(f"{MAX_SIZE_ENV}={text!r} is not a size (bytes, or 500M, 20G)") from None
    if value <= 0:
        raise ValueError(f"{MAX_SIZE_ENV}={text!r} must be positive")
    return value


class _FdBlob:
    """A byte range of an open descriptor, as a blob source (what callers
    that hand :class:`BlobStream` a descriptor get)."""

    def __init__(self, fd: int, offset: int, size: int, label: str):
        self._fd, self._offset, self.size, self.label = fd, offset, size, label
        self.digest = None

    def read_at(self, offset: int, length: int) -> bytes:
        length = min(length, self.size - offset)
        if length <= 0:
            return b""
        return os.pread(self._fd, length, self._offset + offset)


class _RawInput:
    """The blob as stored, read in order through its blob source's
    ``read_at`` (no shared file position), hashed as it passes."""

    def __init__(self, blob: Blob, progress: Optional[Progress],
                 chunk_sums: bool = False, sink: Optional[Sink] = None):
        self._blob = blob
        self._sink = sink             # gets the blob's bytes as they pass
        self.size = blob.size
        self.sums = [] if chunk_sums else None    # sha256 of each SUM_CHUNK bytes
        self.head = bytearray() if chunk_sums else None   # the first SUM_CHUNK bytes
        self._chunk_hasher = hashlib.sha256()
        self._chunk_left = SUM_CHUNK
        self.done = 0
        self.hasher = hashlib.sha256()
        self._progress = progress
        self._next_report = PROGRESS_STEP
        self._reported = -1

    def read(self, n: int) -> bytes:
        n = min(n, self.size - self.done)
        if n <= 0:
            return b""
        data = self._blob.read_at(self.done, n)
        if not data:
            return b""   # the file shrank under us; the caller reports truncation
        self.done += len(data)
        self.hasher.update(data)
        if self._sink is not None:
            self._sink(data)
        if self.sums is not None:
            self._sum(data)
            if len(self.head) < SUM_CHUNK:
                self.head += data[:SUM_CHUNK - len(self.head)]
        if self._progress is not None and self.done >= self._next_report:
            self._report()
        return data

    def _sum(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            piece = view[:self._chunk_left]
            self._chunk_hasher.update(piece)
            self._chunk_left -= len(piece)
            view = view[len(piece):]
            if self._chunk_left == 0 or self.done == self.size and not view:
                self.sums.append(self._chunk_hasher.digest())
                self._chunk_hasher = hashlib.sha256()
                self._chunk_left = SUM_CHUNK

    def _report(self) -> None:
        self._next_report = self.done + PROGRESS_STEP
        self._reported = self.done
        self._progress(self.done, self.size)

    def report_final(self) -> None:
        if self._progress is not None and self._reported != self.done:
            self._report()


class _GzipDecoder:
    """Produces the uncompressed bytes of a (multi-member) gzip stream."""

    def __init__(self, raw: _RawInput, label: str):
        self._raw = raw
        self._label = label
        self._obj = zlib.decompressobj(31)
        self._pending = b""
        self._done = False
        self.data_end = raw.size   # where the last member ends (zero padding after it)

    def __call__(self) -> bytes:
        while not self._done:
            if not self._pending:
                self._pending = self._raw.read(CHUNK)
                if not self._pending:
                    raise _invalid(self._label, "gzip stream is truncated")
            try:
                out = self._obj.decompress(self._pending, CHUNK)
            except zlib.error as e:
                raise _invalid(self._label, f"corrupt gzip stream ({e})") from None
            self._pending = self._obj.unconsumed_tail
            if self._obj.eof:
                self._next_member(self._obj.unused_data)
            if out:
                return out
        return b""

    def _next_member(self, rest: bytes) -> None:
        """After a member: another member, zero padding to the end, or EOF."""
        while len(rest) < len(GZIP_MAGIC):
            more = self._raw.read(CHUNK)
            if not more:
                break
            rest += more
        if rest.startswith(GZIP_MAGIC):
            self._obj = zlib.decompressobj(31)
            self._pending = rest
            return
        self.data_end = self._raw.done - len(rest)
        while rest:
            if rest.count(0) != len(rest):
                raise _invalid(self._label, "garbage after the end of the gzip stream")
            rest = self._raw.read(CHUNK)
        self._done = True


class _ForwardFile(io.RawIOBase):
    """The blob as a file that rapidgzip reads (:class:`_IndexingGzipDecoder`),
    each byte read once from the blob source, in order, through the pass's
    :class:`_RawInput` (so hashed as it passes).  rapidgzip reads it front to
    back but goes back to the start of the chunk it decodes (up to its chunk
    size, measured: 5.2 MB at 4 MiB chunks), and asks the size first: the
    last *keep* bytes read are kept to serve those reads again, the size is
    the blob's.  A seek never fails (rapidgzip's ``close`` seeks to 0, and
    an exception there aborts the process): a read behind what is kept does,
    naming the layer."""

    def __init__(self, raw: _RawInput, keep: int, label: str):
        self._raw = raw
        self._keep = keep
        self._label = label
        self._kept: collections.deque = collections.deque()   # (offset, bytes)
        self._kept_bytes = 0
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = (0, self._pos, self._raw.size)[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._raw.size - self._pos)
        if n <= 0:
            return 0
        while self._pos > self._raw.done:         # a skip forward: read through
            if not self._take(min(CHUNK, self._pos - self._raw.done)):
                return 0
        if self._pos == self._raw.done and not self._take(n):
            return 0
        data = self._kept_at(self._pos, n)
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def _take(self, n: int) -> bytes:
        """The next *n* bytes of the blob, kept."""
        data = self._raw.read(n)
        if data:
            self._kept.append((self._raw.done - len(data), data))
            self._kept_bytes += len(data)
            while self._kept_bytes - len(self._kept[0][1]) >= self._keep:
                self._kept_bytes -= len(self._kept.popleft()[1])
        return data

    def _kept_at(self, offset: int, n: int) -> bytes:
        if not self._kept or offset < self._kept[0][0]:
            raise _invalid(self._label, f"rapidgzip read back to byte {offset}, "
                           f"beyond the {self._keep} bytes the indexing pass keeps")
        start, data = next((s, d) for s, d in reversed(self._kept) if s <= offset)
        return data[offset - start:offset - start + n]

    def close(self) -> None:
        self._kept.clear()
        super().close()


class _IndexingGzipDecoder:
    """Produces the uncompressed bytes of a gzip stream with rapidgzip (one
    thread), which keeps zran-style checkpoints every *spacing* bytes as it
    goes: the indexing pass and the checkpoints from one read and one
    decompression of the blob (:meth:`export_index`).  rapidgzip checks
    every member's CRC-32 and length; a stream that stops inside a member
    it ends quietly, which :meth:`_check_end` catches.  It refuses zero
    padding after the last member (the caller uses this decoder only for a
    blob whose last bytes are a length, not padding)."""

    def __init__(self, raw: _RawInput, label: str, spacing: int):
        import rapidgzip
        self._raw = raw
        self._label = label
        self._file = _ForwardFile(raw, 2 * spacing + CHUNK, label)
        self._reader = rapidgzip.RapidgzipFile(self._file, parallelization=1,
                                               chunk_size=spacing)
        self.data_end = raw.size

    def __call__(self) -> bytes:
        try:
            out = self._reader.read(CHUNK)
        except (ValueError, RuntimeError) as error:      # rapidgzip's
            raise _invalid(self._label, "corrupt gzip stream "
                           f"({_first_line(error)})") from None
        if not out:
            self._check_end()
        return out

    def _check_end(self) -> None:
        if self._raw.done < self._raw.size:
            return            # the blob source came short: BlobStream says so
        if self._reader.tell_compressed() != 8 * self._raw.size:
            raise _invalid(self._label, "gzip stream is truncated")

    def export_index(self, file) -> None:
        """Writes rapidgzip's checkpoints to *file* (after the last chunk)."""
        self._reader.export_index(file)

    def close(self) -> None:
        self._reader.close()
        self._file.close()


def _first_line(error: Exception) -> str:
    """rapidgzip's message, on one line."""
    lines = str(error).strip().splitlines()
    return lines[0][:200] if lines else type(error).__name__


class _ZstdFrames:
    """Follows zstd frame and block headers over the compressed bytes, to
    know whether the input stopped on a frame boundary, and where each
    data frame starts with the content size its header declares
    (:attr:`frames`: ``[(offset, size or None)]``, the seek points of a
    multi-frame blob).  It only skips over block contents; decoding and
    checksums are zstandard's job."""

    _SKIPPABLE_MASK = 0xFFFFFFF0
    _SKIPPABLE_MAGIC = 0x184D2A50
    _MAGIC = 0xFD2FB528

    def __init__(self, label: str):
        self._label = label
        self._pending = b""
        self._need = 4               # bytes of the next field to gather
        self._step = self._on_magic  # what to do with that field
        self._skip = 0               # content bytes to pass over first
        self._checksum = False
        self._fed = 0                # compressed bytes seen before this feed
        self._field_start = 0        # blob offset of the field being gathered
        self._fhd = 0
        self.frames: list = []

    def feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                taken = min(self._skip, end - pos)
                self._skip -= taken
                pos += taken
                continue
            if not self._pending:
                self._field_start = self._fed + pos
            want = self._need - len(self._pending)
            self._pending += data[pos:pos + want]
            pos += want
            if len(self._pending) == self._need:
                field, self._pending = self._pending, b""
                self._step(field)
        self._fed += end

    def finish(self) -> None:
        at_boundary = (self._step == self._on_magic and not self._pending
                       and not self._skip)
        if not at_boundary:
            raise _invalid(self._label, "zstd stream is truncated")

    def _expect(self, need: int, step) -> None:
        self._need, self._step = need, step

    def _on_magic(self, field: bytes) -> None:
        magic = int.from_bytes(field, "little")
        if magic == self._MAGIC:
            self.frames.append((self._field_start, None))
            self._expect(1, self._on_descriptor)
        elif magic & self._SKIPPABLE_MASK == self._SKIPPABLE_MAGIC:
            self._expect(4, self._on_skippable_size)
        else:
            raise _invalid(self._label, "garbage after the end of the zstd stream")

    def _on_skippable_size(self, field: bytes) -> None:
        self._skip = int.from_bytes(field, "little")
        self._expect(4, self._on_magic)

    def _on_descriptor(self, field: bytes) -> None:
        fhd = field[0]
        single_segment = fhd & 0x20
        self._checksum = bool(fhd & 0x04)
        rest = (0 if single_segment else 1)               # window descriptor
        rest += (0, 1, 2, 4)[fhd & 0x03]                   # dictionary id
        rest += (1 if single_segment else 0, 2, 4, 8)[fhd >> 6]  # content size
        self._fhd = fhd
        if rest:
            self._expect(rest, self._on_header_rest)
        else:
            self._expect(3, self._on_block)

    def _on_header_rest(self, field: bytes) -> None:
        fhd = self._fhd
        fcs_size = (1 if fhd & 0x20 else 0, 2, 4, 8)[fhd >> 6]
        if fcs_size:
            size = int.from_bytes(field[len(field) - fcs_size:], "little")
            if fcs_size == 2:
                size += 256
            self.frames[-1] = (self.frames[-1][0], size)
        self._expect(3, self._on_block)

    def _on_block(self, field: bytes) -> None:
        header = int.from_bytes(field, "little")
        block_type = (header >> 1) & 3
        self._skip = 1 if block_type == 1 else header >> 3   # RLE: one byte
        if header & 1:          # last block of the frame
            if self._checksum:
                self._skip += 4
            self._expect(4, self._on_magic)


class _ZstdDecoder:
    """Produces the uncompressed bytes of a zstd stream (all its frames)."""

    def __init__(self, raw: _RawInput, label: str):
        self._raw = raw
        self._label = label
        self._frames = _ZstdFrames(label)
        self._reader = zstandard.ZstdDecompressor().stream_reader(
            self, read_size=CHUNK, read_across_frames=True, closefd=False)

    def read(self, n: int) -> bytes:
        """The compressed side, as the zstandard reader pulls it."""
        data = self._raw.read(n)
        self._frames.feed(data)
        return data

    def __call__(self) -> bytes:
        try:
            out = self._reader.read(CHUNK)
        except zstandard.ZstdError as e:
            raise _invalid(self._label, f"corrupt zstd stream ({e})") from None
        if not out:
            self._frames.finish()
        return out


class BlobStream:
    """The uncompressed tar stream of a blob, read once from front to back.

    *source* is a blob source (:mod:`layerfs.blobsource`), or an open
    descriptor whose *size* bytes from *offset* are the blob.  Every
    uncompressed chunk is passed to *sink* (if given) as it is produced, every
    chunk of the blob as stored to *raw_sink* (if given) as it is read, and
    *progress(done, total)* (blob bytes) is called every few MiB.  After
    :meth:`drain`, :attr:`digest`, :attr:`diff_id` (hex) and
    :attr:`uncompressed_size` are final.

    *gzip_checkpoints* (bytes apart) decodes a gzip blob with rapidgzip
    instead of zlib, keeping checkpoints into it as it goes
    (:meth:`export_gzip_index`); zero padding after the last member is then
    refused.  Such a stream holds rapidgzip's threads: :meth:`close` it.
    """

    def __init__(self, source: Union[int, Blob], *, size: Optional[int] = None,
                 offset: int = 0, label: Optional[str] = None,
                 max_size: Optional[int] = None, sink: Optional[Sink] = None,
                 progress: Optional[Progress] = None, chunk_sums: bool = False,
                 raw_sink: Optional[Sink] = None,
                 gzip_checkpoints: Optional[int] = None):
        if isinstance(source, int):
            source = _FdBlob(source, offset, size, label or f"fd {source}")
        self.label = label = label or source.label
        self._raw = _RawInput(source, progress, chunk_sums, raw_sink)
        head = source.read_at(0, 4)
        self.compression = detect_compression(head)
        if self.compression == GZIP and gzip_checkpoints:
            self._next_chunk = _IndexingGzipDecoder(self._raw, label, gzip_checkpoints)
        elif self.compression == GZIP:
            self._next_chunk = _GzipDecoder(self._raw, label)
        elif self.compression == ZSTD:
            self._next_chunk = _ZstdDecoder(self._raw, label)
        else:
            self._next_chunk = self._raw_chunk
        self._diff_hasher = (None if self.compression == NONE
                             else hashlib.sha256())
        self._max_size = (None if self.compression == NONE
                          else max_layer_size(max_size))
        self._sink = sink
        self._buf = b""
        self._pos = 0
        self._base = 0          # stream offset of _buf[0]
        self._produced = 0      # uncompressed bytes produced so far
        self._eof = False

    def _raw_chunk(self) -> bytes:
        return self._raw.read(CHUNK)

    def _produce(self) -> bytes:
        """The next uncompressed chunk, b"" at the end of the stream."""
        if self._eof:
            return b""
        chunk = self._next_chunk()
        if not chunk:
            self._eof = True
            if self._raw.done != self._raw.size:
                raise _invalid(self.label, "blob is shorter than expected "
                               f"({self._raw.done} of {self._raw.size} bytes)")
            return b""
        self._produced += len(chunk)
        if self._diff_hasher is not None:
            if self._produced > self._max_size:
                raise _invalid(self.label, "uncompressed size exceeds the limit of "
                               f"{self._max_size} bytes (see --max-layer-size, "
                               f"{MAX_SIZE_ENV})")
            self._diff_hasher.update(chunk)
        if self._sink is not None:
            self._sink(chunk)
        return chunk

    def read(self, n: int) -> bytes:
        """Up to *n* bytes; fewer only at the end of the stream."""
        pos = self._pos
        end = pos + n
        if end <= len(self._buf):
            self._pos = end
            return self._buf[pos:end]
        parts = [self._buf[pos:]]
        have = len(parts[0])
        self._base += len(self._buf)
        self._buf, self._pos = b"", 0
        while have < n:
            chunk = self._produce()
            if not chunk:
                break
            want = n - have
            if len(chunk) > want:
                parts.append(chunk[:want])
                self._buf, self._pos = chunk, want
                have = n
                break
            parts.append(chunk)
            self._base += len(chunk)
            have += len(chunk)
        return b"".join(parts)

    def skip(self, n: int) -> int:
        """Passes over *n* bytes without keeping them; returns how many
        there were (fewer only at the end of the stream)."""
        pos = self._pos
        if pos + n <= len(self._buf):
            self._pos = pos + n
            return n
        skipped = len(self._buf) - pos
        self._base += len(self._buf)
        self._buf, self._pos = b"", 0
        while skipped < n:
            chunk = self._produce()
            if not chunk:
                break
            want = n - skipped
            if len(chunk) > want:
                self._buf, self._pos = chunk, want
                return n
            self._base += len(chunk)
            skipped += len(chunk)
        return skipped

    def tell(self) -> int:
        """Offset of the next byte in the uncompressed stream."""
        return self._base + self._pos

    def drain(self) -> None:
        """Reads (and hashes, and checks) whatever is left of the blob."""
        self._base += len(self._buf)
        self._buf, self._pos = b"", 0
        while True:
            chunk = self._produce()
            if not chunk:
                break
            self._base += len(chunk)
        self._raw.report_final()

    @property
    def has_gzip_index(self) -> bool:
        return isinstance(self._next_chunk, _IndexingGzipDecoder)

    def export_gzip_index(self, file) -> None:
        """With *gzip_checkpoints*, after :meth:`drain`: writes the
        checkpoints (rapidgzip's index) to *file*.  Trust them only once
        :attr:`digest` was checked: they come from the bytes it covers."""
        self._next_chunk.export_index(file)

    def close(self) -> None:
        close = getattr(self._next_chunk, "close", None)
        if close is not None:
            close()

    @property
    def digest(self) -> str:
        """sha256 (hex) of the blob as stored."""
        return self._raw.hasher.hexdigest()

    @property
    def zstd_frames(self) -> Optional[list]:
        """For a zstd blob: ``[(offset in the blob, content size or None)]``
        of its data frames, as their headers declare them."""
        frames = getattr(self._next_chunk, "_frames", None)
        return None if frames is None else frames.frames

    @property
    def chunk_sums(self) -> Optional[bytes]:
        """With ``chunk_sums=True``, after :meth:`drain`: the sha256 of
        every :data:`SUM_CHUNK` bytes of the blob, concatenated (the last
        chunk may be shorter), so that a ranged re-read can be verified."""
        return None if self._raw.sums is None else b"".join(self._raw.sums)

    @property
    def head_chunk(self) -> Optional[bytes]:
        """With ``chunk_sums=True``: the blob's first :data:`SUM_CHUNK`
        bytes, as the pass read them (a reader built after the pass reads
        the blob's head: it need not fetch it again)."""
        return None if self._raw.head is None else bytes(self._raw.head)

    @property
    def data_end(self) -> int:
        """Where the compressed data ends in the blob (before any zero
        padding after the last gzip member); final after :meth:`drain`."""
        return getattr(self._next_chunk, "data_end", self._raw.size)

    @property
    def diff_id(self) -> str:
        """sha256 (hex) of the uncompressed stream."""
        if self._diff_hasher is None:
            return self.digest
        return self._diff_hasher.hexdigest()

    @property
    def uncompressed_size(self) -> int:
        return self._produced


def _invalid(label: str, message: str) -> InvalidLayerError:
    return InvalidLayerError(message, layer=label)
