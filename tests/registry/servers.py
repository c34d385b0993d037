"""Small HTTP servers the registry tests run beside ``docker-registry``: a
token server signing ES256 JWTs (the registry's ``auth: token`` backend
checks them against our certificate), and a blob store that the registry's
``redirect`` middleware sends blob downloads to, which refuses any
``Authorization`` header as presigned S3 URLs do."""

from __future__ import annotations

import base64
import datetime
import json
import os
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from registry_helpers import free_port


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class _Server:
    handler_class: type

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        handler = type("Handler", (self.handler_class,), {"owner": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.requests: list[dict] = []

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


class _Quiet(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass


class TokenServer(_Server):
    """Issues tokens for ``users`` ({name: password}); ``grants`` maps a
    user (None: anonymous) to the repositories it may pull."""

    def __init__(self, workdir, *, users: dict, grants: dict, service="test-registry",
                 issuer="test-issuer"):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        self.users, self.grants = users, grants
        self.service, self.issuer = service, issuer
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "layerfs test token")])
        now = datetime.datetime.now(datetime.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(days=1))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .sign(self.key, hashes.SHA256()))
        self.cert_path = os.path.join(str(workdir), "token-cert.pem")
        os.makedirs(str(workdir), exist_ok=True)
        with open(self.cert_path, "wb") as handle:
            handle.write(self.cert.public_bytes(serialization.Encoding.PEM))
        self._der = self.cert.public_bytes(serialization.Encoding.DER)
        super().__init__()

    def registry_auth(self) -> dict:
        return {"token": {"realm": f"{self.url}/token", "service": self.service,
                          "issuer": self.issuer, "rootcertbundle": self.cert_path}}

    def token(self, user, scopes: list[str]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
        allowed = self.grants.get(user, ())
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and name in allowed:
                wanted = [a for a in actions.split(",") if a == "pull"]
                access.append({"type": "repository", "name": name, "actions": wanted})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(self._der).decode()]}
        claims = {"iss": self.issuer, "sub": user or "", "aud": self.service,
                  "exp": now + 300, "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex,
                  "access": access}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        der = self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    class handler_class(_Quiet):
        def do_GET(self):
            owner = self.owner
            query = parse_qs(urlparse(self.path).query)
            user = None
            header = self.headers.get("Authorization", "")
            owner.requests.append({"path": self.path, "authorization": header})
            if header.startswith("Basic "):
                name, _, password = base64.b64decode(header[6:]).decode().partition(":")
                if owner.users.get(name) != password:
                    return self._answer(401, {"details": "wrong username or password"})
                user = name
            if query.get("service", [""])[0] != owner.service:
                return self._answer(400, {"details": "unknown service"})
            token = owner.token(user, query.get("scope", []))
            self._answer(200, {"token": token, "expires_in": 300})

        def do_POST(self):
            """The OAuth2 refresh-token grant: ``refresh_token`` is
            ``rt-<user>``; the token is for the same scopes."""
            owner = self.owner
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode())
            owner.requests.append({"path": self.path, "form": form,
                                   "authorization": self.headers.get("Authorization", "")})
            refresh = form.get("refresh_token", [""])[0]
            user = refresh[3:] if refresh.startswith("rt-") else None
            if form.get("grant_type") != ["refresh_token"] or user not in owner.users:
                return self._answer(401, {"details": "bad refresh token"})
            token = owner.token(user, form.get("scope", []))
            self._answer(200, {"access_token": token, "expires_in": 300})

        def _answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)


