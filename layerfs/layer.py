"""One layer blob, opened: its entries, and random access to file contents.

:func:`open_layer` reads a blob once, front to back: it hashes it (digest of
the blob as stored, diff_id of the tar inside), checks both against what the
caller expects, lists its members (:mod:`layerfs.tarindex`) and, if the blob
is compressed, writes the uncompressed tar to a copy on disk.  File contents
are then read with ``os.pread`` at the offsets the entries record: a plain
tar in place (even when the blob is a byte range of a larger file, a
:class:`BlobSource`), a compressed one from its copy.

Cost of this design, on purpose:

* disk: a compressed layer costs its *uncompressed size* in the cache (the
  copy); a plain tar costs nothing but its index.  In exchange a read is one
  ``pread``, with no seek points to keep and no decompression after opening.
* memory: the entries only (one small tuple per member); contents are never
  held, and indexing holds about one 1 MiB chunk at a time.

The index cache (:class:`IndexCache`, under ``$LAYERFS_CACHE_DIR``, else
``$XDG_CACHE_HOME/layerfs``, else ``~/.cache/layerfs``)::

    index/sha256/<hex>.idx   marshal of (header, marshal of [entry tuples]),
                             keyed by the blob digest; the header holds a
                             format name and version, both digests, sizes
                             and the entry count
    views/sha256/<hex>.view  marshal of (header, tree record): the union of a
                             stack of layers, keyed by the stack's ChainID
                             (see ``layerfs.fs.build_tree``)
    blobs/sha256/<hex>.tar   the uncompressed copy of a compressed blob
    memo/<key>               "stat memo": the identity of a source file
                             (realpath, offset, size, st_dev, st_ino, st_size,
                             st_mtime_ns, st_ctime_ns) -> (digest, diff_id)

Every file is written to a temp file in its final directory and renamed into
place, so readers never see half a file; temp files are removed on any error
(a full disk included).  A second open of an unchanged file finds its digest
in the memo and its entries in the index: it neither hashes the blob nor
parses a tar header; and an image whose stack was opened before loads its
union from ``views/`` without reading the layers' entries.  An index or view
file that cannot be read back (corrupt, from another version) is discarded
and rebuilt.

``cache=False`` turns caching off: nothing is written to the cache
directory, the index lives in memory and the copy of a compressed blob goes
to an anonymous temporary file (:func:`tempfile.TemporaryFile`, in
``$TMPDIR``) that disappears when the layer is closed, or the process dies.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import marshal
import os
import tempfile
from typing import Callable, Optional, Union

import attrs

from layerfs.compression import NONE, BlobStream, detect_compression
from layerfs.entry import Entry
from layerfs.errors import (DigestMismatchError, ImageError, InvalidLayerError,
                            UnsupportedImageError, path_error)
from layerfs.tarindex import iter_entries

CACHE_ENV = "LAYERFS_CACHE_DIR"
INDEX_FORMAT = "layerfs-index"
INDEX_VERSION = 2
VIEW_FORMAT = "layerfs-view"
VIEW_VERSION = 1
MEMO_VERSION = 2
_COPY_BUFFER = 1 << 20


@attrs.frozen
class BlobSource:
    """A blob that is a byte range of a file: *size* bytes (default: up to
    the end) from *offset*, e.g. a layer stored inside an uncompressed
    OCI-layout or ``docker save`` tar."""
    path: str
    offset: int = 0
    size: Optional[int] = None


def default_cache_root() -> str:
    """``$LAYERFS_CACHE_DIR``, else ``$XDG_CACHE_HOME/layerfs``, else
    ``~/.cache/layerfs``."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return root
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return os.path.join(xdg, "layerfs")
    return os.path.join(os.path.expanduser("~"), ".cache", "layerfs")


def cache_root(cache) -> Optional[str]:
    """The directory of a ``cache=`` argument: an :class:`IndexCache`'s
    root, the default one for None, None for ``False`` (no cache)."""
    if cache is False:
        return None
    root = getattr(cache, "root", None)
    return root if root is not None else default_cache_root()


