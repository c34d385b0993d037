"""Where a blob's bytes come from: the one interface every blob reader uses.

A *blob source* is any object with these four members (:class:`Blob`):

``size: int``
    The blob's length in bytes.
``digest: Optional[str]``
    ``"sha256:<hex>"`` where it is known before reading (a descriptor's
    digest, a registry blob); None otherwise.  A source never checks it:
    whoever reads the whole blob does (:class:`layerfs.compression.BlobStream`
    hashes as it goes).
``label: str``
    A short name for error messages (a path, ``docker://host/repo@digest``).
``read_at(offset: int, length: int) -> bytes``
    *length* bytes from *offset*; fewer only where the blob ends (b"" at or
    past the end).  No shared file position: it may be called from several
    threads at once.  Errors are :class:`OSError` (with an errno) or
    :class:`layerfs.errors.ImageError` naming the blob.

That is the whole contract: the layer reader (:func:`layerfs.layer.open_layer`,
:class:`~layerfs.compression.BlobStream`), the image writer and the lazy
readers of remote blobs need nothing more.  A local source may offer more,
used where present and never required:

``extent(offset, length) -> (fd, position, length)``
    where the bytes are in an open file, so that the FUSE adapter lets
    libfuse read them itself (``FileRange`` has it; a remote blob has not);
``identity() -> tuple``
    what the index cache's stat memo is keyed on (``FileRange``: path,
    range, inode, size, mtime and ctime), so that an unchanged local file is
    not hashed again on its next open.

Implementations here: :class:`FileRange` (a file, or a byte range of one, such
as a layer inside a ``docker save`` tar) and :class:`BytesBlob` (bytes in
memory, for tests and small blobs).  A registry blob read with HTTP ``Range``
is :class:`layerfs.remote.RemoteBlob`.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Optional, Protocol, runtime_checkable

from .errors import InvalidLayerError


@runtime_checkable
class Blob(Protocol):
    """The blob-source interface (see the module docstring)."""
    size: int
    digest: Optional[str]
    label: str

    def read_at(self, offset: int, length: int) -> bytes: ...


class FileRange:
    """*size* bytes (default: to the end of the file) from *offset* of the
    file at *path*, read with ``os.pread`` on a descriptor opened here.
    The range is checked against the file when it is opened; ``close()``
    (or ``with``) releases the descriptor."""

    def __init__(self, path, offset: int = 0, size: Optional[int] = None, *,
                 digest: Optional[str] = None, label: Optional[str] = None):
        self.path = os.fspath(path)
        self.offset = offset
        self.digest = digest
        self.label = label or self.path
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.stat = os.fstat(self._fd)
            self.size = _range_size(self.path, offset, size, self.stat.st_size, self.label)
        except BaseException:
            os.close(self._fd)
            raise

    def fileno(self) -> int:
        return self._fd

    def read_at(self, offset: int, length: int) -> bytes:
        length = min(length, self.size - offset)
        if length <= 0:
            return b""
        position = self.offset + offset
        data = os.pread(self._fd, length, position)
        while len(data) < length:      # a short read is not the end of a file
            more = os.pread(self._fd, length - len(data), position + len(data))
            if not more:
                break                  # the file shrank: the caller reports it
            data += more
        return data

    def extent(self, offset: int, length: int) -> tuple:
        length = max(0, min(length, self.size - offset))
        return self._fd, self.offset + offset, length

    def identity(self) -> tuple:
        st = self.stat
        return (os.path.realpath(self.path), self.offset, self.size, st.st_dev,
                st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> "FileRange":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<FileRange {self.path} [{self.offset}:+{self.size}]>"


class BytesBlob:
    """A blob held in memory."""

    def __init__(self, data: bytes, *, digest: Optional[str] = None,
                 label: str = "<bytes>"):
        self._data = bytes(data)
        self.size = len(self._data)
        self.digest = digest
        self.label = label

    def read_at(self, offset: int, length: int) -> bytes:
        if offset < 0 or length <= 0:
            return b""
        return self._data[offset:offset + length]


class RangeBlob:
    """*size* bytes from *offset* of another blob source."""

    def __init__(self, inner: Blob, offset: int, size: int, label: str,
                 digest: Optional[str] = None):
        self.inner, self.offset, self.size = inner, offset, size
        self.label, self.digest = label, digest

    def read_at(self, offset: int, length: int) -> bytes:
        length = min(length, self.size - offset)
        if length <= 0 or offset < 0:
            return b""
        return self.inner.read_at(self.offset + offset, length)


class CountingBlob:
    """Wraps a blob source and counts the bytes and calls it serves (tests
    and benchmarks use it to show what a lazy read fetched)."""

    def __init__(self, inner: Blob):
        self.inner = inner
        self.size = inner.size
        self.digest = inner.digest
        self.label = inner.label
        self.bytes_read = 0
        self.calls = 0
        self._lock = threading.Lock()

    def read_at(self, offset: int, length: int) -> bytes:
        data = self.inner.read_at(offset, length)
        with self._lock:
            self.bytes_read += len(data)
            self.calls += 1
        return data


class VerifiedBlob:
    """A blob source whose every read is checked: the blob is read in
    aligned chunks of *chunk* bytes, each compared with its sha256 in
    *sums* (recorded while the whole blob was verified, see
    :attr:`layerfs.compression.BlobStream.chunk_sums`).  A chunk that does
    not match raises :class:`~layerfs.errors.DigestMismatchError` naming
    the blob; nothing unverified is returned.  The last few chunks are kept
    in memory, so reads that go forward fetch each chunk once.

    *store* (settable later: :meth:`keep_in`), a
    :class:`layerfs.rangestore.RangeStore`, keeps verified chunks on disk
    within the cache budget: a chunk is looked for there before it is
    fetched, checked like a fetched one (a stored chunk that does not match
    is fetched again and rewritten), and written there once verified."""

    KEEP = 8

    def __init__(self, inner: Blob, sums: bytes, chunk: int, store=None):
        self.inner = inner
        self.size = inner.size
        self.digest = inner.digest
        self.label = inner.label
        self.store = store
        self._sums = sums
        self._chunk = chunk
        self._recent: dict = {}
        self._lock = threading.Lock()

    def keep_in(self, cache, last: bool = False) -> None:
        """From now on, keep fetched chunks in *cache* (an
        :class:`~layerfs.cache.IndexCache`; see :mod:`layerfs.rangestore`);
        with *last*, keep the chunk read last too (what a reader built just
        before read: rapidgzip reads the blob's head when it is opened)."""
        if self.store is None and self.digest and self.digest.startswith("sha256:"):
            from .rangestore import RangeStore
            self.store = RangeStore(cache, self.digest.partition(":")[2], self.size,
                                    self._chunk)
            with self._lock:
                recent = list(self._recent.items())[-1:] if last else []
            for index, data in recent:
                self.store.save(index, data)

    def remember(self, index: int, data: bytes) -> None:
        """Chunk *index* as a pass read it: kept in memory, like a fetched
        chunk, if it matches its checksum."""
        if hashlib.sha256(data).digest() == self._sums[32 * index:32 * index + 32]:
            with self._lock:
                self._recent[index] = data

    def stop_keeping(self) -> None:
        store, self.store = self.store, None
        if store is not None:
            store.close()

    def read_at(self, offset: int, length: int) -> bytes:
        length = min(length, self.size - offset)
        if length <= 0 or offset < 0:
            return b""
        parts = []
        while length > 0:
            index, within = divmod(offset, self._chunk)
            piece = self._chunk_at(index)[within:within + length]
            if not piece:
                break
            parts.append(piece)
            offset += len(piece)
            length -= len(piece)
        return b"".join(parts)

    def _chunk_at(self, index: int) -> bytes:
        with self._lock:
            data = self._recent.pop(index, None)
            if data is not None:
                self._recent[index] = data       # most recent last
                return data
        start = index * self._chunk
        expected = self._sums[32 * index:32 * index + 32]
        store = self.store
        data = store.load(index) if store is not None else None
        if data is None or hashlib.sha256(data).digest() != expected:
            data = self.inner.read_at(start, min(self._chunk, self.size - start))
            if hashlib.sha256(data).digest() != expected:
                from .errors import DigestMismatchError
                raise DigestMismatchError(f"bytes {start}-{start + len(data) - 1} do not "
                                          f"match the checksum recorded when the blob was "
                                          f"verified", layer=self.label)
            if store is not None:
                store.save(index, data)
        with self._lock:
            self._recent[index] = data
            while len(self._recent) > self.KEEP:
                self._recent.pop(next(iter(self._recent)))
        return data

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


def read_exact(blob: Blob, offset: int, length: int) -> bytes:
    """Exactly *length* bytes at *offset*, else :class:`InvalidLayerError`
    (the blob is shorter than what was recorded about it)."""
    data = blob.read_at(offset, length)
    if len(data) != length:
        raise InvalidLayerError(f"blob ended early: {len(data)} of {length} bytes "
                                f"at offset {offset} (changed since it was indexed?)",
                                layer=blob.label)
    return data


def is_blob(value: object) -> bool:
    """True for an object that implements the blob-source interface."""
    return (callable(getattr(value, "read_at", None)) and hasattr(value, "size")
            and hasattr(value, "label"))


def _range_size(path: str, offset: int, size: Optional[int], file_size: int,
                label: str) -> int:
    if offset < 0 or offset > file_size:
        raise InvalidLayerError(f"blob offset {offset} is outside the file "
                                f"({file_size} bytes)", path=path, layer=label)
    if size is None:
        return file_size - offset
    if size < 0 or offset + size > file_size:
        raise InvalidLayerError(f"blob of {size} bytes at {offset} runs past the end "
                                f"of the file ({file_size} bytes)", path=path, layer=label)
    return size
