"""Opening an image: OCI layouts, OCI and docker-save archives, layer lists.

Everything that decides *which* blobs make up an image lives here: finding the
manifest (by tag and platform, through nested indexes), checking every blob
against its digest and every layer against the config's ``rootfs.diff_ids``.
Reading what is inside a layer is :mod:`layerfs.layer`'s business.

Rules this module keeps:

- The kind of source is decided from its content, never from its file name.
- Every blob read is verified: index, manifest and config are small and are
  hashed in memory; layers are hashed by :func:`open_layer` (``digest=`` and
  ``diff_id=``).  A blob path is built only from a validated digest, so a
  digest such as ``sha256:../../x`` can never leave the layout.
- An archive is never extracted: its blobs are read in place, as byte ranges
  (:class:`~layerfs.layer.BlobSource`) of the outer tar (:mod:`layerfs.stores`).  A compressed archive (``docker
  save | gzip``) is indexed once like a layer, which leaves its uncompressed
  copy in the cache, and its blobs are byte ranges of that copy; a
  compressed file whose root holds no ``index.json`` + ``oci-layout`` nor a
  docker ``manifest.json`` is one layer.
- A registry (``docker://``) is one more blob store (:mod:`layerfs.registry`):
  its blobs are fetched, verified, into the cache and read from there.
- A ``docker save`` archive written by Docker 25 or later also holds an OCI
  layout (``index.json`` beside ``manifest.json``).  The OCI layout is
  preferred there: it names a digest for every blob, so everything can be
  verified, while ``manifest.json`` gives none for the layers.  Such an
  archive reports the kind ``"oci-archive"``.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import json
import os
import platform as _platform
import re
import shutil
import tempfile
import threading
from typing import Any, Callable, Sequence

import attrs

from .compression import detect_compression
from .errors import DigestMismatchError, ImageError, UnsupportedImageError
from .cache import cache_root
from .layer import Layer, open_layer
from .stores import MAX_JSON_SIZE, CompressedTarStore, DirStore, TarStore
from .tocopen import open_toc_layer
from .paths import BadMemberName, normalize_member_name
from .reference import (DOCKER, DOCKER_ARCHIVE, LAYERS, OCI, OCI_ARCHIVE, PATH,
                        as_reference)

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})

# Layer media types by compression, for manifests layerfs writes itself.
# Readers sniff the compression, so unknown layer media types are accepted.
OCI_LAYER_TYPES = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
DOCKER_LAYER_TYPES = {
    "none": "application/vnd.docker.image.rootfs.diff.tar",
    "gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",  # what Docker writes
}

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
# BuildKit puts attestations (SBOMs...) in the index as manifests of the
# platform "unknown/unknown"; they are not images.
REFERENCE_TYPE = "vnd.docker.reference.type"

MAX_INDEX_DEPTH = 8        # nested image indexes followed at most this deep

_DIGEST_LENGTHS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[0-9a-f]+\Z")
_GOARCH = {
    "x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
    "armv7l": "arm/v7", "armv7": "arm/v7", "armv6l": "arm/v6", "armv8l": "arm/v7",
    "i386": "386", "i486": "386", "i586": "386", "i686": "386",
    "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64",
}
# Variants implied when a platform names none (as containerd normalises them).
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


# -- digests and small helpers shared with imagewrite -------------------------

def parse_digest(digest: Any, *, where: str | None = None) -> tuple[str, str]:
    """``"sha256:<hex>"`` -> ``("sha256", "<hex>")``, refusing anything else.

    Only algorithms layerfs can verify are accepted, with exactly the number
    of lowercase hex digits they produce: this is what keeps blob paths inside
    the layout.
    """
    if not isinstance(digest, str):
        raise UnsupportedImageError(f"digest {digest!r} is not a string", path=where)
    algorithm, sep, hex_ = digest.partition(":")
    if not sep or algorithm not in _DIGEST_LENGTHS:
        raise UnsupportedImageError(
            f"digest {digest!r}: algorithm must be one of "
            f"{', '.join(sorted(_DIGEST_LENGTHS))}", path=where)
    if len(hex_) != _DIGEST_LENGTHS[algorithm] or not _HEX.match(hex_):
        raise UnsupportedImageError(
            f"digest {digest!r}: expected {_DIGEST_LENGTHS[algorithm]} lowercase "
            "hex digits", path=where)
    return algorithm, hex_


def digest_bytes(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def blob_name(digest: str, *, where: str | None = None) -> str:
    """The path of a blob inside a layout, relative to its root."""
    algorithm, hex_ = parse_digest(digest, where=where)
    return f"blobs/{algorithm}/{hex_}"


def canonical_json(value: Any) -> bytes:
    """The bytes layerfs writes for a JSON document: sorted keys, no spaces,
    so the same content always has the same digest."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def descriptor(media_type: str, digest: str, size: int, **extra: Any) -> dict:
    return {"mediaType": media_type, "digest": digest, "size": size, **extra}


def chain_id(diff_ids: Sequence[str]) -> str | None:
    """The ChainID of a stack of layers (OCI config spec): ChainID(L0) is
    DiffID(L0); ChainID(L0..Ln) is sha256 of ChainID(L0..Ln-1) + " " +
    DiffID(Ln).  ``None`` for an empty stack."""
    chain = None
    for diff_id in diff_ids:
        chain = diff_id if chain is None else digest_bytes(f"{chain} {diff_id}".encode())
    return chain