class IndexCache:
    """The on-disk cache of layer indexes and uncompressed copies (the
    layout is in the module docstring).  *root* defaults to
    :func:`default_cache_root`."""

    def __init__(self, root: Union[str, os.PathLike, None] = None):
        self.root = os.fspath(root) if root is not None else default_cache_root()

    def index_path(self, hex_digest: str) -> str:
        return os.path.join(self.root, "index", "sha256", hex_digest + ".idx")

    def view_path(self, chain_hex: str) -> str:
        return os.path.join(self.root, "views", "sha256", chain_hex + ".view")

    def blob_path(self, hex_digest: str) -> str:
        return os.path.join(self.root, "blobs", "sha256", hex_digest + ".tar")

    def memo_path(self, identity: tuple) -> str:
        key = hashlib.sha256(repr(identity).encode("utf-8", "surrogateescape"))
        return os.path.join(self.root, "memo", key.hexdigest()[:40])

    def lookup_memo(self, identity: tuple) -> Optional[tuple]:
        """(digest hex, diff_id hex) remembered for an unchanged source."""
        value = _load_marshal(self.memo_path(identity))
        if (isinstance(value, dict) and value.get("version") == MEMO_VERSION
                and value.get("identity") == identity):
            return value.get("digest"), value.get("diff_id")
        return None

    def store_memo(self, identity: tuple, digest: str, diff_id: str) -> None:
        record = {"version": MEMO_VERSION, "identity": identity,
                  "digest": digest, "diff_id": diff_id}
        _write_atomic(self.memo_path(identity), marshal.dumps(record))

    def refresh_memo(self, path: str, digest: str, diff_id: str) -> None:
        """Remember *path* (a whole blob) again after layerfs itself changed
        its inode's ctime (hardlinking it into a layout), so that the next
        open trusts it without hashing it again.  Only for a file whose
        digest is known to be *digest*."""
        st = os.stat(path)
        self.store_memo(file_identity(path, 0, st.st_size, st),
                        digest.partition(":")[2], diff_id.partition(":")[2])

    def load_header(self, hex_digest: str) -> Optional[dict]:
        """The header of a blob's index, or None (see :meth:`load_index`)."""
        loaded = self._load_index_file(hex_digest)
        return loaded[0] if loaded is not None else None

    def load_index(self, hex_digest: str) -> Optional[tuple]:
        """(header, entries) of a blob, or None; a file that does not read
        back as an index of this version and blob is removed."""
        loaded = self._load_index_file(hex_digest)
        if loaded is None:
            return None
        header, payload = loaded
        try:
            rows = marshal.loads(payload)
            if len(rows) != header["entry_count"]:
                raise ValueError("wrong number of entries")
            make = Entry._make
            entries = [make(row) for row in rows]
        except (ValueError, TypeError, EOFError):
            _remove(self.index_path(hex_digest))
            return None
        return header, entries

    def _load_index_file(self, hex_digest: str) -> Optional[tuple]:
        """(header, marshalled entries): the entries are a payload of their
        own, so that an open which needs only the header does not build them."""
        return _load_headed(self.index_path(hex_digest), INDEX_FORMAT, INDEX_VERSION,
                            ("digest", hex_digest), bytes)

    def store_index(self, header: dict, entries: list) -> None:
        payload = marshal.dumps([tuple(e) for e in entries])
        _write_atomic(self.index_path(header["digest"]), marshal.dumps((header, payload)))

    def load_view(self, chain_hex: str) -> Optional[dict]:
        """The tree record (:meth:`layerfs.union.Tree.to_record`) stored for
        the stack of layers whose ChainID is *chain_hex*, or None."""
        loaded = _load_headed(self.view_path(chain_hex), VIEW_FORMAT, VIEW_VERSION,
                              ("chain_id", chain_hex), dict)
        return loaded[1] if loaded is not None else None

    def store_view(self, chain_hex: str, record: dict) -> None:
        header = {"format": VIEW_FORMAT, "version": VIEW_VERSION, "chain_id": chain_hex}
        _write_atomic(self.view_path(chain_hex), marshal.dumps((header, record)))

    def discard_view(self, chain_hex: str) -> None:
        _remove(self.view_path(chain_hex))


