"""The union core: a stack of layers as one tree.  No I/O, no tar, no FUSE.

Everything that decides what a path *is* lives here.  A :class:`Tree` starts
as an empty root directory; :meth:`Tree.apply_layer` applies one layer's
entries exactly as the OCI image spec's "applying changesets" says (see
``docs/semantics.md`` for every case and the test that covers it).  Layers are
applied once, base first, so the result is a *flattened* index: a dict from
canonical path to :class:`Node`.  Looking a path up is then one dict lookup
whatever the number of layers; nothing walks the layers at lookup time.

The writable upper layer (``layerfs.upper``) changes the same tree through
the mutation methods at the bottom of this module, so the view is always this
one dict.

Inodes: a :class:`Node` is an inode.  Hardlinked names map to the same Node
object, which counts its names in ``nlink``.  A directory's ``nlink`` is
2 + its subdirectories, as on ext4.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import stat as _stat
from itertools import starmap
from operator import attrgetter
from typing import Callable, Iterable, Iterator, Optional

import attrs

from . import whiteout
from .entry import DIRECTORY, HARDLINK, Entry
from .errors import InvalidLayerError, path_error
from .paths import NAME_MAX, encode_name, is_canonical, join, parents, split

S_IFDIR = _stat.S_IFDIR
S_IFLNK = _stat.S_IFLNK
S_IFREG = _stat.S_IFREG
S_IFMT = 0o170000

DEFAULT_DIR_MODE = 0o755
MAX_SYMLINK_HOPS = 40          # Linux's limit before ELOOP
ST_DEV = 0x1A7E5               # one made-up device number for the whole view
BLOCK_SIZE = 4096


# Node.origin: where an inode lives.  Lower inodes are immutable; the upper
# layer copies one up (changing its origin) before changing it.
ORIGIN_LOWER = 0      # in the image's layers only
ORIGIN_METACOPY = 1   # a lower file whose metadata the upper layer changed
ORIGIN_MERGED = 2     # in the upper layer, over a lower path that shows through
ORIGIN_NEW = 3        # in the upper layer, with nothing below showing through
UPPER_SOURCE = -1     # Node.source of a regular file stored in the upper layer


class Node:
    """One inode of the view.

    ``source`` and ``data`` say where a regular file's bytes are: the index
    of the layer that stored them and its ``DataRef``, or ``UPPER`` for a file
    in the writable layer.  The core never reads them.
    """

    __slots__ = ("ino", "mode", "uid", "gid", "size", "mtime_ns", "atime_ns",
                 "ctime_ns", "nlink", "rdev", "target", "xattrs", "source",
                 "data", "children", "stat_cache", "origin")

    def __init__(self, ino: int, mode: int, uid: int = 0, gid: int = 0,
                 mtime_ns: int = 0, size: int = 0):
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.size = size
        self.mtime_ns = self.atime_ns = self.ctime_ns = mtime_ns
        # A directory counts itself and "."; any other inode counts its names,
        # and has none until the tree gives it one.
        self.nlink = 2 if mode & S_IFMT == S_IFDIR else 0
        self.rdev = 0
        self.target = ""
        self.xattrs: Optional[dict] = None
        self.source: Optional[int] = None
        self.data = None
        self.children: Optional[dict] = {} if mode & S_IFMT == S_IFDIR else None
        self.stat_cache: Optional[os.stat_result] = None
        # Which layer owns this inode; see the ORIGIN_* constants.
        self.origin = ORIGIN_LOWER

    @property
    def is_dir(self) -> bool:
        return self.children is not None

    @property
    def is_symlink(self) -> bool:
        return self.mode & S_IFMT == S_IFLNK

    def stat(self) -> os.stat_result:
        """This inode's ``os.stat_result``, built once and kept until the
        node changes (every mutator sets ``stat_cache`` back to None).

        A writable mount changes nodes in one thread while others stat
        them, so a result built from fields that changed meanwhile must not
        be kept: it would outlive the mutator's reset and report the old
        size for good (the kernel then places the next O_APPEND write at the
        old end of file in its page cache).  Hence the second look at the
        fields after storing: a change that finished before it is seen
        there; one that finishes after it resets the cache itself.
        """
        result = self.stat_cache
        if result is None:
            fields = self._stat_fields()
            mode, ino, nlink, uid, gid, size, a, m, c, rdev = fields
            result = os.stat_result((
                mode, ino, ST_DEV, nlink, uid, gid, size,
                a // 1_000_000_000, m // 1_000_000_000, c // 1_000_000_000,
                a / 1e9, m / 1e9, c / 1e9, a, m, c,
                BLOCK_SIZE, (size + 511) // 512, rdev))
            self.stat_cache = result
            if self._stat_fields() != fields:
                self.stat_cache = None
        return result

    def _stat_fields(self) -> tuple:
        return (self.mode, self.ino, self.nlink, self.uid, self.gid, self.size,
                self.atime_ns, self.mtime_ns, self.ctime_ns, self.rdev)


class FrozenNode(Node):
    """A node of an image's shared view (:mod:`layerfs.lowerview`), which
    every filesystem of the image in a process sees and none may change:
    a container takes its own copy first (:meth:`Tree.own`).  Only the
    stat memo may be set (the fields it derives from never change).  A
    change that forgot to take the copy fails here, loudly, instead of
    showing in every other container of the image."""

    __slots__ = ()

    def __setattr__(self, name: str, value) -> None:
        if name != "stat_cache":
            raise AttributeError(f"inode {self.ino} belongs to the image's shared view; "
                                 f"a change must take its own copy first (Tree.own)")
        object.__setattr__(self, name, value)


def freeze(tree: "Tree") -> None:
    """Make every node of *tree* a :class:`FrozenNode` (the tree is to be
    shared, never changed again)."""
    for node in dict.values(tree.nodes):
        if node.__class__ is Node:          # a hardlinked node comes again
            node.__class__ = FrozenNode


def copy_node(node: Node) -> Node:
    """A changeable copy of *node* (a directory's copy shares its
    ``children`` dict: the caller gives it its own)."""
    copy = Node.__new__(Node)
    for field in _NODE_FIELDS:
        setattr(copy, field, getattr(node, field))
    if copy.xattrs:
        copy.xattrs = dict(copy.xattrs)
    copy.stat_cache = None
    return copy


_NODE_FIELDS = Node.__slots__


# The Node fields a tree record keeps (children are rebuilt; stat_cache is
# derived).  Bump RECORD_VERSION with any change here or to the union rules,
# so that cached views built by older rules are not used.
RECORD_FIELDS = ("ino", "mode", "uid", "gid", "size", "mtime_ns", "atime_ns",
                 "ctime_ns", "nlink", "rdev", "target", "xattrs", "source",
                 "data", "origin")
RECORD_VERSION = 1


@contextlib.contextmanager
def collector_paused():
    """Pause the cyclic garbage collector for a block that creates objects
    by the hundred thousand (a layer's entries, a tree's nodes).  Each of its
    collections would traverse every object made so far, which doubles or
    triples the time; these objects form no cycles it could free."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _restored_node(ino, mode, uid, gid, size, mtime_ns, atime_ns, ctime_ns,
                   nlink, rdev, target, xattrs, source, data, origin) -> Node:
    node = Node.__new__(Node)
    node.ino = ino
    node.mode = mode
    node.uid = uid
    node.gid = gid
    node.size = size
    node.mtime_ns = mtime_ns
    node.atime_ns = atime_ns
    node.ctime_ns = ctime_ns
    node.nlink = nlink
    node.rdev = rdev
    node.target = target
    node.xattrs = xattrs
    node.source = source
    node.data = data
    node.children = {} if mode & S_IFMT == S_IFDIR else None
    node.stat_cache = None
    node.origin = origin
    return node