# -- platforms ----------------------------------------------------------------

def host_platform() -> str:
    """The platform of this machine in OCI words, e.g. ``"linux/amd64"``."""
    machine = _platform.machine().lower()
    return "linux/" + _GOARCH.get(machine, machine)


def _split_platform(text: str) -> tuple[str, str, str]:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise UnsupportedImageError(f"platform {text!r}: expected os/arch[/variant]")
    os_, arch = parts[0], parts[1]
    variant = parts[2] if len(parts) == 3 else ""
    return os_, arch, variant


def _platform_string(os_: Any, arch: Any, variant: Any = None) -> str | None:
    if not isinstance(os_, str) or not isinstance(arch, str) or not os_ or not arch:
        return None
    return f"{os_}/{arch}/{variant}" if isinstance(variant, str) and variant else f"{os_}/{arch}"


def _platform_matches(wanted: str, offered: str | None) -> bool:
    """Does *offered* satisfy *wanted*?  A wanted platform without a variant
    accepts any variant; otherwise variants compare after filling in the
    implied default (``arm64`` is ``arm64/v8``)."""
    if offered is None:
        return False
    w_os, w_arch, w_variant = _split_platform(wanted)
    o_os, o_arch, o_variant = _split_platform(offered)
    if (w_os, w_arch) != (o_os, o_arch):
        return False
    if not w_variant:
        return True
    default = _DEFAULT_VARIANT.get(w_arch, "")
    return (w_variant or default) == (o_variant or default)


def _string_list(value) -> list[str]:
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


def _config_platform(config: dict) -> str | None:
    return _platform_string(config.get("os"), config.get("architecture"),
                            config.get("variant"))


# -- tags -----------------------------------------------------------------------

