"""A registry as a blob store: the content-addressed cache of what was
fetched, and the store :class:`layerfs.image._Opener` reads a ``docker://``
image from.

Rules this module keeps:

- The cache holds only verified content: blobs are written under
  ``tmp/`` and renamed to their digest once :class:`layerfs.registry.Client`
  has checked them; so a digest found there is never fetched again, and a
  digest reference opens with the registry gone.
- A tag is resolved again on every open (one HEAD request), unless
  ``offline``, which reads the digest it had when last fetched.

Cache layout, under ``<cache root>/registry/``::

    blobs/sha256/<hex>            manifests, configs and layer blobs, verified
    tags/<host>/<repo>/<tag>.json the last digest a tag resolved to (read only
                                  with ``offline=True``)
    tmp/                          downloads in progress
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import tempfile
import threading
from typing import Callable, Optional

import attrs

from .errors import RegistryError, UnsupportedImageError
from .reference import Reference, is_digest
from .registry import (CHUNK_SIZE, DOCKER_LIST, DOCKER_MANIFEST, MAX_MANIFEST_SIZE,
                       OCI_INDEX, OCI_MANIFEST, PARALLEL_DOWNLOADS, RETRIES, Client,
                       Options, _Dropped)


class BlobCache:
    """Verified blobs by digest, and the last digest of each tag."""

    def __init__(self, root: str):
        self.root = os.path.join(root, "registry")

    def blob_path(self, digest: str) -> str:
        if not is_digest(digest):     # a name from a registry must not leave the cache
            raise UnsupportedImageError(f"{digest!r} is not a sha256 or sha512 digest",
                                        path=self.root)
        algorithm, _, hex_ = digest.partition(":")
        return os.path.join(self.root, "blobs", algorithm, hex_)

    def has(self, digest: str) -> bool:
        return os.path.isfile(self.blob_path(digest))

    def read(self, digest: str) -> bytes:
        with open(self.blob_path(digest), "rb") as handle:
            return handle.read(MAX_MANIFEST_SIZE + 1)

    def put(self, digest: str, data: bytes) -> None:
        """Keep *data*, which the caller has verified against *digest*."""
        handle, temp = self.temp_file()
        with handle:
            handle.write(data)
        self.commit(temp, digest)

    def temp_file(self):
        directory = os.path.join(self.root, "tmp")
        os.makedirs(directory, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix="blob-", dir=directory)
        return os.fdopen(fd, "wb"), temp

    def commit(self, temp: str, digest: str) -> str:
        final = self.blob_path(digest)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(temp, final)
        return final

    def tag_path(self, ref: Reference) -> str:
        return os.path.join(self.root, "tags", ref.host.replace(":", "_"),
                            *ref.repository.split("/"), f"{ref.tag}.json")

    def remember_tag(self, ref: Reference, digest: str, media_type: str) -> None:
        path = self.tag_path(ref)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handle, temp = self.temp_file()
        with handle:
            handle.write(json.dumps({"digest": digest, "mediaType": media_type}).encode())
        os.replace(temp, path)

    def recall_tag(self, ref: Reference) -> Optional[dict]:
        try:
            with open(self.tag_path(ref), encoding="utf-8") as handle:
                return json.load(handle)
        except (FileNotFoundError, ValueError):
            return None


# -- a registry as a blob store for layerfs.image ----------------------------------

UNCOMPRESSED_LAYER_TYPES = frozenset({"application/vnd.oci.image.layer.v1.tar",
                                      "application/vnd.docker.image.rootfs.diff.tar"})


class RemoteStore:
    """What :class:`layerfs.image._Opener` reads blobs from, for an image in
    a registry: ``blobs/<alg>/<hex>`` names, fetched (and verified) into the
    cache on first use.  With ``offline``, only the cache is read."""

    def __init__(self, ref: Reference, cache: BlobCache, options: Options,
                 progress: Optional[Callable[[int, int], None]] = None):
        self.ref = ref
        self.label = str(ref)
        self.cache = cache
        self.options = options
        self.progress = progress
        self._client: Optional[Client] = None
        self._lock = threading.Lock()
        self._sizes: dict = {}     # layer digest -> size, from the manifest
        self._whole: set = set()   # uncompressed layers: fetched whole even when lazy

    @property
    def client(self) -> Client:
        if self.options.offline:
            raise RegistryError("not in the cache, and --offline forbids fetching it",
                                path=self.label)
        with self._lock:
            if self._client is None:
                # The manifest came from the cache: the first place
                # registries.conf names (a mirror, or the registry) serves.
                from .registryconf import endpoints
                place = endpoints(self.ref.host, self.ref.repository, by_digest=True,
                                  path=self.options.registries_conf)[0]
                self._client = self._client_for(place)
            return self._client

    def _client_for(self, place) -> Client:
        return Client(attrs.evolve(self.ref, host=place.host, repository=place.repository),
                      attrs.evolve(self.options,
                                   tls_verify=self.options.tls_verify and not place.insecure))

    def where(self, name: str) -> str:
        return f"docker://{self.ref.name}@{_digest_of(name)}" if name.startswith(
            "blobs/") else f"{self.label} ({name})"

    def path(self, name: str, size: Optional[int] = None) -> str:
        digest = _digest_of(name)
        if not self.cache.has(digest):
            if self.options.offline:
                raise RegistryError("blob is not in the cache, and --offline forbids "
                                    "fetching it", path=self.where(name))
            try:
                self.client.fetch_blob(digest, self.cache, size)
            except RegistryError as error:
                # Manifests named by an index live under /manifests/, not
                # /blobs/: the 404 of the one is a hint to ask the other.
                if not _is_not_found(error):
                    raise
                data, _, verified = self.client.manifest(digest)
                self.cache.put(verified, data)
        return self.cache.blob_path(digest)

    def size(self, name: str) -> Optional[int]:
        digest = _digest_of(name)
        if self.options.lazy and digest in self._sizes and not self.cache.has(digest):
            return self._sizes[digest]   # checked when the layer is read (its digest)
        try:
            return os.path.getsize(self.path(name))
        except RegistryError as error:
            if _is_not_found(error):
                return None
            raise

    def read(self, name: str) -> bytes:
        with open(self.path(name), "rb") as handle:
            return handle.read(MAX_MANIFEST_SIZE + 1)

    def source(self, name: str):
        """Where a layer blob is read from: its file in the cache if it was
        fetched before; else, with ``lazy``, the blob in the registry itself
        (a :class:`RemoteBlob`: the layer reader fetches what it needs);
        else the file, fetched now."""
        digest = _digest_of(name)
        size = self._sizes.get(digest)
        if (self.options.lazy and size is not None and digest not in self._whole
                and not self.cache.has(digest)):
            if self.options.offline:
                # read before without the whole blob: what the index cache
                # holds (a copy, spans) serves; a ranged read is refused
                return OfflineBlob(digest, size, self.where(name))
            return RemoteBlob(self.client, digest, size, self.where(name))
        return self.path(name)

    def discard(self, digest: str) -> None:
        """Forget a fetched blob found bad after all: its diff_id is not the
        config's.  (Indexing stores nothing for a blob that fails a check.)"""
        _remove(self.cache.blob_path(digest))

    def prefetch(self, descriptors: list) -> None:
        """Download the blobs *descriptors* name that the cache lacks,
        several at once, with one progress report over all of them."""
        missing = [(d["digest"], _size(d.get("size"))) for d in descriptors
                   if isinstance(d, dict) and isinstance(d.get("digest"), str)
                   and not self.cache.has(d["digest"])]
        missing = list(dict.fromkeys(missing))
        self._sizes.update((d, size) for d, size in missing if size is not None)
        self._whole.update(d["digest"] for d in descriptors if isinstance(d, dict)
                           and d.get("mediaType") in UNCOMPRESSED_LAYER_TYPES)
        if self.options.lazy:
            # an uncompressed layer is read in place (no decompressed copy
            # is made of it): it is fetched whole, as without lazy reading
            missing = [(d, size) for d, size in missing if d in self._whole]
        if not missing or self.options.offline:
            return
        total = sum(size or 0 for _, size in missing)
        done = [0]
        lock = threading.Lock()
        stop = threading.Event()

        def report(count: int) -> None:
            if stop.is_set():        # another download failed, or Ctrl-C: give up
                raise _Stopped()
            if self.progress is None:
                return
            with lock:
                done[0] += count
                self.progress(min(done[0], total), total)

        client = self.client
        pool = concurrent.futures.ThreadPoolExecutor(PARALLEL_DOWNLOADS)
        try:
            futures = [pool.submit(client.fetch_blob, digest, self.cache, size, report)
                       for digest, size in missing]
            for future in concurrent.futures.as_completed(futures):
                if future.exception() is not None:
                    raise future.exception()
        except BaseException:
            stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def top_manifest(self) -> tuple[bytes, str, str]:
        """The manifest or index the reference names: (bytes, media type,
        digest).  A tag is resolved with one HEAD request (from the last
        resolution with ``offline``); the bytes come from the cache when the
        digest is there."""
        ref = self.ref
        media_type = None
        digest = ref.digest
        if digest is None and self.options.offline:
            known = self.cache.recall_tag(ref)
            if known is None:
                raise RegistryError("tag was never fetched, and --offline forbids "
                                    "resolving it", path=self.label)
            digest, media_type = known["digest"], known.get("mediaType")
        if digest is not None and self.cache.has(digest):
            data = self.cache.read(digest)
        elif self.options.offline:
            raise RegistryError(f"manifest {digest} is not in the cache, and --offline "
                                "forbids fetching it", path=self.label)
        else:
            data, media_type, digest = self._fetch_top(digest)
        media_type = _media_type(data, media_type, self.label)
        if ref.digest is None and not self.options.offline:
            self.cache.remember_tag(ref, digest, media_type)
        return data, media_type, digest

    def _fetch_top(self, digest: Optional[str]) -> tuple[bytes, Optional[str], str]:
        """Resolve the tag (if *digest* is None) and fetch the manifest, from
        the first endpoint of ``registries.conf`` that answers (mirrors
        first); that endpoint then serves the blobs too.  A digest mismatch
        is never a reason to try the next one: it is raised."""
        from .registryconf import endpoints
        places = endpoints(self.ref.host, self.ref.repository, by_digest=digest is not None,
                           path=self.options.registries_conf)
        failures: list[RegistryError] = []
        for place in places:
            client = self._client_for(place)
            try:
                media_type = None
                wanted = digest
                if wanted is None:
                    wanted, media_type = client.resolve(self.ref.tag)
                if self.cache.has(wanted):
                    data = self.cache.read(wanted)
                else:
                    data, fetched_type, verified = client.manifest(wanted)
                    media_type = fetched_type or media_type
                    self.cache.put(verified, data)
            except RegistryError as error:
                failures.append(error)
                continue
            with self._lock:
                self._client = client
            return data, media_type, wanted
        if len(failures) > 1:
            tried = ", ".join(f"{p.host}/{p.repository}" for p in places)
            raise type(failures[-1])(f"{failures[-1].reason} (tried {tried})",
                                     path=failures[-1].path)
        raise failures[-1]


