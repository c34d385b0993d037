"""The immutable merged view of an image, one per image in a process.

Every filesystem of an image shares its :class:`LowerView`: a read-only
filesystem looks paths up in its tree directly; a writable one (a
container) consults it, as overlayfs consults its lower layers, to know
what the image shows beneath the upper (``path -> st_mode``), and starts
its own tree from it, copied lazily (:mod:`layerfs.lazytree`).  Views are
found by a key naming what decides their nodes (``layerfs.fs.view_key``: the
ChainID, and the blob of each layer read through a table of contents): two
images with the same layers share one.  Nothing here ever changes a view's
tree; a view lives as long as a filesystem uses it.

No FUSE, no facade: the tree is built by a callable the caller passes.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from typing import Callable, Iterator, Optional

from .lazytree import container_tree
from .union import Tree


class LowerView(Mapping):
    """What an image's layers show: a mapping of canonical path to
    ``st_mode``, over a tree that must never be changed (``tree``)."""

    def __init__(self, tree: Tree):
        self.tree = tree
        self._nodes = tree.nodes

    def __getitem__(self, path: str) -> int:
        return self._nodes[path].mode

    def __contains__(self, path: object) -> bool:
        return path in self._nodes

    def __iter__(self) -> Iterator[str]:
        return iter(self._nodes)

    def __len__(self) -> int:
        return len(self._nodes)

    def private_tree(self) -> Tree:
        """A new tree equal to the view, for one writer to change: it copies
        the view a directory at a time, as it is used
        (:func:`layerfs.lazytree.container_tree`), so it costs nothing to make."""
        return container_tree(self.tree)


class LowerSnapshot(Mapping):
    """What an image's layers show (path -> ``st_mode``), for a filesystem
    that keeps a private tree and shares nothing (``share_view=False``):
    taken from that tree before any change."""

    tree = None

    def __init__(self, tree: Tree):
        self._modes = {path: node.mode for path, node in tree.nodes.items()}

    def __getitem__(self, path: str) -> int:
        return self._modes[path]

    def __contains__(self, path: object) -> bool:
        return path in self._modes

    def __iter__(self) -> Iterator[str]:
        return iter(self._modes)

    def __len__(self) -> int:
        return len(self._modes)


_views: "weakref.WeakValueDictionary[str, LowerView]" = weakref.WeakValueDictionary()
_views_lock = threading.Lock()


def shared_view(key: Optional[str],
                build: Callable[[], Tree]) -> LowerView:
    """The process's view of the image *key* names (its ChainID, and what
    else decides the nodes' data references: ``layerfs.fs.view_key``),
    made with ``build() -> tree`` if no filesystem holds
    one (and always without a key: nothing to share it by)."""
    with _views_lock:
        view = _views.get(key) if key else None
        if view is None:
            view = LowerView(build())
            if key:
                _views[key] = view
        return view
