"""Images in registries: the client side of the OCI distribution API.

Everything that crosses the network lives here; which manifest of an index
is meant, and how a layer is read, stay :mod:`layerfs.image`'s and
:mod:`layerfs.layer`'s business: a registry is one more place blobs come
from (:class:`RemoteStore`), and every blob lands in a content-addressed
cache before anything reads it.

Rules this module keeps:

- Nothing fetched is trusted before it is verified: a manifest's bytes
  against the digest asked for (or, for a tag, against the registry's
  ``Docker-Content-Digest``), a blob against its digest while it streams to a
  temporary file, which is renamed into the cache only when whole and right
  (and deleted otherwise).  So the cache holds only verified content, and a
  digest found there is never fetched again: a digest reference works with
  the registry gone.
- ``Accept`` always names the four manifest media types (OCI index and
  manifest, Docker manifest list and v2 manifest): without them some
  registries convert the manifest (schema 1) or answer 404.  The platform is
  chosen here, on the client, never by the registry.
- Credentials go to the registry host only: redirects to blob storage are
  followed by ``requests``, which keeps ``Range`` and drops ``Authorization``
  when the host changes.  Plain HTTP is used only for a loopback host or
  with ``tls_verify=False`` (HTTPS is tried first, as the containers tools
  do).
- Memory stays bounded: blobs stream in 256 KiB chunks; a manifest larger than
  :data:`MAX_MANIFEST_SIZE` is refused.  A dropped connection resumes with
  ``Range`` (or restarts, if the server ignores it) up to :data:`RETRIES`
  times.

Cache layout, under ``<cache root>/registry/``::

    blobs/sha256/<hex>            manifests, configs and layer blobs, verified
    tags/<host>/<repo>/<tag>.json the last digest a tag resolved to (read only
                                  with ``offline=True``)
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import ipaddress
import json
import os
import re
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Optional
from urllib.parse import quote, urlencode

import attrs

from . import auth
from .errors import (DigestMismatchError, ImageError, RegistryAuthError, RegistryError,
                     UnsupportedImageError)
from .reference import DEFAULT_HOST, Reference

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])

MAX_MANIFEST_SIZE = 4 << 20
# urllib3 gives nothing of a chunk that a dropped connection cut short, so
# a resume restarts from the last whole chunk: this bounds what is fetched twice.
CHUNK_SIZE = 256 << 10
RETRIES = 3
PARALLEL_DOWNLOADS = 3
TIMEOUT = (15, 60)          # connect, read (seconds between bytes)
USER_AGENT = "layerfs"
_API_HOSTS = {DEFAULT_HOST: "registry-1.docker.io"}


@attrs.frozen
class Options:
    """How to reach registries: ``authfile`` (else the containers tools'
    lookup, see :mod:`layerfs.auth`), ``tls_verify`` (False: accept any
    certificate and allow plain HTTP), ``offline`` (use only the cache; a
    tag resolves to the digest it had when last fetched), ``cert_dir`` (a
    directory of ``*.crt`` CA certificates and ``*.cert``/``*.key`` client
    pairs for every registry; default: ``certs.d/HOST[:PORT]`` of
    :data:`CERTS_D`), ``registries_conf`` (mirrors, locations, insecure and
    blocked registries; default: see :mod:`layerfs.registryconf`)."""
    authfile: Optional[str] = None
    tls_verify: bool = True
    offline: bool = False
    cert_dir: Optional[str] = None
    registries_conf: Optional[str] = None


# Where the containers tools and docker keep per-registry certificates.
CERTS_D = ("~/.config/containers/certs.d", "/etc/containers/certs.d", "/etc/docker/certs.d")


def certificates(host: str, cert_dir: Optional[str] = None) -> tuple[Optional[str], Any]:
    """(CA bundle, client certificate) for *host*, from ``cert_dir`` or
    the first ``certs.d/<host>`` directory that exists: ``*.crt`` files are
    CAs, trusted in addition to the system's (a bundle of both is written
    once, content-addressed, to the temp directory); a ``NAME.cert`` with
    its ``NAME.key`` is the client certificate."""
    directory = cert_dir
    if directory is None:
        for root in CERTS_D:
            candidate = os.path.join(os.path.expanduser(root), host)
            if os.path.isdir(candidate):
                directory = candidate
                break
    if directory is None or not os.path.isdir(directory):
        return None, None
    names = sorted(os.listdir(directory))
    cas = [os.path.join(directory, n) for n in names if n.endswith(".crt")]
    client = None
    for name in names:
        if name.endswith(".cert") and f"{name[:-5]}.key" in names:
            client = (os.path.join(directory, name), os.path.join(directory, f"{name[:-5]}.key"))
            break
    if not cas:
        return None, client
    import certifi
    parts = [open(certifi.where(), "rb").read()]
    for ca in cas:
        with open(ca, "rb") as handle:
            parts.append(handle.read())
    bundle = b"\n".join(parts)
    path = os.path.join(tempfile.gettempdir(),
                        f"layerfs-ca-{hashlib.sha256(bundle).hexdigest()[:32]}.pem")
    if not os.path.exists(path):
        fd, temp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".layerfs-ca-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(bundle)
        os.replace(temp, path)
    return path, client


# -- the cache -----------------------------------------------------------------

class BlobCache:
    """Verified blobs by digest, and the last digest of each tag."""

    def __init__(self, root: str):
        self.root = os.path.join(root, "registry")

    def blob_path(self, digest: str) -> str:
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


# -- the client ----------------------------------------------------------------

def is_loopback(host: str) -> bool:
    name = host
    if name.startswith("["):
        name = name[1:name.find("]")]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*"([^"]*)"')


def parse_challenge(header: str) -> tuple[str, dict]:
    """``Bearer realm="…",service="…"`` -> ``("bearer", {"realm": …})``."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_CHALLENGE_PARAM.findall(rest))


