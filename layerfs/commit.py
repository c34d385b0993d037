"""Committing the upper layer: a new OCI layer, and an image that ends with it.

The layer holds every inode the upper layer changed (``origin`` other than
lower), each with all its names (hardlinks kept), and the whiteout and opaque
markers of ``diff/``; entries are sorted by path, so the same upper gives the
same bytes.  A metacopy file (only its metadata changed) is written whole,
its data read from the lower layer.  The image is written by
:func:`layerfs.imagewrite.write_oci_layout`, sharing the base image's blobs.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
from typing import Optional

import attrs

from .errors import ReadOnlyError, UnsupportedImageError, UpperError
from .image import REF_NAME
from .imagewrite import write_oci_layout
from . import whiteout
from .paths import join, order_key, split
from .tarwrite import LayerTarWriter, write_tree
from .union import ORIGIN_LOWER


@attrs.frozen
class CommitResult:
    """What :func:`commit` wrote."""

    dest: str
    manifest_digest: str
    layer_path: str      # the new layer's blob inside *dest*


def changeset(fs) -> list:
    """The upper layer as sorted ``(path, node)`` pairs, ``node`` None for a
    marker (a long name's whiteout as ``.wh.NAME``, which a tar can hold).
    Entries and markers at or below a volume's PATH are left out
    (:meth:`FileSystem.in_volume`), as :func:`layerfs.writable.diff` leaves
    them out."""
    items = [(path, node) for path, node in fs.tree.nodes.items()
             if node.origin != ORIGIN_LOWER and not fs.in_volume(path)]
    items.extend((path, None) for path in fs.upper.markers()
                 if not fs.in_volume(marked_path(path)))
    items.sort(key=lambda item: order_key(item[0]))
    return items


def marked_path(marker: str) -> str:
    """The view path a marker names: ``P/.wh.NAME`` names ``P/NAME``, the
    opaque marker ``P/.wh..wh..opq`` names ``P``."""
    parent, name = split(marker)
    kind, target = whiteout.classify(name)
    return parent if kind == whiteout.OPAQUE else join(parent, target)


def write_layer(fs, stream, compression: Optional[str] = "gzip", progress=None,
                clamp_mtime: Optional[int] = None) -> dict:
    """Write the upper layer of *fs* as a layer tar to *stream*; mtimes later
    than *clamp_mtime* (seconds) are written as it.  Returns the annotations
    the layer's descriptor must carry (an eStargz or zstd:chunked layer's
    TOC digest or position; none for the other compressions)."""
    items = changeset(fs)
    total = sum(node.size for _, node in items if node is not None and node.children is None)
    writer = LayerTarWriter(stream, compression, clamp_mtime=clamp_mtime)
    write_tree(writer, items, fs.read_node, progress, total)
    writer.close()
    return writer.annotations


def commit(fs, dest, *, compression: Optional[str] = "gzip", tag: Optional[str] = None,
           message: Optional[str] = None, progress=None) -> CommitResult:
    """Write the upper layer of *fs* as a new layer on top of its image,
    into the OCI layout *dest* (created, or added to), tagged *tag*.

    *compression*: ``"gzip"``, ``"zstd"``, None (a plain tar), or
    ``"estargz"`` / ``"zstd:chunked"`` (a layer with a table of contents,
    readable lazily; see docs/toc-layers.md).

    With ``$SOURCE_DATE_EPOCH`` set, the config's ``created`` is that date and
    later mtimes in the layer are written as it (``tar --clamp-mtime``), so
    the same changes commit to the same digest whenever they were made."""
    if fs.upper is None:
        raise ReadOnlyError("<commit: this filesystem has no upper layer>")
    if not fs.upper.writable:
        # Policy: commit reads a consistent upper, so it holds the writer's
        # lock; an upper opened read-only (perhaps beside a mount) is not
        # committed (docs/upper-format.md).
        raise UpperError(errno.EBUSY, f"{fs.upper.directory}: opened read-only: commit "
                                      f"needs the upper opened for writing (unmounted)")
    dest = os.fspath(dest)
    if tag is None:
        refuse_untagged_beside_others(dest)
    os.makedirs(dest, exist_ok=True)
    temporary = os.path.join(dest, f".layerfs-commit-{os.getpid()}.tmp")
    epoch = source_date_epoch()
    created = creation_time(epoch)
    history = {"created": created, "created_by": "layerfs commit"}
    if message:
        history["comment"] = message
    try:
        with fs.upper.lock, open(temporary, "wb") as stream:
            annotations = write_layer(fs, stream, compression, progress, clamp_mtime=epoch)
            stream.flush()
            os.fsync(stream.fileno())
        digest = write_oci_layout(dest, [temporary], base=fs.image, tag=tag,
                                  config=dict(fs.image.config, created=created),
                                  history=[history],
                                  layer_annotations=[annotations or None])
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return CommitResult(dest, digest, layer_blob_path(dest, digest))


def source_date_epoch() -> Optional[int]:
    """``$SOURCE_DATE_EPOCH`` in seconds (reproducible builds: the same upper
    then commits to the same bytes), or None where it is unset or empty."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if not epoch:
        return None
    try:
        seconds = int(epoch)
        datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)   # in range
    except (ValueError, OverflowError, OSError):
        raise OSError(errno.EINVAL, f"SOURCE_DATE_EPOCH={epoch!r} is not a number of "
                      "seconds since 1970") from None
    return seconds


def creation_time(epoch: Optional[int]) -> str:
    """*epoch* (seconds), or now where it is None, as an RFC 3339 UTC date."""
    moment = (datetime.datetime.now(datetime.timezone.utc) if epoch is None
              else datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc))
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def refuse_untagged_beside_others(dest: str) -> None:
    """An untagged image added to a layout that holds others could not be
    told apart from them later: refuse, before anything is written."""
    try:
        with open(os.path.join(dest, "index.json"), "rb") as stream:
            entries = json.load(stream).get("manifests") or []
    except (FileNotFoundError, NotADirectoryError):
        return
    except (ValueError, AttributeError):
        raise UnsupportedImageError("not an image index", path=os.path.join(
            dest, "index.json")) from None
    if entries:
        names = sorted({(e.get("annotations") or {}).get(REF_NAME) or "(untagged)"
                        for e in entries if isinstance(e, dict)})
        raise UnsupportedImageError(
            f"the layout already holds {len(entries)} image(s) ({', '.join(names)}): give "
            "the new one a tag (--tag, tag=) so that later commands can tell which is meant",
            path=dest)


def layer_blob_path(dest: str, manifest_digest: str) -> str:
    """The path of the top layer's blob of the manifest *manifest_digest*."""
    algorithm, _, hex_digest = manifest_digest.partition(":")
    with open(os.path.join(dest, "blobs", algorithm, hex_digest), "rb") as stream:
        manifest = json.load(stream)
    top = manifest["layers"][-1]["digest"]
    algorithm, _, hex_digest = top.partition(":")
    return os.path.join(dest, "blobs", algorithm, hex_digest)