class Layer:
    """An opened layer (see :func:`open_layer`).  Attributes: ``label``,
    ``path``, ``source``, ``digest`` and ``diff_id`` (``"sha256:<hex>"``),
    ``media_type``, ``compression`` (``"none"``, ``"gzip"``, ``"zstd"``),
    ``size`` (bytes of the blob), ``uncompressed_size``, ``entries`` (tar
    order, loaded from the index cache when first needed) and
    ``entry_count``; ``cache`` is the :class:`IndexCache` it came from, or
    None."""

    def __init__(self, *, source: BlobSource, label: str, header: dict,
                 entries: Optional[list], media_type: Optional[str], data_fd: int,
                 base: int, closers: list, cache: Optional[IndexCache] = None):
        self.source = source
        self.path = source.path
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
        self._data_fd = data_fd
        self._base = base
        self._closers = closers

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
        stream = BlobStream(self._data_fd, size=self.uncompressed_size,
                            offset=self._base, label=self.label)
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
        if self._data_fd < 0:
            raise path_error(errno.EBADF, self.label)
        if length <= 0 or offset >= size:
            return b""
        length = min(length, size - offset)
        if isinstance(data, int):
            return self._pread(length, self._base + data + offset)
        return self._read_sparse(data, offset, length)

    def extent(self, data, size: int, offset: int, length: int) -> Optional[tuple]:
        """Where :meth:`read` would read: ``(fd, position, length)`` in this
        layer's uncompressed data (the blob, or its uncompressed copy), for
        a caller that reads the bytes itself (the FUSE adapter lets libfuse
        do it); None for a sparse file, whose holes exist in no file."""
        if self._data_fd < 0:
            raise path_error(errno.EBADF, self.label)
        if not isinstance(data, int):
            return None
        length = max(0, min(length, size - offset))
        return self._data_fd, self._base + data + offset, length

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
                    high - low, self._base + tar_offset + low - start)
        return bytes(out)

    def _pread(self, n: int, position: int) -> bytes:
        data = os.pread(self._data_fd, n, position)
        while len(data) < n:
            more = os.pread(self._data_fd, n - len(data), position + len(data))
            if not more:
                raise InvalidLayerError("blob is shorter than its index says "
                                        "(changed since it was indexed?)",
                                        path=self.path, layer=self.label)
            data += more
        return data

    def data_location(self) -> tuple[str, int]:
        """A path the layer's uncompressed tar can be opened at, and the
        offset where the tar starts in it: the blob itself when it is a
        plain tar, else its uncompressed copy (in the cache, or the
        anonymous one through ``/proc/self/fd`` while this layer is open).
        Lets a compressed archive be read as the image it holds."""
        if self.compression == NONE:
            return self.source.path, self.source.offset
        if self.cache is not None:
            return self.cache.blob_path(self.digest.partition(":")[2]), 0
        return f"/proc/self/fd/{self._data_fd}", 0

    def close(self) -> None:
        self._data_fd = -1
        closers, self._closers = self._closers, []
        for close in closers:
            close()

    def __enter__(self) -> "Layer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Layer {self.label} {self.digest} {self.entry_count} entries>"