class Client:
    """One repository of one registry: manifests, blobs, tags.  Raises
    :class:`RegistryError` / :class:`RegistryAuthError` (one line each,
    naming the registry) and :class:`DigestMismatchError`."""

    def __init__(self, ref: Reference, options: Options = Options(),
                 credentials: Optional[auth.Credentials] = None):
        import requests            # imported here: `import layerfs` must stay light
        self.requests = requests
        self.ref = ref
        self.options = options
        self.host = ref.host
        self.api_host = _API_HOSTS.get(ref.host, ref.host)
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        ca_bundle, client_cert = certificates(self.api_host, options.cert_dir)
        self.verify: Any = options.tls_verify and (ca_bundle or True)
        if client_cert is not None:
            self.session.cert = client_cert
        if not options.tls_verify:
            # Asked for: urllib3's warning per request would only be noise
            # (and break the CLI's one-line errors).
            import warnings
            from urllib3.exceptions import InsecureRequestWarning
            warnings.filterwarnings("ignore", category=InsecureRequestWarning)
        self._base: Optional[str] = None
        self._authorization: Optional[str] = None
        self._lock = threading.Lock()
        # False: not looked up yet (login passes the ones to try)
        self._credentials: Any = credentials if credentials is not None else False

    # ---- connection, authentication

    def credentials(self) -> Optional[auth.Credentials]:
        if self._credentials is False:
            self._credentials = auth.lookup(self.host, self.ref.repository,
                                            self.options.authfile)
        return self._credentials

    def _send(self, method: str, path: str, **kwargs):
        """One request to ``/v2/<path>``.  The first one also settles the
        scheme: HTTPS, or (for a loopback host or with ``tls_verify=False``)
        plain HTTP when HTTPS fails; no extra request is spent on it.
        Network failures raise :class:`_Dropped`."""
        kwargs.setdefault("timeout", TIMEOUT)
        kwargs.setdefault("verify", self.verify)
        if self._base is not None:
            try:
                return self.session.request(method, f"{self._base}/v2/{path}", **kwargs)
            except self.requests.exceptions.RequestException as error:
                raise _Dropped(error) from None
        insecure_allowed = is_loopback(self.api_host) or not self.options.tls_verify
        first_error = None
        for scheme in ("https", "http") if insecure_allowed else ("https",):
            try:
                response = self.session.request(
                    method, f"{scheme}://{self.api_host}/v2/{path}", **kwargs)
            except self.requests.exceptions.RequestException as error:
                first_error = first_error or error
                if "CERTIFICATE_VERIFY_FAILED" in str(error):
                    # The server speaks TLS: falling back to HTTP would only
                    # hide why it is refused.
                    raise _Dropped(error, f"; trust its CA with certs.d/{self.api_host}/ca.crt"
                                          " or --cert-dir, or use --tls-verify=false")
                continue
            self._base = f"{scheme}://{self.api_host}"
            return response
        hint = "" if insecure_allowed else (
            "; plain HTTP is used only for loopback hosts or with --tls-verify=false")
        raise _Dropped(first_error, hint)

    def _authenticate(self, response, scope: str) -> None:
        """Answer the challenge of a 401 *response* for *scope*."""
        header = response.headers.get("WWW-Authenticate", "")
        scheme, params = parse_challenge(header)
        credentials = self.credentials()
        if scheme == "basic":
            if credentials is None:
                raise RegistryAuthError(f"registry {self.host} needs a username and "
                                        f"password: run `layerfs login {self.host}`")
            self._authorization = _basic(credentials)
            return
        if scheme != "bearer" or "realm" not in params:
            raise RegistryAuthError(f"registry {self.host} answered 401 with an "
                                    f"unsupported challenge {header[:80]!r}")
        query = {"service": params.get("service", "")} if params.get("service") else {}
        if params.get("scope") or scope:
            query["scope"] = params.get("scope") or scope
        try:
            answer = self.session.get(params["realm"] + "?" + urlencode(query),
                                      timeout=TIMEOUT, verify=self.verify,
                                      auth=None if credentials is None else (
                                          credentials.username, credentials.password))
        except self.requests.exceptions.RequestException as error:
            raise RegistryError(f"token server of {self.host} ({params['realm']}) is "
                                f"unreachable: {_short(error)}") from None
        if answer.status_code in (401, 403):
            who = ("anonymous access was refused: run `layerfs login "
                   f"{self.host}`") if credentials is None else (
                f"the credentials from {credentials.origin} were refused: "
                f"run `layerfs login {self.host}` again")
            raise RegistryAuthError(f"registry {self.host}: {who}")
        if answer.status_code != 200:
            raise RegistryError(f"token server of {self.host} answered "
                                f"{answer.status_code}")
        try:
            body = answer.json()
            token = body.get("token") or body.get("access_token")
        except ValueError:
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"token server of {self.host} gave no token")
        self._authorization = f"Bearer {token}"

    def request(self, method: str, path: str, *, headers: Optional[dict] = None,
                stream: bool = False, scope_action: str = "pull"):
        """*method* on ``/v2/<path>`` with authentication; the response of
        any status but 401/403/429, which become :class:`RegistryAuthError`."""
        scope = f"repository:{self.ref.repository}:{scope_action}"
        for attempt in (1, 2):
            sent = dict(headers or {})
            if self._authorization:
                sent["Authorization"] = self._authorization
            response = self._send(method, path, headers=sent, stream=stream)
            if response.status_code == 401 and attempt == 1:
                response.close()
                with self._lock:
                    if sent.get("Authorization") == self._authorization:
                        self._authenticate(response, scope)
                continue
            break
        if response.status_code in (401, 403):
            response.close()
            raise RegistryAuthError(
                f"registry {self.host} denied {scope_action} access to "
                f"{self.ref.repository} ({response.status_code}"
                f"{_error_code(response)}): check the repository name, or the "
                f"credentials (`layerfs login {self.host}`)")
        if response.status_code == 429:
            limits = ", ".join(f"{k}: {response.headers[k]}" for k in
                               ("ratelimit-limit", "ratelimit-remaining", "retry-after")
                               if k in response.headers)
            response.close()
            raise RegistryAuthError(f"registry {self.host} is rate-limiting requests (429"
                                    f"{'; ' + limits if limits else ''}): wait, or log in "
                                    f"for a higher limit")
        return response

    def check_login(self) -> None:
        """Prove the credentials this client holds: ``GET /v2/``, answering
        its challenge with them (a token server checks them even with no
        scope).  Raises :class:`RegistryAuthError` if they are refused."""
        try:
            response = self._send("GET", "")
            if response.status_code == 401:
                self._authenticate(response, "")
                response = self._send("GET", "", headers={
                    "Authorization": self._authorization})
        except _Dropped as dropped:
            raise RegistryError(f"cannot reach registry {self.host}: "
                                f"{_short(dropped.error)}{dropped.hint}") from None
        if response.status_code in (401, 403):
            raise RegistryAuthError(f"registry {self.host} refused the username and password")
        if response.status_code != 200:
            raise RegistryError(f"registry {self.host} answered {response.status_code} "
                                "to /v2/")

    # ---- manifests

    def resolve(self, tag: str) -> tuple[str, str]:
        """(digest, media type) a tag names now: one HEAD request."""
        response = self._call("HEAD", f"{self.ref.repository}/manifests/{quote(tag)}",
                              headers={"Accept": ACCEPT})
        self._expect_ok(response, f"{self.ref.name}:{tag}", "manifest")
        digest = response.headers.get("Docker-Content-Digest")
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        if digest is None:          # not every registry sends it on HEAD: GET then
            data, media_type, digest = self.manifest(tag)
        return digest, media_type

    def manifest(self, reference: str) -> tuple[bytes, str, str]:
        """The manifest (or index) *reference* (a tag or digest) names:
        (bytes, media type, digest), verified."""
        where = f"{self.ref.name}{'@' if ':' in reference else ':'}{reference}"
        response = self._call("GET", f"{self.ref.repository}/manifests/{quote(reference)}",
                              headers={"Accept": ACCEPT}, stream=True)
        with response:
            self._expect_ok(response, where, "manifest")
            data = response.raw.read(MAX_MANIFEST_SIZE + 1, decode_content=True)
        if len(data) > MAX_MANIFEST_SIZE:
            raise UnsupportedImageError(f"manifest is larger than {MAX_MANIFEST_SIZE} bytes",
                                        path=f"docker://{where}")
        expected = reference if ":" in reference else response.headers.get(
            "Docker-Content-Digest")
        algorithm = (expected or "sha256:").partition(":")[0]
        if algorithm not in ("sha256", "sha512"):
            raise UnsupportedImageError(f"digest {expected!r}: unsupported algorithm",
                                        path=f"docker://{where}")
        actual = f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"
        if expected is not None and actual != expected:
            raise DigestMismatchError(f"manifest has digest {actual}, expected {expected}",
                                      path=f"docker://{where}")
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        return data, media_type, actual

    def tags(self) -> list[str]:
        found: list[str] = []
        path = f"{self.ref.repository}/tags/list?n=1000"
        while path:
            response = self._call("GET", path)
            with response:
                self._expect_ok(response, self.ref.name, "repository")
                found.extend(response.json().get("tags") or [])
                link = response.headers.get("Link", "")
            match = re.search(r"<([^>]+)>", link)
            path = match.group(1).split("/v2/", 1)[-1] if match else ""
        return found

    # ---- blobs

    def fetch_blob(self, digest: str, cache: BlobCache, size: Optional[int] = None,
                   progress: Optional[Callable[[int], None]] = None) -> str:
        """Download blob *digest* into *cache* (verified) and return its
        path.  Resumes a dropped download with ``Range``; restarts it when
        the server ignores the range; removes the partial file on failure."""
        where = f"docker://{self.ref.name}@{digest}"
        handle, temp = cache.temp_file()
        state = _Download(digest, handle, progress)
        failures = 0
        try:
            with handle:
                while True:
                    try:
                        self._stream_blob(state, where)
                        if size is not None and state.received < size:
                            raise _Dropped(OSError(f"stream ended at {state.received} of "
                                                   f"{size} bytes"))
                        break
                    except _Dropped as dropped:
                        failures += 1
                        if failures > RETRIES:
                            raise RegistryError(
                                f"download broke off {failures} times, last: "
                                f"{_short(dropped.error)}", path=where) from None
                        time.sleep(0.2 * failures)
            if size is not None and state.received != size:
                raise DigestMismatchError(f"blob is {state.received} bytes, its descriptor "
                                          f"says {size}", path=where)
            actual = state.digest()
            if actual != digest:
                raise DigestMismatchError(f"blob has digest {actual}, expected {digest}",
                                          path=where)
            return cache.commit(temp, digest)
        except BaseException:
            _remove(temp)
            raise

    def _stream_blob(self, state: "_Download", where: str) -> None:
        """One GET of the blob, from where *state* stopped."""
        headers = {"Range": f"bytes={state.received}-"} if state.received else {}
        response = self.request("GET", f"{self.ref.repository}/blobs/{state.digest_wanted}",
                                headers=headers, stream=True)
        with response:
            if state.received and response.status_code == 200:
                state.restart()             # the server ignored Range: start over
            elif state.received and response.status_code != 206:
                self._expect_ok(response, where, "blob")
            elif not state.received:
                self._expect_ok(response, where, "blob")
            try:
                for chunk in response.iter_content(CHUNK_SIZE):
                    state.add(chunk)
            except (self.requests.exceptions.RequestException, OSError) as error:
                if isinstance(error, OSError) and not _is_network(error):
                    raise
                raise _Dropped(error) from None

    # ---- helpers

    def _call(self, method: str, path: str, **kwargs):
        try:
            return self.request(method, path, **kwargs)
        except _Dropped as dropped:
            raise RegistryError(f"cannot reach registry {self.host}: "
                                f"{_short(dropped.error)}{dropped.hint}") from None

    def _expect_ok(self, response, where: str, what: str) -> None:
        if response.status_code in (200, 206):
            return
        code = _error_code(response)
        if response.status_code == 404:
            error = RegistryError(f"{what} not found (404{code})", path=f"docker://{where}")
            error.errno = errno.ENOENT
            raise error
        raise RegistryError(f"registry {self.host} answered {response.status_code}"
                            f"{code} for the {what}", path=f"docker://{where}")


