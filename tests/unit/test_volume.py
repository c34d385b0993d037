"""Volume options and named volumes (layerfs/volume.py); binding them into a
mount is tested in tests/mount/test_containers.py."""

from __future__ import annotations

import errno
import os

import pytest

import layerfs
from layerfs import cli
from layerfs.errors import StoreError
from layerfs.volume import Volume, create_volume, list_volumes, parse_volume, remove_volume


@pytest.fixture
def store(tmp_path):
    return layerfs.Store(tmp_path / "store")


def test_parse_host_directories_and_named_volumes(tmp_path, store):
    host = tmp_path / "host"
    host.mkdir()
    assert parse_volume(f"{host}:/data") == Volume(str(host), "/data", False)
    assert parse_volume(f"{host}:/data:ro") == Volume(str(host), "/data", True)
    assert parse_volume(f"{host}:/a/b:rw") == Volume(str(host), "/a/b", False)
    path = create_volume(store, "cache")
    assert parse_volume("cache:/var/cache:ro", store) == Volume(path, "/var/cache", True)


@pytest.mark.parametrize("path", ["data", "/", "/a/../etc", "/a/./b", "//a", "/a/"])
def test_the_volume_path_is_canonical_and_inside(tmp_path, path):
    with pytest.raises(StoreError) as caught:
        parse_volume(f"{tmp_path}:{path}")
    assert caught.value.errno == errno.EINVAL


@pytest.mark.parametrize("text", ["", ":/x", "/tmp:", "/tmp:/x:rx", "/tmp:/x:ro:ro"])
def test_malformed_options(text):
    with pytest.raises(StoreError):
        parse_volume(text)


def test_missing_sources(tmp_path, store):
    with pytest.raises(StoreError) as caught:
        parse_volume(f"{tmp_path}/nope:/x")
    assert caught.value.errno == errno.ENOENT
    with pytest.raises(StoreError) as caught:
        parse_volume("nope:/x", store)
    assert "layerfs volume create nope" in str(caught.value)


def test_named_volumes_are_created_listed_and_removed(store):
    path = create_volume(store, "v1")
    with open(os.path.join(path, "f"), "w") as stream:
        stream.write("kept")
    with pytest.raises(StoreError) as caught:
        create_volume(store, "v1")
    assert caught.value.errno == errno.EEXIST
    assert list_volumes(store) == [("v1", path)]
    remove_volume(store, "v1")
    assert list_volumes(store) == []
    with pytest.raises(StoreError):
        remove_volume(store, "v1")
    with pytest.raises(StoreError):
        create_volume(store, "../x")


def test_volume_cli(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERFS_STORE", str(tmp_path / "store"))
    assert cli.main(["volume", "create", "data"]) == 0
    assert cli.main(["volume", "ls"]) == 0
    assert cli.main(["volume", "rm", "data"]) == 0
    out, _ = capsys.readouterr()
    path = str(tmp_path / "store" / "volumes" / "data")
    assert out == f"{path}\ndata\t{path}\n"
