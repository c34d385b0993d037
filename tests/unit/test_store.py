"""layerfs.Store: named containers over shared images (issue 15), through
the library and the CLI (without FUSE; mounted containers are in
tests/mount/test_containers.py)."""

from __future__ import annotations

import errno
import json
import os

import pytest

import layerfs
from layerfs import cli, store as store_module
from layerfs.errors import StoreError, UpperError
from layerfs.example import build_example


@pytest.fixture
def image(tmp_path):
    return build_example(str(tmp_path / "image"))


@pytest.fixture
def store(tmp_path):
    return layerfs.Store(tmp_path / "store")


def test_create_records_the_image_and_binds_an_empty_upper(store, image):
    container = store.create(image, "web")
    with layerfs.open(image) as fs:
        assert container.chain_id == fs.image.chain_id()
        assert container.manifest_digest == fs.image.manifest_digest
    assert store.get("web") == container
    assert [c.name for c in store.list()] == ["web"]
    with store.open("web") as fs:
        assert fs.diff() == []
        assert not fs.readonly


def test_two_containers_of_one_image_are_isolated(store, image):
    store.create(image, "a")
    store.create(image, "b")
    with store.open("a") as a, store.open("b") as b:
        a.write_text("/only-a", "a")
        b.unlink("/README")
        assert not b.exists("/only-a") and a.exists("/README")
        assert a.lower is b.lower            # one shared view of the image
        assert a.tree is not b.tree
    with store.open("a", readonly=True) as a:
        assert [c.path for c in a.diff()] == ["/only-a"]


def test_the_shared_view_is_never_changed_by_a_container(store, image):
    store.create(image, "a")
    with layerfs.open(image) as reader, store.open("a") as writer:
        assert reader.tree is reader.lower.tree is writer.lower.tree
        writer.unlink("/README")
        writer.mkdir("/new")
        assert reader.exists("/README") and not reader.exists("/new")
        with pytest.raises(ValueError):
            reader.upper = writer.upper


def test_one_writer_at_a_time_and_readers_beside_it(store, image):
    store.create(image, "web")
    with store.open("web") as writer:
        writer.write_text("/x", "1")
        with pytest.raises(UpperError) as caught:
            store.open("web")
        assert caught.value.errno == errno.EBUSY
        with store.open("web", readonly=True) as reader:
            assert [c.path for c in reader.diff()] == ["/x"]
        assert store.upper_size("web") > 0
        with pytest.raises(StoreError) as caught:
            store.remove("web")
        assert caught.value.errno == errno.EBUSY
    store.remove("web")
    assert store.list() == []


@pytest.mark.parametrize("name", ["", "-x", "a/b", "..", ".hidden", "a b", "é", "x" * 129])
def test_names_are_checked(store, image, name):
    with pytest.raises(StoreError) as caught:
        store.create(image, name)
    assert caught.value.errno == errno.EINVAL
    assert "\n" not in str(caught.value)


def test_a_name_is_taken_once_and_missing_names_say_so(store, image):
    store.create(image, "web")
    with pytest.raises(StoreError) as caught:
        store.create(image, "web")
    assert caught.value.errno == errno.EEXIST
    for call in (store.get, store.open, store.remove):
        with pytest.raises(StoreError) as caught:
            call("nope")
        assert caught.value.errno == errno.ENOENT
    assert not [name for name in os.listdir(os.path.join(store.path, "containers"))
                if name.startswith(".")]


def test_a_container_refuses_to_open_over_another_image(store, image, tmp_path):
    store.create(image, "web")
    other = build_example(str(tmp_path / "other"), zstd=True)
    record_path = os.path.join(store.get("web").directory, store_module.RECORD_FILE)
    with open(record_path) as stream:
        record = json.load(stream)
    record["reference"]["path"] = other
    with open(record_path, "w") as stream:
        json.dump(record, stream)
    with pytest.raises(StoreError) as caught:
        store.open("web")
    assert "no longer names" in str(caught.value)


def test_the_default_store_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERFS_STORE", str(tmp_path / "s"))
    assert layerfs.Store().path == str(tmp_path / "s")
    monkeypatch.delenv("LAYERFS_STORE")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert layerfs.Store().path == str(tmp_path / "data" / "layerfs")
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert store_module.default_path() == str(tmp_path / "home/.local/share/layerfs")