class _Download:
    """What has arrived of one blob: bytes written, their running hash."""

    def __init__(self, digest: str, handle, progress):
        self.digest_wanted = digest
        self.handle = handle
        self.progress = progress
        self.restart()

    def restart(self) -> None:
        self.handle.seek(0)
        self.handle.truncate()
        self.received = 0
        self.hasher = hashlib.new(self.digest_wanted.partition(":")[0])

    def add(self, chunk: bytes) -> None:
        self.handle.write(chunk)
        self.hasher.update(chunk)
        self.received += len(chunk)
        if self.progress:
            self.progress(len(chunk))

    def digest(self) -> str:
        return f"{self.digest_wanted.partition(':')[0]}:{self.hasher.hexdigest()}"


class _Dropped(Exception):
    """A connection that failed or broke off mid-transfer: worth retrying.
    *hint* is added to the message of the error it finally becomes."""

    def __init__(self, error: Optional[BaseException], hint: str = ""):
        super().__init__(str(error))
        self.error = error
        self.hint = hint


def _is_network(error: OSError) -> bool:
    return not isinstance(error, (FileNotFoundError, PermissionError)) and \
        error.errno not in (28,)   # ENOSPC is the disk's fault, not the network's


def _basic(credentials: auth.Credentials) -> str:
    import base64
    pair = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(pair).decode("ascii")


