"""A container's tree: the shared view of its image, copied lazily.

A writable filesystem changes its tree's nodes in place (an upper consults
and changes the same :class:`~layerfs.union.Tree`), and the FUSE server
keeps nodes by inode number, so a container cannot share node objects with
the image's shared, immutable view (:mod:`layerfs.lowerview`).  Copying the
whole view at open cost as much as the image is large.  Instead, a
container's tree copies the view one directory at a time, when that
directory is first looked into: opening a container costs the same for a
15-entry image and a 100,000-entry one, and a container holds copies only
of the directories it used, plus its own changes.

The invariant everything rests on: every node a container's tree hands out
(through ``nodes`` or through a directory's ``children``) is the
container's own copy, and there is exactly one copy of each base node
(hardlinked names share it).  So the rest of layerfs keeps treating the
tree as a plain, mutable tree.

* :class:`LazyChildren` is a directory's ``children`` dict, filled with
  copies of the base directory's children on first use of any method;
* :class:`LazyNodes` is the tree's ``path -> node`` dict: a miss fills the
  directories on the way to the path, then looks again; the names of a
  hardlinked inode are found from its base node's names, not by copying
  everything.

Filling happens under one lock per tree (two threads must not make two
copies of one node); a filled dict answers without it.  Whole-tree walks
(``items()`` of ``nodes``, a recursive listing, a commit) fill everything
they reach, so after them the container costs what a copied tree did.

No I/O: part of the union core.
"""

from __future__ import annotations

import sys
import threading

from .paths import join, split
from .union import S_IFDIR, S_IFMT, Node, Tree

_intern = sys.intern
_dict_get = dict.get
_dict_setitem = dict.__setitem__
_dict_contains = dict.__contains__


class _Copier:
    """What the lazy dicts of one container share: the copies made so far
    of base nodes with several names, the tree's ``nodes``, the lock."""

    __slots__ = ("nodes", "lock", "shared", "base_of", "base_tree")

    def __init__(self, base_tree: Tree) -> None:
        self.nodes: "LazyNodes" = None      # set by container_tree
        self.lock = threading.RLock()
        self.base_tree = base_tree
        self.shared: dict[int, Node] = {}   # id(base node) -> its copy, nlink > 1 only
        self.base_of: dict[int, Node] = {}  # the reverse, id(copy) -> base node

    def copy(self, base: Node, path: str) -> Node:
        if base.children is None and base.nlink > 1:
            found = self.shared.get(id(base))
            if found is not None:
                return found
        node = Node.__new__(Node)
        node.ino = base.ino
        node.mode = base.mode
        node.uid = base.uid
        node.gid = base.gid
        node.size = base.size
        node.mtime_ns = base.mtime_ns
        node.atime_ns = base.atime_ns
        node.ctime_ns = base.ctime_ns
        node.nlink = base.nlink
        node.rdev = base.rdev
        node.target = base.target
        node.xattrs = dict(base.xattrs) if base.xattrs else base.xattrs
        node.source = base.source
        node.data = base.data
        node.stat_cache = None
        node.origin = base.origin
        if base.children is not None:
            node.children = LazyChildren(self, path, base.children) \
                if base.children else {}
        else:
            node.children = None
            if base.nlink > 1:
                self.shared[id(base)] = node
                self.base_of[id(node)] = base
        return node


class LazyChildren(dict):
    """A directory's children, copied from its base directory on first use."""

    __slots__ = ("_copier", "_path", "_base")

    def __init__(self, copier: _Copier, path: str, base: dict):
        super().__init__()
        self._copier = copier
        self._path = path
        self._base = base           # None once filled

    def _fill(self) -> None:
        copier = self._copier
        with copier.lock:
            base = self._base
            if base is None:
                return
            path = self._path
            nodes = copier.nodes
            for name, child in base.items():
                # Interned: every container's copy of the path is the one
                # string the view's own path dict holds (see container_tree).
                child_path = _intern(join(path, name))
                copy = copier.copy(child, child_path)
                _dict_setitem(self, name, copy)
                _dict_setitem(nodes, child_path, copy)
            self._base = None

    # Every method of dict, filled first.  (C code reaches an overridden
    # method of a dict subclass through its type's slots, so these cover
    # len(), iteration, ``in`` and subscription too.)

    def get(self, key, default=None):
        if self._base is not None:
            self._fill()
        return _dict_get(self, key, default)

    def __getitem__(self, key):
        if self._base is not None:
            self._fill()
        return dict.__getitem__(self, key)

    def __contains__(self, key):
        if self._base is not None:
            self._fill()
        return _dict_contains(self, key)

    def __iter__(self):
        if self._base is not None:
            self._fill()
        return dict.__iter__(self)

    def __len__(self):
        if self._base is not None:
            self._fill()
        return dict.__len__(self)

    def __bool__(self):
        return len(self) > 0

    def __setitem__(self, key, value):
        if self._base is not None:
            self._fill()
        _dict_setitem(self, key, value)

    def __delitem__(self, key):
        if self._base is not None:
            self._fill()
        dict.__delitem__(self, key)

    def __eq__(self, other):
        if self._base is not None:
            self._fill()
        return dict.__eq__(self, other)

    __hash__ = None

    def __repr__(self):
        if self._base is not None:
            self._fill()
        return dict.__repr__(self)

    def __reversed__(self):
        if self._base is not None:
            self._fill()
        return dict.__reversed__(self)


