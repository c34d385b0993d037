"""The filesystem users import: an image's layers as one ``os``-shaped tree.

:func:`open` loads an image (or a list of layer files), applies its layers to
a :class:`~layerfs.union.Tree` once, and returns a :class:`FileSystem` whose
methods answer like ``os`` functions on the extracted image would.  Absent
paths become ``FileNotFoundError`` here and nowhere earlier.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fnmatch
import glob as _glob
import os
import stat as _stat
from typing import BinaryIO, Iterator, Optional, Sequence, Union

from .errors import ImageError, path_error
from .image import Image, open_image
from .layer import IndexCache
from .lowerview import LowerSnapshot, LowerView, shared_view
from .paths import join, order_key, split
from .reference import as_reference
from .tarwrite import LayerTarWriter, write_tree
from . import writable
from .union import (S_IFLNK, S_IFMT, UPPER_SOURCE, LayerChanges, Node, Tree,
                    collector_paused, describe_layer)
from .upper import Upper
from .upperformat import Binding

PathLike = Union[str, "os.PathLike[str]"]

# How many slow-path resolutions (symlinks followed, missing paths) are
# remembered per direction; the memory is dropped whole when full.
RESOLVED_CACHE_SIZE = 1 << 16
Source = Union[PathLike, Sequence[PathLike]]


def open(source: Source, *, upper: Optional[PathLike] = None, tag: Optional[str] = None,
         platform: Optional[str] = None, cache=None, progress=None,
         registry=None, readonly: bool = False, share_view: bool = True,
         volumes=(), store=None) -> "FileSystem":
    """Open an image as a filesystem.

    *source* names the image as :mod:`layerfs.reference` says: a string
    with a transport prefix (``"oci:DIR:TAG"``, ``"oci-archive:FILE"``,
    ``"docker-archive:FILE"``, ``"docker://HOST/REPO:TAG"``) or a bare path
    to an OCI image layout (directory or tar), a ``docker save`` archive or
    a single layer file; a path object is always a path; a list of layer
    files (base first) is a stack.  *tag* (a tag or a manifest digest, not
    together with a TAG in the reference) and *platform*
    (``"linux/amd64"``) choose among several manifests; the default
    platform is the host's.  *cache* is a cache directory's path or an
    :class:`~layerfs.layer.IndexCache` (default: the user's cache
    directory), or False for none.
    *progress* is called as ``progress(done_bytes, total_bytes)`` while layers
    are indexed.  *upper* is a directory for the writable layer (created if
    missing); without it the filesystem is read-only and every write raises
    ``OSError(EROFS)``.  *registry* (a :class:`layerfs.registry.Options`)
    says how ``docker://`` images are fetched: credentials file, TLS,
    offline.

    One process at a time may write an upper: another writer's raises
    :class:`~layerfs.errors.UpperError` (``EBUSY``), as does an upper
    recorded for another image.  With *readonly*, an existing *upper* is
    read as it is (nothing created, changed or locked: it may be mounted
    meanwhile) and every write raises ``OSError(EROFS)``.

    Every filesystem of one image in a process shares one immutable view of
    it; a writable one copies that view a directory at a time as it uses
    it, so opening it does not cost the image's size.  With
    ``share_view=False``, a writable filesystem copies the whole view at
    open and shares nothing: less memory for a process that serves one
    container and walks all of it (a mount daemon).
    """
    source = as_reference(source)
    if isinstance(cache, (str, bytes, os.PathLike)):
        cache = IndexCache(os.fsdecode(cache))
    with collector_paused():
        image = open_image(source, tag=tag, platform=platform, cache=cache,
                           progress=progress, registry=registry)
        try:
            if volumes:
                from .volumefs import VolumeFileSystem, as_volumes
                volumes = as_volumes(volumes, store)
                fs = VolumeFileSystem(image, shared=upper is None, share_view=share_view)
            else:
                fs = FileSystem(image, shared=upper is None, share_view=share_view)
        except BaseException:
            image.close()
            raise
    try:
        if upper is not None:
            fs.upper = open_upper(fs, os.fspath(upper), writable=not readonly)
        if volumes:
            fs.bind_volumes(volumes)
        return fs
    except BaseException:
        fs.close()
        raise


def open_upper(fs: "FileSystem", directory: str, writable: bool) -> Upper:
    """The upper store over *fs*'s view, given only what it needs: the tree,
    the lower view (what the image shows, path -> mode), a reader of lower
    files' bytes, and the image it belongs to."""
    lower = fs.lower
    layers = fs.layers

    def read_lower(node: Node, offset: int, length: int) -> bytes:
        return layers[node.source].read(node.data, node.size, offset, length)

    binding = Binding(fs.image.chain_id(), fs.image.manifest_digest)
    return Upper(fs.tree, lower, read_lower, directory, binding, writable=writable)


