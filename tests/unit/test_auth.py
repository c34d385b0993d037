"""Where registry credentials are found and how they are written."""

import base64
import json
import os
import stat

import pytest

from layerfs import auth
from layerfs.errors import RegistryAuthError


def encoded(user, password):
    return base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def home(tmp_path, monkeypatch):
    for variable in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_CONFIG",
                     "XDG_CONFIG_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def write(path, document):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))


def test_lookup_order_and_most_specific_key(home, monkeypatch):
    write(home / ".dockercfg", {"r.io": {"auth": encoded("old", "1")}})
    assert auth.lookup("r.io").username == "old"
    write(home / ".docker" / "config.json", {"auths": {
        "https://r.io/v1/": {"auth": encoded("docker", "2")}}})
    assert auth.lookup("r.io").username == "docker"
    write(home / ".config" / "containers" / "auth.json", {"auths": {
        "r.io": {"auth": encoded("host", "3")},
        "r.io/team": {"auth": encoded("team", "4")},
        "r.io/team/app": {"auth": encoded("app", "5")}}})
    assert auth.lookup("r.io", "team/app").username == "app"
    assert auth.lookup("r.io", "team/other").username == "team"
    assert auth.lookup("r.io", "else/x").username == "host"
    assert auth.lookup("other.io") is None
    runtime = home / "run"
    write(runtime / "containers" / "auth.json", {"auths": {"r.io": {"auth": encoded("rt", "6")}}})
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert auth.lookup("r.io", "team/app").username == "rt"
    own = home / "own.json"
    write(own, {"auths": {}})
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(own))
    assert auth.lookup("r.io") is None                 # that file only
    assert auth.lookup("r.io", authfile=str(home / ".dockercfg")).username == "old"


def test_docker_hub_keys(home):
    write(home / ".docker" / "config.json", {"auths": {
        "https://index.docker.io/v1/": {"auth": encoded("hub", "x")}}})
    found = auth.lookup("docker.io", "library/busybox")
    assert (found.username, found.password) == ("hub", "x")


def test_credential_helper(home, monkeypatch):
    bin_dir = home / "bin"
    bin_dir.mkdir()
    helper = bin_dir / "docker-credential-fake"
    helper.write_text('#!/bin/sh\nread host\n[ "$1" = get ] || exit 3\n'
                      'if [ "$host" = r.io ]; then echo \'{"Username":"h","Secret":"s"}\'; '
                      'else echo "credentials not found in native keychain"; exit 1; fi\n')
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    write(home / ".docker" / "config.json", {"credHelpers": {"r.io": "fake", "q.io": "fake",
                                                              "z.io": "missing"},
                                             "auths": {"q.io": {"auth": encoded("a", "b")}}})
    found = auth.lookup("r.io")
    assert (found.username, found.password) == ("h", "s")
    assert auth.lookup("q.io").username == "a"          # helper has none: auths next
    with pytest.raises(RegistryAuthError, match="docker-credential-missing"):
        auth.lookup("z.io")
    write(home / ".docker" / "config.json", {"credsStore": "fake"})     # docker's default
    assert auth.lookup("r.io").username == "h"
    assert auth.lookup("q.io") is None


def test_bad_files_are_named(home):
    (home / ".docker").mkdir()
    (home / ".docker" / "config.json").write_text("{not json")
    with pytest.raises(RegistryAuthError, match="config.json"):
        auth.lookup("r.io")
    write(home / ".docker" / "config.json", {"auths": {"r.io": {"auth": "!!!"}}})
    with pytest.raises(RegistryAuthError, match="base64"):
        auth.lookup("r.io")


def test_store_and_remove(home, monkeypatch):
    runtime = home / "run"
    runtime.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    path = auth.store("r.io:5000", "u", "p:w")
    assert path == str(runtime / "containers" / "auth.json")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert auth.lookup("r.io:5000").password == "p:w"
    auth.store("other.io", "x", "y")
    assert auth.remove("r.io:5000") and not auth.remove("r.io:5000")
    assert list(json.loads(open(path).read())["auths"]) == ["other.io"]