class BlobStore(_Server):
    """Serves the registry's storage files (``GET /docker/registry/v2/...``),
    with ``Range``; refuses requests that carry ``Authorization``.  The
    first ``drop_first`` responses for a blob stop after half the body and
    close the connection."""

    def __init__(self, storage: str, drop_first: int = 0):
        self.storage = storage
        self.drop_first = drop_first
        self.dropped: dict[str, int] = {}
        self.lock = threading.Lock()
        self.active = 0
        self.most_active = 0
        self.barrier: threading.Barrier | None = None
        self.held: set = set()
        super().__init__()

    def hold_until_concurrent(self, digests: list) -> None:
        """Make the downloads of *digests* wait (10 s at most) until all of
        them are in progress at once: a client that downloads one blob at a
        time never gets there, and the barrier breaks."""
        self.held = {digest.partition(":")[2] for digest in digests}
        self.barrier = threading.Barrier(len(self.held), timeout=10)

    class handler_class(_Quiet):
        def do_GET(self):
            owner = self.owner
            path = urlparse(self.path).path
            owner.requests.append({"path": path, "authorization": self.headers.get(
                "Authorization"), "range": self.headers.get("Range")})
            if self.headers.get("Authorization"):
                return self._plain(400, b"presigned URL: Authorization is not allowed")
            file = os.path.normpath(os.path.join(owner.storage, path.lstrip("/")))
            if not file.startswith(owner.storage) or not os.path.isfile(file):
                return self._plain(404, b"no such object")
            with open(file, "rb") as handle:
                data = handle.read()
            start, status = 0, 200
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if match:
                start, status = int(match.group(1)), 206
            body = data[start:]
            with owner.lock:
                count = owner.dropped.get(path, 0)
                drop = count < owner.drop_first
                if drop:
                    owner.dropped[path] = count + 1
                owner.active += 1
                owner.most_active = max(owner.most_active, owner.active)
            try:
                if owner.barrier is not None and path.split("/")[-2] in owner.held:
                    try:
                        owner.barrier.wait()
                    except threading.BrokenBarrierError:
                        pass
                self._send(status, start, data, body, drop)
            finally:
                with owner.lock:
                    owner.active -= 1

        def _send(self, status, start, data, body, drop):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if drop:
                self.wfile.write(body[:max(1, len(body) // 2)])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.wfile.write(body)

        def _plain(self, status, text):
            self.send_response(status)
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)


class CountingProxy(_Server):
    """A pass-through HTTP proxy in front of a registry (``upstream``, its
    base URL) that counts what it serves: ``blob_bytes`` (body bytes of
    ``/blobs/`` answers, the layer data a client fetched) and ``blob_requests``.
    Its ``host`` names it in a ``docker://`` reference; any process may use
    it, so what a second process fetches is counted too.  A response is
    counted whole when it is asked for (a client that closes it early read
    less): the count does not depend on when the client reads.""" 

    FORWARDED = ("Range", "Accept", "Authorization")
    RETURNED = ("Content-Type", "Content-Range", "Docker-Content-Digest", "Location",
                "WWW-Authenticate", "Docker-Distribution-Api-Version")

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.blob_bytes = 0
        self.blob_requests = 0
        self.lock = threading.Lock()
        super().__init__()
        self.host = f"127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self.lock:
            self.blob_bytes = self.blob_requests = 0

    class handler_class(_Quiet):
        def handle_one_request(self):
            try:
                super().handle_one_request()
            except ConnectionResetError:      # a client closing a kept-alive connection
                self.close_connection = True

        def do_GET(self):
            self._forward("GET")

        def do_HEAD(self):
            self._forward("HEAD")

        def _forward(self, method):
            import requests
            owner = self.owner
            headers = {name: self.headers[name] for name in owner.FORWARDED
                       if self.headers.get(name)}
            answer = requests.request(method, owner.upstream + self.path, headers=headers,
                                      allow_redirects=False, timeout=30)
            body = answer.content if method == "GET" else b""
            self.send_response(answer.status_code)
            for name in owner.RETURNED:
                if name in answer.headers:
                    self.send_header(name, answer.headers[name])
            self.send_header("Content-Length", answer.headers.get("Content-Length", "0")
                             if method == "HEAD" else str(len(body)))
            self.end_headers()
            if method == "GET":
                if "/blobs/" in self.path:     # counted when asked for, not when read
                    with owner.lock:
                        owner.blob_bytes += len(body)
                        owner.blob_requests += 1
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass            # the client had what it wanted, and closed
