"""Tests of layerfs.image: opening OCI layouts, archives, docker archives and
layer lists; choosing by tag and platform; verifying every blob."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile

import pytest
import zstandard

from layerfs.errors import DigestMismatchError, ImageError, UnsupportedImageError
from layerfs.image import (DOCKER_LIST, OCI_INDEX, REF_NAME, blob_name, chain_id,
                           host_platform, open_image, parse_digest)
from layerfs.imagewrite import write_docker_archive, write_oci_archive, write_oci_layout
from layerfs.layer import BlobSource


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def load(path):
    with open(path, "rb") as f:
        return json.load(f)


def dump(path, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f)


def blob_path(layout, digest: str) -> str:
    return os.path.join(layout, blob_name(digest))


def put_json_blob(layout, value) -> tuple[str, int]:
    data = json.dumps(value).encode()
    with open(blob_path(layout, sha256(data)), "wb") as f:
        f.write(data)
    return sha256(data), len(data)


def flip_byte(path, offset: int = 0) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture
def layers(tmp_path):
    paths = []
    for i, files in enumerate([{"a": b"zero"}, {"b": b"one"}]):
        path = tmp_path / f"l{i}.tar.gz"
        path.write_bytes(gzip.compress(tar_bytes(files), mtime=0))
        paths.append(os.fspath(path))
    return paths


DIFF_IDS = [sha256(tar_bytes({"a": b"zero"})), sha256(tar_bytes({"b": b"one"}))]


@pytest.fixture
def layout(tmp_path, layers):
    dest = tmp_path / "img"
    write_oci_layout(dest, layers, tag="v1")
    return dest


def manifest_of(layout, index_entry: int = 0) -> tuple[dict, str]:
    digest = load(layout / "index.json")["manifests"][index_entry]["digest"]
    return load(blob_path(layout, digest)), digest


def rewrite(layout, change_manifest=None, change_config=None) -> None:
    """Edit the manifest or config of the only image of *layout*, writing
    new blobs with correct digests up to index.json."""
    manifest, _ = manifest_of(layout)
    if change_config is not None:
        config = load(blob_path(layout, manifest["config"]["digest"]))
        change_config(config)
        digest, size = put_json_blob(layout, config)
        manifest["config"].update(digest=digest, size=size)
    if change_manifest is not None:
        change_manifest(manifest)
    digest, size = put_json_blob(layout, manifest)
    index = load(layout / "index.json")
    index["manifests"][0].update(digest=digest, size=size)
    dump(layout / "index.json", index)


# -- each kind of source ----------------------------------------------------------

def test_oci_layout(layout, layers):
    manifest, digest = manifest_of(layout)
    with open_image(layout) as image:
        assert image.kind == "oci-layout"
        assert image.manifest_digest == digest and image.manifest == manifest
        assert image.config_digest == manifest["config"]["digest"]
        assert image.config["rootfs"]["diff_ids"] == DIFF_IDS == image.diff_ids
        assert [layer.digest for layer in image.layers] == [d["digest"] for d in manifest["layers"]]
        assert image.ref == image.tag == "v1"
        assert image.platform == host_platform()
        assert image.layer_sources[0] == blob_path(layout, manifest["layers"][0]["digest"])
        assert [e.path for e in image.layers[1].entries] == ["/b"]
        assert image.source == os.fspath(layout)
    with open_image(os.fsencode(layout)) as image:
        assert image.diff_ids == DIFF_IDS


def test_oci_archive_reads_blobs_in_place(tmp_path, layers):
    digest = write_oci_archive(tmp_path / "img.tar", layers, tag="v1")
    with open_image(tmp_path / "img.tar") as image:
        assert image.kind == "oci-archive" and image.manifest_digest == digest
        assert image.diff_ids == DIFF_IDS
        source = image.layer_sources[1]
        assert isinstance(source, BlobSource) and source.path == os.fspath(tmp_path / "img.tar")
        with open(source.path, "rb") as f:
            f.seek(source.offset)
            assert f.read(source.size) == open(layers[1], "rb").read()


@pytest.mark.parametrize("compress", [gzip.compress,
                                      lambda data: zstandard.ZstdCompressor().compress(data)])
@pytest.mark.parametrize("cache", [None, False])
def test_a_compressed_image_archive_opens_as_the_image_it_holds(tmp_path, layers, compress,
                                                                 cache):
    """``docker save | gzip`` (and a compressed OCI archive): the archive is
    indexed once like a layer and its blobs read from the uncompressed copy."""
    from layerfs.layer import IndexCache
    cache = IndexCache(tmp_path / "cache") if cache is None else cache
    write_docker_archive(tmp_path / "saved.tar", layers, ["app:v1"])
    write_oci_archive(tmp_path / "oci.tar", layers, tag="v1")
    for name, kind in (("saved.tar", "docker-archive"), ("oci.tar", "oci-archive")):
        packed = tmp_path / f"{name}.z"
        packed.write_bytes(compress((tmp_path / name).read_bytes()))
        for source in (packed, f"{kind}:{packed}", f"{kind}:{packed}:v1"):
            with open_image(source, cache=cache) as image:
                assert image.kind == kind
                assert image.diff_ids == DIFF_IDS
                assert [layer.entry_count for layer in image.layers] == [
                    layer.entry_count for layer in open_image(tmp_path / name).layers]
    with pytest.raises(UnsupportedImageError, match="no image tagged 'v9'"):
        open_image(f"docker-archive:{tmp_path / 'saved.tar.z'}:v9", cache=cache)


def test_a_compressed_layer_is_still_one_layer(tmp_path):
    (tmp_path / "layer.tar.gz").write_bytes(gzip.compress(tar_bytes({"a": b"zero"})))
    with open_image(tmp_path / "layer.tar.gz") as image:
        assert image.kind == "layers" and len(image.layers) == 1
        assert image.diff_ids == DIFF_IDS[:1]
    with pytest.raises(UnsupportedImageError, match="not an image archive"):
        open_image(f"docker-archive:{tmp_path / 'layer.tar.gz'}")
    with pytest.raises(UnsupportedImageError, match="no tags"):
        open_image(f"{tmp_path / 'layer.tar.gz'}", tag="v1")


def test_kind_comes_from_content_not_name(tmp_path, layers):
    write_oci_archive(tmp_path / "image.json", layers)
    with open_image(tmp_path / "image.json") as image:
        assert image.kind == "oci-archive"


def test_docker_archive(tmp_path, layers):
    config_digest = write_docker_archive(tmp_path / "d.tar", layers, ["app:1", "app:2"])
    with open_image(tmp_path / "d.tar", tag="app:2") as image:
        assert image.kind == "docker-archive" and image.ref == "app:2"
        assert image.config_digest == config_digest and image.manifest_digest is None
        assert image.diff_ids == DIFF_IDS
        assert [layer.compression for layer in image.layers] == ["none", "none"]
    with open_image(tmp_path / "d.tar") as image:
        assert image.ref == "app:1"


def test_docker_archive_with_linked_layer_and_config_check(tmp_path):
    layer = tar_bytes({"x": b"1"})
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [sha256(layer)] * 2}}).encode()
    config_name = sha256(config).split(":")[1] + ".json"
    manifest = [{"Config": config_name, "RepoTags": None, "Layers": ["a/layer.tar", "b/layer.tar"]}]
    path = tmp_path / "d.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a/layer.tar", layer), (config_name, config),
                           ("manifest.json", json.dumps(manifest).encode())]:
            info = tarfile.TarInfo("./" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("b/layer.tar")
        link.type, link.linkname = tarfile.SYMTYPE, "../a/layer.tar"
        tar.addfile(link)
    with open_image(path) as image:
        assert image.diff_ids == [sha256(layer)] * 2 and image.ref is None
        assert image.layer_sources[0] == image.layer_sources[1]
    flipped = config.replace(b"amd64", b"arm64")
    with tarfile.open(tmp_path / "bad.tar", "w") as tar:
        for name, data in [("a/layer.tar", layer), ("b/layer.tar", layer),
                           (config_name, flipped), ("manifest.json", json.dumps(manifest).encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DigestMismatchError, match=config_name):
        open_image(tmp_path / "bad.tar")


def test_docker_archive_that_also_holds_an_oci_layout_is_read_as_oci(tmp_path, layers):
    digest = write_oci_archive(tmp_path / "img.tar", layers)
    manifest = json.dumps([{"Config": "missing.json", "RepoTags": ["x:1"], "Layers": []}]).encode()
    with tarfile.open(tmp_path / "img.tar", "a") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    with open_image(tmp_path / "img.tar") as image:
        assert image.kind == "oci-archive" and image.manifest_digest == digest


def test_layer_list(layers):
    with open_image(layers) as image:
        assert image.kind == "layers" and image.ref is None
        assert image.diff_ids == DIFF_IDS == image.config["rootfs"]["diff_ids"]
        assert image.config_digest == sha256(json.dumps(
            image.config, sort_keys=True, separators=(",", ":")).encode())
        assert [d["digest"] for d in image.manifest["layers"]] == [
            sha256(open(p, "rb").read()) for p in layers]
        assert image.manifest["layers"][0]["mediaType"].endswith("tar+gzip")
    with open_image(tuple(os.fsencode(p) for p in reversed(layers))) as image:
        assert image.diff_ids == DIFF_IDS[::-1]
    with pytest.raises(UnsupportedImageError):
        open_image([])


def test_chain_id_by_hand(layers):
    with open_image(layers) as image:
        expected = "sha256:" + hashlib.sha256(f"{DIFF_IDS[0]} {DIFF_IDS[1]}".encode()).hexdigest()
        assert image.chain_id() == expected
    assert chain_id(DIFF_IDS[:1]) == DIFF_IDS[0]
    assert chain_id([]) is None


def test_not_an_image(tmp_path, layers):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnsupportedImageError, match="not an OCI image layout"):
        open_image(tmp_path / "empty")
    (tmp_path / "layer.tar").write_bytes(tar_bytes({"a": b""}))
    with open_image(tmp_path / "layer.tar") as image:       # a single layer tar
        assert image.kind == "layers"
        assert [entry.path for entry in image.layers[0].entries] == ["/a"]
    (tmp_path / "junk").write_bytes(b"\x00not a tar" * 100)
    with pytest.raises(UnsupportedImageError):
        open_image(tmp_path / "junk")
    with pytest.raises(FileNotFoundError):
        open_image(tmp_path / "nothing")


# -- choosing an image --------------------------------------------------------------

def test_choice_by_tag(layout, layers):
    write_oci_layout(layout, layers[:1], tag="docker.io/library/app:v2")
    with open_image(layout, tag="v1") as image:
        assert image.ref == "v1" and len(image.layers) == 2
    for tag in ("v2", "app:v2", "docker.io/library/app:v2"):
        with open_image(layout, tag=tag) as image:
            assert image.ref == "docker.io/library/app:v2" and len(image.layers) == 1
    with pytest.raises(UnsupportedImageError, match="several images.*v1.*app:v2"):
        open_image(layout)
    with pytest.raises(UnsupportedImageError, match="no image tagged 'v3'.*v1"):
        open_image(layout, tag="v3")


def test_docker_style_index_names(layout):
    index = load(layout / "index.json")
    index["manifests"][0]["annotations"] = {
        REF_NAME: "latest", "io.containerd.image.name": "docker.io/library/busybox:latest"}
    dump(layout / "index.json", index)
    for tag in ("latest", "busybox", "busybox:latest", "docker.io/library/busybox"):
        with open_image(layout, tag=tag) as image:
            assert image.ref in ("latest", "docker.io/library/busybox:latest")
    with pytest.raises(UnsupportedImageError, match="no image tagged 'busybox:1'"):
        open_image(layout, tag="busybox:1")


@pytest.fixture
def two_platforms(tmp_path, layers):
    dest = tmp_path / "multi"
    for arch in ("amd64", "arm64", "riscv64"):
        write_oci_layout(dest, layers[:1], config={"architecture": arch, "os": "linux"})
    return dest


def test_choice_by_platform(two_platforms):
    with open_image(two_platforms, platform="linux/arm64") as image:
        assert image.platform == "linux/arm64" and image.config["architecture"] == "arm64"
    with open_image(two_platforms, platform="linux/arm64/v8") as image:
        assert image.platform == "linux/arm64"
    if host_platform() in ("linux/amd64", "linux/arm64", "linux/riscv64"):
        with open_image(two_platforms) as image:
            assert image.platform == host_platform()
    with pytest.raises(UnsupportedImageError, match="no image for platform linux/s390x.*riscv64"):
        open_image(two_platforms, platform="linux/s390x")
    with pytest.raises(UnsupportedImageError, match="os/arch"):
        open_image(two_platforms, platform="linux")


@pytest.mark.parametrize("machine,expected", [
    ("x86_64", "linux/amd64"), ("aarch64", "linux/arm64"), ("armv7l", "linux/arm/v7"),
    ("i686", "linux/386"), ("ppc64le", "linux/ppc64le"), ("s390x", "linux/s390x"),
    ("riscv64", "linux/riscv64")])
def test_host_platform_uses_go_names(monkeypatch, machine, expected):
    monkeypatch.setattr("platform.machine", lambda: machine)
    assert host_platform() == expected


def test_platform_read_from_config_when_the_index_gives_none(two_platforms):
    index = load(two_platforms / "index.json")
    for entry in index["manifests"]:
        del entry["platform"]
    dump(two_platforms / "index.json", index)
    with open_image(two_platforms, platform="linux/riscv64") as image:
        assert image.config["architecture"] == "riscv64"


@pytest.mark.parametrize("media_type", [OCI_INDEX, DOCKER_LIST])
def test_nested_index_inherits_the_tag(two_platforms, media_type):
    index = load(two_platforms / "index.json")
    index["mediaType"] = media_type
    attestation = dict(index["manifests"][0], annotations={"vnd.docker.reference.type": "x"},
                       platform={"os": "unknown", "architecture": "unknown"})
    index["manifests"].append(attestation)
    digest, size = put_json_blob(two_platforms, index)
    dump(two_platforms / "index.json", {"schemaVersion": 2, "manifests": [
        {"mediaType": media_type, "digest": digest, "size": size,
         "annotations": {REF_NAME: "multi"}}]})
    with open_image(two_platforms, tag="multi", platform="linux/arm64") as image:
        assert image.ref == "multi" and image.config["architecture"] == "arm64"
    with pytest.raises(UnsupportedImageError, match="unknown"):
        open_image(two_platforms, platform="unknown/unknown")


def test_the_same_manifest_under_two_tags_is_one_candidate(layout, layers):
    write_oci_layout(layout, layers, tag="latest")
    with open_image(layout) as image:
        assert image.ref == "v1"


# -- verification -------------------------------------------------------------------

def test_layer_blob_digest_mismatch(layout):
    manifest, _ = manifest_of(layout)
    # Byte 4 of a gzip stream is its header's mtime: the stream stays valid,
    # so only the digest can tell.
    path = blob_path(layout, manifest["layers"][1]["digest"])
    flip_byte(path, 4)
    with pytest.raises(DigestMismatchError) as info:
        open_image(layout)
    assert info.value.path == path or path in str(info.value)


def test_uncompressed_layer_digest_mismatch_in_an_archive(tmp_path):
    layer = tmp_path / "l.tar"
    layer.write_bytes(tar_bytes({"f": b"content"}))
    write_oci_archive(tmp_path / "img.tar", [layer])
    data = (tmp_path / "img.tar").read_bytes()
    (tmp_path / "img.tar").write_bytes(data.replace(b"content", b"CONTENT"))
    with pytest.raises(DigestMismatchError):
        open_image(tmp_path / "img.tar")


def test_config_digest_mismatch(layout):
    manifest, _ = manifest_of(layout)
    path = blob_path(layout, manifest["config"]["digest"])
    flip_byte(path, 5)
    with pytest.raises(DigestMismatchError, match="image config") as info:
        open_image(layout)
    assert info.value.path == path


def test_manifest_digest_mismatch(layout):
    _, digest = manifest_of(layout)
    flip_byte(blob_path(layout, digest), 3)
    with pytest.raises(DigestMismatchError, match="image manifest"):
        open_image(layout)


def test_diff_id_mismatch(layout):
    rewrite(layout, change_config=lambda c: c["rootfs"]["diff_ids"].reverse())
    with pytest.raises(DigestMismatchError):
        open_image(layout)


def test_diff_id_count_mismatch(layout):
    rewrite(layout, change_config=lambda c: c["rootfs"]["diff_ids"].pop())
    with pytest.raises(ImageError, match="1 diff_ids for 2 layers"):
        open_image(layout)


def test_size_mismatch(layout):
    rewrite(layout, change_manifest=lambda m: m["layers"][0].update(size=1))
    with pytest.raises(DigestMismatchError, match="descriptor says 1"):
        open_image(layout)


def test_missing_blob(layout):
    manifest, _ = manifest_of(layout)
    os.unlink(blob_path(layout, manifest["layers"][0]["digest"]))
    with pytest.raises(ImageError, match="layer 0 blob .* is missing"):
        open_image(layout)
    rewrite(layout, change_manifest=lambda m: m["layers"][0].update(
        mediaType="application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        urls=["https://example.com/l0"]))
    with pytest.raises(ImageError, match="non-distributable.*example.com"):
        open_image(layout)


def test_unknown_layer_media_type_is_not_an_error(layout):
    rewrite(layout, change_manifest=lambda m: m["layers"][0].update(mediaType="application/x-odd"))
    with open_image(layout) as image:
        assert image.diff_ids == DIFF_IDS


@pytest.mark.parametrize("digest", [
    "sha256:../../x", "sha256:" + "A" * 64, "sha256:" + "0" * 63, "md5:" + "0" * 32,
    "sha256" + "0" * 64, "sha512:" + "0" * 64, 42])
def test_bad_digest_strings(layout, digest):
    with pytest.raises(UnsupportedImageError):
        parse_digest(digest)
    index = load(layout / "index.json")
    index["manifests"][0]["digest"] = digest
    dump(layout / "index.json", index)
    with pytest.raises(UnsupportedImageError, match="digest"):
        open_image(layout)


def test_bad_layer_digest_in_manifest(layout):
    rewrite(layout, change_manifest=lambda m: m["layers"][1].update(digest="sha256:../../../etc"))
    with pytest.raises(UnsupportedImageError, match="sha256:../../../etc"):
        open_image(layout)


def test_good_digests_parse():
    assert parse_digest("sha256:" + "ab" * 32) == ("sha256", "ab" * 32)
    assert parse_digest("sha512:" + "0" * 128) == ("sha512", "0" * 128)


@pytest.mark.parametrize("name,content,message", [
    ("index.json", "{not json", "not valid JSON"),
    ("index.json", "{}", "'manifests'"),
    ("index.json", '{"manifests": [1]}', "expected a JSON object"),
    ("oci-layout", '{"imageLayoutVersion": "2.0.0"}', "version"),
    ("oci-layout", "[]", "imageLayoutVersion"),
])
def test_bad_json_names_the_file(layout, name, content, message):
    (layout / name).write_text(content)
    with pytest.raises(UnsupportedImageError, match=message) as info:
        open_image(layout)
    assert info.value.path == os.path.join(layout, name)


def test_manifest_missing_fields(layout):
    rewrite(layout, change_manifest=lambda m: m.pop("layers"))
    with pytest.raises(UnsupportedImageError, match="'layers'"):
        open_image(layout)
    rewrite(layout, change_manifest=lambda m: m.update(schemaVersion=1))
    with pytest.raises(UnsupportedImageError, match="schemaVersion"):
        open_image(layout)