def lower_view(image: Image) -> LowerView:
    """The process's shared, immutable merged view of *image*'s layers
    (:mod:`layerfs.lowerview`), built by :func:`build_tree` if no open
    filesystem of the same ChainID holds one."""
    return shared_view(view_key(image), lambda: build_tree(image))


def view_key(image: Image) -> Optional[str]:
    """What two images must have in common to share a view: the ChainID
    (the same uncompressed layers), and the blob digest of each layer read
    through a table of contents (with no index cache), whose entries point
    at the blob's own chunks rather than at offsets of the layer's tar."""
    chain_id = image.chain_id()
    if not chain_id:
        return None
    blobs = [layer.digest or "?" for layer in image.layers if layer.cache is None]
    return " ".join([chain_id, *blobs])


def build_tree(image: Image) -> Tree:
    """Apply every layer of *image*, base first.

    The result depends only on the layers' contents, so it is kept in the
    layers' index cache under the stack's ChainID: opening the same stack
    again restores it from one record, without reading any layer's entries.
    """
    cache = image.layers[0].cache if image.layers else None
    if any(layer.cache is None for layer in image.layers):
        cache = None    # a TOC layer's entries point at chunks, not tar offsets
    chain_hex = (image.chain_id() or "").partition(":")[2]
    if cache is not None:
        record = cache.load_view(chain_hex)
        if record is not None:
            try:
                return Tree.from_record(record)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                cache.discard_view(chain_hex)
    tree = Tree()
    for index, layer in enumerate(image.layers):
        try:
            tree.apply_layer(layer.entries, index, layer.label)
        except ImageError as error:
            raise error.located(layer.path) from None
        layer.release_entries()     # the tree holds all reads need
    if cache is not None:
        with contextlib.suppress(OSError):    # a full or read-only cache: rebuilt next time
            cache.store_view(chain_hex, tree.to_record())
    return tree


