"""How an image is named: one grammar for every command and for ``layerfs.open``.

The rule this module owns: **a transport prefix decides, and nothing else
does.**  The meaning of a reference is read from its text alone; nothing on
the host (whether a path exists, is a file or a directory) is ever consulted
here.  What the named thing turns out to be is checked later, when it is
opened, against what the transport promised.

=====================================  =========================================
``docker://[HOST[:PORT]/]REPO[:TAG]``  an image in a registry; ``@DIGEST`` in
``docker://...REPO@DIGEST``            place of (or after) the tag names a
                                       manifest by digest.  As the containers
                                       tools read it: host ``docker.io`` when
                                       the first component has no ``.`` or
                                       ``:`` and is not ``localhost``;
                                       ``library/`` before a one-component
                                       name on ``docker.io``; tag ``latest``.
``oci:DIR[:TAG]``                      an OCI image layout directory
``oci-archive:FILE[:TAG]``             a tar of an OCI image layout
``docker-archive:FILE[:TAG]``          a ``docker save`` archive (maybe gzip)
``PATH`` (no prefix)                   a layout, an archive or a single layer
                                       file, told apart by their content
a list of paths (Python only), or      a stack of layer files, base first
``--layer FILE`` repeated (CLI)
=====================================  =========================================

For the local forms, everything after the first ``:`` following the path is
the TAG (so a path containing ``:`` needs no prefix, or ``./``), and a TAG
that is a digest (``sha256:<hex>``, optionally after ``@``) selects a
manifest by its digest.
"""

from __future__ import annotations

import os
import re
from typing import Any, Optional, Sequence, Union

import attrs

from .errors import InvalidReferenceError

DOCKER = "docker"
OCI = "oci"
OCI_ARCHIVE = "oci-archive"
DOCKER_ARCHIVE = "docker-archive"
PATH = "path"
LAYERS = "layers"

DEFAULT_HOST = "docker.io"
DEFAULT_TAG = "latest"
# Prefixes in the order they are tried: "docker://" before the local ones.
_PREFIXES = (("docker://", DOCKER), ("oci:", OCI), ("oci-archive:", OCI_ARCHIVE),
             ("docker-archive:", DOCKER_ARCHIVE))
_LOCAL_PREFIX = {OCI: "oci:", OCI_ARCHIVE: "oci-archive:", DOCKER_ARCHIVE: "docker-archive:"}

# The distribution project's reference grammar (reference/regexp.go), spelt out.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*\Z")
_HOST = re.compile(r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
                   r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
                   r"|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?\Z")
_TAG = re.compile(r"[\w][\w.-]{0,127}\Z")
_DIGEST = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})\Z")


@attrs.frozen
class Reference:
    """A parsed image reference.  ``transport`` is one of ``"docker"``,
    ``"oci"``, ``"oci-archive"``, ``"docker-archive"``, ``"path"`` (a bare
    argument) and ``"layers"`` (a stack of layer files in ``layers``).

    For ``docker``: ``host`` (``docker.io`` by default), ``repository``
    (``library/`` added on ``docker.io``), ``tag`` (``latest`` unless a digest
    is given) and ``digest``.  For the local forms: ``path``, and the
    ``tag`` or manifest ``digest`` that selects one image in it, if given.
    """

    transport: str
    path: Optional[str] = None
    tag: Optional[str] = None
    digest: Optional[str] = None
    host: Optional[str] = None
    repository: Optional[str] = None
    layers: tuple[str, ...] = ()

    @property
    def is_remote(self) -> bool:
        return self.transport == DOCKER

    @property
    def name(self) -> str:
        """``HOST/REPO`` of a registry reference."""
        return f"{self.host}/{self.repository}"

    def __str__(self) -> str:
        if self.transport == DOCKER:
            text = f"docker://{self.name}"
            if self.tag is not None:
                text += f":{self.tag}"
            if self.digest is not None:
                text += f"@{self.digest}"
            return text
        if self.transport == LAYERS:
            return " ".join(f"--layer {layer}" for layer in self.layers)
        selector = self.tag if self.tag is not None else self.digest
        if self.transport == PATH:
            return self.path or ""
        text = f"{_LOCAL_PREFIX[self.transport]}{self.path}"
        return f"{text}:{selector}" if selector is not None else text

    def absolute(self) -> "Reference":
        """The same reference with its local paths made absolute (for a
        process that changes its working directory, like a mount daemon)."""
        if self.transport == DOCKER:
            return self
        if self.transport == LAYERS:
            return attrs.evolve(self, layers=tuple(os.path.abspath(p) for p in self.layers))
        return attrs.evolve(self, path=os.path.abspath(self.path))

    def with_selector(self, tag: Optional[str]) -> "Reference":
        """This local reference choosing *tag* (a tag, or a manifest digest)
        too.  Giving a selector twice is an error, whatever the two are."""
        if tag is None:
            return self
        if self.transport == DOCKER:
            raise InvalidReferenceError(
                f"{self}: a registry reference carries its own tag or digest "
                "(docker://REPO:TAG or docker://REPO@DIGEST), not tag=")
        if self.transport == LAYERS:
            raise InvalidReferenceError("a stack of layer files has no tags to choose from")
        if self.tag is not None or self.digest is not None:
            raise InvalidReferenceError(
                f"{self}: the reference already chooses an image; give the tag "
                "either in the reference or as --tag/tag=, not both")
        return attrs.evolve(self, **_selector(tag, str(self)))