def open_layer(source: Union[str, os.PathLike, BlobSource], *,
               digest: Optional[str] = None, diff_id: Optional[str] = None,
               media_type: Optional[str] = None,
               cache: Union[IndexCache, None, bool] = None,
               label: Optional[str] = None,
               progress: Optional[Callable[[int, int], None]] = None,
               max_size: Optional[int] = None) -> Layer:
    """Opens a layer blob (a path or a :class:`BlobSource`).

    *digest* / *diff_id*, if given, must match (else
    :class:`DigestMismatchError`).  *cache*: an :class:`IndexCache`, None for
    the default one, False for none.  *progress(done, total)* is called every
    few MiB while indexing.  *max_size* bounds the uncompressed size of a
    compressed blob (see :mod:`layerfs.compression`).
    """
    if not isinstance(source, BlobSource):
        source = BlobSource(os.fspath(source))
    label = label or source.path
    for expected in (digest, diff_id):
        if expected is not None and not expected.startswith("sha256:"):
            raise UnsupportedImageError(f"digest {expected!r}: only sha256 "
                                        "is supported", path=source.path, layer=label)
    if cache is None or cache is True:
        cache = IndexCache()
    fd = os.open(source.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        size = _blob_size(source, st.st_size, label)
        identity = file_identity(source.path, source.offset, size, st)
        opener = _Opener(source, label, fd, size, digest, diff_id, media_type)
        layer = None
        if cache:
            layer = opener.from_cache(cache, identity)
        if layer is None:
            layer = opener.index(cache or None, identity, progress, max_size)
    except ImageError as error:
        os.close(fd)
        raise error.located(source.path) from None
    except BaseException:
        os.close(fd)
        raise
    return layer


@attrs.define
class _Opener:
    """The two ways to open a layer: from the cache, or by indexing it."""
    source: BlobSource
    label: str
    fd: int
    size: int
    digest: Optional[str]
    diff_id: Optional[str]
    media_type: Optional[str]

    def from_cache(self, cache: IndexCache, identity: tuple) -> Optional[Layer]:
        memo = cache.lookup_memo(identity)
        if memo is None:
            return None
        self.verify(*memo)
        header = cache.load_header(memo[0])
        if header is None:
            return None
        if header["compression"] == NONE:
            return self.layer(header, None, self.fd, self.source.offset,
                              [lambda: os.close(self.fd)], cache)
        try:
            copy_fd = os.open(cache.blob_path(header["digest"]),
                              os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        if os.fstat(copy_fd).st_size != header["uncompressed_size"]:
            os.close(copy_fd)
            return None
        os.close(self.fd)
        return self.layer(header, None, copy_fd, 0, [lambda: os.close(copy_fd)], cache)

    def index(self, cache: Optional[IndexCache], identity: tuple,
              progress, max_size) -> Layer:
        """One pass over the blob: hashes, entries and (if compressed) the
        uncompressed copy, written under a temp name and renamed when whole."""
        head = os.pread(self.fd, min(4, self.size), self.source.offset)
        copy = temp_path = None
        if detect_compression(head) != NONE:
            if cache is None:
                copy = tempfile.TemporaryFile(prefix="layerfs-")
            else:
                copy, temp_path = _temp_file(cache.blob_path("x"))
        try:
            stream = BlobStream(self.fd, size=self.size, offset=self.source.offset,
                                label=self.label, max_size=max_size,
                                sink=copy.write if copy else None, progress=progress)
            entries = list(iter_entries(stream, self.label))
            stream.drain()
            self.verify(stream.digest, stream.diff_id)
            header = {"format": INDEX_FORMAT, "version": INDEX_VERSION,
                      "digest": stream.digest, "diff_id": stream.diff_id,
                      "compression": stream.compression, "size": self.size,
                      "uncompressed_size": stream.uncompressed_size,
                      "entry_count": len(entries)}
            if copy is not None:
                copy.flush()
            if temp_path is not None:
                os.replace(temp_path, cache.blob_path(stream.digest))
                temp_path = None
            if cache is not None:
                cache.store_index(header, entries)
                cache.store_memo(identity, stream.digest, stream.diff_id)
        except BaseException:
            if copy is not None:
                copy.close()
            if temp_path is not None:
                _remove(temp_path)
            raise
        if copy is None:
            return self.layer(header, entries, self.fd, self.source.offset,
                              [lambda: os.close(self.fd)], cache)
        os.close(self.fd)
        return self.layer(header, entries, copy.fileno(), 0, [copy.close], cache)

    def verify(self, digest_hex: str, diff_id_hex: str) -> None:
        for what, expected, actual in (("digest", self.digest, digest_hex),
                                       ("diff_id", self.diff_id, diff_id_hex)):
            if expected is not None and expected != "sha256:" + actual:
                raise DigestMismatchError(
                    f"{what} is sha256:{actual}, expected {expected}",
                    path=self.source.path, layer=self.label)

    def layer(self, header, entries, data_fd, base, closers, cache=None) -> Layer:
        return Layer(source=self.source, label=self.label, header=header,
                     entries=entries, media_type=self.media_type,
                     data_fd=data_fd, base=base, closers=closers, cache=cache)


def file_identity(path: str, offset: int, size: int, st: os.stat_result) -> tuple:
    """What the stat memo is keyed on: everything an in-place edit of the
    file changes.  Editing keeps the inode and may put the size and mtime
    back (``touch -r``), but never the ctime."""
    return (os.path.realpath(path), offset, size, st.st_dev, st.st_ino, st.st_size,
            st.st_mtime_ns, st.st_ctime_ns)


def _blob_size(source: BlobSource, file_size: int, label: str) -> int:
    if source.offset < 0 or source.offset > file_size:
        raise InvalidLayerError(f"blob offset {source.offset} is outside the file "
                                f"({file_size} bytes)", path=source.path, layer=label)
    if source.size is None:
        return file_size - source.offset
    if source.size < 0 or source.offset + source.size > file_size:
        raise InvalidLayerError(f"blob of {source.size} bytes at {source.offset} "
                                f"runs past the end of the file ({file_size} bytes)",
                                path=source.path, layer=label)
    return source.size


def _segment_start(segment: tuple) -> int:
    return segment[0]


def _temp_file(final_path: str):
    """An open binary file in *final_path*'s directory, and its name."""
    directory = os.path.dirname(final_path)
    os.makedirs(directory, exist_ok=True)
    fd, temp_path = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        return os.fdopen(fd, "w+b", buffering=_COPY_BUFFER), temp_path
    except BaseException:
        os.close(fd)
        _remove(temp_path)
        raise


def _write_atomic(path: str, payload: bytes) -> None:
    file, temp_path = _temp_file(path)
    try:
        with file:
            file.write(payload)
        os.replace(temp_path, path)
    except BaseException:
        _remove(temp_path)
        raise


def _load_marshal(path: str):
    """The marshalled value in *path*, None if absent; an unreadable file
    is removed (it will be rebuilt)."""
    try:
        with open(path, "rb") as file:
            payload = file.read()
    except FileNotFoundError:
        return None
    try:
        return marshal.loads(payload)
    except (ValueError, EOFError, TypeError):
        _remove(path)
        return None


def _load_headed(path: str, format_name: str, version: int, key: tuple,
                 body_type: type) -> Optional[tuple]:
    """(header, body) of a cache file holding the marshal of that pair, if
    the header names *format_name*, *version* and *key* (a (field, value)
    pair) and the body is a *body_type*; else None, and the file is removed."""
    value = _load_marshal(path)
    if value is None:
        return None
    try:
        header, body = value
        if (header["format"] != format_name or header["version"] != version
                or header[key[0]] != key[1] or not isinstance(body, body_type)):
            raise ValueError("not the expected cache file")
    except (ValueError, TypeError, KeyError):
        _remove(path)
        return None
    return header, body


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
