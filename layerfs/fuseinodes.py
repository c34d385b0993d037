"""The kernel's inodes of a writable mount: node ids, lookup counts, names.

libfuse's low-level API names inodes, not paths: the kernel learns a node
id from every reply that gives it an entry (lookup, create, mkdir, mknod,
symlink, link, READDIRPLUS), counts those replies, and gives the count back
with FORGET once it drops the inode.  The facade (:mod:`layerfs.writable`)
takes paths.  This table joins the two, with no FUSE and no I/O in it:

* A node id is the view's inode number (``Node.ino``: unique in a tree,
  never reused, shared by a file's hard links; the root's is 1, as FUSE
  wants).  So ``st_ino`` and the node id agree, and the kernel sees one
  inode for several names.
* Each inode the kernel holds has a record: the view's :class:`Node` (the
  same object the tree holds, so attributes are always current), the
  kernel's lookup count, and the name it was last reached by (its parent's
  record and a name).  A path is built by walking up the records, and
  checked against the tree's path dict (one lookup): a renamed directory
  needs only its own record changed for everything beneath to follow.
* A record lives while the kernel counts lookups of it or a record beneath
  names it as parent (so a path can always be built), and is dropped then.
* An inode no name reaches any more (unlinked, replaced by a rename) keeps
  its record while the kernel references it: its attributes come from the
  node, and :attr:`layerfs.upper.Upper.referenced` (this table's
  :meth:`InodeTable.holds`) keeps an upper file's data for it.

Locking: one lock guards the records; building a path takes it briefly.
Callers that act on a path hold the upper's lock meanwhile, as renames do,
so the path stays true while they use it.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

from .union import Node

ROOT_ID = 1


class Inode:
    """One record of the table (see the module doc)."""

    __slots__ = ("node", "lookups", "parent", "name", "beneath")

    def __init__(self, node: Node, parent: Optional["Inode"], name: str):
        self.node = node
        self.lookups = 0
        self.parent = parent
        self.name = name
        self.beneath = 0        # records whose parent this is


class InodeTable:
    """The records of one mount's tree.  *tree* is the view's
    :class:`~layerfs.union.Tree` (its ``nodes``, ``names_of``); *released*
    is called with a node whose record went (outside the table's lock)."""

    def __init__(self, tree, released: Callable[[Node], None] = lambda node: None):
        self.tree = tree
        self.released = released
        self.lock = threading.Lock()
        root = Inode(tree.nodes["/"], None, "")
        root.lookups = 1          # the kernel never forgets the root
        self.records: dict[int, Inode] = {ROOT_ID: root}
        if root.node.ino != ROOT_ID:
            raise ValueError("the view's root must have inode number 1")
        tree.listen_owned(self._owned)

    def _owned(self, shared: Node, copy: Node) -> None:
        """A container copied an image's node it changes: the record
        follows (its inode number is the same)."""
        with self.lock:
            record = self.records.get(copy.ino)
            if record is not None and record.node is shared:
                record.node = copy

    def get(self, node_id: int) -> Optional[Inode]:
        return self.records.get(node_id)

    def holds(self, node_id: int) -> bool:
        """Does the kernel (or a record beneath) still reference *node_id*?"""
        return node_id in self.records

    def looked_up(self, parent: Inode, name: str, node: Node) -> Inode:
        """The kernel got *node* as *name* in *parent*: count it.  A
        directory's record keeps the name it has (renames update it, see
        :meth:`moved`); a file's takes the latest, any name will do."""
        with self.lock:
            record = self.records.get(node.ino)
            if record is None:
                record = Inode(node, parent, name)
                parent.beneath += 1
                self.records[node.ino] = record
            elif record.node is not node:
                # A container copied the node meanwhile: the lookup found it
                # before (or the record was told after) the copy was made.
                current = self.tree.current
                node = current(node)
                if current(record.node) is not node:
                    raise AssertionError(f"two nodes with inode number {node.ino}")
                record.node = node
            elif node.children is None and record.parent is not None \
                    and (record.parent is not parent or record.name != name):
                self._reparent(record, parent, name)
            record.lookups += 1
            return record

    def unlooked(self, record: Inode) -> None:
        """A reply that gave *record* to the kernel failed: it never got it."""
        self.forget(record.node.ino, 1)

    def forget(self, node_id: int, count: int) -> None:
        """The kernel dropped *count* lookups of *node_id*."""
        gone = []
        with self.lock:
            record = self.records.get(node_id)
            if record is None or node_id == ROOT_ID:
                return
            record.lookups -= count
            while record is not None and record.lookups <= 0 and record.beneath == 0 \
                    and record.parent is not None:
                del self.records[record.node.ino]
                gone.append(record.node)
                parent = record.parent
                parent.beneath -= 1
                record = parent
        for node in gone:
            self.released(node)

    def moved(self, node: Node, parent: Inode, name: str) -> None:
        """*node* was renamed to *name* in *parent*."""
        with self.lock:
            record = self.records.get(node.ino)
            if record is not None and record.node is node:
                self._reparent(record, parent, name)

    def _reparent(self, record: Inode, parent: Inode, name: str) -> None:
        old = record.parent
        parent.beneath += 1
        record.parent, record.name = parent, name
        old.beneath -= 1
        # The old parent may have been kept only for this record: it goes
        # with the kernel's next FORGET of it, or here if that came already.
        while old is not None and old.lookups <= 0 and old.beneath == 0 \
                and old.parent is not None and self.records.get(old.node.ino) is old:
            del self.records[old.node.ino]
            old.parent.beneath -= 1
            old = old.parent

    def path(self, record: Inode) -> Optional[str]:
        """The path that names *record*'s node now, or None if none does
        (unlinked, or replaced)."""
        node = record.node
        names = []
        with self.lock:
            walked = record
            while walked.parent is not None:
                names.append(walked.name)
                walked = walked.parent
        path = "/" + "/".join(reversed(names))
        if self.tree.nodes.get(path) is node:
            return path
        if node.children is None and node.nlink > 0:
            # A file reached by another of its names since.
            found = self.tree.names_of(node)
            if found:
                return found[0]
        return None
