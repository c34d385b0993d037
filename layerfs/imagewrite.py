"""Writing images: OCI layouts, OCI archives and docker-save archives.

The three writers share one plan (:func:`_plan`): hash the layer blobs, build
the config and the manifest.  They differ only in where the bytes go.

- Deterministic: the same inputs give the same bytes (JSON with sorted keys,
  a fixed ``created`` time unless the config gives one, tar members with
  mtime 0 and owner 0).
- Atomic: every file is written to a temporary name beside its final one and
  renamed into place, so a reader never sees half a blob, and ``index.json``
  is written last, so it never names a blob that is not there yet.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import secrets
import tarfile
from typing import Any, BinaryIO, Iterator, Sequence, Union

import attrs

from .compression import BlobStream
from .errors import ImageError, UnsupportedImageError
from .image import (DOCKER_CONFIG, DOCKER_LAYER_TYPES, DOCKER_MANIFEST, OCI_CONFIG,
                    OCI_INDEX, OCI_LAYER_TYPES, OCI_MANIFEST, REF_NAME, Image, blob_name,
                    canonical_json, descriptor, digest_bytes, host_platform)
from .blobsource import FileRange, is_blob
from .layer import BlobSource, IndexCache

EPOCH = "1970-01-01T00:00:00Z"
CREATED_BY = "layerfs"
LAYOUT_VERSION = {"imageLayoutVersion": "1.0.0"}

_MEDIA_TYPES = {
    "oci": (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER_TYPES),
    "docker": (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER_TYPES),
}

LayerBlob = Union[str, os.PathLike, BlobSource]


@attrs.frozen
class _Blob:
    """A layer blob to write, and what hashing it told."""

    source: str | BlobSource
    digest: str
    diff_id: str
    size: int
    uncompressed_size: int
    compression: str


@attrs.frozen
class _Plan:
    layers: tuple[_Blob, ...]
    config: bytes
    config_digest: str
    manifest: bytes
    manifest_digest: str
    manifest_descriptor: dict   # for an index, without annotations


def write_oci_layout(dest_dir: str | os.PathLike, layer_blobs: Sequence[LayerBlob], *,
                     config: dict | None = None, tag: str | None = None,
                     base: Image | None = None, history: Sequence[dict] | None = None,
                     media_types: str = "oci",
                     layer_annotations: Sequence[dict | None] | None = None) -> str:
    """Write an image to the OCI layout *dest_dir* and return its manifest digest.

    The image is *base*'s layers (if given) then *layer_blobs* (layer tar
    files, compressed or not, bottom first).  *config* is the starting config
    (default *base*'s, else empty): ``rootfs`` is always recomputed,
    ``architecture``/``os`` default to the host's, ``created`` to the epoch,
    and one *history* entry per new layer is appended (default
    ``{"created_by": "layerfs"}``).  *media_types* is ``"oci"`` or
    ``"docker"``.  An existing layout is added to: its blobs stay, and its
    index keeps every entry but the one tagged *tag*.

    *layer_annotations* (one dict or None per new layer) become the
    annotations of their descriptors (an eStargz or zstd:chunked layer's
    TOC digest and position); *base*'s layers keep the annotations its
    manifest gave them.

    Layer blobs are hardlinked into the layout where possible (else copied):
    do not modify the given files afterwards.
    """
    plan = _plan(layer_blobs, config, base, history, media_types, layer_annotations)
    dest = os.fspath(dest_dir)
    os.makedirs(os.path.join(dest, "blobs", "sha256"), exist_ok=True)
    for blob in plan.layers:
        _put_layer_blob(dest, blob)
    for data, digest in ((plan.config, plan.config_digest),
                         (plan.manifest, plan.manifest_digest)):
        final = os.path.join(dest, blob_name(digest))
        if not os.path.exists(final):
            _write_atomic(final, data)
    if not os.path.exists(os.path.join(dest, "oci-layout")):
        _write_atomic(os.path.join(dest, "oci-layout"), canonical_json(LAYOUT_VERSION))
    index_path = os.path.join(dest, "index.json")
    _write_atomic(index_path, canonical_json(_merged_index(index_path, plan, tag)))
    return plan.manifest_digest


def copy_to_layout(dest_dir: str | os.PathLike, manifest_descriptor: dict,
                   blobs: dict, tag: str | None = None) -> str:
    """Add an existing image to the OCI layout *dest_dir* byte for byte:
    *blobs* maps every digest the image needs (manifest, config, layers) to
    a file holding exactly that blob (hardlinked where possible, else
    copied), and *manifest_descriptor* becomes its index entry, tagged
    *tag*.  The digests stay what they were (``layerfs copy``).  An entry
    tagged *tag* is replaced.  Without a tag the layout must hold no other
    image: later commands could not tell which is meant.  Returns the
    manifest digest."""
    dest = os.fspath(dest_dir)
    index_path = os.path.join(dest, "index.json")
    index = _read_index(index_path) if os.path.exists(index_path) else {
        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    digest = manifest_descriptor["digest"]
    kept = [m for m in index["manifests"]
            if (m.get("annotations") or {}).get(REF_NAME) != tag or tag is None]
    if tag is None and any(m.get("digest") != digest for m in kept):
        raise UnsupportedImageError(
            "the layout already holds other images: give this one a tag "
            "(oci:DIR:TAG) so that later commands can tell which is meant", path=dest)
    os.makedirs(os.path.join(dest, "blobs", "sha256"), exist_ok=True)
    for blob_digest, path in blobs.items():
        final = os.path.join(dest, blob_name(blob_digest))
        if os.path.exists(final):
            continue
        temp = _temp_name(final)
        try:
            os.link(path, temp)
            os.replace(temp, final)
        except OSError:
            with open(path, "rb") as src, _atomic_output(final) as out:
                _copy(src, out, os.fstat(src.fileno()).st_size)
    if not os.path.exists(os.path.join(dest, "oci-layout")):
        _write_atomic(os.path.join(dest, "oci-layout"), canonical_json(LAYOUT_VERSION))
    entry = dict(manifest_descriptor)
    if tag is not None:
        entry["annotations"] = {REF_NAME: tag}
    index["manifests"] = [m for m in kept if m.get("digest") != digest or tag is not None] + [
        entry]
    _write_atomic(index_path, canonical_json(index))
    return digest


def write_oci_archive(dest_tar: str | os.PathLike, layer_blobs: Sequence[LayerBlob], *,
                      config: dict | None = None, tag: str | None = None,
                      base: Image | None = None, history: Sequence[dict] | None = None,
                      media_types: str = "oci") -> str:
    """The same image as :func:`write_oci_layout`, as one new tar file
    *dest_tar* (replaced if it exists).  Returns the manifest digest."""
    plan = _plan(layer_blobs, config, base, history, media_types)
    index = _merged_index(None, plan, tag)
    with _atomic_tar(os.fspath(dest_tar)) as tar:
        _add_dir(tar, "blobs")
        _add_dir(tar, "blobs/sha256")
        _add_bytes(tar, "oci-layout", canonical_json(LAYOUT_VERSION))
        for blob in _unique(plan.layers, "digest"):
            with _open_source(blob.source) as f:
                _add_file(tar, blob_name(blob.digest), f, blob.size)
        _add_bytes(tar, blob_name(plan.config_digest), plan.config)
        _add_bytes(tar, blob_name(plan.manifest_digest), plan.manifest)
        _add_bytes(tar, "index.json", canonical_json(index))
    return plan.manifest_digest


def write_docker_archive(dest_tar: str | os.PathLike, layer_blobs: Sequence[LayerBlob],
                         repo_tags: Sequence[str], config: dict | None = None) -> str:
    """Write an image in the ``docker save`` format and return its config
    digest (docker's image ID): ``manifest.json``, ``repositories``,
    ``<config hex>.json`` and one uncompressed ``<diff_id hex>/layer.tar``
    per distinct layer."""
    plan = _plan(layer_blobs, config, None, None, "docker")
    layer_names = [f"{b.diff_id.partition(':')[2]}/layer.tar" for b in plan.layers]
    config_name = f"{plan.config_digest.partition(':')[2]}.json"
    manifest = [{"Config": config_name, "RepoTags": list(repo_tags), "Layers": layer_names}]
    with _atomic_tar(os.fspath(dest_tar)) as tar:
        for blob in _unique(plan.layers, "diff_id"):
            name = f"{blob.diff_id.partition(':')[2]}/layer.tar"
            _add_dir(tar, os.path.dirname(name))
            with _uncompressed(blob) as stream:
                _add_file(tar, name, stream, blob.uncompressed_size)
        _add_bytes(tar, config_name, plan.config)
        _add_bytes(tar, "manifest.json", canonical_json(manifest))
        _add_bytes(tar, "repositories", canonical_json(_repositories(repo_tags, layer_names)))
    return plan.config_digest


# -- the plan -------------------------------------------------------------------

def _plan(layer_blobs: Sequence[LayerBlob], config: dict | None, base: Image | None,
          history: Sequence[dict] | None, media_types: str,
          layer_annotations: Sequence[dict | None] | None = None) -> _Plan:
    if media_types not in _MEDIA_TYPES:
        raise ValueError(f"media_types must be one of {sorted(_MEDIA_TYPES)}, not {media_types!r}")
    if history is not None and len(history) != len(layer_blobs):
        raise ValueError(f"{len(history)} history entries for {len(layer_blobs)} layers")
    manifest_type, config_type, layer_types = _MEDIA_TYPES[media_types]
    base_layers = [] if base is None else [
        _Blob(src, layer.digest, layer.diff_id, layer.size, layer.uncompressed_size,
              layer.compression)
        for src, layer in zip(base.layer_sources, base.layers)]
    layers = base_layers + [_hash_blob(_as_source(b)) for b in layer_blobs]
    cfg = _config(config if config is not None else (base.config if base else {}),
                  layers, history, len(layer_blobs), bool(base_layers))
    config_bytes = canonical_json(cfg)
    manifest = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": descriptor(config_type, digest_bytes(config_bytes), len(config_bytes)),
        "layers": [_layer_descriptor(layer_types[b.compression], b, annotations)
                   for b, annotations in zip(layers, _annotations(
                       base, len(base_layers), layer_annotations, len(layer_blobs)))],
    }
    manifest_bytes = canonical_json(manifest)
    platform = {"architecture": cfg["architecture"], "os": cfg["os"]}
    if cfg.get("variant"):
        platform["variant"] = cfg["variant"]
    manifest_digest = digest_bytes(manifest_bytes)
    return _Plan(tuple(layers), config_bytes, manifest["config"]["digest"], manifest_bytes,
                 manifest_digest, descriptor(manifest_type, manifest_digest,
                                             len(manifest_bytes), platform=platform))


def _layer_descriptor(media_type: str, blob: _Blob, annotations: dict | None) -> dict:
    if annotations:
        return descriptor(media_type, blob.digest, blob.size, annotations=dict(annotations))
    return descriptor(media_type, blob.digest, blob.size)


def _annotations(base: Image | None, base_count: int,
                 new: Sequence[dict | None] | None, new_count: int) -> list:
    """One annotations dict (or None) per layer, base first."""
    if new is not None and len(new) != new_count:
        raise ValueError(f"{len(new)} layer annotations for {new_count} layers")
    kept = []
    if base is not None and base_count:
        descriptors = (base.manifest or {}).get("layers") if isinstance(
            base.manifest, dict) else None
        if not isinstance(descriptors, list) or len(descriptors) != base_count:
            descriptors = [None] * base_count
        kept = [d.get("annotations") if isinstance(d, dict) else None for d in descriptors]
    return kept + list(new if new is not None else [None] * new_count)


def _config(start: dict, layers: list[_Blob], history: Sequence[dict] | None,
            new_count: int, has_base_layers: bool) -> dict:
    """The config to write: *start* with the rootfs of *layers*, defaults
    for the platform and time, and history entries for the new layers.  If
    the base layers have no history, none is invented for the new ones
    unless given, so that history never covers only part of the layers."""
    cfg = copy.deepcopy(start)
    os_, _, rest = host_platform().partition("/")
    arch, _, variant = rest.partition("/")
    if "architecture" not in cfg:
        cfg["architecture"] = arch
        if variant:
            cfg["variant"] = variant
    cfg.setdefault("os", os_)
    cfg.setdefault("created", EPOCH)
    cfg["rootfs"] = {"type": "layers", "diff_ids": [b.diff_id for b in layers]}
    existing = list(cfg.get("history") or [])
    if history is not None or existing or not has_base_layers:
        new = history if history is not None else [
            {"created": cfg["created"], "created_by": CREATED_BY}] * new_count
        cfg["history"] = existing + [dict(h) for h in new]
    return cfg


def _as_source(blob: LayerBlob) -> Any:
    return blob if isinstance(blob, BlobSource) or is_blob(blob) else os.fspath(blob)


def _hash_blob(source: Any) -> _Blob:
    """Digest, diff_id and compression of a blob, in one pass that also
    checks its compressed stream."""
    with _reader(source) as blob:
        stream = BlobStream(blob)
        stream.drain()
    return _Blob(source, f"sha256:{stream.digest}", f"sha256:{stream.diff_id}", blob.size,
                 stream.uncompressed_size, stream.compression)


@contextlib.contextmanager
def _reader(source: Any) -> Iterator[Any]:
    """*source* (a path, a :class:`BlobSource` or any blob source, see
    :mod:`layerfs.blobsource`) as a blob source; one opened here is closed
    after the block."""
    if is_blob(source):
        yield source
        return
    if isinstance(source, BlobSource):
        blob = FileRange(source.path, source.offset, source.size)
    else:
        blob = FileRange(source)
    with blob:
        yield blob


class _SequentialReader:
    """A blob source read front to back as a file (``read(n)``)."""

    def __init__(self, blob: Any):
        self._blob = blob
        self._position = 0
        self.name = blob.label

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self._blob.size - self._position
        data = self._blob.read_at(self._position, n)
        self._position += len(data)
        return data


# -- writing files ----------------------------------------------------------------

def _temp_name(final: str) -> str:
    head, name = os.path.split(final)
    return os.path.join(head, f".{name}.{secrets.token_hex(6)}.tmp")


@contextlib.contextmanager
def _atomic_output(final: str) -> Iterator[BinaryIO]:
    """A new file that becomes *final* when the block ends without error."""
    temp = _temp_name(final)
    try:
        with open(temp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def _write_atomic(final: str, data: bytes) -> None:
    with _atomic_output(final) as f:
        f.write(data)


def _put_layer_blob(dest: str, blob: _Blob) -> None:
    """Place *blob* in the layout: a hardlink to a whole file where the
    filesystem allows, else a copy.  A blob already there is kept (its name
    is its digest)."""
    final = os.path.join(dest, blob_name(blob.digest))
    if os.path.exists(final):
        return
    if isinstance(blob.source, str):
        temp = _temp_name(final)
        try:
            os.link(blob.source, temp)
        except OSError:
            pass   # another filesystem, or links not allowed: copy below
        else:
            os.replace(temp, final)
            _refresh_memos(blob, [blob.source, final])
            return
    with _open_source(blob.source) as src, _atomic_output(final) as out:
        _copy(src, out, blob.size)


def _refresh_memos(blob: _Blob, paths: list[str]) -> None:
    """A new link changed the blob's ctime, which the index cache's stat
    memo covers: remember both names again (the digest is known: the blob
    was hashed or verified to write this layout), so that opening either
    does not hash it again.  A cache that cannot be written is no error."""
    cache = IndexCache()
    for path in paths:
        with contextlib.suppress(OSError):
            cache.refresh_memo(path, blob.digest, blob.diff_id)


@contextlib.contextmanager
def _open_source(source: Any) -> Iterator[Any]:
    """The blob as a file read from its first byte."""
    with _reader(source) as blob:
        yield _SequentialReader(blob)


@contextlib.contextmanager
def _uncompressed(blob: _Blob) -> Iterator[Any]:
    """The uncompressed tar of *blob* as a readable stream."""
    with _reader(blob.source) as source:
        if blob.compression == "none":
            yield _SequentialReader(source)
        else:
            yield BlobStream(source)


def _copy(src: BinaryIO, dst: BinaryIO, size: int) -> None:
    while size > 0:
        chunk = src.read(min(size, 1 << 20))
        if not chunk:
            raise ImageError(f"blob ended {size} bytes early", path=src.name)
        dst.write(chunk)
        size -= len(chunk)


@contextlib.contextmanager
def _atomic_tar(final: str) -> Iterator[tarfile.TarFile]:
    with _atomic_output(final) as f, \
            tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        yield tar


def _tar_info(name: str, kind: bytes, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.mtime = 0
    return info


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    tar.addfile(_tar_info(name, tarfile.DIRTYPE))


def _add_file(tar: tarfile.TarFile, name: str, f: Any, size: int) -> None:
    tar.addfile(_tar_info(name, tarfile.REGTYPE, size), f)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    _add_file(tar, name, io.BytesIO(data), len(data))


# -- index and docker metadata ----------------------------------------------------

def _merged_index(path: str | None, plan: _Plan, tag: str | None) -> dict:
    """The index at *path* (or a new one) with the plan's manifest added: it
    replaces the entry tagged *tag*, or an untagged entry of the same
    manifest when there is no tag."""
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    if path is not None and os.path.exists(path):
        index = _read_index(path)
    desc = dict(plan.manifest_descriptor)
    if tag is not None:
        desc["annotations"] = {REF_NAME: tag}

    def replaced(entry: dict) -> bool:
        name = (entry.get("annotations") or {}).get(REF_NAME)
        return name == tag if tag is not None else (
            name is None and entry.get("digest") == desc["digest"])

    index["manifests"] = [m for m in index["manifests"] if not replaced(m)] + [desc]
    return index


def _read_index(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            index = json.load(f)
    except ValueError as e:
        raise UnsupportedImageError(f"not valid JSON: {e}", path=path) from None
    if not isinstance(index, dict) or not isinstance(index.get("manifests"), list) or not all(
            isinstance(m, dict) for m in index["manifests"]):
        raise UnsupportedImageError("not an image index (no manifests list)", path=path)
    return index


def _repositories(repo_tags: Sequence[str], layer_names: list[str]) -> dict:
    """docker's ``repositories`` file: {repository: {tag: top layer id}}."""
    top = layer_names[-1].partition("/")[0] if layer_names else ""
    repositories: dict[str, dict[str, str]] = {}
    for ref in repo_tags:
        repo, sep, tag = ref.rpartition(":")
        if not sep or "/" in tag:
            raise ValueError(f"repo tag {ref!r} is not name:tag")
        repositories.setdefault(repo, {})[tag] = top
    return repositories


def _unique(blobs: Sequence[_Blob], key: str) -> list[_Blob]:
    seen: dict[str, _Blob] = {}
    for blob in blobs:
        seen.setdefault(getattr(blob, key), blob)
    return list(seen.values())