def test_commit_of_a_container_makes_an_image_with_its_changes(store, image, tmp_path):
    store.create(image, "web")
    with store.open("web") as fs:
        fs.write_text("/etc/motd", "hello\n")
        fs.commit(str(tmp_path / "out"), tag="v2")
    with layerfs.open(f"oci:{tmp_path / 'out'}:v2") as committed:
        assert committed.read_text("/etc/motd") == "hello\n"


# -- the CLI --------------------------------------------------------------------------

def run(capsys, *arguments):
    code = cli.main(list(arguments))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_create_ls_diff_commit_rm(capsys, tmp_path, image, monkeypatch):
    monkeypatch.setenv("LAYERFS_STORE", str(tmp_path / "store"))
    assert run(capsys, "container", "create", image, "web")[:2] == (0, "web\n")
    code, out, err = run(capsys, "container", "create", image, "web")
    assert code == 1 and err == "layerfs: container 'web' exists already\n"
    with layerfs.Store().open("web") as fs:
        fs.write_text("/new", "x")
        fs.unlink("/README")
    code, out, _ = run(capsys, "container", "ls", "--json")
    [row] = json.loads(out)
    assert row["name"] == "web" and row["image"] == image and row["mounted"] is None
    assert row["chain_id"].startswith("sha256:") and row["upper_size"] > 0
    code, out, _ = run(capsys, "container", "ls")
    assert out.splitlines()[0].split("\t") == ["NAME", "IMAGE", "CHAINID", "CREATED",
                                               "SIZE", "MOUNTED"]
    assert out.splitlines()[1].startswith("web\t")
    assert run(capsys, "container", "diff", "web")[1] == "D /README\nA /new\n"
    code, out, _ = run(capsys, "container", "commit", "web", str(tmp_path / "out"),
                       "--tag", "v2")
    assert code == 0 and out.startswith("sha256:")
    with layerfs.open(f"oci:{tmp_path / 'out'}:v2") as fs:
        assert fs.read_text("/new") == "x" and not fs.exists("/README")
    assert run(capsys, "container", "rm", "web")[0] == 0
    code, out, err = run(capsys, "container", "diff", "web")
    assert code == 1 and err.count("\n") == 1 and "no container 'web'" in err


def test_cli_store_option_and_bad_names(capsys, tmp_path, image):
    store = str(tmp_path / "elsewhere")
    assert run(capsys, "container", "create", "--store", store, image, "c1")[0] == 0
    assert [c.name for c in layerfs.Store(store).list()] == ["c1"]
    code, _, err = run(capsys, "container", "create", "--store", store, image, "a/b")
    assert code == 1 and err.startswith("layerfs: invalid container name 'a/b'")


def test_a_filesystem_that_shares_no_view_behaves_the_same(image, tmp_path):
    from layerfs.lazytree import LazyNodes
    from layerfs.lowerview import LowerSnapshot
    results = []
    for share in (True, False):
        with layerfs.open(image, upper=tmp_path / f"u{share}", share_view=share) as fs:
            assert isinstance(fs.tree.nodes, LazyNodes) == share
            assert isinstance(fs.lower, LowerSnapshot) != share
            fs.unlink("/README")
            fs.write_text("/etc/new", "x")
            fs.rename("/etc", "/etc2")
            results.append((fs.diff(), sorted(fs.tree.nodes)))
    assert results[0] == results[1]


def test_a_container_holds_its_image_in_the_cache_until_removed(store, image, tmp_path):
    from layerfs.cache import IndexCache
    cache = IndexCache(tmp_path / "cache")
    store.create(image, "web", cache=cache)
    store.create(image, "db", cache=cache)
    layer_data = [e for e in cache.scan() if e.kind != "view"]
    assert layer_data and all(e.pinned for e in layer_data)     # nothing is open now
    assert not any(cache.remove(e) for e in layer_data)         # prune --all keeps them
    store.remove("web")
    assert not any(cache.remove(e) for e in cache.scan() if e.kind != "view")
    store.remove("db")
    assert all(cache.remove(e) for e in cache.scan() if e.kind != "view")
    assert cache.remove_stale_pins() >= 0 and not os.listdir(tmp_path / "cache" / "holds")


def test_a_hold_whose_container_went_by_hand_is_stale(store, image, tmp_path):
    import shutil
    from layerfs.cache import IndexCache
    cache = IndexCache(tmp_path / "cache")
    container = store.create(image, "web", cache=cache)
    shutil.rmtree(container.directory)
    assert not any(e.pinned for e in cache.scan())
