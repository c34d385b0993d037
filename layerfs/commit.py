"""Committing the upper layer: a new OCI layer, and an image that ends with it.

The layer holds every inode the upper layer changed (``origin`` other than
lower), each with all its names (hardlinks kept), and the whiteout and opaque
markers of ``diff/``; entries are sorted by path components (each
directory's subtree right after it, see :func:`~layerfs.tarwrite.path_order`),
so the same upper gives the same bytes.  A metacopy file (only its metadata changed) is written whole,
its data read from the lower layer.  The image is written by
:func:`layerfs.imagewrite.write_oci_layout`, sharing the base image's blobs.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import time
from typing import Optional

import attrs

from . import whiteout
from .errors import ReadOnlyError
from .imagewrite import write_oci_layout
from .tarwrite import LayerTarWriter, path_order, write_tree
from .union import ORIGIN_LOWER
from .upper import diff_path


@attrs.frozen
class CommitResult:
    """What :func:`commit` wrote."""

    dest: str
    manifest_digest: str
    layer_path: str      # the new layer's blob inside *dest*


def changeset(fs) -> list:
    """The upper layer as sorted ``(path, node)`` pairs, ``node`` None for a
    marker."""
    upper = fs.upper
    items = [(path, node) for path, node in fs.tree.nodes.items()
             if node.origin != ORIGIN_LOWER]
    prefix = len(diff_path("/"))
    for host_path, _ in upper.host.walk(diff_path("/")):
        if whiteout.is_marker_name(os.path.basename(host_path)):
            items.append((host_path[prefix:], None))
    items.sort(key=lambda item: path_order(item[0]))
    return items


def write_layer(fs, stream, compression: Optional[str] = "gzip", progress=None,
                clamp_mtime: Optional[int] = None) -> None:
    """Write the upper layer of *fs* as a layer tar to *stream*, mtimes later
    than *clamp_mtime* (seconds) written as it."""
    items = changeset(fs)
    total = sum(node.size for _, node in items if node is not None and node.children is None)
    writer = LayerTarWriter(stream, compression, clamp_mtime=clamp_mtime)
    write_tree(writer, items, fs.read_node, progress, total)
    writer.close()


def commit(fs, dest, *, compression: Optional[str] = "gzip", tag: Optional[str] = None,
           message: Optional[str] = None, progress=None) -> CommitResult:
    """Write the upper layer of *fs* as a new layer on top of its image,
    into the OCI layout *dest* (created, or added to), tagged *tag*.

    The layer is gzip-compressed unless *compression* says ``"zstd"`` or
    None (every OCI reader takes gzip; some refuse zstd).  The config gets
    ``created`` now, or ``$SOURCE_DATE_EPOCH`` when set, and a history entry
    with that date, ``created_by: layerfs commit`` and *message*.  With
    ``$SOURCE_DATE_EPOCH`` set, mtimes later than it are written as it, so
    the same changes made at different times commit to the same digest."""
    if fs.upper is None:
        raise ReadOnlyError("<commit: this filesystem has no upper layer>")
    dest = os.fspath(dest)
    os.makedirs(dest, exist_ok=True)
    temporary = os.path.join(dest, f".layerfs-commit-{os.getpid()}.tmp")
    epoch = source_date_epoch()
    created = _rfc3339(epoch if epoch is not None else time.time())
    history = {"created": created, "created_by": "layerfs commit"}
    if message:
        history["comment"] = message
    try:
        with fs.upper.lock, open(temporary, "wb") as stream:
            write_layer(fs, stream, compression, progress, clamp_mtime=epoch)
            stream.flush()
            os.fsync(stream.fileno())
        config = dict(fs.image.config or {}) if fs.image is not None else {}
        config["created"] = created
        digest = write_oci_layout(dest, [temporary], base=fs.image, tag=tag,
                                  history=[history], config=config)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return CommitResult(dest, digest, layer_blob_path(dest, digest))


def source_date_epoch() -> Optional[int]:
    """``$SOURCE_DATE_EPOCH`` as seconds, or None when unset
    (https://reproducible-builds.org/specs/source-date-epoch/)."""
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None:
        return None
    if not value.isdigit():
        raise OSError(errno.EINVAL, f"SOURCE_DATE_EPOCH={value!r} is not a number of "
                      "seconds since 1970 (unset it, or give e.g. $(date +%s))")
    return int(value)


def _rfc3339(seconds: float) -> str:
    when = datetime.datetime.fromtimestamp(int(seconds), datetime.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def layer_blob_path(dest: str, manifest_digest: str) -> str:
    """The path of the top layer's blob of the manifest *manifest_digest*."""
    algorithm, _, hex_digest = manifest_digest.partition(":")
    with open(os.path.join(dest, "blobs", algorithm, hex_digest), "rb") as stream:
        manifest = json.load(stream)
    top = manifest["layers"][-1]["digest"]
    algorithm, _, hex_digest = top.partition(":")
    return os.path.join(dest, "blobs", algorithm, hex_digest)
