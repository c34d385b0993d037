"""The on-disk cache: layer indexes, decompressed data, and its budget.

Everything about what the cache directory holds, how much of it, and what
may be removed lives here.  Under the root (``$LAYERFS_CACHE_DIR``, else
``$XDG_CACHE_HOME/layerfs``, else ``~/.cache/layerfs``)::

    cache.json               the budget: {"size": bytes}; a property of the
                             directory, so a command run with a small budget
                             does not evict what a mount with a large one uses
    lock                     flock'ed (exclusive) while space is reserved or
                             entries are removed
    index/sha256/<hex>.idx   marshal of (header, marshal of [entry tuples]),
                             keyed by the blob digest
    views/sha256/<hex>.view  marshal of (header, tree record): the union of a
                             stack of layers, keyed by the stack's ChainID
    blobs/sha256/<hex>.tar   the whole decompressed copy of a compressed blob
    spans/sha256/<hex>.spans the decompressed data re-framed into seekable
                             spans (see :mod:`layerfs.seekpoints`), for a
                             zstd layer whose whole copy did not fit the budget
    spans/sha256/<hex>.gzidx checkpoints into a gzip blob (zran-style, made
                             by rapidgzip), for a gzip layer likewise
    spans/sha256/<hex>.frames the frame table of a multi-frame zstd blob
    ranges/sha256/<hex>.ranges compressed chunks of a registry blob fetched
                             by ranged reads, a sparse file (see
                             :mod:`layerfs.rangestore`: each chunk is
                             checked against the index when read)
    index/sha256/<hex>.toc   the table of contents of an eStargz or
                             zstd:chunked blob, as fetched and verified
                             (see :mod:`layerfs.tocopen`)
    memo/<key>               "stat memo": the identity of a source file ->
                             (digest, diff_id)
    pins/<hex>.lock          a pin: held with a shared flock by every process
                             that has the layer open
    holds/<hex>/<key>        a hold: the path of a record file (a container's)
                             whose existence keeps the blob's data pinned
    registry/                blobs fetched from registries (layerfs.remote)

Rules:

* **Nothing half-written is trusted.**  Every file is written under a
  ``.tmp-`` name in its final directory and renamed into place when whole;
  the writer holds an exclusive flock on the temp file, so a temp file
  nobody holds belongs to a dead process and is removed by the next scan.
  A copy is used only if its size is the one its index records; spans
  carry zstd checksums and a table checked on load.  The one file not
  renamed into place, a blob's fetched ranges, is checked chunk by chunk
  against the index's checksums on every load.
* **The budget bounds decompressed data.**  Before a copy, spans or
  fetched ranges grow,
  :meth:`IndexCache.reserve` (under ``lock``) counts what is on disk
  (temp files of other writers included) and evicts unpinned copies,
  spans and fetched ranges, least recently used first, until the new bytes fit; if they
  cannot, the caller falls back to a smaller form (spans instead of a
  copy), keeps nothing (fetched ranges) or fails.  Indexes, TOCs, views
  and memos are small and never evicted;
  registry blobs are counted and listed but only ``prune`` removes them.
* **A pin protects what is in use.**  An open layer holds a shared flock on
  ``pins/<hex>.lock``; eviction and ``prune`` take the exclusive lock
  without waiting, and skip the entry when they cannot.  A killed
  process's locks go with it, so a pin never outlives its holder.
  ``prune --all --force`` removes pinned data too; a process that has the
  file open keeps reading it (the kernel keeps an unlinked file for its
  open descriptors), so a running mount does not break.
* **A hold outlives the process.**  A container holds its image's layers
  from its creation to its removal (``holds/<hex>/``: a file naming the
  container's record); a hold whose record is gone is stale and removed
  when next looked at, so a container deleted by hand holds nothing.

The default budget is a tenth of the size of the filesystem that holds the
cache (at least 1 GiB); ``--cache-size`` / ``$LAYERFS_CACHE_SIZE`` (``500M``,
``20G``) changes it and records the new value in ``cache.json``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import marshal
import os
import re
import tempfile
import time
from typing import Iterator, Optional, Union

import attrs

from .entry import Entry

CACHE_ENV = "LAYERFS_CACHE_DIR"
SIZE_ENV = "LAYERFS_CACHE_SIZE"
INDEX_FORMAT = "layerfs-index"
INDEX_VERSION = 3
VIEW_FORMAT = "layerfs-view"
VIEW_VERSION = 1
MEMO_VERSION = 2
MIN_DEFAULT_BUDGET = 1 << 30
DEFAULT_SHARE = 10          # percent of the cache's filesystem
EVICTABLE = ("copy", "spans", "checkpoints", "frames", "ranges")
TEMP_PREFIX = ".tmp-"
TEMP_GRACE = 60             # seconds before an unlocked temp file is a leftover
_COPY_BUFFER = 1 << 20
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """Bytes from ``123``, ``500M``, ``20G``, ``1.5T`` (binary units; a
    trailing ``B`` or ``iB`` is accepted); ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.I)
    if not match:
        raise ValueError(f"{text!r} is not a size (examples: 500M, 20G)")
    value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise ValueError(f"{text!r}: a size must be positive")
    return value


