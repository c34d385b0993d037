"""A container's tree: the shared view of its image, copied only where
the container changes it.

A writable filesystem changes its tree (an upper consults and changes the
same :class:`~layerfs.union.Tree`); the image's view
(:mod:`layerfs.lowerview`) is shared by every filesystem of the image in
the process and must never change.  Copying the whole view per container
cost as much as the image is large, at open and in memory.  Instead:

* a directory of the view is copied when the container first looks into
  it (its entries, not their subtrees): a directory's ``children`` and
  the tree's ``path -> node`` dict are the container's own, so names can
  be added, removed and renamed;
* every other node (files, symlinks, devices: most of an image) is the
  view's own object, a :class:`~layerfs.union.FrozenNode`, shared by every
  container, until the container changes it: each change takes its own
  copy first through :meth:`ContainerTree.own`, which puts the copy under
  every name the container gives the node (a hardlinked file has
  several).  A change that forgot to would fail loudly on the frozen node.

What keeps a node from an earlier lookup (an open handle, the FUSE
server's inode records) finds the copy through
:meth:`ContainerTree.current`, or is told through
:meth:`ContainerTree.listen_owned`.  So opening a container costs the same
for a 15-entry image and a 100,000-entry one, and N containers of an
image cost one view, plus per container the directories it used and the
nodes it changed.

* :class:`LazyChildren` is a directory's ``children`` dict, filled from
  the base directory's children on first use of any method;
* :class:`LazyNodes` is the tree's ``path -> node`` dict: a miss fills the
  directories on the way to the path, then looks again; the names of a
  hardlinked inode are found from the view's names, not by filling
  everything.

Filling and copying happen under one lock per tree (two threads must not
make two copies of one node); a filled dict answers without it.
Whole-tree walks (``items()`` of ``nodes``, a recursive listing, a
commit) fill every directory they reach.

No I/O: part of the union core.
"""

from __future__ import annotations

import sys
import threading

from .paths import join, split
from .union import S_IFDIR, S_IFMT, FrozenNode, Node, Tree, copy_node, freeze

_intern = sys.intern
_dict_get = dict.get
_dict_setitem = dict.__setitem__
_dict_contains = dict.__contains__


class _Copier:
    """What the lazy dicts of one container share: the tree's ``nodes``,
    the lock, and the copies :meth:`ContainerTree.own` made of the view's
    nodes (by the shared node's id)."""

    __slots__ = ("nodes", "lock", "owned", "base_tree", "listeners")

    def __init__(self, base_tree: Tree) -> None:
        self.nodes: "LazyNodes" = None      # set by container_tree
        self.lock = threading.RLock()
        self.base_tree = base_tree
        self.owned: dict[int, Node] = {}
        self.listeners: list = []

    def copy(self, base: Node, path: str) -> Node:
        """A directory of the view as the container's own (its children
        copied lazily); any other node is the view's own, shared."""
        if base.children is None:
            return base
        node = copy_node(base)
        node.children = LazyChildren(self, path, base.children) if base.children else {}
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


def _view_names(view: Tree, node: Node) -> list[str]:
    """The names the view gives its hardlinked file *node*: found by one
    scan of the view, the first time a container asks, and kept with it
    for every container of the image (a hardlinked file is few)."""
    names = getattr(view, "hardlink_names", None)
    if names is None:
        names = {}
        for path, candidate in dict.items(view.nodes):
            if candidate.nlink > 1 and candidate.children is None:
                names.setdefault(id(candidate), []).append(path)
        view.hardlink_names = names
    return names.get(id(node), [])


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
        the whole view: a node of the view has the directories of its names
        there copied first (a copy :meth:`ContainerTree.own` made had them
        copied then), then the copied paths are scanned."""
        if node.__class__ is FrozenNode:
            for path in _view_names(self._copier.base_tree, node):
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


class ContainerTree(Tree):
    """A container's tree: the view's nodes until it changes them."""

    def own(self, path: str, node: Node) -> Node:
        """*node* (at *path*) as this container may change it: a node of
        the view is copied once, and the copy takes its place under every
        name the container gives it (a hardlinked file has several)."""
        if node.__class__ is not FrozenNode:
            return node
        copier = self.nodes._copier
        with copier.lock:
            copy = copier.owned.get(id(node))
            if copy is not None:
                return copy
            copy = copy_node(node)
            nodes = self.nodes
            if node.nlink <= 1 and _dict_get(nodes, path) is node:
                names = [path]
            else:
                names = nodes.names_of(node)
            for name in names:
                parent_path, leaf = split(name)
                nodes[parent_path].children[leaf] = copy
                _dict_setitem(nodes, name, copy)
            copier.owned[id(node)] = copy
            self.version += 1       # what was remembered by path now names the copy
            for listener in copier.listeners:
                listener(node, copy)
        return copy

    def current(self, node: Node) -> Node:
        if node.__class__ is FrozenNode:
            return self.owned.get(id(node), node)
        return node

    def listen_owned(self, callback) -> None:
        self.nodes._copier.listeners.append(callback)


def container_tree(base: Tree) -> ContainerTree:
    """A tree equal to *base* that copies it lazily (see the module's
    docstring); *base* is never changed through it (its nodes are made
    :class:`~layerfs.union.FrozenNode` if they are not yet)."""
    if not getattr(base, "paths_interned", False):
        for path in dict.keys(base.nodes):     # once per view: its keys become the
            _intern(path)                       # strings every container shares
        base.paths_interned = True
    if base.root.__class__ is not FrozenNode:
        freeze(base)
    copier = _Copier(base)
    tree = ContainerTree.__new__(ContainerTree)
    tree.nodes = nodes = LazyNodes.__new__(LazyNodes)
    dict.__init__(nodes)
    nodes._copier = copier
    nodes._complete = False
    copier.nodes = nodes
    # The root is copied at once (it is every walk's start).
    root = copier.copy(base.root, "/")
    assert root.mode & S_IFMT == S_IFDIR
    _dict_setitem(nodes, "/", root)
    tree.root = root
    tree.owned = copier.owned
    tree.version = base.version
    tree._next_ino = base._next_ino
    return tree