class FileSystem:
    """An image as one filesystem; see :func:`open`."""

    def __init__(self, image: Image, tree: Optional[Tree] = None, *, shared: bool = False,
                 share_view: bool = True):
        """*tree*: the view to serve (default: the image's).  With *shared*
        (never to be given an upper), the tree is the process's shared
        lower view itself; otherwise a copy a writer may change: lazy,
        over the shared view, or with *share_view* false a whole private
        copy."""
        self.image = image
        self.layers = image.layers
        # What the image's layers show (the upper consults it): shared with
        # every filesystem of the same image in this process, or a snapshot.
        if tree is None and not shared and not share_view:
            tree = build_tree(image)
            self.lower = LowerSnapshot(tree)
        else:
            self.lower = lower_view(image)
        if tree is None:
            tree = self.lower.tree if shared else self.lower.private_tree()
        self.tree = tree
        self._nodes = self.tree.nodes
        self._upper: Optional[Upper] = None
        # Read-only, a path always stats the same: its answers are kept by
        # path, one dict lookup away (see upper's setter for writable ones).
        self._stats: dict = {}
        self._lstats: dict = {}
        self._image_statvfs: Optional[os.statvfs_result] = None
        self._followed: dict = {}
        self._not_followed: dict = {}

    # -- lifecycle ------------------------------------------------------

    @property
    def upper(self) -> Optional[Upper]:
        """The writable layer, or None (read-only)."""
        return self._upper

    @upper.setter
    def upper(self, upper: Optional[Upper]) -> None:
        # A writable view changes under its paths: stats are then answered
        # from the nodes, whose own stat_cache every change resets.
        if upper is not None and self.tree is self.lower.tree:
            raise ValueError("this filesystem serves the shared view of its image, "
                             "which no upper may change: open it with upper=")
        self._upper = upper
        self._stats.clear()
        self._lstats.clear()

    @property
    def readonly(self) -> bool:
        return self._upper is None or not self._upper.writable

    def close(self) -> None:
        """Release the image (and the upper).  Any later use raises
        ``ValueError``, as a closed file does; closing again does nothing."""
        if self.tree is _CLOSED:
            return
        if self.upper is not None:
            self.upper.close()
            self.upper = None
        self.image.close()
        self.lower = None       # the shared view lives while a filesystem uses it
        # Every lookup starts in one of these: swapping them costs the hot
        # path nothing and makes each use of a closed filesystem one error.
        self.tree = self._nodes = self._stats = self._lstats = _CLOSED

    @property
    def closed(self) -> bool:
        return self.tree is _CLOSED

    def __enter__(self) -> "FileSystem":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- lookup ---------------------------------------------------------

    def node(self, path: PathLike, follow_symlinks: bool = True) -> Node:
        """The inode at *path*; raises ``FileNotFoundError`` and friends."""
        node = self._nodes.get(path)
        if node is not None and not (follow_symlinks and node.mode & S_IFMT == S_IFLNK):
            return node
        return self._resolve(os.fsdecode(path), follow_symlinks)

    def _resolve(self, path: str, follow: bool) -> Node:
        """The slow path (symlinks, missing or unclean paths), remembered.

        The answer, a node or an errno, is kept with the tree version it was
        computed from (read before resolving, so a concurrent change makes
        it stale) and used only while the tree has that version.
        """
        answers = self._followed if follow else self._not_followed
        version = self.tree.version
        remembered = answers.get(path)
        if remembered is not None and remembered[0] == version:
            answer = remembered[1]
        else:
            try:
                node = self.tree.resolve(path, follow)[1]
                answer = node if node is not None else errno.ENOENT
            except OSError as error:
                answer = error.errno
            if len(answers) >= RESOLVED_CACHE_SIZE:
                answers.clear()
            answers[path] = (version, answer)
        if answer.__class__ is int:
            raise path_error(answer, path)
        return answer

    def realpath(self, path: PathLike) -> str:
        """The canonical path of *path* with every symlink resolved (bytes
        for a bytes *path*, as ``os.path.realpath``)."""
        real, node = self.tree.resolve(os.fsdecode(path), True)
        if node is None:
            raise path_error(errno.ENOENT, os.fspath(path))
        return os.fsencode(real) if isinstance(path, bytes) else real

    def stat(self, path: PathLike, *, follow_symlinks: bool = True) -> os.stat_result:
        if not follow_symlinks:
            return self.lstat(path)
        result = self._stats.get(path)
        if result is not None:
            return result
        node = self._nodes.get(path)
        if node is None or node.mode & S_IFMT == S_IFLNK:
            node = self._resolve(os.fsdecode(path), True)
        result = node.stat_cache or node.stat()
        if self._upper is None:
            self._stats[os.fsdecode(path)] = result
        return result

    def lstat(self, path: PathLike) -> os.stat_result:
        result = self._lstats.get(path)
        if result is not None:
            return result
        node = self._nodes.get(path)
        if node is None:
            node = self._resolve(os.fsdecode(path), False)
        result = node.stat_cache or node.stat()
        if self._upper is None:
            self._lstats[os.fsdecode(path)] = result
        return result

    def exists(self, path: PathLike) -> bool:
        try:
            self.node(path)
        except OSError:
            return False
        return True

    def lexists(self, path: PathLike) -> bool:
        try:
            self.node(path, False)
        except OSError:
            return False
        return True

    def is_dir(self, path: PathLike) -> bool:
        try:
            return self.node(path).children is not None
        except OSError:
            return False

    def is_file(self, path: PathLike) -> bool:
        try:
            return _stat.S_ISREG(self.node(path).mode)
        except OSError:
            return False

    def is_symlink(self, path: PathLike) -> bool:
        try:
            return self.node(path, False).is_symlink
        except OSError:
            return False

    def readlink(self, path: PathLike) -> str:
        node = self.node(path, False)
        if not node.is_symlink:
            raise path_error(errno.EINVAL, os.fspath(path))
        return os.fsencode(node.target) if isinstance(path, bytes) else node.target

    def listdir(self, path: PathLike = "/") -> list[str]:
        """Names in *path* (bytes for a bytes *path*, as ``os.listdir``)."""
        node = self.node(path)
        if node.children is None:
            raise path_error(errno.ENOTDIR, os.fspath(path))
        if isinstance(path, bytes):
            return [os.fsencode(name) for name in node.children]
        return list(node.children)

    def scandir(self, path: PathLike = "/") -> Iterator["DirEntry"]:
        path = os.fsdecode(path)
        real = self.realpath(path)
        node = self._nodes[real]
        if node.children is None:
            raise path_error(errno.ENOTDIR, path)
        prefix = path.rstrip("/")
        for name, child in list(node.children.items()):
            yield DirEntry(self, name, f"{prefix}/{name}", child)

    def walk(self, top: PathLike = "/", topdown: bool = True, onerror=None,
             followlinks: bool = False) -> Iterator[tuple[str, list[str], list[str]]]:
        """Like ``os.walk``, over the image (names as ``str``, whatever *top* is)."""
        top = os.fsdecode(top)
        try:
            entries = list(self.scandir(top))
        except OSError as error:
            if onerror is not None:
                onerror(error)
            return
        dirs, files = [], []
        for entry in entries:
            (dirs if entry.is_dir(follow_symlinks=followlinks) else files).append(entry.name)
        if topdown:
            yield top, dirs, files
        prefix = top.rstrip("/")
        for name in dirs:
            yield from self.walk(f"{prefix}/{name}", topdown, onerror, followlinks)
        if not topdown:
            yield top, dirs, files

    # -- xattrs ---------------------------------------------------------

    def listxattr(self, path: PathLike, *, follow_symlinks: bool = True) -> list[str]:
        return list(self.node(path, follow_symlinks).xattrs or ())

    def getxattr(self, path: PathLike, attribute: str, *,
                 follow_symlinks: bool = True) -> bytes:
        xattrs = self.node(path, follow_symlinks).xattrs or {}
        try:
            return xattrs[attribute]
        except KeyError:
            raise path_error(errno.ENODATA, os.fspath(path)) from None

    # -- contents -------------------------------------------------------

    def open(self, path: PathLike, mode: str = "rb", buffering: int = -1,
             encoding: Optional[str] = None, errors: Optional[str] = None,
             newline: Optional[str] = None):
        """Open a file of the view, like the builtin ``open`` (every mode).

        Without an upper layer, a mode that writes raises ``OSError(EROFS)``.
        """
        return writable.open_file(self, path, mode, buffering, encoding, errors, newline)

    def open_handle(self, path: PathLike, flags: int, mode: int = 0o666) -> writable.Handle:
        """``os.open`` for the view: a :class:`~layerfs.writable.Handle`."""
        return writable.open_handle(self, path, flags, mode)

    def iglob(self, pattern: PathLike, *, recursive: bool = False) -> Iterator[str]:
        """Like :func:`glob.iglob` over the image, for an absolute *pattern*:
        ``*``, ``?``, ``[...]`` within a name, names beginning with ``.``
        only where the pattern's name does, ``**`` for any depth of
        directories with *recursive* (a last ``**`` also matches the files
        beneath), a trailing ``/`` for directories only (given with the
        ``/``).  Unlike :mod:`glob`, ``**`` does not descend through symlinks
        (no loops).  Matches come in sorted order."""
        pattern = os.fsdecode(pattern)
        if not pattern.startswith("/"):
            raise ValueError(f"a pattern inside the image starts with /: {pattern!r}")
        parts = [part for part in pattern.split("/") if part]
        if pattern.endswith("/") and parts:
            for match in self._glob("/", parts, recursive):
                if self.is_dir(match):
                    yield match.rstrip("/") + "/"
            return
        yield from self._glob("/", parts, recursive)

    def glob(self, pattern: PathLike, *, recursive: bool = False) -> list[str]:
        """:meth:`iglob` as a list."""
        return list(self.iglob(pattern, recursive=recursive))

    def _glob(self, path: str, parts: list, recursive: bool) -> Iterator[str]:
        if not parts:
            yield path
            return
        part, rest = parts[0], parts[1:]
        if recursive and part == "**":
            if not rest:          # a last ``**`` matches the files too
                yield from self._directories_below(path, with_files=True)
                return
            for directory in self._directories_below(path):
                yield from self._glob(directory, rest, recursive)
            return
        if not _glob.has_magic(part):
            child = join(path, part)
            if (self.is_dir(child) if rest else self.lexists(child)):
                yield from self._glob(child, rest, recursive)
            return
        try:
            names = self.listdir(path)
        except OSError:
            return
        for name in sorted(fnmatch.filter(names, part)):
            if name.startswith(".") and not part.startswith("."):
                continue
            child = join(path, name)
            if not rest or self.is_dir(child):
                yield from self._glob(child, rest, recursive)

    def _directories_below(self, path: str, with_files: bool = False) -> Iterator[str]:
        """*path* and every directory beneath it (symlinks not followed,
        names beginning with ``.`` skipped, as ``**`` does)."""
        yield path
        try:
            entries = sorted(self.scandir(path), key=lambda entry: entry.name)
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                yield from self._directories_below(entry.path, with_files)
            elif with_files:
                yield entry.path

    def in_volume(self, path: str) -> bool:
        """Is the canonical *path* at or below a volume's PATH?  Such paths
        are left out of :meth:`diff`, :meth:`commit`, :meth:`export` and
        :meth:`extract` (a plain filesystem has no volumes: never)."""
        return False

    def extract(self, path: PathLike, dest: PathLike) -> str:
        """Copy *path* (a file or a tree) out of the image to *dest* on the
        host, as ``cp -a`` would; see :mod:`layerfs.extract`."""
        from .extract import extract
        return extract(self, os.fsdecode(path), os.fsdecode(dest))

    def read_bytes(self, path: PathLike) -> bytes:
        node = self.node(path)
        check_readable(node, os.fsdecode(path))
        return self.read_node(node, 0, node.size)

    def read_text(self, path: PathLike, encoding: str = "utf-8",
                  errors: str = "strict") -> str:
        return self.read_bytes(path).decode(encoding, errors)

    def read_node(self, node: Node, offset: int, length: int) -> bytes:
        """Up to *length* bytes of a regular file's content from *offset*."""
        end = min(node.size, offset + length)
        if offset >= end:
            return b""
        source = node.source
        if source is None:
            return b""
        if source == UPPER_SOURCE:
            return self.upper.read(node, offset, end - offset)
        return self.layers[source].read(node.data, node.size, offset, end - offset)

    # -- writes (need an upper layer) --------------------------------------

    mkdir = writable.mkdir
    rmdir = writable.rmdir
    unlink = writable.unlink
    remove = writable.unlink
    rename = writable.rename
    replace = writable.rename
    symlink = writable.symlink
    link = writable.link
    mknod = writable.mknod
    chmod = writable.chmod
    chown = writable.chown
    utime = writable.utime
    truncate = writable.truncate
    setxattr = writable.setxattr
    removexattr = writable.removexattr
    diff = writable.diff

    def makedirs(self, path: PathLike, mode: int = 0o777, exist_ok: bool = False) -> None:
        path = os.fsdecode(path)
        parent = os.path.dirname(path.rstrip("/"))
        if parent and parent != path and not self.lexists(parent):
            self.makedirs(parent, mode, exist_ok=True)
        try:
            self.mkdir(path, mode)
        except FileExistsError:
            if not exist_ok or not self.is_dir(path):
                raise

    def write_bytes(self, path: PathLike, data: bytes) -> int:
        with self.open(path, "wb") as stream:
            return stream.write(data)

    def write_text(self, path: PathLike, data: str, encoding: str = "utf-8",
                   errors: str = "strict") -> int:
        """Write *data* as *path*'s whole content; returns the characters written."""
        self.write_bytes(path, data.encode(encoding, errors))
        return len(data)

    def commit(self, dest: PathLike, *, compression: Optional[str] = "gzip",
               tag: Optional[str] = None, message: Optional[str] = None, progress=None):
        """Write the upper layer as a new layer and image on top of this
        image, into the OCI layout *dest*: :func:`layerfs.commit.commit`."""
        from .commit import commit
        return commit(self, dest, compression=compression, tag=tag, message=message,
                      progress=progress)

    def statvfs(self) -> os.statvfs_result:
        """The upper directory's filesystem; a read-only view reports its
        own size and no free space."""
        if self.upper is not None:
            return self.upper.statvfs()
        if self._image_statvfs is None:      # a read-only view never changes
            used = sum(node.size for node in self._nodes.values()) // 4096 + 1
            self._image_statvfs = os.statvfs_result(
                (4096, 4096, used, 0, 0, len(self._nodes), 0, 0, os.ST_RDONLY, 255))
        return self._image_statvfs

    def sync(self) -> None:
        """Flush the upper layer's filesystem to disk."""
        if self.upper is not None:
            self.upper.sync()

    # -- whole-image operations -----------------------------------------

    def export(self, out: Union[PathLike, BinaryIO], compression: Optional[str] = None,
               progress=None) -> None:
        """Write the flattened view as one tar (no markers; hardlinks kept).

        *out* is a path (written atomically) or a binary file object.  A
        path that is one of the image's own files is refused
        (:class:`FileExistsError`), so an export never replaces its input.
        Entries come in :func:`layerfs.paths.order_key` order.  Nothing
        below a volume's PATH is written (a PATH the image or upper holds is
        written as itself, an empty mount point), as ``docker export`` does.
        """
        # A volume's content is no part of the view's own filesystem (as
        # ``docker export`` leaves it out): nothing below a volume's PATH,
        # neither the host's nor the image's or upper's it hides.
        in_volume = self.in_volume
        items = sorted(((path, node) for path, node in self.tree.nodes.items()
                        if path == "/" or not in_volume(split(path)[0])),
                       key=lambda item: order_key(item[0]))
        total = sum(node.size for _, node in items if node.children is None)
        if not isinstance(out, (str, os.PathLike)):
            self._export_to(out, items, compression, progress, total)
            return
        out = os.fspath(out)
        self._refuse_input_file(out)
        temporary = f"{out}.{os.getpid()}.tmp"
        try:
            with builtins.open(temporary, "wb") as stream:
                self._export_to(stream, items, compression, progress, total)
            os.replace(temporary, out)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise

    def _refuse_input_file(self, out: str) -> None:
        try:
            target = os.stat(out)
        except (FileNotFoundError, NotADirectoryError):
            return
        for layer in self.layers:
            path = getattr(layer.source, "path", None)
            try:
                same = path is not None and os.path.samestat(target, os.stat(path))
            except OSError:
                continue
            if same:
                raise FileExistsError(errno.EEXIST, f"{out} holds layer {layer.label} of "
                                      "the image: write the export elsewhere")

    def _export_to(self, stream, items, compression, progress, total) -> None:
        writer = LayerTarWriter(stream, compression)
        write_tree(writer, items, self.read_node, progress, total)
        writer.close()

    def layer_changes(self) -> list[LayerChanges]:
        """What each layer adds, changes and deletes, base first."""
        tree = Tree()
        changes = []
        for index, layer in enumerate(self.layers):
            entries = layer.entries
            changes.append(describe_layer(tree, entries))
            tree.apply_layer(entries, index, layer.label)
        return changes