def _error_code(response) -> str:
    try:
        errors = response.json().get("errors") or []
        codes = [e.get("code") for e in errors if isinstance(e, dict) and e.get("code")]
        return f", {', '.join(codes)}" if codes else ""
    except Exception:   # a body that is not the registry's JSON: no code to add
        return ""


def _short(error: Optional[BaseException]) -> str:
    text = str(error) if error is not None else "no answer"
    text = re.sub(r"\s+", " ", text)
    match = re.search(r"\[Errno -?\d+\] [^')\]]+|Connection refused|Read timed out|"
                      r"IncompleteRead\([^)]*\)|wrong version number|"
                      r"certificate verify failed[^')\]]*", text)
    return match.group(0) if match else text[:160]


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- a registry as a blob store for layerfs.image ----------------------------------

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

    @property
    def client(self) -> Client:
        if self.options.offline:
            raise RegistryError("not in the cache, and --offline forbids fetching it",
                                path=self.label)
        with self._lock:
            if self._client is None:
                self._client = Client(self.ref, self.options)
            return self._client

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
        try:
            return os.path.getsize(self.path(name))
        except RegistryError as error:
            if _is_not_found(error):
                return None
            raise

    def read(self, name: str) -> bytes:
        with open(self.path(name), "rb") as handle:
            return handle.read(MAX_MANIFEST_SIZE + 1)

    def source(self, name: str) -> str:
        return self.path(name)

    def discard(self, digest: str) -> None:
        """Forget a fetched blob found bad after all: its diff_id is not the
        config's.  (Indexing stores nothing for a blob that fails a check.)"""
        _remove(self.cache.blob_path(digest))

    def prefetch(self, descriptors: list) -> None:
        """Download the blobs *descriptors* name that the cache lacks,
        several at once, with one progress report over all of them."""
        missing = [(d["digest"], d.get("size")) for d in descriptors
                   if isinstance(d, dict) and isinstance(d.get("digest"), str)
                   and not self.cache.has(d["digest"])]
        missing = list(dict.fromkeys(missing))
        if not missing or self.options.offline:
            return
        total = sum(size or 0 for _, size in missing)
        done = [0]
        lock = threading.Lock()

        def report(count: int) -> None:
            if self.progress is None:
                return
            with lock:
                done[0] += count
                self.progress(min(done[0], total), total)

        client = self.client
        with concurrent.futures.ThreadPoolExecutor(PARALLEL_DOWNLOADS) as pool:
            futures = [pool.submit(client.fetch_blob, digest, self.cache, size, report)
                       for digest, size in missing]
            errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:
            raise errors[0]

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
        media_type = _media_type(data, media_type)
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
            client = Client(attrs.evolve(self.ref, host=place.host, repository=place.repository),
                            attrs.evolve(self.options,
                                         tls_verify=self.options.tls_verify and not place.insecure))
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


