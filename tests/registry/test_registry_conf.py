"""registries.conf: mirrors, rewritten locations, blocked registries."""

from __future__ import annotations

import io
import tarfile

import pytest

import layerfs
from layerfs.errors import RegistryError
from layerfs.layer import IndexCache
from layerfs.registry import Options
from layerfs.registryconf import Endpoint, endpoints

from registry_helpers import free_port


def layer(text: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("from")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
    return out.getvalue()


def test_endpoints_follow_the_longest_prefix(tmp_path):
    conf = tmp_path / "registries.conf"
    conf.write_text('''
[[registry]]
location = "docker.io"
[[registry.mirror]]
location = "mirror.local:5000/hub"
insecure = true
[[registry.mirror]]
location = "digests.local"
pull-from-mirror = "digest-only"

[[registry]]
prefix = "docker.io/team"
location = "internal.local/team-copy"

[[registry]]
prefix = "bad.io"
blocked = true
''')
    (tmp_path / "registries.conf.d").mkdir()
    (tmp_path / "registries.conf.d" / "50-extra.conf").write_text(
        '[[registry]]\nlocation = "quay.io"\ninsecure = true\n')
    path = str(conf)
    assert endpoints("docker.io", "library/busybox", by_digest=False, path=path) == [
        Endpoint("mirror.local:5000", "hub/library/busybox", True, True),
        Endpoint("docker.io", "library/busybox")]
    assert [e.host for e in endpoints("docker.io", "library/busybox", by_digest=True,
                                      path=path)] == ["mirror.local:5000", "digests.local",
                                                      "docker.io"]
    assert endpoints("docker.io", "team/app", by_digest=False, path=path) == [
        Endpoint("internal.local", "team-copy/app")]
    assert endpoints("quay.io", "a/b", by_digest=False, path=path) == [
        Endpoint("quay.io", "a/b", insecure=True)]
    assert endpoints("ghcr.io", "a/b", by_digest=False, path=path) == [Endpoint("ghcr.io", "a/b")]
    with pytest.raises(RegistryError, match="blocked"):
        endpoints("bad.io", "x", by_digest=False, path=path)


def test_a_mirror_serves_when_the_registry_is_down(registry, tmp_path):
    registry.push_image("library/app", "v1", [layer(b"mirror")])
    dead = f"127.0.0.1:{free_port()}"
    conf = tmp_path / "registries.conf"
    conf.write_text(f'[[registry]]\nlocation = "{dead}"\n'
                    f'[[registry.mirror]]\nlocation = "{registry.host}/library"\n'
                    f'[[registry]]\nprefix = "example.test/team"\n'
                    f'location = "{registry.host}/library"\n')
    options = Options(registries_conf=str(conf))
    cache = IndexCache(tmp_path / "cache")
    with layerfs.open(f"docker://{dead}/app:v1", cache=cache, registry=options) as fs:
        assert fs.read_bytes("/from") == b"mirror"
    with layerfs.open("docker://example.test/team/app:v1", cache=IndexCache(tmp_path / "c2"),
                      registry=options) as fs:
        assert fs.read_bytes("/from") == b"mirror"
    registry.stop()
    with pytest.raises(RegistryError) as caught:
        layerfs.open(f"docker://{dead}/app:v2", cache=cache, registry=options)
    assert f"tried {registry.host}/library/app, {dead}/app" in str(caught.value)
