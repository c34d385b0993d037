"""The facade: os-shaped reads over a known image (the example image)."""

import errno
import os
import stat

import pytest

import layerfs
from layerfs.example import build_example


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return build_example(str(tmp_path_factory.mktemp("example") / "image"), zstd=True)


@pytest.fixture
def fs(image):
    with layerfs.open(image) as opened:
        yield opened


def test_whiteout_opaque_and_replacement_are_applied(fs):
    assert sorted(fs.listdir("/etc")) == ["motd", "os-release"]
    assert fs.listdir("/var/cache") == ["fresh"]
    assert fs.read_bytes("/etc/motd") == b"Welcome: layer 1 replaced this file.\n"


def test_stat_follows_symlinks_inside_the_image(fs):
    assert stat.S_ISLNK(fs.lstat("/bin").st_mode)
    assert fs.stat("/bin/hello") == fs.stat("/usr/bin/hello")
    assert fs.realpath("/bin/hi") == "/usr/bin/hi"
    assert fs.readlink("/bin") == "usr/bin"


def test_hardlinks_share_inode_and_count(fs):
    a, b = fs.stat("/usr/bin/hello"), fs.stat("/usr/bin/hi")
    assert a.st_ino == b.st_ino and a.st_nlink == b.st_nlink == 2


def test_open_is_seekable_and_text_mode_works(fs):
    with fs.open("/etc/os-release", "rb") as stream:
        stream.seek(5)
        assert stream.read(7) == b'"layerf'
        stream.seek(-3, os.SEEK_END)
        assert stream.read() == b"fs\n"
    with fs.open("/etc/os-release", "r") as text:
        assert text.readline() == 'NAME="layerfs example"\n'


def test_walk_matches_listdir(fs):
    seen = set()
    for top, dirs, files in fs.walk("/"):
        assert sorted(dirs + files) == sorted(fs.listdir(top))
        seen.update(os.path.join(top, name) for name in dirs + files)
    assert "/usr/bin/hi" in seen and "/bin" in seen


def test_scandir_entries(fs):
    entries = {e.name: e for e in fs.scandir("/")}
    assert entries["bin"].is_symlink() and entries["bin"].is_dir()
    assert not entries["bin"].is_dir(follow_symlinks=False)
    assert entries["README"].is_file() and entries["README"].inode() == fs.stat("/README").st_ino


@pytest.mark.parametrize("call, code", [
    (lambda fs: fs.stat("/nothing"), errno.ENOENT),
    (lambda fs: fs.listdir("/README"), errno.ENOTDIR),
    (lambda fs: fs.read_bytes("/etc"), errno.EISDIR),
    (lambda fs: fs.readlink("/README"), errno.EINVAL),
    (lambda fs: fs.stat("/README/x"), errno.ENOTDIR),
    (lambda fs: fs.getxattr("/README", "user.none"), errno.ENODATA),
])
def test_errors_carry_the_right_errno(fs, call, code):
    with pytest.raises(OSError) as info:
        call(fs)
    assert info.value.errno == code


@pytest.mark.parametrize("call", [
    lambda fs: fs.open("/README", "wb"), lambda fs: fs.mkdir("/x"),
    lambda fs: fs.unlink("/README"), lambda fs: fs.rename("/README", "/y"),
    lambda fs: fs.chmod("/README", 0o600), lambda fs: fs.symlink("a", "/b"),
])
def test_every_write_is_erofs_without_an_upper(fs, call):
    with pytest.raises(OSError) as info:
        call(fs)
    assert info.value.errno == errno.EROFS


def test_layers_and_image_are_exposed(fs):
    assert len(fs.layers) == 3
    assert [layer.compression for layer in fs.layers] == ["none", "none", "zstd"]
    assert fs.image.diff_ids == [layer.diff_id for layer in fs.layers]
    changes = fs.layer_changes()
    assert changes[1].deleted == ["/etc/old.conf", "/var/cache/stale-1", "/var/cache/stale-2"]
    assert changes[1].changed == ["/etc/motd"]