class RemoteBlob:
    """A blob in a registry as a blob source (:mod:`layerfs.blobsource`):
    ``read_at`` fetches with HTTP ``Range`` (kept across redirects to blob
    storage; credentials are not).  A read that continues where the last
    one ended goes on with the same response, so a front-to-back pass is
    one request per :data:`READ_AHEAD` bytes; a dropped connection is
    resumed.  Nothing is verified here: the layer reader checks the digest
    of a whole pass, and each span of a ranged read against the checksums
    it recorded then (:class:`layerfs.blobsource.VerifiedBlob`).
    ``bytes_fetched`` and ``requests`` count what went over the network."""

    READ_AHEAD = 8 << 20
    KEEP_BEHIND = 64 << 10     # bytes kept before the last read (a re-read of a head)

    def __init__(self, client: Client, digest: str, size: int, label: str):
        self.client = client
        self.digest = digest
        self.size = size
        self.label = label
        self.bytes_fetched = 0
        self.requests = 0
        # what a request asks for beyond the read: a front-to-back pass wants
        # much; a layer read from its TOC (random chunks) sets it to 0
        self.read_ahead = self.READ_AHEAD
        self._lock = threading.Lock()
        self._response = None
        self._chunks = None
        self._pending = b""
        self._position = -1      # blob offset of _pending[0]
        self._end = -1           # end of the range the response serves

    def read_at(self, offset: int, length: int) -> bytes:
        length = min(length, self.size - offset)
        if length <= 0 or offset < 0:
            return b""
        with self._lock:
            for attempt in range(RETRIES + 1):
                try:
                    if self._is_aside(offset, length):
                        return self._fetch(offset, length)
                    if not (self._position <= offset and offset + length <= self._end):
                        self._open(offset, length)
                    return self._take(offset, length)
                except (_Dropped, OSError) as error:
                    self._close()
                    if attempt == RETRIES:
                        raise RegistryError(f"reading bytes {offset}+{length} failed: "
                                            f"{error}", path=self.label) from None
        return b""   # not reached

    def _open(self, offset: int, length: int) -> None:
        self._close()
        end = min(self.size, offset + max(length, self.read_ahead))
        response = self._ranged_get(offset, end)
        if response.status_code == 200:       # Range ignored: the whole blob
            start = 0
            end = self.size
        elif response.status_code == 206:
            start = offset
        else:
            status = response.status_code
            response.close()
            raise RegistryError(f"ranged read answered {status}", path=self.label)
        self._response = response
        self._chunks = response.iter_content(CHUNK_SIZE)
        self._pending, self._position, self._end = b"", start, end

    def _ranged_get(self, start: int, end: int):
        """A streamed GET of the blob's bytes *start* to *end* (exclusive)."""
        response = self.client.request(
            "GET", f"{self.client.ref.repository}/blobs/{self.digest}",
            headers={"Range": f"bytes={start}-{end - 1}"}, stream=True)
        self.requests += 1
        return response

    def _is_aside(self, offset: int, length: int) -> bool:
        """Whether a read is small and away from where a response with much
        left to stream stands (a pass reading the blob looks at its last
        bytes): read aside, not by dropping the response or by streaming
        through to it."""
        if self._response is None or length > self.KEEP_BEHIND:
            return False
        received = self._position + len(self._pending)
        near = self._position <= offset <= received + self.KEEP_BEHIND
        return not near and self._end - received > self.KEEP_BEHIND

    def _fetch(self, offset: int, length: int) -> bytes:
        """A small read away from the response a pass is streaming (a
        gzip trailer, a footer): its exact range, by a request of its own,
        so that the streaming response is not dropped and asked again."""
        response = self._ranged_get(offset, offset + length)
        if response.status_code != 206:       # Range ignored, or an error: as before
            response.close()
            self._open(offset, length)
            return self._take(offset, length)
        data = response.content
        self.bytes_fetched += len(data)
        return data

    def _take(self, offset: int, length: int) -> bytes:
        want_end = offset + length
        requests = self.client.requests
        while self._position + len(self._pending) < want_end:
            try:
                chunk = next(self._chunks, b"")
            except requests.exceptions.RequestException as error:
                raise _Dropped(error) from None
            if not chunk:
                raise _Dropped(None, "the response ended early")
            self.bytes_fetched += len(chunk)
            self._pending += chunk
        skip = offset - self._position
        data = self._pending[skip:skip + length]
        drop = max(0, skip + length - self.KEEP_BEHIND)   # keep a little behind
        self._pending = self._pending[drop:]
        self._position += drop
        return data

    def _close(self) -> None:
        if self._response is not None:
            self._response.close()
        self._response = self._chunks = None
        self._pending, self._position, self._end = b"", -1, -1

    def close(self) -> None:
        with self._lock:
            self._close()


