"""The image reference grammar: text alone decides, never the host."""

import os
import pathlib

import pytest

import layerfs
from layerfs.errors import InvalidReferenceError
from layerfs.example import build_example
from layerfs.reference import Reference, as_reference, parse_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, host, repository, tag, digest", [
    ("docker://busybox", "docker.io", "library/busybox", "latest", None),
    ("docker://busybox:1.36", "docker.io", "library/busybox", "1.36", None),
    ("docker://user/app", "docker.io", "user/app", "latest", None),
    ("docker://index.docker.io/busybox", "docker.io", "library/busybox", "latest", None),
    ("docker://quay.io/a/b/c:v1", "quay.io", "a/b/c", "v1", None),
    ("docker://localhost/app", "localhost", "app", "latest", None),
    ("docker://127.0.0.1:5000/app:x", "127.0.0.1:5000", "app", "x", None),
    ("docker://registry:5000/app", "registry:5000", "app", "latest", None),
    (f"docker://busybox@{DIGEST}", "docker.io", "library/busybox", None, DIGEST),
    (f"docker://ghcr.io/o/r:t@{DIGEST}", "ghcr.io", "o/r", "t", DIGEST),
])
def test_docker_references_follow_the_containers_conventions(text, host, repository, tag,
                                                              digest):
    ref = parse_reference(text)
    assert (ref.transport, ref.host, ref.repository, ref.tag, ref.digest) == (
        "docker", host, repository, tag, digest)
    assert parse_reference(str(ref)) == ref


@pytest.mark.parametrize("text", [
    "docker://", "docker://Busybox", "docker://a/B", "docker://busybox:",
    "docker://busybox:-x", "docker://busybox@sha256:12", "docker://host:port:1/a",
    "oci:", "oci::tag", "oci:dir:", "oci-archive:", "docker-archive:", "",
    f"oci:dir:@sha256:12",
])
def test_malformed_references_are_refused_naming_the_text(text):
    with pytest.raises(InvalidReferenceError) as caught:
        parse_reference(text)
    assert isinstance(caught.value, ValueError)
    if text:
        assert text in str(caught.value)


@pytest.mark.parametrize("text, transport, path, tag, digest", [
    ("oci:dir", "oci", "dir", None, None),
    ("oci:/a/dir:v1", "oci", "/a/dir", "v1", None),
    ("oci:dir:docker.io/library/busybox:1", "oci", "dir", "docker.io/library/busybox:1", None),
    (f"oci:dir:{DIGEST}", "oci", "dir", None, DIGEST),
    (f"oci:dir:@{DIGEST}", "oci", "dir", None, DIGEST),
    ("oci-archive:img.tar:v2", "oci-archive", "img.tar", "v2", None),
    ("docker-archive:save.tar", "docker-archive", "save.tar", None, None),
    ("docker-archive:save.tar:app:1", "docker-archive", "save.tar", "app:1", None),
    ("plain/dir", "path", "plain/dir", None, None),
    ("has:colon.tar", "path", "has:colon.tar", None, None),
    ("./oci:x", "path", "./oci:x", None, None),
    ("/etc/os-release", "path", "/etc/os-release", None, None),
])
def test_local_references(text, transport, path, tag, digest):
    ref = parse_reference(text)
    assert (ref.transport, ref.path, ref.tag, ref.digest) == (transport, path, tag, digest)


def test_a_bare_argument_is_a_path_whatever_exists_on_the_host(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "oci:weird").mkdir()
    # "oci:weird" exists as a directory here, but the prefix still decides.
    assert parse_reference("oci:weird") == Reference("oci", path="weird")
    assert as_reference(pathlib.Path("oci:weird")) == Reference("path", path="oci:weird")
    assert as_reference(b"oci:weird") == Reference("path", path="oci:weird")


def test_lists_are_stacks_and_selectors_are_given_once():
    assert as_reference(["a", pathlib.Path("b")]) == Reference("layers", layers=("a", "b"))
    with pytest.raises(InvalidReferenceError):
        as_reference([])
    ref = parse_reference("oci:dir:v1")
    with pytest.raises(InvalidReferenceError, match="not both"):
        ref.with_selector("v2")
    assert parse_reference("oci:dir").with_selector(DIGEST).digest == DIGEST
    with pytest.raises(InvalidReferenceError):
        parse_reference("docker://a/b").with_selector("v1")
    with pytest.raises(InvalidReferenceError):
        as_reference(["a"]).with_selector("v1")


def test_absolute_keeps_the_transport(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_reference("oci:d:t").absolute() == Reference(
        "oci", path=str(tmp_path / "d"), tag="t")
    assert as_reference(["x"]).absolute().layers == (str(tmp_path / "x"),)
    remote = parse_reference("docker://a.io/b")
    assert remote.absolute() is remote


def test_layerfs_open_takes_the_same_strings(tmp_path):
    image = build_example(str(tmp_path / "image"))
    for source in (image, f"oci:{image}", f"oci:{image}:example", pathlib.Path(image)):
        with layerfs.open(source) as fs:
            assert fs.read_bytes("/etc/motd").startswith(b"Welcome")
    with layerfs.open(image) as fs:
        digest = fs.image.manifest_digest
    with layerfs.open(f"oci:{image}:{digest}") as fs:
        assert fs.image.manifest_digest == digest
    with layerfs.open(f"oci:{image}", tag=digest) as fs:
        assert fs.image.manifest_digest == digest
    with pytest.raises(InvalidReferenceError, match="not both"):
        layerfs.open(f"oci:{image}:example", tag="example")
    with pytest.raises(layerfs.UnsupportedImageError, match="not an OCI"):
        layerfs.open(f"oci-archive:{image}/oci-layout")
    with pytest.raises(FileNotFoundError):
        layerfs.open(f"oci:{tmp_path / 'nothing'}")
    assert os.path.isdir(image)


def test_registry_helpers_read_text_only():
    from layerfs.registry import is_loopback, parse_challenge
    assert all(map(is_loopback, ["localhost", "localhost:5000", "127.0.0.1:5000",
                                 "127.1.2.3", "[::1]:5000", "::1"]))
    assert not any(map(is_loopback, ["example.com", "10.0.0.1:5000", "localhost.example"]))
    assert parse_challenge('Bearer realm="https://a/token",service="reg",'
                           'scope="repository:x/y:pull"') == (
        "bearer", {"realm": "https://a/token", "service": "reg",
                   "scope": "repository:x/y:pull"})
    assert parse_challenge('Basic realm="r"') == ("basic", {"realm": "r"})
