"""Credentials, tokens, redirects and dropped connections, against a real
registry: htpasswd and token-auth variants, and a redirecting blob store."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

import layerfs
from layerfs.errors import RegistryAuthError, RegistryError
from layerfs.layer import IndexCache
from layerfs.registry import Options

from registry_helpers import Registry, htpasswd_line
from servers import BlobStore, TokenServer


def one_file_layer(name: str, content: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    return out.getvalue()


def cli(*args, env, stdin=None):
    return subprocess.run([sys.executable, "-m", "layerfs.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, input=stdin, timeout=120)


def one_line(result, *words):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerfs: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def env(tmp_path):
    """A user environment of its own: auth file and cache in the test's dir."""
    return dict(os.environ, REGISTRY_AUTH_FILE=str(tmp_path / "auth.json"),
                LAYERFS_CACHE_DIR=str(tmp_path / "cache"), HOME=str(tmp_path / "home"))


@pytest.fixture
def htpasswd_registry(tmp_path):
    path = tmp_path / "htpasswd"
    path.write_text(htpasswd_line("alice", "s3cret") + "\n")
    server = Registry(tmp_path / "registry",
                      auth={"htpasswd": {"realm": "layerfs-test", "path": str(path)}})
    yield server
    server.close()


def test_htpasswd_login_pull_and_logout(htpasswd_registry, env, tmp_path):
    registry = htpasswd_registry
    registry.push_image("team/app", "v1", [one_file_layer("hello", b"hi")],
                        auth=("alice", "s3cret"))
    ref = f"docker://{registry.host}/team/app:v1"
    one_line(cli("cat", ref, "/hello", env=env), "needs a username and password",
             f"layerfs login {registry.host}")
    one_line(cli("login", "-u", "alice", "--password-stdin", registry.host, env=env,
                 stdin="wrong\n"), registry.host, "refused")
    assert not (tmp_path / "auth.json").exists()
    done = cli("login", "-u", "alice", "--password-stdin", registry.host, env=env,
               stdin="s3cret\n")
    assert done.returncode == 0, done.stderr
    stored = json.loads((tmp_path / "auth.json").read_text())
    assert base64.b64decode(stored["auths"][registry.host]["auth"]) == b"alice:s3cret"
    assert os.stat(tmp_path / "auth.json").st_mode & 0o077 == 0
    result = cli("cat", ref, "/hello", env=env)
    assert result.returncode == 0 and result.stdout == "hi", result.stderr
    assert cli("logout", registry.host, env=env).returncode == 0
    assert registry.host not in json.loads((tmp_path / "auth.json").read_text())["auths"]
    # The cache still holds the blobs, but the tag must be resolved again.
    one_line(cli("cat", ref, "/hello", env=env), "needs a username and password")


def test_credentials_are_found_where_the_containers_tools_keep_them(
        htpasswd_registry, tmp_path, monkeypatch):
    registry = htpasswd_registry
    registry.push_image("team/app", "v1", [one_file_layer("hello", b"hi")],
                        auth=("alice", "s3cret"))
    for variable in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_CONFIG",
                     "XDG_CONFIG_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    docker_config = tmp_path / "home" / ".docker" / "config.json"
    docker_config.parent.mkdir(parents=True)
    token = base64.b64encode(b"alice:s3cret").decode()
    # A key for the repository path is preferred to the host's.
    docker_config.write_text(json.dumps({"auths": {
        f"{registry.host}/team/app": {"auth": token},
        registry.host: {"auth": base64.b64encode(b"alice:wrong").decode()}}}))
    ref = f"docker://{registry.host}/team/app:v1"
    cache = IndexCache(tmp_path / "cache")
    with layerfs.open(ref, cache=cache) as fs:
        assert fs.read_bytes("/hello") == b"hi"
    # ~/.config/containers/auth.json comes before docker's file.
    containers = tmp_path / "home" / ".config" / "containers" / "auth.json"
    containers.parent.mkdir(parents=True)
    containers.write_text(json.dumps({"auths": {registry.host: {
        "auth": base64.b64encode(b"alice:wrong").decode()}}}))
    with pytest.raises(RegistryAuthError, match=registry.host):
        layerfs.open(ref, cache=IndexCache(tmp_path / "cache2"))
    # --authfile / authfile= overrides everything.
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"auths": {registry.host: {"auth": token}}}))
    with layerfs.open(ref, cache=IndexCache(tmp_path / "cache3"),
                      registry=Options(authfile=str(own))) as fs:
        assert fs.read_bytes("/hello") == b"hi"


