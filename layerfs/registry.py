"""Images in registries: the client side of the OCI distribution API.

Everything that crosses the network lives here: the :class:`Client` of one
repository (manifests, blobs, tags, authentication).  Which manifest of an
index is meant, and how a layer is read, stay :mod:`layerfs.image`'s and
:mod:`layerfs.layer`'s business: a registry is one more place blobs come
from (:class:`layerfs.remote.RemoteStore`), and every blob lands in a
content-addressed cache before anything reads it.

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

Blobs are written through a cache object (:class:`layerfs.remote.BlobCache`);
which blobs an image needs, and the cache itself, are :mod:`layerfs.remote`'s.
Registry settings (certificates, ``registries.conf``) are
:mod:`layerfs.registryconf`'s; credentials :mod:`layerfs.auth`'s.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import os
import re
import threading
import time
from typing import Any, Callable, Optional
from urllib.parse import quote, urlencode

import attrs

from . import auth
from .errors import (DigestMismatchError, RegistryAuthError, RegistryError,
                     UnsupportedImageError)
from .reference import DEFAULT_HOST, Reference, is_digest
from .registryconf import certificates

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
LAZY_ENV = "LAYERFS_LAZY"
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
    :data:`layerfs.registryconf.CERTS_D`), ``registries_conf`` (mirrors, locations, insecure and
    blocked registries; default: see :mod:`layerfs.registryconf`), ``lazy``
    (read layers from the registry as they are needed instead of fetching
    them whole first; default: on, unless ``$LAYERFS_LAZY=0``; ``layerfs
    pull`` and ``copy`` always fetch whole blobs; see docs/cache.md)."""
    authfile: Optional[str] = None
    tls_verify: bool = True
    offline: bool = False
    cert_dir: Optional[str] = None
    registries_conf: Optional[str] = None
    lazy: bool = attrs.field(factory=lambda: lazy_default())


def lazy_default() -> bool:
    """Lazy reading, unless ``$LAYERFS_LAZY`` is ``0`` (or ``false``, ``no``)."""
    return os.environ.get(LAZY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


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
            if credentials is not None and credentials.is_identity_token:
                raise RegistryAuthError(f"registry {self.host} asks for a password, and "
                                        f"{credentials.origin} holds an identity token: run "
                                        f"`layerfs login {self.host}`")
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
            if credentials is not None and credentials.is_identity_token:
                # docker's identity token is an OAuth2 refresh token: it is
                # traded with a POST, never sent as a password.
                answer = self.session.post(params["realm"], timeout=TIMEOUT, verify=self.verify,
                                           data=dict(query, grant_type="refresh_token",
                                                     refresh_token=credentials.password,
                                                     client_id=USER_AGENT))
            else:
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
        response.close()
        digest = response.headers.get("Docker-Content-Digest")
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        if response.status_code in (400, 405, 501) or (
                response.status_code == 200 and not is_digest(digest)):
            # No HEAD, or no usable digest with it: GET, and hash the body.
            data, media_type, digest = self.manifest(tag)
            return digest, media_type
        self._expect_ok(response, f"{self.ref.name}:{tag}", "manifest")
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
        if expected is not None and not is_digest(expected):
            expected = None     # a header naming no digest we know: hash the body alone
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
                try:
                    tags = response.json().get("tags") or []
                except (ValueError, AttributeError):
                    tags = None
                if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                    raise RegistryError(f"registry {self.host} answered the tag list with "
                                        "something that is not one",
                                        path=f"docker://{self.ref.name}")
                found.extend(tags)
                link = response.headers.get("Link", "")
            match = re.search(r"<([^>]+)>", link)
            path = match.group(1).split("/v2/", 1)[-1] if match else ""
        return found

    # ---- blobs

    def fetch_blob(self, digest: str, cache: Any, size: Optional[int] = None,
                   progress: Optional[Callable[[int], None]] = None) -> str:
        """Download blob *digest* into *cache* (a
        :class:`layerfs.remote.BlobCache`), verified, and return its path.  Resumes a dropped download with ``Range``; restarts it when
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