def check_readable(node: Node, path: str) -> None:
    if node.children is not None:
        raise path_error(errno.EISDIR, path)
    if not _stat.S_ISREG(node.mode):
        # Device nodes and fifos of an image are not backed by anything.
        raise path_error(errno.ENXIO, path)


class _Closed:
    """Stands for the tree and the lookup tables of a closed filesystem."""

    def __getattr__(self, name):
        raise ValueError("I/O operation on a closed layerfs filesystem")

    def get(self, *args):
        raise ValueError("I/O operation on a closed layerfs filesystem")

    __getitem__ = __contains__ = __iter__ = __len__ = get


_CLOSED = _Closed()


class DirEntry:
    """What :meth:`FileSystem.scandir` yields, shaped like ``os.DirEntry``."""

    __slots__ = ("_fs", "name", "path", "_node")

    def __init__(self, fs: FileSystem, name: str, path: str, node: Node):
        self._fs = fs
        self.name = name
        self.path = path
        self._node = node

    def inode(self) -> int:
        return self._node.ino

    def _target(self, follow_symlinks: bool) -> Optional[Node]:
        if follow_symlinks and self._node.is_symlink:
            try:
                return self._fs.node(self.path)
            except OSError:
                return None
        return self._node

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        node = self._target(follow_symlinks)
        return node is not None and node.children is not None

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        node = self._target(follow_symlinks)
        return node is not None and _stat.S_ISREG(node.mode)

    def is_symlink(self) -> bool:
        return self._node.is_symlink

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        if follow_symlinks and self._node.is_symlink:
            return self._fs.stat(self.path)
        return self._node.stat()

    def __fspath__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"<DirEntry {self.name!r}>"