def parse_duration(text: str) -> float:
    """Seconds from ``90s``, ``30m``, ``12h``, ``7d``, ``2w``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", str(text))
    if not match:
        raise ValueError(f"{text!r} is not a duration (examples: 12h, 7d)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def format_size(n: int) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n}{unit or 'B'}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


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


@attrs.frozen
class CacheEntry:
    """One thing in the cache, as ``layerfs cache ls`` shows it."""
    digest: str          # "sha256:<hex>" (a ChainID for a view)
    kind: str            # copy, spans, index, view, blob (registry)
    path: str
    size: int            # bytes on disk
    last_use: float      # seconds since the epoch
    pinned: bool

    @property
    def evictable(self) -> bool:
        return self.kind in EVICTABLE


class Pin:
    """A shared flock on a blob's pin file, held while a layer is open."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        while True:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_SH)
            # A prune may have removed the file between the open and the
            # lock: a lock on a file no longer at *path* pins nothing.
            try:
                if os.stat(path).st_ino == os.fstat(self._fd).st_ino:
                    return
            except FileNotFoundError:
                pass
            os.close(self._fd)

    def release(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)      # closing drops the lock


class IndexCache:
    """The on-disk cache (layout and rules in the module docstring).
    *root* defaults to :func:`default_cache_root`; *size*, if given (bytes
    or a string like ``"20G"``), becomes the directory's recorded budget."""

    def __init__(self, root: Union[str, os.PathLike, None] = None,
                 size: Union[int, str, None] = None):
        self.root = os.fspath(root) if root is not None else default_cache_root()
        self._size: Optional[int] = None
        if size is None and os.environ.get(SIZE_ENV, "").strip():
            size = os.environ[SIZE_ENV]
        if size is not None:
            self.set_budget(parse_size(size) if isinstance(size, str) else int(size))

    # -- paths ------------------------------------------------------------
    def index_path(self, hex_digest: str) -> str:
        return os.path.join(self.root, "index", "sha256", hex_digest + ".idx")

    def view_path(self, chain_hex: str) -> str:
        return os.path.join(self.root, "views", "sha256", chain_hex + ".view")

    def blob_path(self, hex_digest: str) -> str:
        """The whole decompressed copy of a blob."""
        return os.path.join(self.root, "blobs", "sha256", hex_digest + ".tar")

    def spans_path(self, hex_digest: str) -> str:
        return os.path.join(self.root, "spans", "sha256", hex_digest + ".spans")

    def checkpoints_path(self, hex_digest: str) -> str:
        return os.path.join(self.root, "spans", "sha256", hex_digest + ".gzidx")

    def frames_path(self, hex_digest: str) -> str:
        return os.path.join(self.root, "spans", "sha256", hex_digest + ".frames")

    def ranges_path(self, hex_digest: str) -> str:
        """Fetched chunks of a registry blob (see :mod:`layerfs.rangestore`)."""
        return os.path.join(self.root, "ranges", "sha256", hex_digest + ".ranges")

    def toc_path(self, hex_digest: str) -> str:
        """What an eStargz or zstd:chunked blob's TOC was read from."""
        return os.path.join(self.root, "index", "sha256", hex_digest + ".toc")

    def pin_path(self, hex_digest: str) -> str:
        return os.path.join(self.root, "pins", hex_digest + ".lock")

    def holds_path(self, hex_digest: str) -> str:
        return os.path.join(self.root, "holds", hex_digest)

    def memo_path(self, identity: tuple) -> str:
        key = hashlib.sha256(repr(identity).encode("utf-8", "surrogateescape"))
        return os.path.join(self.root, "memo", key.hexdigest()[:40])

    # -- budget -----------------------------------------------------------
    def set_budget(self, size: int) -> None:
        """Records *size* as the directory's budget (this object uses it
        even where the directory cannot be written)."""
        self._size = size
        if self._recorded() == size:
            return
        try:
            os.makedirs(self.root, exist_ok=True)
            write_atomic(os.path.join(self.root, "cache.json"),
                         json.dumps({"size": size}).encode())
        except OSError:
            pass

    @property
    def budget(self) -> int:
        """Bytes the cache may hold: recorded in ``cache.json``, else the
        default (a tenth of the filesystem, at least 1 GiB)."""
        if self._size is not None:
            return self._size
        recorded = self._recorded()
        return recorded if recorded is not None else default_budget(self.root)

    def _recorded(self) -> Optional[int]:
        try:
            with open(os.path.join(self.root, "cache.json"), "rb") as file:
                size = json.load(file)["size"]
            if isinstance(size, int) and size > 0:
                return size
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    def reserve(self, nbytes: int, keep: str = "", ahead: int = 0) -> int:
        """Room for *nbytes* more of decompressed data, once what is on
        disk plus *nbytes* fits the budget, evicting unpinned copies and
        spans (least recently used first, never those of *keep*, a digest
        hex) as needed.  Returns the room found: *nbytes* plus *ahead*
        where the budget can hold both (a writer asks ahead, so as to ask,
        and list the cache, less often), else *nbytes*; 0 if even *nbytes*
        cannot fit.  Room ahead is evicted for only where evicting can make
        it (not every unpinned file, for a step the budget cannot hold)."""
        budget = self.budget
        with self._locked():
            # Pins are asked of a victim only when it is to go (by
            # _remove_unpinned, which skips a pinned one): most calls fit
            # and look at no pin at all.
            entries = list(self.scan(pins=False))
            used = sum(e.size for e in entries)
            if used + nbytes + ahead <= budget:
                return nbytes + ahead
            victims = sorted((e for e in entries if e.evictable
                              and not e.digest.endswith(keep or "\0")),
                             key=lambda e: e.last_use)
            if used - sum(v.size for v in victims) + nbytes + ahead > budget:
                ahead = 0
            for victim in victims:
                if used + nbytes + ahead <= budget:
                    break
                if self._remove_unpinned(victim):
                    used -= victim.size
            if used + nbytes + ahead <= budget:
                return nbytes + ahead
            return nbytes if used + nbytes <= budget else 0

    def usage(self) -> int:
        return sum(e.size for e in self.scan(pins=False))

    # -- pins -------------------------------------------------------------
    def pin(self, hex_digest: str) -> Pin:
        return Pin(self.pin_path(hex_digest))

    def hold(self, hex_digest: str, record: str) -> None:
        """Pins the blob while the file *record* exists (see the module's
        rules); taken again at will, it stays one hold."""
        record = os.path.abspath(record)
        key = hashlib.sha256(record.encode("utf-8", "surrogateescape")).hexdigest()[:40]
        path = os.path.join(self.holds_path(hex_digest), key)
        with self._locked():
            if not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                write_atomic(path, record.encode("utf-8", "surrogateescape"))

    def _held(self, hex_digest: str) -> bool:
        """Whether a live hold pins the blob (stale holds are removed)."""
        held = False
        for item in _scandir(self.holds_path(hex_digest)):
            if item.name.startswith(TEMP_PREFIX):
                continue
            try:
                with open(item.path, "rb") as stream:
                    record = os.fsdecode(stream.read())
            except FileNotFoundError:
                continue
            if os.path.exists(record):
                held = True
            else:
                _remove(item.path)
        return held

    def is_pinned(self, hex_digest: str) -> bool:
        if self._held(hex_digest):
            return True
        try:
            fd = os.open(self.pin_path(hex_digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def touch(self, path: str) -> None:
        """Marks a copy or spans file as used now (its mtime is its last use)."""
        try:
            os.utime(path)
        except OSError:
            pass

    # -- listing and removal -----------------------------------------------
    def scan(self, pins: bool = True) -> Iterator[CacheEntry]:
        """Everything in the cache that takes space; dead temp files (whose
        writer is gone) are removed on the way.  Without *pins*, no entry's
        pin is looked at (``pinned`` is False, a live temp file's True)."""
        kinds = (("blobs", {".tar": "copy"}),
                 ("spans", {".spans": "spans", ".gzidx": "checkpoints",
                            ".frames": "frames"}),
                 ("ranges", {".ranges": "ranges"}),
                 ("index", {".idx": "index", ".toc": "toc"}), ("views", {".view": "view"}))
        for folder, suffixes in kinds:
            directory = os.path.join(self.root, folder, "sha256")
            for item in _scandir(directory):
                if item.name.startswith(TEMP_PREFIX):
                    size = _temp_in_use(item)
                    if size:
                        yield CacheEntry("", "temp", item.path, size, time.time(), True)
                    continue
                hex_, dot, suffix = item.name.rpartition(".")
                kind = suffixes.get(dot + suffix)
                if kind is None:
                    continue
                try:
                    st = item.stat()
                except FileNotFoundError:
                    continue
                pinned = pins and kind != "view" and self.is_pinned(hex_)
                yield CacheEntry("sha256:" + hex_, kind, item.path, st.st_blocks * 512,
                                 st.st_mtime, pinned)
        directory = os.path.join(self.root, "registry", "blobs", "sha256")
        for item in _scandir(directory):
            if item.name.startswith((".", "tmp")):
                continue
            try:
                st = item.stat()
            except FileNotFoundError:
                continue
            yield CacheEntry("sha256:" + item.name, "blob", item.path, st.st_blocks * 512,
                             st.st_mtime, pins and self.is_pinned(item.name))

    def remove(self, entry: CacheEntry, force: bool = False) -> bool:
        """Removes *entry* unless it is pinned (and not *force*); True if
        it was removed."""
        with self._locked():
            if force:
                _remove(entry.path)
                return True
            return self._remove_unpinned(entry)

    def _remove_unpinned(self, entry: CacheEntry) -> bool:
        hex_ = entry.digest.partition(":")[2]
        if entry.kind != "view" and self._held(hex_):
            return False
        path = self.pin_path(hex_)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            _remove(entry.path)     # under the exclusive pin lock: nobody opens it now
        finally:
            os.close(fd)
        return True

    def remove_stale_pins(self) -> int:
        """Removes pin files nobody holds (one is left per blob ever
        opened); returns how many."""
        removed = 0
        with self._locked():
            for item in _scandir(os.path.join(self.root, "pins")):
                fd = os.open(item.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                else:
                    _remove(item.path)    # a pinner that opens it now holds the old inode
                    removed += 1
                finally:
                    os.close(fd)
            for item in _scandir(os.path.join(self.root, "holds")):
                if not self._held(item.name):
                    try:
                        os.rmdir(item.path)
                    except OSError:
                        pass          # a hold taken meanwhile
        return removed

    def _locked(self):
        return _FileLock(os.path.join(self.root, "lock"))

    # -- memo -------------------------------------------------------------
    def lookup_memo(self, identity: tuple) -> Optional[tuple]:
        """(digest hex, diff_id hex) remembered for an unchanged source."""
        value = load_marshal(self.memo_path(identity))
        if (isinstance(value, dict) and value.get("version") == MEMO_VERSION
                and value.get("identity") == identity):
            return value.get("digest"), value.get("diff_id")
        return None

    def store_memo(self, identity: tuple, digest: str, diff_id: str) -> None:
        record = {"version": MEMO_VERSION, "identity": identity,
                  "digest": digest, "diff_id": diff_id}
        write_atomic(self.memo_path(identity), marshal.dumps(record))

    def refresh_memo(self, path: str, digest: str, diff_id: str) -> None:
        """Remember *path* (a whole blob) again after layerfs itself changed
        its inode's ctime (hardlinking it into a layout), so that the next
        open trusts it without hashing it again.  Only for a file whose
        digest is known to be *digest*."""
        st = os.stat(path)
        self.store_memo(file_identity(path, 0, st.st_size, st),
                        digest.partition(":")[2], diff_id.partition(":")[2])

    # -- indexes and views -------------------------------------------------
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
        return load_headed(self.index_path(hex_digest), INDEX_FORMAT, INDEX_VERSION,
                           ("digest", hex_digest), bytes)

    def store_index(self, header: dict, entries: list) -> None:
        payload = marshal.dumps([tuple(e) for e in entries])
        write_atomic(self.index_path(header["digest"]), marshal.dumps((header, payload)))

    def load_view(self, chain_hex: str) -> Optional[dict]:
        """The tree record stored for the stack of layers whose ChainID is
        *chain_hex*, or None."""
        loaded = load_headed(self.view_path(chain_hex), VIEW_FORMAT, VIEW_VERSION,
                             ("chain_id", chain_hex), dict)
        return loaded[1] if loaded is not None else None

    def store_view(self, chain_hex: str, record: dict) -> None:
        header = {"format": VIEW_FORMAT, "version": VIEW_VERSION, "chain_id": chain_hex}
        write_atomic(self.view_path(chain_hex), marshal.dumps((header, record)))

    def discard_view(self, chain_hex: str) -> None:
        _remove(self.view_path(chain_hex))


def default_budget(root: str) -> int:
    """A tenth of the filesystem that holds *root* (or its nearest existing
    parent), at least 1 GiB."""
    path = os.path.abspath(root)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        st = os.statvfs(path)
    except OSError:
        return MIN_DEFAULT_BUDGET
    return max(MIN_DEFAULT_BUDGET, st.f_blocks * st.f_frsize * DEFAULT_SHARE // 100)


def file_identity(path: str, offset: int, size: int, st: os.stat_result) -> tuple:
    """What the stat memo is keyed on: everything an in-place edit of the
    file changes.  Editing keeps the inode and may put the size and mtime
    back (``touch -r``), but never the ctime."""
    return (os.path.realpath(path), offset, size, st.st_dev, st.st_ino, st.st_size,
            st.st_mtime_ns, st.st_ctime_ns)


class _FileLock:
    """An exclusive flock on *path* for a ``with`` block."""

    def __init__(self, path: str):
        self._path = path
        self._fd = -1

    def __enter__(self):
        os.makedirs(os.path.dirname(self._path), exist_ok=True)
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        os.close(self._fd)


def temp_file(final_path: str):
    """An open binary file in *final_path*'s directory, and its name.  The
    file is flock'ed by this process until closed (so a scan can tell it
    from the leftover of a crash)."""
    directory = os.path.dirname(final_path)
    os.makedirs(directory, exist_ok=True)
    fd, temp_path = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return os.fdopen(fd, "w+b", buffering=_COPY_BUFFER), temp_path
    except BaseException:
        os.close(fd)
        _remove(temp_path)
        raise


def write_atomic(path: str, payload: bytes) -> None:
    file, temp_path = temp_file(path)
    try:
        with file:
            file.write(payload)
        os.replace(temp_path, path)
    except BaseException:
        _remove(temp_path)
        raise


def load_marshal(path: str):
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


def load_headed(path: str, format_name: str, version: int, key: tuple,
                body_type: type) -> Optional[tuple]:
    """(header, body) of a cache file holding the marshal of that pair, if
    the header names *format_name*, *version* and *key* (a (field, value)
    pair) and the body is a *body_type*; else None, and the file is removed."""
    value = load_marshal(path)
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


def _scandir(directory: str):
    try:
        with os.scandir(directory) as items:
            return list(items)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _temp_in_use(item) -> int:
    """Size of a temp file whose writer still holds it; 0 (and the file
    removed) if its writer is gone."""
    try:
        fd = os.open(item.path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return max(os.fstat(fd).st_blocks * 512, 1)
        st = os.fstat(fd)
        if time.time() - st.st_mtime < TEMP_GRACE:
            return max(st.st_blocks * 512, 1)   # maybe just made, not yet locked
        _remove(item.path)          # nobody writes it: a crash's leftover
        return 0
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        if error.errno != errno.ENOENT:
            raise