@attrs.frozen
class LayerChanges:
    """What one layer does to the tree below it (paths, sorted)."""

    added: list
    changed: list
    deleted: list


def describe_layer(tree: "Tree", entries) -> LayerChanges:
    """Classify a layer's entries against *tree*, the view below it.

    Call before applying the layer.  Implied parents are not changes; a
    path listed twice counts once.
    """
    added, changed, deleted = set(), set(), set()
    nodes = tree.nodes
    for entry in entries:
        parent_path, name = split(entry.path)
        kind, target = whiteout.classify(name)
        if kind == whiteout.NOT_A_MARKER:
            (changed if entry.path in nodes else added).add(entry.path)
        elif kind == whiteout.WHITEOUT:
            victim = join(parent_path, target)
            if victim in nodes:
                deleted.update(p for p, _ in tree.walk_nodes(victim))
        elif kind == whiteout.OPAQUE and parent_path in nodes:
            deleted.update(p for p, _ in tree.walk_nodes(parent_path) if p != parent_path)
    return LayerChanges(sorted(added), sorted(changed), sorted(deleted))


class Tree:
    """The merged view: canonical path -> :class:`Node`."""

    def __init__(self) -> None:
        self._next_ino = 1
        root = self.new_node(S_IFDIR | DEFAULT_DIR_MODE)
        self.root = root
        self.nodes: dict[str, Node] = {"/": root}
        # Bumped by every change, so callers can keep caches of derived
        # results (directory listings, resolved paths) and know when to drop them.
        self.version = 0

    def new_node(self, mode: int, uid: int = 0, gid: int = 0,
                 mtime_ns: int = 0, size: int = 0) -> Node:
        node = Node(self._next_ino, mode, uid, gid, mtime_ns, size)
        self._next_ino += 1
        return node

    # ------------------------------------------------------------------
    # Lookup: the hot path.

    def get(self, path: str) -> Optional[Node]:
        """The node at canonical *path*, or None; follows no symlink."""
        return self.nodes.get(path)

    def resolve(self, path: str, follow: bool = True) -> tuple[str, Optional[Node]]:
        """Resolve a path as the kernel would inside a chroot at the root.

        *path* may be relative (to the root), hold ``.``, ``..``, repeated
        slashes and symlinks in any component.  Returns the canonical real
        path of the last component and its node, or None for the node when
        everything but the last component exists.  *follow* says whether a
        symlink in the last component is followed.  Raises
        ``FileNotFoundError`` (a parent is missing), ``NotADirectoryError``
        or ``OSError(ELOOP)``, all naming *path*.
        """
        if is_canonical(path):
            node = self.nodes.get(path)
            if node is not None and not (follow and node.mode & S_IFMT == S_IFLNK):
                return path, node
        return self._walk(path, follow)

    def _walk(self, path: str, follow: bool) -> tuple[str, Optional[Node]]:
        must_be_dir = path.endswith("/") and path.strip("/") != ""
        if must_be_dir:
            follow = True
        pending = [c for c in reversed(path.split("/")) if c and c != "."]
        current, node = "/", self.root
        hops = 0
        while pending:
            name = pending.pop()
            if name == "..":
                current = split(current)[0]
                node = self.nodes[current]
                continue
            if node.children is None:
                raise path_error(errno.ENOTDIR, path)
            child = node.children.get(name)
            child_path = join(current, name)
            if child is None:
                if len(encode_name(name)) > NAME_MAX:
                    raise path_error(errno.ENAMETOOLONG, path)
                if pending:
                    raise path_error(errno.ENOENT, path)
                return child_path, None
            if child.mode & S_IFMT == S_IFLNK and (pending or follow):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise path_error(errno.ELOOP, path)
                target = child.target
                if target.startswith("/"):
                    current, node = "/", self.root
                pending.extend(c for c in reversed(target.split("/")) if c and c != ".")
                continue
            current, node = child_path, child
        if must_be_dir and node.children is None:
            raise path_error(errno.ENOTDIR, path)
        return current, node

    # ------------------------------------------------------------------
    # The view as plain data, so a cache can keep it (see layerfs.layer).

    def to_record(self) -> dict:
        """The whole view as marshal-able data: every inode's fields in
        columns, and each directory's children as names, paths and inode
        numbers within the record.  :meth:`from_record` restores an equal
        tree (same inode numbers, same listing order)."""
        inodes: list = []
        index_of: dict = {}
        directories, names, paths, members = [], [], [], []

        def number(node: Node) -> int:
            found = index_of.get(id(node))
            if found is None:
                found = index_of[id(node)] = len(inodes)
                inodes.append(node)
            return found

        number(self.root)
        for path, node in self.walk_nodes():
            if node.children:
                prefix = path if path == "/" else path + "/"
                directories.append(number(node))
                names.append(tuple(node.children))
                paths.append(tuple(prefix + name for name in node.children))
                members.append(tuple(number(child) for child in node.children.values()))
        # Equal numbers (modes, times, owners) become one object, which
        # marshal then writes once: the restored tree shares them too.
        shared: dict = {}
        columns = tuple(tuple(shared.setdefault(value, value) if value.__class__ is int
                              else value for value in map(attrgetter(field), inodes))
                        for field in RECORD_FIELDS)
        return {"version": RECORD_VERSION, "tree_version": self.version,
                "next_ino": self._next_ino, "inodes": columns,
                "directories": (tuple(directories), tuple(names), tuple(paths),
                                tuple(members))}

    @classmethod
    def from_record(cls, record: dict) -> "Tree":
        """The tree :meth:`to_record` described.  Raises ``ValueError`` if
        *record* is not one (of this version)."""
        if record.get("version") != RECORD_VERSION:
            raise ValueError("not a tree record of this version")
        columns = record["inodes"]
        if len(columns) != len(RECORD_FIELDS):
            raise ValueError("wrong number of inode fields")
        with collector_paused():
            inodes = list(starmap(_restored_node, zip(*columns)))
        inode = inodes.__getitem__
        tree = cls.__new__(cls)
        tree.root = inodes[0]
        tree.nodes = nodes = {"/": tree.root}
        for directory, names, paths, members in zip(*record["directories"]):
            children = list(map(inode, members))
            inodes[directory].children = dict(zip(names, children, strict=True))
            nodes.update(zip(paths, children, strict=True))
        tree.version = record["tree_version"]
        tree._next_ino = record["next_ino"]
        return tree

    def walk_nodes(self, top: str = "/") -> Iterator[tuple[str, Node]]:
        """Every (path, node) at and beneath canonical *top*, parents first."""
        stack = [(top, self.nodes[top])]
        while stack:
            path, node = stack.pop()
            yield path, node
            if node.children:
                for name, child in node.children.items():
                    stack.append((join(path, name), child))

    # ------------------------------------------------------------------
    # Applying a layer (see docs/semantics.md).

    def apply_layer(self, entries: Iterable[Entry], layer_index: int,
                    label: str) -> None:
        """Apply one layer's entries (in tar order) on top of this tree."""
        entries = entries if isinstance(entries, (list, tuple)) else list(entries)
        self._apply_markers(entries, label)
        nodes = self.nodes
        for entry in entries:
            path = entry.path
            parent_path, name = split(path)
            parent = nodes.get(parent_path)
            if parent is None or parent.children is None:
                parent = self._make_parents(path)
            if name.startswith(whiteout.PREFIX):
                continue        # a marker: applied above; it only implied its parents
            if path == "/":
                self._apply_root(entry, label)
            elif entry.kind == DIRECTORY:
                self._apply_directory(entry, parent, name)
            elif entry.kind == HARDLINK:
                self._apply_hardlink(entry, parent, name, label)
            else:
                self._replace(parent, name, path, self._node_from(entry, layer_index))
        self.version += 1

    def _apply_markers(self, entries: list, label: str) -> None:
        """Phase one: whiteouts and opaque markers act on what lower layers
        left, before any entry of their own layer, wherever they stand."""
        for entry in entries:
            path = entry.path
            if whiteout.PREFIX not in path:
                continue
            parent_path, name = split(path)
            for ancestor in parents(path):
                if split(ancestor)[1].startswith(whiteout.PREFIX):
                    raise InvalidLayerError("a whiteout name is used as a directory",
                                            layer=label, entry=path)
            kind, target = whiteout.classify(name)
            if kind == whiteout.NOT_A_MARKER:
                continue
            if kind == whiteout.MALFORMED:
                raise InvalidLayerError("malformed whiteout marker (no name to hide)",
                                        layer=label, entry=path)
            directory = self.nodes.get(parent_path)
            if directory is None or directory.children is None:
                continue
            if kind == whiteout.OPAQUE:
                for child_name in list(directory.children):
                    self._remove(directory, child_name, join(parent_path, child_name))
            elif target in directory.children:
                self._remove(directory, target, join(parent_path, target))

    def _make_parents(self, path: str) -> Node:
        """Every entry implies its parent directories: a missing one is
        created with default metadata, a non-directory is replaced by one."""
        parent = self.root
        for ancestor in parents(path):
            name = split(ancestor)[1]
            node = parent.children.get(name)
            if node is None or node.children is None:
                node = self.new_node(S_IFDIR | DEFAULT_DIR_MODE)
                self._replace(parent, name, ancestor, node)
            parent = node
        return parent

    def _apply_root(self, entry: Entry, label: str) -> None:
        if entry.kind != DIRECTORY:
            raise InvalidLayerError("the root of a layer must be a directory",
                                    layer=label, entry=entry.path)
        self._set_directory_attributes(self.root, entry)

    def _apply_directory(self, entry: Entry, parent: Node, name: str) -> None:
        existing = parent.children.get(name)
        if existing is not None and existing.children is not None:
            self._set_directory_attributes(existing, entry)
            return
        node = self.new_node(S_IFDIR | entry.mode)
        self._set_directory_attributes(node, entry)
        self._replace(parent, name, entry.path, node)

    @staticmethod
    def _set_directory_attributes(node: Node, entry: Entry) -> None:
        node.mode = S_IFDIR | entry.mode
        node.uid = entry.uid
        node.gid = entry.gid
        node.mtime_ns = node.atime_ns = node.ctime_ns = entry.mtime_ns
        node.xattrs = entry.xattrs or None
        node.stat_cache = None

    def _apply_hardlink(self, entry: Entry, parent: Node, name: str,
                        label: str) -> None:
        target_path = entry.linkname
        if target_path == entry.path:
            raise InvalidLayerError("hardlink to itself", layer=label, entry=entry.path)
        target = self.nodes.get(target_path)
        if target is None:
            raise InvalidLayerError(f"hardlink target {target_path!r} does not exist",
                                    layer=label, entry=entry.path)
        if target.children is not None:
            raise InvalidLayerError(f"hardlink target {target_path!r} is a directory",
                                    layer=label, entry=entry.path)
        self._replace(parent, name, entry.path, self.own(target_path, target))

    def _node_from(self, entry: Entry, layer_index: int) -> Node:
        node = self.new_node(entry.kind | entry.mode, entry.uid, entry.gid,
                             entry.mtime_ns, entry.size)
        kind = entry.kind
        if kind == S_IFREG:
            node.source = layer_index
            node.data = entry.data
        elif kind == S_IFLNK:
            # Linux has no symlink permissions: extracted, every symlink is
            # 0777 whatever the tar header says, so the view shows that.
            node.mode = S_IFLNK | 0o777
            node.target = entry.linkname
            node.size = len(encode_name(entry.linkname))
        else:
            node.size = 0
            node.rdev = entry.rdev
        if entry.xattrs:
            node.xattrs = entry.xattrs
        return node

    # ------------------------------------------------------------------
    # Changes made by the writable layer.  The caller has checked that they
    # are allowed (parent is a directory, names are free...).

    def insert(self, path: str, node: Node) -> None:
        """Give *node* the name *path*, replacing whatever was there."""
        parent_path, name = split(path)
        self._replace(self.nodes[parent_path], name, path, node)
        self.version += 1

    def remove(self, path: str) -> None:
        """Remove *path* and everything beneath it."""
        parent_path, name = split(path)
        self._remove(self.nodes[parent_path], name, path)
        self.version += 1

    def move(self, source: str, destination: str) -> None:
        """Rename *source* (with its subtree) to *destination*, replacing it.

        Readers take no lock, so the order matters: the new names are added
        before the old ones go, and *destination* is replaced in one dict
        assignment; a concurrent lookup never finds neither.
        """
        node = self.nodes[source]
        moved = list(self.walk_nodes(source))
        destination_parent, destination_name = split(destination)
        new_parent = self.nodes[destination_parent]
        replaced = new_parent.children.get(destination_name)
        if replaced is not None and replaced.children is None:
            replaced = self.own(destination, replaced)
        cut = len(source)
        for path, child in moved:
            self.nodes[destination + path[cut:]] = child
        new_parent.children[destination_name] = node
        if replaced is not None:
            if replaced.children is not None:
                new_parent.nlink -= 1
            else:
                replaced.nlink -= 1
                replaced.stat_cache = None
        source_parent, source_name = split(source)
        old_parent = self.nodes[source_parent]
        del old_parent.children[source_name]
        if node.children is not None:
            old_parent.nlink -= 1
            new_parent.nlink += 1
        for path, _ in moved:
            del self.nodes[path]
        old_parent.stat_cache = new_parent.stat_cache = None
        self.version += 1

    def own(self, path: str, node: Node) -> Node:
        """The node at *path* (*node*, found there) as this tree may change
        it.  A tree's nodes are its own; a container's tree
        (:mod:`layerfs.lazytree`) shares the image's and copies one here."""
        return node

    def current(self, node: Node) -> Node:
        """What *node*, kept from an earlier lookup, is now (the copy
        :meth:`own` made of it, if any)."""
        return node

    def listen_owned(self, callback: Callable[[Node, Node], None]) -> None:
        """Have ``callback(shared, copy)`` called when :meth:`own` copies a
        node (a plain tree never does)."""

    def names_of(self, node: Node) -> list[str]:
        """Every path naming *node*.  A scan of the whole view: callers use
        it only for files with several names."""
        lazy = getattr(self.nodes, "names_of", None)      # a container's tree (lazytree)
        if lazy is not None:
            return lazy(node)
        return sorted(path for path, candidate in self.nodes.items() if candidate is node)

    # ------------------------------------------------------------------
    # The one family of primitive changes; everything else is built on these.

    def _replace(self, parent: Node, name: str, path: str, node: Node) -> None:
        """Put *node* at *path* (child *name* of *parent*), removing whatever
        was there with everything beneath it."""
        if name in parent.children:
            self._remove(parent, name, path)
        parent.children[name] = node
        self.nodes[path] = node
        if node.children is not None:
            parent.nlink += 1
        else:
            node.nlink += 1
        parent.stat_cache = None
        node.stat_cache = None

    def _remove(self, parent: Node, name: str, path: str) -> None:
        """Remove *path* (child *name* of *parent*) and everything beneath."""
        node = parent.children[name]
        if node.children is None:
            node = self.own(path, node)
        del parent.children[name]
        parent.stat_cache = None
        if node.children is None:
            del self.nodes[path]
            node.nlink -= 1
            node.stat_cache = None
            return
        parent.nlink -= 1
        stack = [(path, node)]
        while stack:
            dir_path, directory = stack.pop()
            for child_name, child in list(directory.children.items()):
                child_path = join(dir_path, child_name)
                if child.children is None:
                    child = self.own(child_path, child)     # its name is still there
                    del self.nodes[child_path]
                    child.nlink -= 1
                    child.stat_cache = None
                else:
                    stack.append((child_path, child))
            del self.nodes[dir_path]

