"""Images read straight from a real registry on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import layerfs
from layerfs.errors import DigestMismatchError, RegistryError, UnsupportedImageError
from layerfs.imagewrite import write_docker_archive
from layerfs.layer import IndexCache
from layerfs.registry import Options
from layerfs.testing.view import assert_views_equal, snapshot

from registry_helpers import OCI_MANIFEST, Registry, sha256


def push_layout(registry: Registry, layout: str, repo: str, tag: str) -> str:
    """Push the one image of the OCI layout *layout* byte for byte (same
    blobs, config and manifest, hence the same digests)."""
    with open(os.path.join(layout, "index.json")) as handle:
        entry = json.load(handle)["manifests"][0]

    def blob(digest):
        with open(os.path.join(layout, "blobs", *digest.split(":")), "rb") as handle:
            return handle.read()
    manifest_bytes = blob(entry["digest"])
    manifest = json.loads(manifest_bytes)
    for desc in [manifest["config"], *manifest["layers"]]:
        registry.push_blob(repo, blob(desc["digest"]))
    import requests
    answer = requests.put(f"{registry.url}/v2/{repo}/manifests/{tag}", data=manifest_bytes,
                          headers={"Content-Type": manifest.get("mediaType", OCI_MANIFEST)})
    assert answer.status_code == 201, answer.text
    return entry["digest"]


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "layerfs.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=120)


def cache_files(cache: IndexCache) -> list[str]:
    found = []
    for top, _, files in os.walk(os.path.join(cache.root, "registry")):
        found.extend(os.path.join(top, name) for name in files)
    return sorted(found)


def test_the_same_image_from_registry_layout_and_docker_archive_reads_the_same(
        registry, example, cache, tmp_path):
    digest = push_layout(registry, example, "demo/example", "v1")
    with layerfs.open(example, cache=cache) as local:
        expected = snapshot(local)
        layers = [source for source in local.image.layer_sources]
        config = local.image.config
    archive = tmp_path / "saved.tar"
    write_docker_archive(archive, layers, ["demo/example:v1"], config=config)
    with layerfs.open(f"docker://{registry.host}/demo/example:v1", cache=cache) as remote:
        assert remote.image.manifest_digest == digest
        assert remote.image.kind == "registry"
        assert remote.image.ref == "v1"
        assert_views_equal(expected, snapshot(remote))
        assert remote.read_bytes("/etc/motd").startswith(b"Welcome")
        assert not remote.exists("/etc/old.conf")           # a whiteout, applied
    with layerfs.open(f"docker-archive:{archive}", cache=cache) as saved:
        assert_views_equal(expected, snapshot(saved))
    with layerfs.open(f"docker://{registry.host}/demo/example@{digest}", cache=cache) as pinned:
        assert pinned.image.manifest_digest == digest


def test_a_digest_reference_reads_from_the_cache_with_the_registry_stopped(
        registry, example, cache):
    digest = push_layout(registry, example, "demo/example", "v1")
    reference = f"docker://{registry.host}/demo/example@{digest}"
    with layerfs.open(reference, cache=cache) as fs:
        first = fs.read_bytes("/etc/motd")
    tagged = f"docker://{registry.host}/demo/example:v1"
    layerfs.open(tagged, cache=cache).close()
    registry.stop()
    with layerfs.open(reference, cache=cache) as fs:
        assert fs.read_bytes("/etc/motd") == first
    with pytest.raises(RegistryError, match="cannot reach registry"):
        layerfs.open(tagged, cache=cache)
    with layerfs.open(tagged, cache=cache, registry=Options(offline=True)) as fs:
        assert fs.image.manifest_digest == digest
    with pytest.raises(RegistryError, match="offline"):
        layerfs.open(f"docker://{registry.host}/demo/example:never", cache=cache,
                     registry=Options(offline=True))


def test_multi_platform_index_resolves_per_platform_and_never_falls_back(registry, cache):
    import io
    import tarfile

    def layer(text: bytes) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as tar:
            info = tarfile.TarInfo("arch")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
        return out.getvalue()
    platforms = [("linux", "amd64", None), ("linux", "arm64", "v8"), ("linux", "arm", "v7")]
    pushed = [(p, registry.push_image("multi", None, [layer(p[1].encode())], platform=p))
              for p in platforms]
    registry.push_index("multi", "latest", pushed)
    reference = f"docker://{registry.host}/multi"
    for (os_, arch, variant), image in pushed:
        wanted = f"{os_}/{arch}" + (f"/{variant}" if variant else "")
        with layerfs.open(reference, platform=wanted, cache=cache) as fs:
            assert fs.read_bytes("/arch") == arch.encode()
            assert fs.image.manifest_digest == image["digest"]
            assert fs.image.platform == wanted
    with pytest.raises(UnsupportedImageError) as caught:
        layerfs.open(reference, platform="linux/s390x", cache=cache)
    message = str(caught.value)
    assert "linux/s390x" in message and reference in message
    for listed in ("linux/amd64", "linux/arm64/v8", "linux/arm/v7"):
        assert listed in message


def test_tampered_blob_is_refused_and_nothing_of_it_kept(registry, example, cache):
    digest = push_layout(registry, example, "demo/example", "v1")
    with open(os.path.join(example, "blobs", *digest.split(":")), "rb") as handle:
        layer_digest = json.load(handle)["layers"][1]["digest"]
    path = registry.blob_file(layer_digest)
    with open(path, "r+b") as handle:
        first = handle.read(1)
        handle.seek(0)
        handle.write(bytes([first[0] ^ 0xFF]))
    with pytest.raises(DigestMismatchError) as caught:
        layerfs.open(f"docker://{registry.host}/demo/example:v1", cache=cache)
    assert layer_digest in str(caught.value)
    assert f"{registry.host}/demo/example" in str(caught.value)
    names = cache_files(cache)
    assert not any(layer_digest.partition(":")[2] in name for name in names)
    partial = os.path.join(cache.root, "registry", "tmp") + os.sep
    assert not any(name.startswith(partial) for name in names)


def test_missing_repository_tag_and_unreachable_registry_are_one_line(registry, tmp_path):
    with pytest.raises(RegistryError, match="not found"):
        layerfs.open(f"docker://{registry.host}/nothing/here:v1", cache=False)
    result = cli("ls", f"docker://{registry.host}/nothing/here:v1",
                 env=dict(os.environ, LAYERFS_CACHE_DIR=str(tmp_path / "c")))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "not found (404" in result.stderr
    registry.stop()
    result = cli("ls", f"docker://{registry.host}/nothing/here:v1",
                 env=dict(os.environ, LAYERFS_CACHE_DIR=str(tmp_path / "c")))
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert f"cannot reach registry {registry.host}" in result.stderr


def test_plain_http_only_for_loopback(registry):
    """The same server named by a non-loopback address is refused over
    HTTP unless --tls-verify=false."""
    import socket
    address = None
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        pass
    if not address or address.startswith("127."):
        address = "localhost.invalid"
    from layerfs.reference import parse_reference
    from layerfs.registry import Client
    reference = parse_reference(f"docker://{address}:{registry.port}/a")
    with pytest.raises(RegistryError, match="plain HTTP is used only for loopback"):
        Client(reference, Options()).tags()


def test_a_second_open_of_a_tag_costs_one_head_request(registry, example, cache,
                                                       monkeypatch):
    import requests
    push_layout(registry, example, "demo/example", "v1")
    reference = f"docker://{registry.host}/demo/example:v1"
    layerfs.open(reference, cache=cache).close()
    sent = []
    original = requests.Session.request

    def counting(self, method, url, *args, **kwargs):
        sent.append((method, url))
        return original(self, method, url, *args, **kwargs)
    monkeypatch.setattr(requests.Session, "request", counting)
    with layerfs.open(reference, cache=cache) as fs:
        assert fs.read_bytes("/etc/motd").startswith(b"Welcome")
    # The only request the registry answers; before it, a new client tries
    # HTTPS once (the TLS handshake fails on this plain-HTTP loopback server).
    manifest = "/v2/demo/example/manifests/v1"
    assert [entry for entry in sent if entry[1].startswith(registry.url)] == [
        ("HEAD", registry.url + manifest)]
    assert sent[0] == ("HEAD", f"https://{registry.host}{manifest}") and len(sent) == 2


def test_a_layer_whose_diff_id_is_wrong_is_refused_and_dropped_from_the_cache(
        registry, cache):
    import gzip
    import io
    import tarfile
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("f")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    blob = gzip.compress(out.getvalue())
    wrong = sha256(b"not this tar")
    pushed = registry.push_image("bad", "v1", [blob], diff_ids=[wrong],
                                 layer_types=["application/vnd.oci.image.layer.v1.tar+gzip"])
    layer_digest = pushed["manifest"]["layers"][0]["digest"]
    with pytest.raises(DigestMismatchError) as caught:
        layerfs.open(f"docker://{registry.host}/bad:v1", cache=cache)
    message = str(caught.value)
    assert f"docker://{registry.host}/bad@{layer_digest}" in message
    assert "diff_id" in message and wrong in message
    hex_ = layer_digest.partition(":")[2]
    assert not any(hex_ in name for name in cache_files(cache))
    assert not os.path.exists(cache.blob_path(hex_))
    assert not os.path.exists(cache.index_path(hex_))