@pytest.fixture
def token_registry(tmp_path):
    """A registry whose repositories were pushed by a plain registry on the
    same storage, then served with token auth: ``public`` for anyone,
    ``private`` for bob only; carol may log in but pull nothing."""
    storage = str(tmp_path / "storage")
    plain = Registry(tmp_path / "plain", storage=storage)
    try:
        for repo in ("public", "private"):
            plain.push_image(repo, "v1", [one_file_layer("who", repo.encode())])
    finally:
        plain.close()
    tokens = TokenServer(tmp_path / "tokens", users={"bob": "pw", "carol": "pw"},
                         grants={None: {"public"}, "bob": {"public", "private"}})
    server = Registry(tmp_path / "registry", storage=storage, auth=tokens.registry_auth())
    server.tokens = tokens
    yield server
    server.close()
    tokens.close()


def test_token_auth_anonymous_with_credentials_and_missing_scope(token_registry, tmp_path):
    registry = token_registry
    cache = IndexCache(tmp_path / "cache")
    with layerfs.open(f"docker://{registry.host}/public:v1", cache=cache) as fs:
        assert fs.read_bytes("/who") == b"public"
    assert registry.tokens.requests and not registry.tokens.requests[0]["authorization"]
    private = f"docker://{registry.host}/private:v1"
    with pytest.raises(RegistryAuthError) as caught:
        layerfs.open(private, cache=cache)
    assert f"registry {registry.host} denied pull access to private" in str(caught.value)
    authfile = tmp_path / "auth.json"
    authfile.write_text(json.dumps({"auths": {registry.host: {
        "auth": base64.b64encode(b"bob:pw").decode()}}}))
    with layerfs.open(private, cache=cache, registry=Options(authfile=str(authfile))) as fs:
        assert fs.read_bytes("/who") == b"private"
    authfile.write_text(json.dumps({"auths": {registry.host: {
        "auth": base64.b64encode(b"carol:pw").decode()}}}))
    with pytest.raises(RegistryAuthError, match="denied pull access to private"):
        layerfs.open(private, cache=IndexCache(tmp_path / "c2"),
                     registry=Options(authfile=str(authfile)))
    authfile.write_text(json.dumps({"auths": {registry.host: {"identitytoken": "rt-bob"}}}))
    with layerfs.open(private, cache=IndexCache(tmp_path / "c4"),
                      registry=Options(authfile=str(authfile))) as fs:
        assert fs.read_bytes("/who") == b"private"
    posted = [r for r in registry.tokens.requests if "form" in r]
    assert posted and posted[-1]["form"]["refresh_token"] == ["rt-bob"]
    assert not posted[-1]["authorization"]           # never sent as a password
    authfile.write_text(json.dumps({"auths": {registry.host: {
        "auth": base64.b64encode(b"bob:nope").decode()}}}))
    with pytest.raises(RegistryAuthError, match="were refused"):
        layerfs.open(private, cache=IndexCache(tmp_path / "c3"),
                     registry=Options(authfile=str(authfile)))
    assert not os.listdir(tmp_path / "c3" / "registry" / "tmp") if (
        tmp_path / "c3" / "registry" / "tmp").exists() else True


@pytest.fixture
def redirecting(tmp_path):
    """An htpasswd registry that redirects blob downloads to a blob store
    refusing Authorization."""
    storage = str(tmp_path / "storage")
    store = BlobStore(storage)
    path = tmp_path / "htpasswd"
    path.write_text(htpasswd_line("alice", "s3cret") + "\n")
    server = Registry(tmp_path / "registry", storage=storage,
                      auth={"htpasswd": {"realm": "layerfs-test", "path": str(path)}},
                      middleware={"storage": [{"name": "redirect",
                                               "options": {"baseurl": store.url + "/"}}]})
    server.store = store
    server.authfile = tmp_path / "auth.json"
    server.authfile.write_text(json.dumps({"auths": {server.host: {
        "auth": base64.b64encode(b"alice:s3cret").decode()}}}))
    yield server
    server.close()
    store.close()