class OfflineBlob:
    """A registry blob that is not in the cache, with ``--offline``: a blob
    source whose size is known (from the manifest) and whose every read is
    refused, so a layer opens from what the index cache holds of it (a
    whole copy, spans) or fails with a one-line error naming the blob."""

    def __init__(self, digest: str, size: int, label: str):
        self.digest = digest
        self.size = size
        self.label = label
        self.bytes_fetched = 0
        self.requests = 0
        self.read_ahead = 0      # a registry blob: a TOC layer reads its kept chunks

    def read_at(self, offset: int, length: int) -> bytes:
        raise RegistryError("blob is not in the cache, and --offline forbids fetching it",
                            path=self.label)

    def close(self) -> None:
        pass


class _Stopped(Exception):
    """Raised in a download thread to stop it: its partial file is removed
    as for any failure."""


def _size(value: object) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


def _is_not_found(error: RegistryError) -> bool:
    return error.errno == errno.ENOENT


def _digest_of(name: str) -> str:
    _, algorithm, hex_ = name.split("/", 2)
    return f"{algorithm}:{hex_}"


def _media_type(data: bytes, given: Optional[str], where: str) -> str:
    """The media type of a manifest: its own ``mediaType`` field if it has
    one, else what the registry said, else guessed from its shape."""
    try:
        document = json.loads(data)
    except ValueError:
        raise UnsupportedImageError("manifest is not valid JSON", path=where) from None
    if isinstance(document, dict):
        own = document.get("mediaType")
        if isinstance(own, str) and own:
            return own
        if given in (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST):
            return given
        return OCI_INDEX if "manifests" in document else OCI_MANIFEST
    raise UnsupportedImageError("manifest is not a JSON object", path=where)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