Source = Union[str, bytes, "os.PathLike[str]", Reference, Sequence[Any]]


def is_digest(text: object) -> bool:
    """Is *text* a digest layerfs can verify (``sha256:<64 hex>`` or
    ``sha512:<128 hex>``)?  Only such digests ever become file names."""
    return isinstance(text, str) and _DIGEST.match(text) is not None


def parse_reference(text: str) -> Reference:
    """The :class:`Reference` that *text* spells (see the module docstring).
    Raises :class:`InvalidReferenceError` naming *text* when a prefix is
    followed by something it cannot mean."""
    if not isinstance(text, str):
        raise InvalidReferenceError(f"image reference {text!r} is not a string")
    if text == "":
        raise InvalidReferenceError("empty image reference")
    for prefix, transport in _PREFIXES:
        if text.startswith(prefix):
            rest = text[len(prefix):]
            if transport == DOCKER:
                return parse_docker(rest, text)
            return _parse_local(transport, rest, text)
    return Reference(PATH, path=text)


def as_reference(source: Source) -> Reference:
    """What :func:`layerfs.open` takes, as a :class:`Reference`: a string is
    parsed; ``bytes`` and ``os.PathLike`` are paths (a path object names a
    path, never a transport); a list or tuple is a stack of layer files."""
    if isinstance(source, Reference):
        return source
    if isinstance(source, str):
        return parse_reference(source)
    if isinstance(source, (bytes, os.PathLike)):
        path = os.fsdecode(source)
        if path == "":
            raise InvalidReferenceError("empty image path")
        return Reference(PATH, path=path)
    if isinstance(source, (list, tuple)):
        return layer_stack(source)
    raise InvalidReferenceError(f"image source {source!r}: expected a reference string, "
                                "a path or a list of layer paths")


def layer_stack(paths: Sequence[Any]) -> Reference:
    """A stack of layer files, base first."""
    layers = tuple(os.fsdecode(p) for p in paths)
    if not layers:
        raise InvalidReferenceError("an image needs at least one layer")
    if any(layer == "" for layer in layers):
        raise InvalidReferenceError("empty layer path")
    return Reference(LAYERS, layers=layers)


def parse_docker(rest: str, text: str) -> Reference:
    """``[HOST[:PORT]/]REPO[:TAG][@DIGEST]`` (what follows ``docker://``)."""
    name, at, digest = rest.partition("@")
    if at and not _DIGEST.match(digest):
        raise InvalidReferenceError(f"{text}: {digest!r} is not a digest "
                                    "(sha256:<64 hex digits>)")
    tag = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
        if not _TAG.match(tag):
            raise InvalidReferenceError(f"{text}: {tag!r} is not a valid tag")
    first, sep, remainder = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        host, repository = first, remainder
        if not _HOST.match(host):
            raise InvalidReferenceError(f"{text}: {host!r} is not a valid registry host")
    else:
        host, repository = DEFAULT_HOST, name
    if host == "index.docker.io":
        host = DEFAULT_HOST
    if host == DEFAULT_HOST and "/" not in repository:
        repository = f"library/{repository}"
    if not _REPOSITORY.match(repository):
        raise InvalidReferenceError(
            f"{text}: {repository!r} is not a valid repository name "
            "(lowercase letters, digits and separators, components joined by /)")
    if tag is None and not at:
        tag = DEFAULT_TAG
    return Reference(DOCKER, host=host, repository=repository, tag=tag,
                     digest=digest if at else None)


def _parse_local(transport: str, rest: str, text: str) -> Reference:
    path, sep, selector = rest.partition(":")
    if not path:
        raise InvalidReferenceError(f"{text}: no path after {_LOCAL_PREFIX[transport]!r}")
    if sep and not selector:
        raise InvalidReferenceError(f"{text}: empty tag after the path")
    return Reference(transport, path=path, **(_selector(selector, text) if sep else {}))


def _selector(selector: str, text: str) -> dict:
    """A local TAG: a manifest digest (``sha256:...`` or ``@sha256:...``) or
    a tag (an ``org.opencontainers.image.ref.name`` or a docker RepoTag)."""
    if selector.startswith("@") or _DIGEST.match(selector):
        digest = selector.removeprefix("@")
        if not _DIGEST.match(digest):
            raise InvalidReferenceError(f"{text}: {digest!r} is not a digest "
                                        "(sha256:<64 hex digits>)")
        return {"digest": digest}
    return {"tag": selector}
