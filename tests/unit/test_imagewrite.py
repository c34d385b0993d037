"""Tests of layerfs.imagewrite: OCI layouts, OCI archives, docker archives."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile

import pytest
import zstandard

from layerfs.errors import UnsupportedImageError
from layerfs.image import (DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, REF_NAME, host_platform,
                           open_image)
from layerfs.imagewrite import (EPOCH, write_docker_archive, write_oci_archive,
                                write_oci_layout)


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_layer(path, files: dict[str, bytes], compression: str = "none") -> str:
    raw = tar_bytes(files)
    data = {"none": lambda b: b, "gzip": lambda b: gzip.compress(b, mtime=0),
            "zstd": lambda b: zstandard.ZstdCompressor().compress(b)}[compression](raw)
    with open(path, "wb") as f:
        f.write(data)
    return os.fspath(path)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def load(path):
    with open(path, "rb") as f:
        return json.load(f)


def blob(layout, digest: str) -> bytes:
    with open(os.path.join(layout, "blobs", *digest.split(":")), "rb") as f:
        return f.read()


@pytest.fixture
def layers(tmp_path):
    return [make_layer(tmp_path / "l0.tar", {"a": b"zero"}),
            make_layer(tmp_path / "l1.tar.gz", {"b": b"one"}, "gzip"),
            make_layer(tmp_path / "l2.tar.zst", {"c": b"two"}, "zstd")]


def test_layout_blobs_config_manifest_index(tmp_path, layers):
    dest = tmp_path / "img"
    digest = write_oci_layout(dest, layers, tag="v1")
    assert load(dest / "oci-layout") == {"imageLayoutVersion": "1.0.0"}
    index = load(dest / "index.json")
    assert index["mediaType"] == OCI_INDEX
    [entry] = index["manifests"]
    assert entry["digest"] == digest and entry["annotations"] == {REF_NAME: "v1"}
    manifest_bytes = blob(dest, digest)
    assert sha256(manifest_bytes) == digest and entry["size"] == len(manifest_bytes)
    manifest = json.loads(manifest_bytes)
    assert manifest["mediaType"] == OCI_MANIFEST
    assert [d["mediaType"] for d in manifest["layers"]] == [
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd"]
    for desc, path in zip(manifest["layers"], layers):
        with open(path, "rb") as f:
            assert blob(dest, desc["digest"]) == f.read()
        assert desc["digest"] == sha256(blob(dest, desc["digest"]))
    config = json.loads(blob(dest, manifest["config"]["digest"]))
    assert config["rootfs"] == {"type": "layers", "diff_ids": [
        sha256(tar_bytes({"a": b"zero"})), sha256(tar_bytes({"b": b"one"})),
        sha256(tar_bytes({"c": b"two"}))]}
    assert f"{config['os']}/{config['architecture']}" == host_platform()
    assert config["created"] == EPOCH
    assert config["history"] == [{"created": EPOCH, "created_by": "layerfs"}] * 3
    assert entry["platform"] == {"os": config["os"], "architecture": config["architecture"]}


def test_layout_is_deterministic_and_leaves_no_temp_files(tmp_path, layers):
    first = write_oci_layout(tmp_path / "a", layers, tag="x")
    second = write_oci_layout(tmp_path / "b", layers, tag="x")
    assert first == second
    assert (tmp_path / "a" / "index.json").read_bytes() == (tmp_path / "b" / "index.json").read_bytes()
    names = [n for _, _, files in os.walk(tmp_path / "a") for n in files]
    assert not [n for n in names if n.endswith(".tmp")]
    assert len(names) == 2 + 3 + 2   # oci-layout, index.json; layers; config, manifest


def test_layout_hardlinks_layer_blobs(tmp_path, layers):
    dest = tmp_path / "img"
    digest = write_oci_layout(dest, layers)
    first = json.loads(blob(dest, digest))["layers"][0]["digest"]
    assert os.path.samefile(dest / "blobs" / "sha256" / first.split(":")[1], layers[0])


def test_adding_to_a_layout_keeps_other_entries_and_replaces_the_tag(tmp_path, layers):
    dest = tmp_path / "img"
    one = write_oci_layout(dest, layers[:1], tag="one")
    two = write_oci_layout(dest, layers[:2], tag="two")
    again = write_oci_layout(dest, layers, tag="one")
    entries = load(dest / "index.json")["manifests"]
    assert [(e["annotations"][REF_NAME], e["digest"]) for e in entries] == [
        ("two", two), ("one", again)]
    assert one != again
    write_oci_layout(dest, layers[:2])
    write_oci_layout(dest, layers[:2])   # the same untagged image is listed once
    assert len(load(dest / "index.json")["manifests"]) == 3


def test_config_history_and_media_types(tmp_path, layers):
    config = {"architecture": "arm64", "os": "linux", "created": "2024-01-02T03:04:05Z",
              "config": {"Env": ["A=1"]}, "history": [{"created_by": "old", "empty_layer": True}]}
    dest = tmp_path / "img"
    digest = write_oci_layout(dest, layers[1:2], config=config, media_types="docker",
                              history=[{"created_by": "mine"}])
    manifest = json.loads(blob(dest, digest))
    assert manifest["mediaType"] == DOCKER_MANIFEST
    assert manifest["layers"][0]["mediaType"] == "application/vnd.docker.image.rootfs.diff.tar.gzip"
    written = json.loads(blob(dest, manifest["config"]["digest"]))
    assert written["created"] == "2024-01-02T03:04:05Z"
    assert written["architecture"] == "arm64" and written["config"] == {"Env": ["A=1"]}
    assert written["history"] == [{"created_by": "old", "empty_layer": True},
                                  {"created_by": "mine"}]
    assert "rootfs" not in config   # the caller's dict is left alone
    with pytest.raises(ValueError):
        write_oci_layout(dest, layers, history=[{}])
    with pytest.raises(ValueError):
        write_oci_layout(dest, layers, media_types="other")


def test_existing_index_that_is_not_json_is_refused(tmp_path, layers):
    dest = tmp_path / "img"
    dest.mkdir()
    (dest / "index.json").write_text("{nope")
    with pytest.raises(UnsupportedImageError, match="index.json"):
        write_oci_layout(dest, layers)


def test_oci_archive_is_the_layout_in_one_deterministic_tar(tmp_path, layers):
    digest = write_oci_layout(tmp_path / "img", layers, tag="t")
    assert write_oci_archive(tmp_path / "a.tar", layers, tag="t") == digest
    write_oci_archive(tmp_path / "b.tar", layers, tag="t")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        assert all(m.mtime == 0 and m.uid == 0 for m in tar.getmembers())
    on_disk = {os.path.relpath(os.path.join(d, n), tmp_path / "img"): None
               for d, _, names in os.walk(tmp_path / "img") for n in names}
    assert set(files) == set(on_disk)
    for name in files:
        assert files[name] == (tmp_path / "img" / name).read_bytes()


def test_docker_archive_layout(tmp_path, layers):
    dest = tmp_path / "d.tar"
    config_digest = write_docker_archive(dest, layers + layers[:1], ["app:1", "reg/app:2"])
    with tarfile.open(dest) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    [entry] = json.loads(files["manifest.json"])
    assert entry["RepoTags"] == ["app:1", "reg/app:2"]
    assert entry["Config"] == config_digest.split(":")[1] + ".json"
    assert sha256(files[entry["Config"]]) == config_digest
    contents = [{"a": b"zero"}, {"b": b"one"}, {"c": b"two"}, {"a": b"zero"}]
    assert [files[name] for name in entry["Layers"]] == [tar_bytes(c) for c in contents]
    assert entry["Layers"][0] == entry["Layers"][3]   # one copy of a repeated layer
    assert len([n for n in files if n.endswith("layer.tar")]) == 3
    config = json.loads(files[entry["Config"]])
    assert config["rootfs"]["diff_ids"] == [sha256(tar_bytes(c)) for c in contents]
    top = entry["Layers"][-1].split("/")[0]
    assert json.loads(files["repositories"]) == {"app": {"1": top}, "reg/app": {"2": top}}
    with pytest.raises(ValueError):
        write_docker_archive(tmp_path / "e.tar", layers, ["no-tag"])
    assert not (tmp_path / "e.tar").exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_base_image_layers_come_first(tmp_path, layers):
    write_oci_archive(tmp_path / "base.tar", layers[:2], tag="base",
                      config={"config": {"Env": ["X=1"]}})
    with open_image(tmp_path / "base.tar") as base:
        digest = write_oci_layout(tmp_path / "img", layers[2:], base=base, tag="top")
        base_diff_ids = base.diff_ids
    with open_image(tmp_path / "img", tag="top") as image:
        assert image.manifest_digest == digest
        assert image.diff_ids == base_diff_ids + [sha256(tar_bytes({"c": b"two"}))]
        assert image.config["config"] == {"Env": ["X=1"]}
        assert len(image.config["history"]) == 3