def _filled_first(name):
    method = getattr(dict, name)

    def wrapper(self, *args, **kwargs):
        if self._base is not None:
            self._fill()
        return method(self, *args, **kwargs)

    wrapper.__name__ = name
    return wrapper


for _name in ("keys", "values", "items", "pop", "popitem", "setdefault", "update",
              "clear", "copy"):
    setattr(LazyChildren, _name, _filled_first(_name))


class LazyNodes(dict):
    """A container tree's ``path -> node``: a path not yet copied is found
    by filling the directories on the way to it."""

    __slots__ = ("_copier", "_complete")

    def __init__(self, copier: _Copier, root: Node):
        super().__init__()
        self._copier = copier
        self._complete = False
        _dict_setitem(self, "/", root)

    def _find(self, path: str):
        """The node at canonical *path*, filling directories on the way;
        None if there is none."""
        if not isinstance(path, str) or not path.startswith("/"):
            return None
        parent_path = split(path)[0]
        parent = _dict_get(self, parent_path)
        if parent is None:
            if parent_path == path:
                return None
            parent = self._find(parent_path)
            if parent is None:
                return None
        children = parent.children
        if children is None:
            return None
        if children.__class__ is LazyChildren and children._base is not None:
            children._fill()
        return _dict_get(self, path)

    def fill_all(self) -> None:
        """Copy every directory not copied yet (before a whole-tree walk)."""
        if self._complete:
            return
        with self._copier.lock:
            stack = [_dict_get(self, "/")]
            while stack:
                node = stack.pop()
                children = node.children
                if children:
                    stack.extend(child for child in dict.values(children)
                                 if child.children is not None)
            self._complete = True

    def names_of(self, node: Node) -> list[str]:
        """Every path naming *node* (:meth:`Tree.names_of`), without copying
        the whole view: the names its base node had are copied (so they
        are all here, unless removed), then the copied paths are scanned."""
        copier = self._copier
        base = copier.base_of.get(id(node))
        if base is not None:
            for path, candidate in copier.base_tree.nodes.items():
                if candidate is base:
                    self.get(path)
        return sorted(path for path, candidate in dict.items(self) if candidate is node)

    def get(self, path, default=None):
        node = _dict_get(self, path)
        if node is None:
            node = self._find(path)
            if node is None:
                return default
        return node

    def __getitem__(self, path):
        node = _dict_get(self, path)
        if node is None:
            node = self._find(path)
            if node is None:
                raise KeyError(path)
        return node

    def __contains__(self, path):
        return _dict_contains(self, path) or self._find(path) is not None

    def __iter__(self):
        self.fill_all()
        return dict.__iter__(self)

    def __len__(self):
        self.fill_all()
        return dict.__len__(self)

    def __repr__(self):
        return f"<LazyNodes of {dict.__len__(self)} copied paths>"


def _filled_nodes_first(name):
    method = getattr(dict, name)

    def wrapper(self, *args, **kwargs):
        self.fill_all()
        return method(self, *args, **kwargs)

    wrapper.__name__ = name
    return wrapper


for _name in ("keys", "values", "items", "copy"):
    setattr(LazyNodes, _name, _filled_nodes_first(_name))


def container_tree(base: Tree) -> Tree:
    """A tree equal to *base* that copies it lazily (see the module's
    docstring); *base* is never changed through it."""
    if not getattr(base, "paths_interned", False):
        for path in dict.keys(base.nodes):     # once per view: its keys become the
            _intern(path)                       # strings every container shares
        base.paths_interned = True
    copier = _Copier(base)
    tree = Tree.__new__(Tree)
    base_root = base.root
    root = Node.__new__(Node)
    copier.nodes = None
    # The root is copied at once (it is every walk's start).
    tree.nodes = nodes = LazyNodes.__new__(LazyNodes)
    dict.__init__(nodes)
    nodes._copier = copier
    nodes._complete = False
    copier.nodes = nodes
    root = copier.copy(base_root, "/")
    _dict_setitem(nodes, "/", root)
    tree.root = root
    tree.version = base.version
    tree._next_ino = base._next_ino
    assert root.mode & S_IFMT == S_IFDIR
    return tree
