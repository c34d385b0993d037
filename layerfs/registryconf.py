"""Registry settings as the containers tools keep them: ``registries.conf``
(where an image is really fetched from) and ``certs.d`` (which certificates
a registry gets, :func:`certificates`).

Everything about mirrors, rewritten locations, ``insecure`` and ``blocked``
registries lives here, read as the containers tools read it
(containers-registries.conf(5), version 2).  :mod:`layerfs.registry` asks
:func:`endpoints` for the places to try, in order.

Files: ``$CONTAINERS_REGISTRIES_CONF`` (or ``Options.registries_conf``) if
set; else ``~/.config/containers/registries.conf`` if it exists, else
``/etc/containers/registries.conf``; then the ``*.conf`` drop-ins of the
``registries.conf.d`` directory beside the chosen file, in name order, whose
``[[registry]]`` tables replace those of the same prefix.

For a reference ``HOST/REPO``, the ``[[registry]]`` with the longest
``prefix`` (default: its ``location``) equal to ``HOST/REPO`` or to a
leading part of it, ending at a ``/``, applies: its mirrors are tried first,
in order (``pull-from-mirror``: ``all``, ``digest-only``, ``tag-only``; the
registry's ``mirror-by-digest-only`` = ``digest-only`` for all), then its
``location`` with the prefix replaced.  ``insecure = true`` lets that place
be reached over plain HTTP or with an unchecked certificate.  A ``blocked``
registry is refused.  Wildcard prefixes (``*.example.com``) and
``unqualified-search-registries`` are not read: references are always fully
qualified here.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any, Optional

import attrs

from .errors import RegistryError, UnsupportedImageError


@attrs.frozen
class Endpoint:
    """One place to fetch ``repository`` from, on ``host``."""
    host: str
    repository: str
    insecure: bool = False
    mirror: bool = False


def config_files(path: Optional[str] = None) -> list[str]:
    main = path or os.environ.get("CONTAINERS_REGISTRIES_CONF")
    if not main:
        user = os.path.join(os.environ.get("XDG_CONFIG_HOME")
                            or os.path.join(os.path.expanduser("~"), ".config"),
                            "containers", "registries.conf")
        main = user if os.path.exists(user) else "/etc/containers/registries.conf"
    files = [main] if os.path.isfile(main) else []
    drop_ins = os.path.splitext(main)[0] + ".conf.d"
    if os.path.isdir(drop_ins):
        files.extend(os.path.join(drop_ins, name) for name in sorted(os.listdir(drop_ins))
                     if name.endswith(".conf"))
    return files


def load(path: Optional[str] = None) -> dict[str, dict]:
    """``{prefix: [[registry]] table}`` from every file, later ones winning."""
    try:
        import tomllib
    except ModuleNotFoundError:     # Python 3.10
        import tomli as tomllib     # type: ignore[no-redef]
    registries: dict[str, dict] = {}
    for file in config_files(path):
        try:
            with open(file, "rb") as handle:
                document = tomllib.load(handle)
        except (OSError, ValueError) as error:
            raise UnsupportedImageError(f"cannot read registries.conf ({error})",
                                        path=file) from None
        for table in document.get("registry") or []:
            if not isinstance(table, dict):
                continue
            prefix = table.get("prefix") or table.get("location")
            if isinstance(prefix, str) and prefix:
                registries[prefix.rstrip("/")] = dict(table, _file=file)
    return registries


def endpoints(host: str, repository: str, *, by_digest: bool,
              path: Optional[str] = None) -> list[Endpoint]:
    """The places to fetch ``host/repository`` from, mirrors first."""
    name = f"{host}/{repository}"
    registries = load(path)
    matching = [prefix for prefix in registries
                if name == prefix or name.startswith(prefix + "/")]
    if not matching:
        return [Endpoint(host, repository)]
    prefix = max(matching, key=len)
    table = registries[prefix]
    if table.get("blocked"):
        raise RegistryError(f"registry {prefix} is blocked in {table['_file']}")
    rest = name[len(prefix):]
    found = []
    digest_only = bool(table.get("mirror-by-digest-only"))
    for mirror in table.get("mirror") or []:
        if not isinstance(mirror, dict) or not isinstance(mirror.get("location"), str):
            continue
        when = mirror.get("pull-from-mirror") or ("digest-only" if digest_only else "all")
        if (when == "digest-only" and not by_digest) or (when == "tag-only" and by_digest):
            continue
        found.append(_endpoint(mirror["location"] + rest, bool(mirror.get("insecure")), True))
    location = table.get("location") or prefix
    found.append(_endpoint(location + rest, bool(table.get("insecure")), False))
    return found


def _endpoint(name: str, insecure: bool, mirror: bool) -> Endpoint:
    host, _, repository = name.partition("/")
    return Endpoint(host, repository, insecure, mirror)


def describe(endpoint: Any) -> str:
    return f"{endpoint.host}/{endpoint.repository}" + (" (mirror)" if endpoint.mirror else "")


# -- certs.d ------------------------------------------------------------------

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
    from requests.certs import where as system_cas   # certifi, through requests
    with open(system_cas(), "rb") as handle:
        parts = [handle.read()]
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
