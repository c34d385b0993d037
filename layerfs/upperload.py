"""Reopening an upper: ``diff/`` and the sidecar applied to the view, and
the repair of what a crash can leave (``docs/upper-format.md``)."""

from __future__ import annotations

import logging
import os
import stat as _stat

from . import upperformat, whiteout
from .errors import InvalidLayerError
from .entry import DIRECTORY, HARDLINK, REGULAR, Entry
from .paths import join, split
from .union import ORIGIN_MERGED, ORIGIN_METACOPY, ORIGIN_NEW, S_IFDIR, \
    S_IFLNK, S_IFMT, S_IFREG, UPPER_SOURCE

log = logging.getLogger("layerfs.upper")


def load_upper(upper) -> None:
    """Apply an existing ``diff/`` to the view, as the top layer, then the
    sidecar; a writer repairs what a crash can leave (whiteouts beside their
    entry), a reader leaves the directory as it is."""
    entries, opaque_dirs, ctimes = read_diff(upper)
    label = f"upper {upper.directory}"
    upper.tree.apply_layer(entries, UPPER_SOURCE, label)
    nodes = upper.tree.nodes
    whited_out = {join(split(e.path)[0], whiteout.classify(split(e.path)[1])[1])
                  for e in entries if whiteout.classify(split(e.path)[1])[0] == whiteout.WHITEOUT}
    for entry in entries:          # parents before children
        name = split(entry.path)[1]
        if whiteout.is_marker_name(name):
            continue
        node = nodes[entry.path]
        if entry.kind == DIRECTORY:
            parent = nodes[split(entry.path)[0]]
            merged = (parent.origin != ORIGIN_NEW and entry.path in upper.lower_paths
                      and entry.path not in opaque_dirs and entry.path not in whited_out)
            node.origin = ORIGIN_MERGED if merged else ORIGIN_NEW
        else:
            node.origin = ORIGIN_MERGED
        node.ctime_ns = ctimes[entry.path]
    apply_sidecar(upper)
    if upper.writable:
        remove_redundant_whiteouts(upper, entries)


def read_diff(upper) -> tuple[list[Entry], set[str], dict[str, int]]:
    """``diff/`` as a list of entries (hardlinks found by host inode, long
    whiteouts as ``.wh.NAME``), the opaque directories, and each entry's
    host ctime."""
    entries = []
    opaque_dirs = set()
    ctimes = {}
    first_name: dict[tuple[int, int], str] = {}
    host = upper.host
    for host_path, st in host.walk("/diff"):
        path = host_path[len("/diff"):]
        parent, name = split(path)
        if name == whiteout.OPAQUE_NAME:
            opaque_dirs.add(parent)
        kind = _stat.S_IFMT(st.st_mode)
        if upperformat.is_long_whiteout(name) and kind == S_IFREG:
            entries.append(Entry(join(parent, whiteout.PREFIX + long_whiteout(upper, host_path)),
                                 REGULAR, mode=0o600, uid=0, gid=0, mtime_ns=st.st_mtime_ns))
            continue
        xattrs = host.listxattr(host_path) or None
        common = dict(mode=_stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                      mtime_ns=st.st_mtime_ns, xattrs=xattrs)
        ctimes[path] = st.st_ctime_ns
        if kind != S_IFDIR and st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            if key in first_name:
                entries.append(Entry(path, HARDLINK, linkname=first_name[key], **common))
                continue
            first_name[key] = path
        if kind == S_IFREG:
            entries.append(Entry(path, REGULAR, size=st.st_size, data=path, **common))
        elif kind == S_IFLNK:
            entries.append(Entry(path, kind, linkname=host.readlink(host_path), **common))
        else:
            entries.append(Entry(path, kind, rdev=st.st_rdev, **common))
    return entries, opaque_dirs, ctimes


def long_whiteout(upper, host_path: str) -> str:
    fd = upper.host.open_file(host_path, os.O_RDONLY)
    try:
        content = os.read(fd, 1024)
    finally:
        os.close(fd)
    try:
        return upperformat.long_whiteout_target(split(host_path)[1], content)
    except ValueError as error:
        raise InvalidLayerError(str(error), path=upper.directory,
                                entry=host_path[len("/diff"):]) from None


def apply_sidecar(upper) -> None:
    try:
        _apply_sidecar(upper)
    except (TypeError, ValueError, AttributeError) as error:
        raise upper.sidecar.corrupt(f"bad record: {error}") from None


def _apply_sidecar(upper) -> None:
    nodes = upper.tree.nodes
    stale = []
    for path, record in upper.sidecar.records.items():
        node = nodes.get(path)
        if node is None or (record.get("metacopy") and node.origin >= ORIGIN_MERGED
                            and path != "/"):
            stale.append(path)     # the entry went away or was copied up since
            continue
        node = upper.tree.own(path, node)
        if record.get("metacopy"):
            node.origin = ORIGIN_METACOPY
        if "mode" in record:
            node.mode = (node.mode & S_IFMT) | record["mode"]
        for field in ("uid", "gid", "atime_ns", "mtime_ns", "ctime_ns", "rdev"):
            if field in record:
                setattr(node, field, record[field])
        if "rdev" in record and "kind" in record:
            node.mode = record["kind"] | (node.mode & 0o7777)
        if "xattrs" in record:
            node.xattrs = {k: bytes.fromhex(v) for k, v in record["xattrs"].items()} or None
        if record.get("host_xattrs_missing"):
            node.xattrs = {**(node.xattrs or {}), **{
                k: bytes.fromhex(v) for k, v in record["host_xattrs_missing"].items()}}
        node.stat_cache = None
    if stale and upper.writable:
        for path in stale:
            upper.sidecar.forget(path, subtree=False)


def remove_redundant_whiteouts(upper, entries: list[Entry]) -> None:
    """Bring what a crash can leave back to the usual form, view unchanged:
    a whiteout beside its own entry, or inside a directory that nothing
    lower shows through, hides nothing more; a whiteout beside a directory
    becomes that directory's opaque marker.  Through the store's own marker
    operations, like every change."""
    present = {entry.path for entry in entries}
    for entry in entries:
        parent, name = split(entry.path)
        kind, target = whiteout.classify(name)
        if kind != whiteout.WHITEOUT:
            continue
        victim = join(parent, target)
        node = upper.tree.nodes.get(victim)
        parent_node = upper.tree.nodes.get(parent)
        if victim in present and node is not None and node.children is not None:
            upper._opaque(upper_diff(victim))
        elif not (victim in present or (parent_node is not None
                                        and parent_node.origin == ORIGIN_NEW)):
            continue
        log.debug("repair: the whiteout of %s is redundant", victim)
        upper._unwhiteout(victim)


def upper_diff(path: str) -> str:
    return "/diff" if path == "/" else "/diff" + path