def _is_not_found(error: RegistryError) -> bool:
    return error.errno == errno.ENOENT


def _digest_of(name: str) -> str:
    _, algorithm, hex_ = name.split("/", 2)
    return f"{algorithm}:{hex_}"


def _media_type(data: bytes, given: Optional[str]) -> str:
    """The media type of a manifest: its own ``mediaType`` field if it has
    one, else what the registry said, else guessed from its shape."""
    try:
        document = json.loads(data)
    except ValueError:
        raise UnsupportedImageError("manifest is not valid JSON") from None
    if isinstance(document, dict):
        own = document.get("mediaType")
        if isinstance(own, str) and own:
            return own
        if given in (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST):
            return given
        return OCI_INDEX if "manifests" in document else OCI_MANIFEST
    raise UnsupportedImageError("manifest is not a JSON object")


def cache_root(cache: Any) -> Optional[str]:
    """The cache directory of a ``cache=`` argument (None for ``False``)."""
    if cache is False:
        return None
    root = getattr(cache, "root", None)
    if root is None:
        from .layer import default_cache_root
        root = default_cache_root()
    return root


def save_layout(image: Any, cache: BlobCache, dest: str, tag: Optional[str]) -> str:
    """Write the registry image *image* (opened with the cache *cache*)
    into the OCI layout *dest* byte for byte: the same manifest, config and
    layer blobs (hardlinked from the cache where possible), so the same
    digests.  An existing layout is added to; an entry with the same *tag*
    is replaced.  Without a tag, the layout must hold no other image, so
    that later commands can always tell which image is meant.  Returns the
    manifest digest."""
    from .imagewrite import LAYOUT_VERSION, _write_atomic
    from .image import REF_NAME, canonical_json, descriptor
    index_path = os.path.join(dest, "index.json")
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as handle:
            index = json.load(handle)
    kept = [entry for entry in index.get("manifests", [])
            if tag is None or (entry.get("annotations") or {}).get(REF_NAME) != tag]
    if tag is None and any(entry.get("digest") != image.manifest_digest for entry in kept):
        raise UnsupportedImageError(
            "the layout already holds other images: give this one a tag "
            "(oci:DIR:TAG) so that later commands can tell which is meant", path=dest)
    for digest in [image.manifest_digest, image.config_digest,
                   *[layer.digest for layer in image.layers]]:
        _place_blob(cache.blob_path(digest), os.path.join(dest, "blobs", *digest.split(":")))
    layout = os.path.join(dest, "oci-layout")
    if not os.path.exists(layout):
        _write_atomic(layout, canonical_json(LAYOUT_VERSION))
    entry = descriptor(image.manifest.get("mediaType") or OCI_MANIFEST, image.manifest_digest,
                       os.path.getsize(cache.blob_path(image.manifest_digest)))
    if image.platform:
        parts = image.platform.split("/")
        entry["platform"] = {"os": parts[0], "architecture": parts[1],
                             **({"variant": parts[2]} if len(parts) > 2 else {})}
    if tag is not None:
        entry["annotations"] = {REF_NAME: tag}
    kept = [e for e in kept if not (tag is None and e.get("digest") == image.manifest_digest)]
    index["manifests"] = kept + [entry]
    _write_atomic(index_path, canonical_json(index))
    return image.manifest_digest


def _place_blob(source: str, final: str) -> None:
    if os.path.exists(final):
        return
    os.makedirs(os.path.dirname(final), exist_ok=True)
    temp = f"{final}.tmp-{os.getpid()}"
    try:
        try:
            os.link(source, temp)
        except OSError:
            shutil.copyfile(source, temp)
        os.replace(temp, final)
    except BaseException:
        _remove(temp)
        raise
