"""Registry credentials, found and kept where the containers tools keep them.

Everything about *which* username and password a registry gets lives here;
how they are sent (basic, or traded for a bearer token) is
:mod:`layerfs.registry`'s business.

Lookup order (containers-auth.json(5), as podman and skopeo read it):

1. ``--authfile FILE`` (``authfile=``), else ``$REGISTRY_AUTH_FILE``: only that file;
2. ``$XDG_RUNTIME_DIR/containers/auth.json``;
3. ``~/.config/containers/auth.json``;
4. ``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``;
5. ``~/.dockercfg`` (the old format: the ``auths`` object at the top level).

In each file, ``credHelpers[host]`` (else docker's ``credsStore``) names a
``docker-credential-NAME`` program asked first; then the ``auths`` keys are matched from the most specific to
the least: ``host/ns/repo``, ``host/ns``, ``host`` (a key may carry a scheme
and a path, as docker writes ``https://index.docker.io/v1/``).  The first
file with an answer wins.

``login`` writes to the auth file named by ``--authfile`` / ``$REGISTRY_AUTH_FILE``,
else to ``$XDG_RUNTIME_DIR/containers/auth.json`` (where podman writes), else to
``~/.config/containers/auth.json``; the file is created mode 0600 and replaced
atomically.  ``logout`` removes the entry from that file.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import subprocess
import tempfile
from typing import Optional

import attrs

from .errors import RegistryAuthError

DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "registry-1.docker.io")


@attrs.frozen
class Credentials:
    username: str
    password: str = attrs.field(repr=False)
    origin: str = ""     # the file (and helper) they came from, for messages

    @property
    def is_identity_token(self) -> bool:
        """docker's ``<token>`` user: the secret is a refresh token."""
        return self.username == "<token>"


def auth_files(authfile: Optional[str] = None) -> list[str]:
    """The files looked at, in order (see the module docstring)."""
    chosen = authfile or os.environ.get("REGISTRY_AUTH_FILE")
    if chosen:
        return [chosen]
    files = []
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        files.append(os.path.join(runtime, "containers", "auth.json"))
    home = os.path.expanduser("~")
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    files.append(os.path.join(config_home, "containers", "auth.json"))
    docker_config = os.environ.get("DOCKER_CONFIG")
    files.append(os.path.join(docker_config, "config.json") if docker_config
                 else os.path.join(home, ".docker", "config.json"))
    files.append(os.path.join(home, ".dockercfg"))
    return files


def write_target(authfile: Optional[str] = None) -> str:
    """The file ``login`` writes and ``logout`` edits."""
    chosen = authfile or os.environ.get("REGISTRY_AUTH_FILE")
    if chosen:
        return chosen
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "containers", "auth.json")
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(
        os.path.expanduser("~"), ".config")
    return os.path.join(config_home, "containers", "auth.json")


def lookup(host: str, repository: Optional[str] = None,
           authfile: Optional[str] = None) -> Optional[Credentials]:
    """The credentials for *host* (and *repository* on it), or None."""
    for path in auth_files(authfile):
        document = _load(path, must_exist=path == authfile)
        if document is None:
            continue
        helper = (document.get("credHelpers") or {}).get(host) or document.get("credsStore")
        if isinstance(helper, str) and helper:
            found = _from_helper(helper, host, path)
            if found is not None:
                return found
        auths = document.get("auths") if "auths" in document else (
            document if path.endswith(".dockercfg") else None)
        if not isinstance(auths, dict):
            continue
        for key in _keys(host, repository):
            entry = _find_entry(auths, key)
            if entry is not None:
                return _decode(entry, f"{path} ({key})")
    return None


def store(host: str, username: str, password: str,
          authfile: Optional[str] = None) -> str:
    """Record credentials for *host*; returns the file written."""
    path = write_target(authfile)
    document = _load(path) or {}
    auths = document.setdefault("auths", {})
    token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
    auths[host] = {"auth": token}
    _write_private(path, document)
    return path


def remove(host: str, authfile: Optional[str] = None) -> bool:
    """Forget *host*'s credentials; False if there were none."""
    path = write_target(authfile)
    document = _load(path)
    if not document or host not in (document.get("auths") or {}):
        return False
    del document["auths"][host]
    _write_private(path, document)
    return True


def _keys(host: str, repository: Optional[str]) -> list[str]:
    keys = []
    if repository:
        parts = repository.split("/")
        for end in range(len(parts), 0, -1):
            keys.append(f"{host}/{'/'.join(parts[:end])}")
    keys.append(host)
    if host == "docker.io":
        keys.extend(DOCKER_HUB_KEYS)
    return keys


def _find_entry(auths: dict, key: str) -> Optional[dict]:
    if isinstance(auths.get(key), dict):
        return auths[key]
    for name, entry in auths.items():      # keys written with a scheme or a path
        bare = name.split("://", 1)[-1].rstrip("/")
        if bare.endswith("/v1") or bare.endswith("/v2"):
            bare = bare[:-3]
        if bare == key and isinstance(entry, dict):
            return entry
    return None


def _decode(entry: dict, origin: str) -> Optional[Credentials]:
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            username, sep, password = base64.b64decode(auth, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            sep = ""
        if not sep:
            raise RegistryAuthError("the \"auth\" value is not base64 of user:password",
                                    path=origin)
        return Credentials(username, password, origin)
    token = entry.get("identitytoken")
    if isinstance(token, str) and token:
        return Credentials("<token>", token, origin)
    return None


def _from_helper(helper: str, host: str, origin: str) -> Optional[Credentials]:
    program = f"docker-credential-{helper}"
    try:
        result = subprocess.run([program, "get"], input=host, capture_output=True,
                                text=True, timeout=60)
    except FileNotFoundError:
        raise RegistryAuthError(f"credential helper {program} (credHelpers of {host}) "
                                "is not installed", path=origin) from None
    if result.returncode != 0:
        if "not found" in (result.stdout + result.stderr).lower():
            return None
        raise RegistryAuthError(f"credential helper {program} failed for {host}: "
                                f"{(result.stderr or result.stdout).strip()[:200]}",
                                path=origin)
    try:
        answer = json.loads(result.stdout)
        return Credentials(answer["Username"], answer["Secret"], f"{origin} ({program})")
    except (ValueError, KeyError, TypeError):
        raise RegistryAuthError(f"credential helper {program} gave no Username/Secret",
                                path=origin) from None


def _load(path: str, must_exist: bool = False) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except FileNotFoundError:
        if must_exist:
            raise
        return None
    except (ValueError, UnicodeDecodeError) as error:
        raise RegistryAuthError(f"not a valid auth file ({error})", path=path) from None
    if not isinstance(document, dict):
        raise RegistryAuthError("not a valid auth file (not a JSON object)", path=path)
    return document


def _write_private(path: str, document: dict) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=".auth-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