def test_export_round_trips(fs, tmp_path):
    out = tmp_path / "flat.tar"
    fs.export(out)
    with layerfs.open([str(out)]) as flat:
        for top, dirs, files in fs.walk("/"):
            for name in files:
                path = os.path.join(top, name)
                assert flat.lstat(path).st_mode == fs.lstat(path).st_mode
                if stat.S_ISREG(fs.lstat(path).st_mode):
                    assert flat.read_bytes(path) == fs.read_bytes(path)
        assert flat.stat("/usr/bin/hi").st_ino == flat.stat("/usr/bin/hello").st_ino


def tree_shape(tree):
    """Everything a tree says, inode numbers and listing order included."""
    from layerfs.union import RECORD_FIELDS
    return {path: (tuple(getattr(node, field) for field in RECORD_FIELDS),
                   None if node.children is None else list(node.children))
            for path, node in tree.nodes.items()}


def test_a_second_open_restores_the_view_without_reading_entries(image, monkeypatch):
    from layerfs.layer import IndexCache
    from layerfs.union import Tree
    with layerfs.open(image) as first:
        built = tree_shape(first.tree)
        content = first.read_bytes("/etc/os-release")

    def forbidden(*args):
        raise AssertionError("the cached view was not used")

    monkeypatch.setattr(IndexCache, "load_index", forbidden)
    monkeypatch.setattr(Tree, "apply_layer", forbidden)
    with layerfs.open(image) as second:
        assert tree_shape(second.tree) == built
        assert second.read_bytes("/etc/os-release") == content


@pytest.mark.parametrize("garbage", [b"\xff not marshal", b"\xe9",
                                     b"\xa9\x02\xfb\xfb"])
def test_an_unreadable_cached_view_is_rebuilt(image, garbage):
    cache_root = os.environ["LAYERFS_CACHE_DIR"]
    with layerfs.open(image) as first:
        built = tree_shape(first.tree)
        chain = first.image.chain_id().partition(":")[2]
    view = os.path.join(cache_root, "views", "sha256", chain + ".view")
    with open(view, "wb") as file:
        file.write(garbage)
    with layerfs.open(image) as second:
        assert tree_shape(second.tree) == built
    with open(view, "rb") as file:
        assert file.read() != garbage


def test_a_view_record_of_another_shape_is_rebuilt(image):
    import marshal
    cache_root = os.environ["LAYERFS_CACHE_DIR"]
    with layerfs.open(image) as first:
        built = tree_shape(first.tree)
        chain = first.image.chain_id().partition(":")[2]
    view = os.path.join(cache_root, "views", "sha256", chain + ".view")
    header = {"format": "layerfs-view", "version": 1, "chain_id": chain}
    broken = {"version": 1, "tree_version": 1, "next_ino": 2,
              "inodes": ((1,),) * 15, "directories": ((0,), (("a", "b"),), (("/a",),), ((0,),))}
    with open(view, "wb") as file:
        file.write(marshal.dumps((header, broken)))
    with layerfs.open(image) as second:
        assert tree_shape(second.tree) == built


def test_views_are_kept_per_stack(tmp_path):
    from layerfs.testing.layers import file
    from layerfs.testing.writers import write_layer
    lower = write_layer([file("f", b"lower")], tmp_path / "lower.tar")
    upper = write_layer([file("f", b"upper")], tmp_path / "upper.tar")
    for _ in range(2):      # the second round restores both views
        with layerfs.open([lower, upper]) as fs:
            assert fs.read_bytes("/f") == b"upper"
        with layerfs.open([upper, lower]) as fs:
            assert fs.read_bytes("/f") == b"lower"


def test_stats_are_kept_by_path_only_while_read_only(image, tmp_path):
    with layerfs.open(image) as fs:
        assert fs.stat("/etc/os-release") is fs.stat("/etc/os-release")
    with layerfs.open(image, upper=tmp_path / "upper") as fs:
        before = fs.stat("/etc/os-release")
        fs.lstat("/etc/os-release")
        with fs.open("/etc/os-release", "ab") as stream:
            stream.write(b"MORE=1\n")
        fs.chmod("/etc/os-release", 0o600)
        assert fs.stat("/etc/os-release").st_size == before.st_size + 7
        assert stat.S_IMODE(fs.lstat("/etc/os-release").st_mode) == 0o600
