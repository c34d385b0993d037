"""Fetched ranges of a registry blob, kept in the cache within its budget.

Everything about how the compressed bytes a lazy layer fetched are kept on
disk lives here.  A layer of a ``docker://`` image read lazily (gzip
checkpoints, zstd frames, the stream form) re-reads its blob by ranges,
through :class:`layerfs.blobsource.VerifiedBlob`, in aligned chunks of
``SUM_CHUNK`` (1 MiB) bytes, each checked against the sha256 the index
recorded for it while the whole blob was verified.  A :class:`RangeStore`
keeps those chunks, so that a reopen, or another process, reads them from
disk instead of the network.

The format: one sparse file per blob, ``ranges/sha256/<hex>.ranges``, in
which chunk *i* lies at offset ``i * SUM_CHUNK``, where it lies in the blob.
There is no separate record of which chunks are present:

* presence is asked of the filesystem (``lseek(SEEK_DATA)``: a chunk never
  written is a hole);
* trust comes from the index: a chunk read from the file is returned only
  after its sha256 matches the one in the index's ``chunk_sums`` (checked by
  the caller, ``VerifiedBlob``).  A chunk is also written only after it was
  verified, but that is not what makes it trusted: a torn write (a crash),
  two processes writing the same chunk at once, or a reader that sees a
  chunk half-written by another process all give a checksum mismatch, and
  the chunk is then fetched again and rewritten.

Why no bitmap or extent record beside the data: such a record would have
to be kept consistent with the data across processes and crashes (a lock
and an ordering of writes), while the index already holds what tells a good
chunk from a bad one.  Checking costs a sha256 of 1 MiB (about 1-2 ms) per
chunk loaded, small against the network fetch it replaces and against the
decompression that follows it.  One file per blob (not one per chunk) keeps
the cache's scan, its budget and its eviction as cheap as for a copy.

Budget: before a chunk is written, :meth:`layerfs.cache.IndexCache.reserve`
must find room for it, counted in whole disk blocks (evicting least
recently used unpinned data of other blobs; asked 256 KiB at a time for
small chunks);
when it cannot, the chunk is not kept (it is still returned).  The
file's blocks on disk count toward the budget; its mtime is its last use.
It is evicted whole, like a copy, and never while its layer is open (the
layer's pin).  The file is never renamed into place: it holds no claim
that could be half-true, each chunk being checked when read.

Only reads made after a layer is open are kept, not the passes that index
the layer (they stream the whole blob, and keeping it would crowd out the
layer's own seek points in a small budget).

A layer read from its table of contents (:class:`layerfs.toc.TocLayer`)
keeps the compressed chunks it fetches in the same file, at their offsets
in the blob (:meth:`RangeStore.save_range`); each is checked against its
``chunkDigest`` when loaded, as when fetched.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from typing import Optional

TOUCH_EVERY = 10.0     # seconds between two updates of the file's last use
ROOM_STEP = 16 << 20   # room asked of the budget ahead, when it has it
BLOCK = 4096           # what a write into a hole allocates at least, per block touched


class RangeStore:
    """The chunks kept of one blob (*hex_* its sha256, *size* bytes, read
    in aligned *chunk*-byte pieces) in *cache* (an
    :class:`~layerfs.cache.IndexCache`).  Thread-safe; several processes
    may use the same file at once."""

    def __init__(self, cache, hex_: str, size: int, chunk: int):
        self._cache = cache
        self._hex = hex_
        self.path = cache.ranges_path(hex_)
        self._size = size
        self._chunk = chunk
        self._lock = threading.Lock()
        self._touched = 0.0
        self.loaded = 0        # chunks served from disk (for tests, benchmarks)
        self.saved = 0         # chunks written
        self._room = 0         # bytes the budget was last found to have for us

    def load(self, index: int) -> Optional[bytes]:
        """The bytes stored for chunk *index*, or None; unverified: the
        caller checks them."""
        return self.load_range(*self._bounds(index))

    def save(self, index: int, data: bytes) -> bool:
        """Keep chunk *index* (already verified by the caller) if the budget
        has room for it; True if it was written."""
        start, length = self._bounds(index)
        return len(data) == length and self.save_range(start, data)

    def load_range(self, start: int, length: int) -> Optional[bytes]:
        """The *length* bytes stored at *start* of the blob, or None where
        the file has a hole there; unverified (a range next to a stored one
        may share a block with it and read as zeros: the caller's check
        tells)."""
        if length <= 0:
            return None
        fd = self._open(create=False)
        if fd < 0:
            return None
        try:
            if not _has_data(fd, start, length):
                return None
            data = _pread_all(fd, length, start)
        finally:
            os.close(fd)
        if len(data) != length:
            return None
        with self._lock:
            now = time.monotonic()
            touch = now - self._touched > TOUCH_EVERY
            if touch:
                self._touched = now
            self.loaded += 1
        if touch:
            self._cache.touch(self.path)
        return data

    def save_range(self, start: int, data: bytes) -> bool:
        """Keep *data* (verified by the caller) at *start* of the blob if the
        budget has room for it; True if it was written."""
        length = len(data)
        if length <= 0 or start < 0 or start + length > self._size:
            return False
        fd = self._open(create=False)
        rewrite = False
        if fd >= 0:
            try:
                rewrite = _has_data(fd, start, length)     # a bad chunk: same blocks
            finally:
                os.close(fd)
        if not rewrite and not self._take_room(_blocks(start, length)):
            return False
        fd = self._open(create=True)
        try:
            os.pwrite(fd, data, start)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                return False
            raise
        finally:
            os.close(fd)
        with self._lock:
            self._touched = time.monotonic()
            self.saved += 1
        return True

    def _take_room(self, n: int) -> bool:
        """Whether *n* more bytes fit the budget.  Each ask of the cache is
        a scan of its files under its lock (47 ms with 9,000 files here),
        so room is asked a step ahead where the budget can hold the step
        (see :meth:`IndexCache.reserve`): one ask per 16 chunks of 1 MiB,
        not one each.  As with the other writers of the cache, another
        process may take the room meanwhile: the budget can be passed by
        less than a step per writer."""
        with self._lock:
            if n <= self._room:
                self._room -= n
                return True
        granted = self._cache.reserve(n, keep=self._hex, ahead=max(0, ROOM_STEP - n))
        if not granted:
            return False
        with self._lock:
            self._room = granted - n
        return True

    def _bounds(self, index: int) -> tuple[int, int]:
        start = index * self._chunk
        return start, max(0, min(self._chunk, self._size - start))

    def _open(self, create: bool) -> int:
        """A descriptor of the file (-1 if absent and not *create*), opened
        for each operation: nothing stays open to leak or to outlive an
        eviction."""
        if create:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        try:
            return os.open(self.path, flags, 0o644)
        except FileNotFoundError:
            return -1

    def close(self) -> None:
        """Nothing to release (see :meth:`_open`); kept for symmetry."""


def _has_data(fd: int, start: int, length: int) -> bool:
    """Whether the filesystem holds data, no hole, from *start* to
    *start + length* (at its block granularity)."""
    try:
        if os.lseek(fd, start, os.SEEK_DATA) != start:
            return False
        return os.lseek(fd, start, os.SEEK_HOLE) >= start + length
    except OSError as error:
        if error.errno == errno.ENXIO:      # at or past the end of the file
            return False
        return True          # no hole support: read, and let the checksum decide


def _blocks(start: int, length: int) -> int:
    """Bytes of disk a write of *length* bytes at *start* into a hole may
    allocate: every block it touches."""
    first = start // BLOCK * BLOCK
    end = -(-(start + length) // BLOCK) * BLOCK
    return end - first


def _pread_all(fd: int, length: int, position: int) -> bytes:
    parts, done = [], 0
    while done < length:
        part = os.pread(fd, length - done, position + done)
        if not part:
            break
        parts.append(part)
        done += len(part)
    return b"".join(parts)