def _familiar(name: str) -> str:
    """``docker.io/library/busybox:1`` -> ``busybox:1``, as docker prints it."""
    for prefix in ("docker.io/library/", "docker.io/"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _tag_part(name: str) -> str | None:
    repo, sep, tag = name.rpartition(":")
    return tag if sep and repo and "/" not in tag else None


def _match_tag(wanted: str, names: Sequence[str]) -> str | None:
    """The name among *names* that *wanted* designates, if any: the same
    name, the same name once ``docker.io/library/`` is dropped, the name
    with ``:latest`` added (as docker does), or (for a bare tag such as
    ``"v1"``) the same tag part of a full reference."""
    implied = wanted if _tag_part(wanted) else f"{wanted}:latest"
    for candidate in (wanted, implied):
        for name in names:
            if candidate == name or _familiar(candidate) == _familiar(name):
                return name
    if ":" not in wanted and "/" not in wanted:
        for name in names:
            if _tag_part(name) == wanted:
                return name
    return None


# -- the image --------------------------------------------------------------------

@attrs.define(eq=False)
class Image:
    """An opened image: its layers (bottom first), config and manifest.

    ``manifest_digest`` is None for a docker archive, whose ``manifest`` is
    its ``manifest.json`` entry ({Config, RepoTags, Layers}); for a layer
    list, config and manifest are synthesised (the host platform, no
    history).  ``ref`` is the name the image was chosen by, or its only name.
    ``layer_sources[i]`` is where the blob of ``layers[i]`` is stored.
    An image opened with ``read_layers=False`` has no layers: its manifest
    and config only.
    """

    layers: list[Layer]
    config: dict
    config_digest: str
    manifest: dict
    manifest_digest: str | None
    ref: str | None
    platform: str | None
    kind: str
    source: str
    layer_sources: list
    # What an index offered: ``[(names, platform, manifest digest)]`` and the
    # digest of the manifest or index the reference itself resolved to (for
    # a registry image: what a tag pointed at when it was opened).
    offered: list = attrs.field(factory=list)
    resolved_digest: str | None = None
    closers: list = attrs.field(factory=list)   # run by close(), after the layers

    @property
    def tag(self) -> str | None:
        """The same as ``ref``, named like :func:`open_image`'s parameter."""
        return self.ref

    @property
    def diff_ids(self) -> list[str]:
        return [layer.diff_id for layer in self.layers]

    def chain_id(self) -> str | None:
        return chain_id(self.diff_ids)

    # What a container of this image runs with: the config's ``config``
    # object (OCI config spec, "Properties"), read without trusting its shape.

    @property
    def settings(self) -> dict:
        """The config's ``config`` object (Env, Entrypoint, Cmd, ...), or {}."""
        settings = self.config.get("config")
        return settings if isinstance(settings, dict) else {}

    @property
    def env(self) -> dict[str, str]:
        """``Env`` as a dict (``NAME=value`` entries; a bare ``NAME`` is "")."""
        env = {}
        for item in self.settings.get("Env") or []:
            if isinstance(item, str):
                name, _, value = item.partition("=")
                env[name] = value
        return env

    @property
    def entrypoint(self) -> list[str]:
        return _string_list(self.settings.get("Entrypoint"))

    @property
    def cmd(self) -> list[str]:
        return _string_list(self.settings.get("Cmd"))

    @property
    def history(self) -> list[dict]:
        """The config's history entries, oldest first (``empty_layer``
        entries included)."""
        return [h for h in self.config.get("history") or [] if isinstance(h, dict)]

    def layer_history(self) -> list[dict | None]:
        """The history entry that made each layer, base first: the entries
        that are not ``empty_layer``, in order (None where history is short)."""
        made = [h for h in self.history if not h.get("empty_layer")]
        return [made[i] if i < len(made) else None for i in range(len(self.manifest.get(
            "layers") or self.layers))]

    def close(self) -> None:
        for layer in self.layers:
            layer.close()
        closers, self.closers = self.closers, []
        for close in closers:
            close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@attrs.define
class _Candidate:
    """One image an index or a docker manifest.json offers."""

    names: tuple[str, ...]
    platform: str | None
    key: str                 # manifest digest, or docker config path
    entry: dict              # its descriptor, or docker manifest.json entry


def open_image(source: Any, *, tag: str | None = None, platform: str | None = None,
               cache: Any = None, progress: Any = None, registry: Any = None,
               read_layers: bool = True) -> Image:
    """Open an image named as :mod:`layerfs.reference` says: a reference
    string (``oci:DIR[:TAG]``, ``oci-archive:FILE[:TAG]``,
    ``docker-archive:FILE[:TAG]``, ``docker://...``, or a bare path), a path
    object, a :class:`~layerfs.reference.Reference`, or a list of layer
    files, bottom first.  A bare path is an OCI layout directory, an OCI or
    docker-save archive, or a single layer file (a plain tar with no
    ``index.json`` + ``oci-layout`` nor ``manifest.json`` at its root, or any
    gzip or zstd file), told apart by its content.

    *tag* (or the reference's TAG) chooses among several images by
    ``org.opencontainers.image.ref.name`` or docker ``RepoTags``, or by
    manifest digest (``sha256:...``); *platform* (``"os/arch[/variant]"``,
    by default the host's) among several platforms.  Raises
    :class:`InvalidReferenceError` for a reference that cannot be read or a
    tag given twice, :class:`UnsupportedImageError` when the source is not
    what its transport says or the choice is ambiguous (the message lists
    what there is), and :class:`DigestMismatchError` when a blob is not what
    its digest says.
    """
    if platform is not None:
        _split_platform(platform)
    ref = as_reference(source).with_selector(tag)
    layer_args = {"cache": cache, "progress": progress}
    if not read_layers:
        layer_args["read_layers"] = False
    if ref.transport == LAYERS:
        return _open_layer_list(list(ref.layers), layer_args)
    if ref.transport == DOCKER:
        return _open_remote(ref, platform, layer_args, registry)
    path = ref.path
    choice = _Choice(ref.tag, ref.digest, platform)
    if ref.transport in (PATH, OCI) and os.path.isdir(path):
        store: DirStore | TarStore = DirStore(path)
        if store.size("oci-layout") is None or store.size("index.json") is None:
            raise UnsupportedImageError(
                "directory is not an OCI image layout (no oci-layout and index.json)", path=path)
        return _Opener(store, "oci-layout", layer_args).open_oci(choice)
    if ref.transport == OCI:
        _not_a(path, "an OCI image layout directory")
    if os.path.isdir(path):
        _not_a(path, "an archive file")
    if _is_compressed_layer(path):
        outer = open_layer(path, label=f"0 ({os.path.basename(path)})",
                           **_layer_only(layer_args))
        try:
            store = CompressedTarStore(path, outer)
        except BaseException:
            outer.close()
            raise
        if not store.is_archive():
            if ref.transport != PATH:
                outer.close()
                _not_a(path, "an image archive: a compressed file with no index.json "
                       "and oci-layout, nor a docker manifest.json, at its root")
            _refuse_selector(choice, path, "a single layer file")
            return _image_of_layers([outer], [path])
        try:
            return _open_archive(store, ref.transport, choice, layer_args, path)
        finally:
            outer.close()      # the image's layers opened their own descriptors
    store = TarStore(path)
    image = _open_archive(store, ref.transport, choice, layer_args, path)
    if image is not None:
        return image
    # Neither kind of image archive: a single layer tar.
    _refuse_selector(choice, path, "a single layer file")
    return _open_layer_list([path], layer_args)


def _open_archive(store: Any, transport: str, choice: "_Choice", layer_args: dict,
                  path: str) -> Image | None:
    """The image an archive holds, or None if *store* is no image archive
    and *transport* allows a single layer."""
    if transport != DOCKER_ARCHIVE and store.size("index.json") is not None \
            and store.size("oci-layout") is not None:
        return _Opener(store, "oci-archive", layer_args).open_oci(choice)
    if transport != OCI_ARCHIVE and store.size("manifest.json") is not None:
        return _Opener(store, "docker-archive", layer_args).open_docker(choice)
    if transport == OCI_ARCHIVE:
        _not_a(path, "an OCI archive (no index.json and oci-layout at its root)")
    if transport == DOCKER_ARCHIVE:
        _not_a(path, "a docker archive (no manifest.json at its root)")
    return None


def _layer_only(layer_args: dict) -> dict:
    return {k: v for k, v in layer_args.items() if k != "read_layers"}


def _open_remote(ref: Any, platform: str | None, layer_args: dict, options: Any) -> Image:
    """An image in a registry: its blobs are fetched into the cache (see
    :mod:`layerfs.registry`) and then read like a layout's.  The reference
    resolves to one manifest or index, which is then treated as a layout
    whose index.json names only it."""
    from .registry import Options
    from .remote import BlobCache, RemoteStore
    root = cache_root(layer_args["cache"])
    temporary = None
    if root is None:          # cache=False: nothing may stay behind
        temporary = root = tempfile.mkdtemp(prefix="layerfs-registry-")
    try:
        store = RemoteStore(ref, BlobCache(root), options or Options(),
                            progress=layer_args["progress"])
        data, media_type, digest = store.top_manifest()
        entry = descriptor(media_type, digest, len(data))
        if ref.tag is not None:
            entry["annotations"] = {REF_NAME: ref.tag}
        opener = _Opener(store, "registry", layer_args)
        image = opener.open_index({"manifests": [entry]}, store.label,
                                  _Choice(None, None, platform))
    except BaseException:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
        raise
    image.resolved_digest = digest
    if temporary is not None:
        # The blobs stay while the image is open (commit copies them).
        image.closers.append(lambda: shutil.rmtree(temporary, ignore_errors=True))
    return image


def list_images(source: Any, *, cache: Any = None,
                progress: Any = None) -> list[tuple[tuple[str, ...], str | None, str]]:
    """``[(names, platform, digest)]`` for every image a layout or archive
    holds (``layerfs tags``): its tags, its platform, and its manifest
    digest (a docker archive, which has no manifests: its config digest).
    Only JSON is read, no layer is opened (a compressed archive is
    indexed first, as :func:`open_image` does)."""
    ref = as_reference(source)
    if ref.transport in (LAYERS, DOCKER):
        raise UnsupportedImageError(f"{ref}: not a layout or archive (list a registry "
                                    "repository's tags with the registry client)")
    path = ref.path
    if os.path.isdir(path):
        return _list_images(DirStore(path), path)
    if _is_compressed_layer(path):
        with open_layer(path, label=f"0 ({os.path.basename(path)})", cache=cache,
                        progress=progress) as outer:
            return _list_images(CompressedTarStore(path, outer), path)
    return _list_images(TarStore(path), path)


def _list_images(store: Any, path: str) -> list[tuple[tuple[str, ...], str | None, str]]:
    opener = _Opener(store, "layout", {"cache": False, "progress": None,
                                       "read_layers": False})
    out = []
    if store.size("index.json") is not None:
        candidates: list[_Candidate] = []
        opener.walk_index(opener.read_json_file("index.json"), store.where("index.json"),
                          (), 0, candidates)
        for c in candidates:
            out.append((c.names, c.platform or opener.oci_platform(c), c.key))
        return out
    if store.size("manifest.json") is None:
        raise UnsupportedImageError("not an OCI layout or image archive", path=path)
    entries = opener.read_json_file("manifest.json")
    where = store.where("manifest.json")
    if not isinstance(entries, list):
        raise UnsupportedImageError("manifest.json is not a list", path=where)
    for entry in entries:
        config, digest = opener.docker_config(_field(entry, "Config", str, where))
        out.append((tuple(_field(entry, "RepoTags", list, where, default=[])),
                    _config_platform(config), digest))
    return out


@attrs.frozen
class _Choice:
    """What selects one image among those a layout or archive holds."""
    tag: str | None
    digest: str | None
    platform: str | None


def _not_a(path: str, what: str) -> Any:
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    raise UnsupportedImageError(f"not {what}", path=path)


def _refuse_selector(choice: _Choice, path: str, what: str) -> None:
    selector = choice.tag or choice.digest
    if selector is not None:
        raise UnsupportedImageError(f"{what} has no tags or manifests to choose "
                                    f"{selector!r} from", path=path)


def _is_compressed_layer(path: str) -> bool:
    """A gzip or zstd file is a layer: image archives are read in place, so
    they are never compressed."""
    with open(path, "rb") as stream:
        return detect_compression(stream.read(4)) != "none"


class _Opener:
    """Reads one image out of a layout or archive, verifying as it goes.

    Error locations: a file of the store when one is concerned (a blob, the
    index.json), else the store itself; messages say which blob."""

    def __init__(self, store: DirStore | TarStore, kind: str, layer_args: dict):
        self.store = store
        self.kind = kind
        self.read_layers = layer_args.pop("read_layers", True)
        self.layer_args = layer_args
        self._json_cache: dict[str, dict] = {}
        self._indexed: dict[str, bool] = {}
        self.offered: list = []

    # ---- reading files and blobs

    def read_json_file(self, name: str) -> Any:
        return _parse_json(self.store.read(name), self.store.where(name))

    def read_json_blob(self, desc: Any, what: str) -> dict:
        """The parsed blob *desc* describes, checked against its digest and size."""
        name = self.blob(desc, what)
        digest = desc["digest"]
        if digest in self._json_cache:
            return self._json_cache[digest]
        where = self.store.where(name)
        data = self.store.read(name)
        if len(data) > MAX_JSON_SIZE:
            raise UnsupportedImageError(f"{what} is larger than {MAX_JSON_SIZE} bytes", path=where)
        actual = digest_bytes(data, digest.partition(":")[0])
        if actual != digest:
            raise DigestMismatchError(f"{what} blob has digest {actual}, expected {digest}",
                                      path=where)
        value = _parse_json(data, where)
        if not isinstance(value, dict):
            raise UnsupportedImageError(f"{what} is not a JSON object", path=where)
        self._json_cache[digest] = value
        return value

    def blob(self, desc: Any, what: str) -> str:
        """The store name of the blob *desc* describes, after checking that
        the digest is valid, the blob exists and its size is the one given."""
        digest = _field(desc, "digest", str, self.store.label, f"{what} descriptor")
        name = blob_name(digest, where=self.store.label)
        size = self.store.size(name)
        if size is None:
            urls = desc.get("urls")
            hint = f" (a non-distributable layer; its urls: {urls})" if urls else ""
            raise ImageError(f"{what} blob {digest} is missing{hint}",
                             path=self.store.where(name))
        expected = desc.get("size")
        if expected is not None and expected != size:
            raise DigestMismatchError(f"{what} blob is {size} bytes, its descriptor says "
                                      f"{expected}", path=self.store.where(name))
        return name

    # ---- OCI

    def open_oci(self, choice: _Choice) -> Image:
        where = self.store.where("oci-layout")
        version = _field(self.read_json_file("oci-layout"), "imageLayoutVersion", str, where)
        if not version.startswith("1."):
            raise UnsupportedImageError(f"image layout version {version!r} is not 1.x",
                                        path=where)
        return self.open_index(self.read_json_file("index.json"),
                               self.store.where("index.json"), choice)

    def open_index(self, index: Any, where: str, choice: _Choice) -> Image:
        """The image *choice* designates among those *index* (read from
        *where*) names, nested indexes followed."""
        candidates: list[_Candidate] = []
        self.walk_index(index, where, (), 0, candidates)
        chosen, ref = _choose(candidates, choice, self.oci_platform, where)
        self.offered = [(c.names, c.platform, c.key) for c in candidates]
        manifest = self.read_json_blob(chosen.entry, "image manifest")
        image = self.open_manifest(manifest, chosen.key, ref)
        image.offered = self.offered
        return image

    def walk_index(self, index: Any, where: str, names: tuple[str, ...], depth: int,
                   out: list[_Candidate]) -> None:
        """Collect the image manifests of *index* (read from *where*),
        following nested indexes.  A nested entry without a name of its own
        inherits its parent's."""
        if depth > MAX_INDEX_DEPTH:
            raise UnsupportedImageError(f"image indexes nested deeper than {MAX_INDEX_DEPTH}",
                                        path=where)
        for desc in _field(index, "manifests", list, where):
            annotations = _field(desc, "annotations", dict, where, "manifests entry", {})
            if REFERENCE_TYPE in annotations:
                continue
            own = tuple(n for n in (annotations.get(REF_NAME), annotations.get(CONTAINERD_NAME))
                        if isinstance(n, str) and n)
            media_type = desc.get("mediaType")
            if media_type is None:   # optional in old indexes: ask the blob itself
                blob = self.read_json_blob(desc, "image manifest")
                media_type = blob.get("mediaType") or (
                    OCI_INDEX if "manifests" in blob else OCI_MANIFEST)
            if media_type in INDEX_TYPES:
                nested = self.read_json_blob(desc, "image index")
                self.walk_index(nested, self.store.where(blob_name(desc["digest"])),
                                own or names, depth + 1, out)
            elif media_type in MANIFEST_TYPES:
                plat = _field(desc, "platform", dict, where, "manifests entry", {})
                digest = _field(desc, "digest", str, where, "manifests entry")
                out.append(_Candidate(own or names, _platform_string(
                    plat.get("os"), plat.get("architecture"), plat.get("variant")), digest, desc))

    def oci_platform(self, candidate: _Candidate) -> str | None:
        manifest = self.read_json_blob(candidate.entry, "image manifest")
        config_desc = _field(manifest, "config", dict,
                             self.store.where(blob_name(candidate.key)))
        return _config_platform(self.read_json_blob(config_desc, "image config"))

    def open_manifest(self, manifest: dict, digest: str, ref: str | None) -> Image:
        where = self.store.where(blob_name(digest))
        if manifest.get("schemaVersion") != 2:
            raise UnsupportedImageError(
                f"manifest schemaVersion {manifest.get('schemaVersion')!r} is not 2", path=where)
        media_type = manifest.get("mediaType")
        if media_type is not None and media_type not in MANIFEST_TYPES:
            raise UnsupportedImageError(f"manifest media type {media_type!r}", path=where)
        config_desc = _field(manifest, "config", dict, where)
        config = self.read_json_blob(config_desc, "image config")
        layer_descs = _field(manifest, "layers", list, where)
        diff_ids = _diff_ids(config, len(layer_descs),
                             self.store.where(blob_name(config_desc["digest"])))
        if not self.read_layers:
            return Image([], config, config_desc["digest"], manifest, digest, ref,
                         _config_platform(config), self.kind, self.store.label, [])
        prefetch = getattr(self.store, "prefetch", None)
        if prefetch is not None:        # a remote store: download several at once
            prefetch(layer_descs)
        sources = [self.store.source(self.blob(d, f"layer {i}"))
                   for i, d in enumerate(layer_descs)]
        layers = self.open_layers([
            (src, d["digest"], diff_id, d.get("mediaType"), d.get("annotations"))
            for src, d, diff_id in zip(sources, layer_descs, diff_ids)])
        return Image(layers, config, config_desc["digest"], manifest, digest, ref,
                     _config_platform(config), self.kind, self.store.label, sources)

    # ---- docker save

    def open_docker(self, choice: _Choice) -> Image:
        where = self.store.where("manifest.json")
        entries = self.read_json_file("manifest.json")
        if not isinstance(entries, list) or not entries:
            raise UnsupportedImageError("manifest.json is not a non-empty list", path=where)
        candidates = []
        for entry in entries:
            config_path = _field(entry, "Config", str, where)
            repo_tags = _field(entry, "RepoTags", list, where, default=[])
            candidates.append(_Candidate(tuple(repo_tags), None, config_path, entry))
        if choice.digest is not None:
            raise UnsupportedImageError(
                f"a docker archive names no manifest digests: choose by tag, not "
                f"{choice.digest}; its tags: {_listing(candidates)}", path=where)
        chosen, ref = _choose(candidates, choice,
                              lambda c: _config_platform(self.docker_config(c.key)[0]), where)
        config, config_digest = self.docker_config(chosen.key)
        layer_paths = _field(chosen.entry, "Layers", list, where)
        diff_ids = _diff_ids(config, len(layer_paths), self.store.where(chosen.key))
        sources, specs = [], []
        for path, diff_id in zip(layer_paths, diff_ids):
            name = self.member(path, "layer")
            sources.append(self.store.source(name))
            specs.append((sources[-1], _digest_from_name(name), diff_id, None))
        layers = self.open_layers(specs)
        return Image(layers, config, config_digest, chosen.entry, None, ref,
                     _config_platform(config), self.kind, self.store.label, sources)

    def member(self, path: Any, what: str) -> str:
        """The archive member a manifest.json path names, which must exist."""
        where = self.store.where("manifest.json")
        if not isinstance(path, str):
            raise UnsupportedImageError(f"{what} path {path!r} is not a string", path=where)
        try:
            name = normalize_member_name(path)[1:]
        except BadMemberName as e:
            raise UnsupportedImageError(f"{what} path {path!r}: {e}", path=where) from None
        if self.store.size(name) is None:
            raise ImageError(f"{what} {path!r} named in manifest.json is missing", path=where)
        return name

    def docker_config(self, path: str) -> tuple[dict, str]:
        """The config at *path* and its digest, checked against the digest
        its file name gives (``<hex>.json`` or ``blobs/sha256/<hex>``)."""
        name = self.member(path, "config")
        where = self.store.where(name)
        data = self.store.read(name)
        if len(data) > MAX_JSON_SIZE:
            raise UnsupportedImageError(f"image config is larger than {MAX_JSON_SIZE} bytes",
                                        path=where)
        actual = digest_bytes(data)
        expected = _digest_from_name(name)
        if expected is not None and expected != actual:
            raise DigestMismatchError(f"image config has digest {actual}, expected {expected}",
                                      path=where)
        config = _parse_json(data, where)
        if not isinstance(config, dict):
            raise UnsupportedImageError("image config is not a JSON object", path=where)
        return config, actual

    # ---- layers

    def open_layers(self, specs: list[tuple]) -> list[Layer]:
        """Open every layer, or none: those already opened are closed when
        one fails.  Layers the index cache holds are opened one after
        another; when two or more must be indexed, those are indexed at once
        by a few threads (decompression and hashing release the GIL; a
        registry's waits overlap).  The error raised is the one of the
        first failing layer in stack order, as when opened one by one."""
        openers = [lambda i=i, s=s: self.open_layer(i, *s) for i, s in enumerate(specs)]
        cold, later, seen = [], [], set()
        for i, spec in enumerate(specs):
            if spec[1] is not None and spec[1] in seen:
                later.append(i)     # the same blob again: opened once the first is indexed
            elif not self.indexed(spec[1]):
                cold.append(i)
                seen.add(spec[1])
        if len(cold) < 2:
            return _open_all(openers)
        progress = self.layer_args.get("progress")
        if progress is not None:
            combined = _CombinedProgress(progress)
            openers = [lambda i=i, s=s: self.open_layer(i, *s, progress=combined.of(i))
                       for i, s in enumerate(specs)]
        return _open_all_parallel(openers, set(cold), set(later))

    def indexed(self, digest: str | None) -> bool:
        """Whether the index cache holds the index of the layer with this
        blob digest (False when that is not known, e.g. without a digest).
        Asked once per digest: open_layers and needs_sniff share the answer."""
        if digest in self._indexed:
            return self._indexed[digest]
        self._indexed[digest or ""] = answer = self._look_up_index(digest)
        return answer

    def _look_up_index(self, digest: str | None) -> bool:
        cache = self.layer_args.get("cache")
        hex_ = (digest or "").partition(":")[2]
        if cache is False or not hex_ or not (digest or "").startswith("sha256:"):
            return False
        if cache is None or cache is True:
            from .cache import IndexCache
            cache = IndexCache()
        if not hasattr(cache, "load_header"):
            return False
        try:
            return cache.load_header(hex_) is not None
        except (OSError, ValueError):
            return False

    def needs_sniff(self, digest: str | None, media_type: str | None) -> bool:
        """Whether a layer without TOC annotations must be looked at (its
        last 72 bytes: one request for a registry blob) for an eStargz or
        zstd:chunked footer: not when its media type is an uncompressed tar
        (no footer there), nor when the index cache already holds its index
        (it was read as a plain layer before: the cache answers first)."""
        from .remote import UNCOMPRESSED_LAYER_TYPES
        if media_type in UNCOMPRESSED_LAYER_TYPES:
            return False
        return not self.indexed(digest)

    def open_layer(self, number: int, source: Any, digest: str | None, diff_id: str,
                   media_type: str | None, annotations: dict | None = None,
                   progress: Any = None) -> Layer:
        """Open one layer; *progress*, if given, in place of the image's."""
        label = f"{number} ({(digest or diff_id)[:19]})"
        layer_args = self.layer_args if progress is None else \
            {**self.layer_args, "progress": progress}
        try:
            toc_layer = open_toc_layer(source, digest=digest, diff_id=diff_id,
                                       media_type=media_type, annotations=annotations,
                                       label=label, sniff=self.needs_sniff(digest, media_type),
                                       cache=self.layer_args.get("cache"))
            if toc_layer is not None:       # eStargz, zstd:chunked: read from the TOC
                return toc_layer            # type: ignore[return-value]
            return open_layer(source, digest=digest, diff_id=diff_id, media_type=media_type,
                              label=label, **layer_args)
        except DigestMismatchError as error:
            discard = getattr(self.store, "discard", None)
            if discard is None or digest is None:
                raise
            # A fetched blob that is not what the config says (its diff_id)
            # leaves the cache, and the error names where it came from.
            discard(digest)
            raise DigestMismatchError(error.reason, path=self.store.where(blob_name(digest)),
                                      layer=error.layer, entry=error.entry) from None


class _CombinedProgress:
    """The progress of layers indexed at once, reported as one: the bytes
    done and the total of every layer that has reported so far (one bar that
    moves forward, instead of each thread's layer in turn)."""

    def __init__(self, report: Callable[[int, int], None]):
        self._report = report
        self._lock = threading.Lock()
        self._layers: dict[int, tuple[int, int]] = {}

    def of(self, number: int) -> Callable[[int, int], None]:
        def layer_progress(done: int, total: int) -> None:
            with self._lock:
                self._layers[number] = (done, total)
                self._report(sum(d for d, _ in self._layers.values()),
                             sum(t for _, t in self._layers.values()))
        return layer_progress


def _open_all(openers: list[Callable[[], Layer]]) -> list[Layer]:
    """Call every opener, or close what was opened and re-raise."""
    layers: list[Layer] = []
    try:
        for opener in openers:
            layers.append(opener())
    except BaseException:
        for layer in layers:
            layer.close()
        raise
    return layers


PARALLEL_INDEXING = 4     # layers indexed at once when an image is opened


def _open_all_parallel(openers: list[Callable[[], Layer]], cold: set[int],
                       later: set[int] = frozenset()) -> list[Layer]:  # type: ignore[assignment]
    """Like :func:`_open_all`, with the openers numbered in *cold* (those
    that index) run by a thread pool and the others run here, meanwhile,
    but those in *later* (a blob seen before in the stack) after the pool's.
    The error raised is the lowest-numbered one; openers after it that have
    not started are not started, and every layer opened is closed."""
    results: dict[int, Layer] = {}
    errors: dict[int, BaseException] = {}
    pool = concurrent.futures.ThreadPoolExecutor(min(PARALLEL_INDEXING, len(cold)),
                                                 thread_name_prefix="layerfs-index")
    futures: dict[concurrent.futures.Future, int] = {}
    try:
        futures = {pool.submit(openers[i]): i for i in sorted(cold)}
        for i, opener in enumerate(openers):   # the cached ones, serially
            if i in cold or i in later:
                continue
            try:
                results[i] = opener()
            except BaseException as error:     # noqa: B036 - re-raised below
                errors[i] = error
                for other, j in futures.items():
                    if j > i:
                        other.cancel()
                break
        for future in concurrent.futures.as_completed(futures):
            i = futures[future]
            if future.cancelled():
                continue
            error = future.exception()
            if error is None:
                results[i] = future.result()
                continue
            errors[i] = error
            for other, j in futures.items():   # those after it are not needed
                if j > i:
                    other.cancel()
        for i in sorted(later):
            if errors and min(errors) < i:
                break
            try:
                results[i] = openers[i]()
            except BaseException as error:     # noqa: B036 - re-raised below
                errors[i] = error
                break
    except BaseException:                      # Ctrl-C while waiting: give up
        for future in futures:
            future.cancel()
        pool.shutdown(wait=True)
        _close_layers(results.values())
        _close_layers(f.result() for f in futures
                      if f.done() and not f.cancelled() and f.exception() is None
                      and futures[f] not in results)
        raise
    pool.shutdown(wait=True)
    if errors:
        _close_layers(results.values())
        raise errors[min(errors)]
    return [results[i] for i in range(len(openers))]


def _close_layers(layers) -> None:
    for layer in layers:
        layer.close()


def _digest_from_name(name: str) -> str | None:
    """The digest a blob's file name promises, if it follows a known pattern."""
    match = re.fullmatch(r"blobs/(sha256|sha512)/([0-9a-f]+)|([0-9a-f]{64})\.json", name)
    if match is None:
        return None
    if match.group(3):
        return f"sha256:{match.group(3)}"
    return f"{match.group(1)}:{match.group(2)}"


def _open_layer_list(paths: list[str], layer_args: dict) -> Image:
    """An image made of the given layer files, with a synthesised config
    (host platform, the layers' diff_ids) and manifest."""
    if not paths:
        raise UnsupportedImageError("an image needs at least one layer")
    layer_args = {k: v for k, v in layer_args.items() if k != "read_layers"}
    layers = _open_all([
        lambda i=i, p=p: open_layer(p, label=f"{i} ({os.path.basename(p)})", **layer_args)
        for i, p in enumerate(paths)])
    return _image_of_layers(layers, paths)


def _image_of_layers(layers: list[Layer], paths: list[str]) -> Image:
    os_, arch, variant = _split_platform(host_platform())
    config = {"architecture": arch, "os": os_,
              "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}}
    if variant:
        config["variant"] = variant
    config_bytes = canonical_json(config)
    manifest = {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, digest_bytes(config_bytes), len(config_bytes)),
        "layers": [descriptor(layer.media_type or OCI_LAYER_TYPES[layer.compression],
                              layer.digest, layer.size) for layer in layers],
    }
    return Image(layers, config, manifest["config"]["digest"], manifest,
                 digest_bytes(canonical_json(manifest)), None, _config_platform(config),
                 "layers", ", ".join(paths), list(paths))


def _choose(candidates: list[_Candidate], choice: _Choice,
            platform_of: Callable[[_Candidate], str | None],
            where: str) -> tuple[_Candidate, str | None]:
    """The one candidate that the tag or digest and the platform of
    *choice* designate, and the name it was chosen by.  Without a platform,
    a lone candidate is taken whatever its platform (its files can be read
    anywhere) and several are narrowed to the host's.  Candidates whose
    index entry gives no platform are asked their config's."""
    tag, platform = choice.tag, choice.platform
    if not candidates:
        raise UnsupportedImageError("no image manifests found", path=where)
    if tag is not None:
        candidates = [c for c in candidates if _match_tag(tag, c.names) is not None] or _fail(
            f"no image tagged {tag!r}; there are: {_listing(candidates)}", where)
    if choice.digest is not None:
        candidates = [c for c in candidates if c.key == choice.digest] or _fail(
            f"no image manifest {choice.digest}; there are: {_listing(candidates)}", where)
    if len({c.key for c in candidates}) == 1 and platform is None:
        chosen = candidates[0]
    else:
        for candidate in candidates:
            if candidate.platform is None:
                candidate.platform = platform_of(candidate)
        wanted = platform or host_platform()
        fitting = [c for c in candidates if _platform_matches(wanted, c.platform)]
        if len({c.key for c in fitting}) != 1:
            problem = "no image" if not fitting else "several images"
            tagged = "" if tag is None else f" tagged {tag!r}"
            _fail(f"{problem} for platform {wanted}{tagged}; choose with a tag, a manifest "
                  f"digest or a platform among: {_listing(candidates)}", where)
        chosen = fitting[0]
    if tag is not None:
        return chosen, _match_tag(tag, chosen.names)
    return chosen, (chosen.names[0] if chosen.names else None)


def _fail(message: str, where: str) -> Any:
    raise UnsupportedImageError(message, path=where)


def _listing(candidates: list[_Candidate]) -> str:
    return "; ".join(
        f"{', '.join(c.names) or '(untagged)'} [{c.platform or 'platform unknown'}] {c.key}"
        for c in candidates)


def _diff_ids(config: dict, layer_count: int, where: str) -> list[str]:
    rootfs = _field(config, "rootfs", dict, where)
    diff_ids = _field(rootfs, "diff_ids", list, where)
    if len(diff_ids) != layer_count:
        raise ImageError(f"config lists {len(diff_ids)} diff_ids for {layer_count} layers",
                         path=where)
    for diff_id in diff_ids:
        parse_digest(diff_id, where=where)
    return diff_ids


def _parse_json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise UnsupportedImageError(f"not valid JSON: {e}", path=where) from None


_REQUIRED = object()


def _field(obj: Any, key: str, kind: type, where: str, what: str = "",
           default: Any = _REQUIRED) -> Any:
    """``obj[key]`` if it is a *kind*; *default* if given and the key is
    absent or null; else an error naming *where* (and *what* in it)."""
    inside = f"{what}: " if what else ""
    if not isinstance(obj, dict):
        raise UnsupportedImageError(f"{inside}expected a JSON object with {key!r}", path=where)
    value = obj.get(key)
    if value is None and default is not _REQUIRED:
        return default
    if not isinstance(value, kind):
        raise UnsupportedImageError(f"{inside}missing or invalid field {key!r}", path=where)
    return value
