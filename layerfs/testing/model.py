"""The reference model: extract the layers, in order, into a dict.

Deliberately naive and independent of layerfs's union core: the tree is a
dict ``path -> inode``, every rule of docs/semantics.md is applied literally
to it, one member at a time, and nothing is indexed or cached.  Only the
lexical name normalisation is shared with layerfs (``layerfs.paths``), and it
knows nothing about markers.  Keep it short enough to check by eye.
"""

from __future__ import annotations

import attrs

from layerfs.paths import BadMemberName, join, normalize_member_name, parents, split
from layerfs.testing.layers import (DEVICE_KINDS, DIR, FILE, HARDLINK, OPAQUE_MARKER, SYMLINK,
                                    WHITEOUT_PREFIX)


class ModelError(ValueError):
    """The stack is invalid: layerfs must refuse it too."""

    def __init__(self, layer: int, name: str, reason: str):
        super().__init__(f"layer {layer}: entry {name!r}: {reason}")
        self.layer, self.name, self.reason = layer, name, reason


@attrs.frozen
class ModelNode:
    """One path of a view.  ``link_group`` is the set of every name of the
    same file (non-directories only), so hardlinks compare as partitions."""

    kind: str
    mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    content: bytes = b""
    target: str = ""
    xattrs: tuple = ()            # sorted (name, value) pairs
    rdev: tuple = (0, 0)          # (major, minor) for devices
    link_group: frozenset = frozenset()


@attrs.define(eq=False)
class _Inode:
    kind: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    content: bytes = b""
    target: str = ""
    xattrs: tuple = ()
    rdev: tuple = (0, 0)


def apply_stack(stack) -> dict:
    """The final view of *stack* (base first): ``{path: ModelNode}``, root
    included.  Raises :class:`ModelError` for an invalid stack."""
    tree = {"/": _Inode(DIR)}
    for index, layer in enumerate(stack):
        apply_layer(tree, layer, index)
    return _freeze(tree)


def apply_layer(tree: dict, layer, index: int) -> None:
    entries = [(_normalize(m.name, index, m.name), m) for m in layer]
    # Phase 1: every marker acts on what the lower layers left.
    for path, member in entries:
        marker = _marker(path, index, member.name)
        if marker == "opaque":
            directory = split(path)[0]
            if _is_dir(tree.get(directory)):
                _remove_beneath(tree, directory)
        elif marker:
            _remove(tree, marker)
    # Phase 2: every entry in tar order.
    for path, member in entries:
        inode = _new_inode(tree, path, member, index)
        for ancestor in parents(path):
            if not _is_dir(tree.get(ancestor)):
                _remove(tree, ancestor)
                tree[ancestor] = _Inode(DIR)
        if path != "/" and _marker(path, index, member.name):
            continue
        old = tree.get(path)
        if _is_dir(old) and member.kind == DIR:
            for field in ("mode", "uid", "gid", "mtime_ns", "xattrs"):
                setattr(old, field, getattr(inode, field))
        elif path == "/":
            raise ModelError(index, member.name, "the root must be a directory")
        else:
            _remove(tree, path)
            tree[path] = inode


def _new_inode(tree: dict, path: str, member, index: int) -> _Inode:
    """The inode *member* names; a hardlink's target is looked up now,
    before the entry changes anything."""
    if member.kind != HARDLINK:
        rdev = (member.devmajor, member.devminor) if member.kind in DEVICE_KINDS else (0, 0)
        mode = 0o777 if member.kind == SYMLINK else member.mode & 0o7777   # as extracted
        return _Inode(member.kind, mode, member.uid, member.gid,
                      member.mtime * 10**9,
                      member.content if member.kind == FILE else b"",
                      member.target if member.kind == SYMLINK else "",
                      member.xattrs, rdev)
    target = _normalize(member.target, index, member.name)
    found = tree.get(target)
    if target == path or found is None or _is_dir(found):
        raise ModelError(index, member.name,
                         f"hardlink to {target!r}: missing, a directory or itself")
    return found


def _normalize(name: str, index: int, member_name: str) -> str:
    try:
        return normalize_member_name(name)
    except BadMemberName as exc:
        raise ModelError(index, member_name, str(exc)) from None


def _marker(path: str, index: int, name: str):
    """``"opaque"``, the whited-out path, or None for an ordinary entry."""
    parent, base = split(path)
    if base == OPAQUE_MARKER:
        return "opaque"
    if not base.startswith(WHITEOUT_PREFIX):
        return None
    hidden = base[len(WHITEOUT_PREFIX):]
    if hidden in ("", ".", ".."):
        raise ModelError(index, name, "malformed whiteout")
    return join(parent, hidden)


def _is_dir(inode) -> bool:
    return inode is not None and inode.kind == DIR


def _remove_beneath(tree: dict, path: str) -> None:
    prefix = "/" if path == "/" else path + "/"
    for key in [k for k in tree if k.startswith(prefix) and k != "/"]:
        del tree[key]


def _remove(tree: dict, path: str) -> None:
    tree.pop(path, None)
    _remove_beneath(tree, path)


def _freeze(tree: dict) -> dict:
    names: dict[int, list] = {}
    for path, inode in tree.items():
        names.setdefault(id(inode), []).append(path)
    view = {}
    for path, inode in tree.items():
        group = frozenset() if inode.kind == DIR else frozenset(names[id(inode)])
        view[path] = ModelNode(inode.kind, inode.mode, inode.uid, inode.gid,
                               inode.mtime_ns, inode.content, inode.target,
                               inode.xattrs, inode.rdev, group)
    return view