def test_redirected_blobs_get_no_credentials(redirecting, tmp_path):
    registry = redirecting
    pushed = registry.push_image("app", "v1", [one_file_layer("f", b"x" * 100_000)],
                                 auth=("alice", "s3cret"))
    options = Options(authfile=str(registry.authfile))
    with layerfs.open(f"docker://{registry.host}/app:v1", cache=IndexCache(tmp_path / "c"),
                      registry=options) as fs:
        assert fs.read_bytes("/f") == b"x" * 100_000
    fetched = {r["path"].split("/")[-2] for r in registry.store.requests}
    assert pushed["manifest"]["layers"][0]["digest"].partition(":")[2] in fetched
    assert all(r["authorization"] is None for r in registry.store.requests)


def test_a_dropped_download_resumes_with_range(redirecting, tmp_path):
    registry = redirecting
    registry.store.drop_first = 1
    content = os.urandom(1_500_000)
    registry.push_image("app", "v1", [one_file_layer("f", content)], auth=("alice", "s3cret"))
    options = Options(authfile=str(registry.authfile))
    with layerfs.open(f"docker://{registry.host}/app:v1", cache=IndexCache(tmp_path / "c"),
                      registry=options) as fs:
        assert fs.read_bytes("/f") == content
    ranged = [r for r in registry.store.requests if r["range"]]
    # The layer was cut after about 750 kB: the second request asks for the rest.
    assert ranged and all(int(r["range"][6:-1]) >= 256 << 10 for r in ranged)


def test_a_download_that_keeps_breaking_is_one_error_and_leaves_no_partial_file(
        redirecting, tmp_path):
    registry = redirecting
    registry.store.drop_first = 100
    registry.push_image("app", "v1", [one_file_layer("f", os.urandom(200_000))],
                        auth=("alice", "s3cret"))
    cache = IndexCache(tmp_path / "c")
    with pytest.raises(RegistryError, match="download broke off") as caught:
        layerfs.open(f"docker://{registry.host}/app:v1", cache=cache,
                     registry=Options(authfile=str(registry.authfile)))
    assert f"docker://{registry.host}/app@sha256:" in str(caught.value)
    assert os.listdir(tmp_path / "c" / "registry" / "tmp") == []


def test_rate_limiting_is_one_line_with_the_limits(tmp_path):
    """docker-registry does not rate-limit: a stand-in answers 429 the way
    Docker Hub does, with its rate-limit headers."""
    from servers import _Quiet, _Server

    class RateLimited(_Server):
        class handler_class(_Quiet):
            def do_HEAD(self):
                self.send_response(429)
                self.send_header("ratelimit-limit", "100;w=21600")
                self.send_header("ratelimit-remaining", "0;w=21600")
                self.send_header("Content-Length", "0")
                self.end_headers()
            do_GET = do_HEAD

    server = RateLimited()
    try:
        env = dict(os.environ, LAYERFS_CACHE_DIR=str(tmp_path / "c"),
                   REGISTRY_AUTH_FILE=str(tmp_path / "auth.json"))
        result = cli("ls", f"docker://127.0.0.1:{server.port}/library/busybox:1", env=env)
        one_line(result, f"127.0.0.1:{server.port}", "429", "ratelimit-limit: 100;w=21600",
                 "ratelimit-remaining: 0;w=21600")
    finally:
        server.close()


def test_layers_download_at_once(redirecting, tmp_path):
    registry = redirecting
    layers = [one_file_layer(f"f{number}", os.urandom(50_000)) for number in range(3)]
    pushed = registry.push_image("app", "v1", layers, auth=("alice", "s3cret"))
    registry.store.hold_until_concurrent([d["digest"] for d in pushed["manifest"]["layers"]])
    with layerfs.open(f"docker://{registry.host}/app:v1", cache=IndexCache(tmp_path / "c"),
                      registry=Options(authfile=str(registry.authfile))) as fs:
        assert sorted(fs.listdir("/")) == ["f0", "f1", "f2"]
    assert not registry.store.barrier.broken
    assert registry.store.most_active == 3
