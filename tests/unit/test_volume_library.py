"""Volumes through the library (layerfs/volumefs.py): ``layerfs.open(...,
volumes=)`` and ``Store.open(..., volumes=)``."""

from __future__ import annotations

import errno
import os

import pytest

import layerfs
from layerfs.testing import layers as L
from layerfs.testing.writers import write_image
from layerfs.volume import Volume

IMAGE = [L.Layer([L.directory("etc"), L.file("etc/passwd", b"image passwd"),
                  L.directory("data"), L.file("data/hidden", b"image data"),
                  L.directory("d"), L.file("d/f", b"lower"),
                  L.symlink("to-data", "/data"), L.directory("var")])]


@pytest.fixture
def image(tmp_path):
    return write_image(IMAGE, tmp_path / "image", kind="layers", compression="none")


@pytest.fixture
def host(tmp_path):
    directory = tmp_path / "host"
    directory.mkdir()
    (directory / "a").write_bytes(b"host a")
    (directory / "sub").mkdir()
    (directory / "sub" / "b").write_bytes(b"host b")
    return directory


@pytest.fixture
def outside(tmp_path):
    """A host directory beside the volume that nothing may touch."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "secret").write_bytes(b"secret")
    return directory


@pytest.fixture
def fs(image, host, tmp_path):
    with layerfs.open(image, upper=tmp_path / "upper", volumes=[f"{host}:/data"]) as fs:
        yield fs


def errno_of(call):
    with pytest.raises(OSError) as info:
        call()
    return info.value.errno


def upper_files(tmp_path):
    found = []
    for root, dirs, files in os.walk(tmp_path / "upper"):
        found += [os.path.join(root, name) for name in dirs + files]
    return found


def test_reads_are_the_host_directory_and_hide_the_image(fs, host):
    assert sorted(fs.listdir("/data")) == sorted(os.listdir(host))
    assert fs.read_bytes("/data/a") == b"host a"
    assert fs.read_bytes("/to-data/sub/b") == b"host b"
    assert fs.read_bytes("/data/../d/f") == b"lower"
    assert not fs.exists("/data/hidden")
    for path in ("/data/a", "/data/sub", "/data"):
        mine, theirs = fs.stat(path), os.stat(host / path[len("/data/"):])
        assert (mine.st_ino, mine.st_mode, mine.st_size) == \
            (theirs.st_ino, theirs.st_mode, theirs.st_size)
    assert fs.is_dir("/data") and fs.is_file("/data/a")
    assert sorted(entry.name for entry in fs.scandir("/data")) == ["a", "sub"]
    assert "data" in fs.listdir("/")
    walked = {top: sorted(files) for top, _, files in fs.walk("/data")}
    assert walked == {"/data": ["a"], "/data/sub": ["b"]}
    assert fs.realpath("/to-data/sub") == "/data/sub"


def test_writes_land_in_the_host_directory_and_none_in_the_upper(fs, host, tmp_path):
    fs.write_bytes("/data/new", b"written")
    fs.mkdir("/data/dir")
    fs.symlink("new", "/data/dir/ln")
    fs.rename("/data/a", "/data/dir/a2")
    fs.chmod("/data/new", 0o600)
    with fs.open("/data/new", "ab") as stream:
        stream.write(b"+")
    fs.utime("/data/new", ns=(1, 2))
    fs.truncate("/data/sub/b", 2)
    fs.unlink("/data/sub/b")
    fs.rmdir("/data/sub")
    assert (host / "new").read_bytes() == b"written+"
    assert os.stat(host / "new").st_mode & 0o777 == 0o600
    assert os.stat(host / "new").st_mtime_ns == 2
    assert os.readlink(host / "dir" / "ln") == "new"
    assert (host / "dir" / "a2").read_bytes() == b"host a"
    assert sorted(os.listdir(host)) == ["dir", "new"]
    assert fs.readlink("/data/dir/ln") == "new"
    handle = fs.open_handle("/data/new", os.O_RDWR)
    try:
        handle.pwrite(b"W", 0)
        assert handle.pread(3, 0) == b"Wri"
    finally:
        handle.close()
    assert not [path for path in upper_files(tmp_path) if "data" in path]
    assert fs.diff() == []


def test_diff_and_commit_leave_volumes_out(fs, host, tmp_path):
    fs.write_bytes("/data/in-volume", b"v")
    fs.write_bytes("/d/in-image", b"i")
    changed = [change.path for change in fs.diff()]
    assert "/d/in-image" in changed and not [path for path in changed if "data" in path]
    fs.commit(tmp_path / "committed", tag="t")
    with layerfs.open(f"oci:{tmp_path / 'committed'}:t") as committed:
        assert committed.read_bytes("/d/in-image") == b"i"
        assert committed.read_bytes("/data/hidden") == b"image data"
        assert not committed.exists("/data/in-volume")


def test_read_only_volumes_refuse_writes_with_erofs(image, host, tmp_path):
    with layerfs.open(image, upper=tmp_path / "upper",
                      volumes=[Volume(str(host), "/data", True)]) as fs:
        assert fs.read_bytes("/data/a") == b"host a"
        for call in (lambda: fs.write_bytes("/data/x", b""), lambda: fs.mkdir("/data/x"),
                     lambda: fs.unlink("/data/a"), lambda: fs.rmdir("/data/sub"),
                     lambda: fs.rename("/data/a", "/data/b"), lambda: fs.chmod("/data/a", 0),
                     lambda: fs.symlink("a", "/data/s"), lambda: fs.open("/data/a", "r+b"),
                     lambda: fs.truncate("/data/a", 0), lambda: fs.utime("/data/a")):
            assert errno_of(call) == errno.EROFS
        fs.write_bytes("/d/f", b"the rest is writable")
    assert sorted(os.listdir(host)) == ["a", "sub"]
    assert (host / "a").read_bytes() == b"host a"


def test_a_rw_volume_is_writable_in_a_read_only_view(image, host):
    with layerfs.open(image, volumes=[f"{host}:/data"]) as fs:
        fs.write_bytes("/data/x", b"x")
        assert errno_of(lambda: fs.write_bytes("/d/x", b"")) == errno.EROFS
    assert (host / "x").read_bytes() == b"x"


def test_renames_and_links_across_the_boundary_are_exdev(fs, host):
    assert errno_of(lambda: fs.rename("/data/a", "/d/a")) == errno.EXDEV
    assert errno_of(lambda: fs.rename("/d/f", "/data/f")) == errno.EXDEV
    assert errno_of(lambda: fs.link("/d/f", "/data/f")) == errno.EXDEV
    # A volume's PATH is a mount point: EBUSY, as a bind mount's (mv then
    # stops, where EXDEV would make it copy the volume out and empty it).
    assert errno_of(lambda: fs.rename("/data", "/d/moved")) == errno.EBUSY
    assert errno_of(lambda: fs.rename("/data", "/data2")) == errno.EBUSY
    assert errno_of(lambda: fs.rmdir("/data")) == errno.EBUSY
    assert (host / "a").exists() and fs.read_bytes("/d/f") == b"lower"


def test_symlinks_in_a_volume_resolve_in_the_view_not_on_the_host(fs, host, outside):
    os.symlink("/etc", host / "etc-link")
    os.symlink(str(outside), host / "abs-outside")
    os.symlink("../outside", host / "rel-outside")
    assert fs.read_bytes("/data/etc-link/passwd") == b"image passwd"
    assert not fs.exists("/data/abs-outside/secret")
    assert not fs.exists("/data/rel-outside/secret")
    fs.write_bytes("/data/etc-link/passwd", b"changed in the upper")
    assert fs.read_bytes("/etc/passwd") == b"changed in the upper"
    for call in (lambda: fs.write_bytes("/data/rel-outside/secret", b"x"),
                 lambda: fs.write_bytes("/data/abs-outside/secret", b"x"),
                 lambda: fs.unlink("/data/../../outside/secret"),
                 lambda: fs.read_bytes("/data/../../../outside/secret")):
        with pytest.raises(OSError):
            call()
    assert (outside / "secret").read_bytes() == b"secret"
    assert os.listdir(outside) == ["secret"]
    # The final symlink itself is the volume's: removed, not followed.
    fs.unlink("/data/abs-outside")
    assert not (host / "abs-outside").exists() and (outside / "secret").exists()


def test_a_symlink_swapped_in_for_a_directory_is_not_followed(fs, host, outside,
                                                               monkeypatch):
    # Met while resolving, the symlink resolves in the view (no such path
    # in the image): nothing outside is reached.
    os.rename(host / "sub", host / "sub-old")
    os.symlink(str(outside), host / "sub")
    assert errno_of(lambda: fs.read_bytes("/data/sub/secret")) == errno.ENOENT
    assert errno_of(lambda: fs.unlink("/data/sub/secret")) == errno.ENOENT
    # Swapped in after resolving (a race, forced here by answering every
    # resolution as if "sub" were still a directory): HostDir's no-follow
    # walk refuses it.
    mounted = fs._mounted["/data"]
    monkeypatch.setattr(fs, "_walk", lambda path, follow: (mounted, path[len("/data"):]))
    for call in (lambda: fs.read_bytes("/data/sub/secret"),
                 lambda: fs.write_bytes("/data/sub/secret", b"x"),
                 lambda: fs.unlink("/data/sub/secret"),
                 lambda: fs.chmod("/data/sub/secret", 0o777),
                 lambda: fs.rename("/data/sub/secret", "/data/stolen"),
                 lambda: fs.listdir("/data/sub"),
                 lambda: fs.mkdir("/data/sub/made")):
        assert errno_of(call) in (errno.ELOOP, errno.ENOTDIR)
    assert (outside / "secret").read_bytes() == b"secret"
    assert os.listdir(outside) == ["secret"]
    assert os.stat(outside / "secret").st_mode & 0o777 != 0o777


def test_a_volume_path_missing_from_the_image_is_listed_not_created(image, host, tmp_path):
    with layerfs.open(image, upper=tmp_path / "upper",
                      volumes=[f"{host}:/var/cache:ro"]) as fs:
        assert "cache" in fs.listdir("/var")
        assert fs.is_dir("/var/cache") and fs.read_bytes("/var/cache/a") == b"host a"
        assert fs.diff() == []
    with pytest.raises(ValueError):
        layerfs.open(image, volumes=[f"{host}:/missing/x"])
    with pytest.raises(ValueError):
        layerfs.open(image, volumes=[f"{host}:/d/f/x"])


def test_store_open_takes_volumes(image, host, tmp_path):
    from layerfs.volume import create_volume
    store = layerfs.Store(tmp_path / "store")
    store.create(image, "c1")
    named = create_volume(store, "cache")
    with store.open("c1", volumes=[f"{host}:/data", "cache:/var/cache"]) as fs:
        fs.write_bytes("/data/x", b"x")
        fs.write_bytes("/var/cache/y", b"y")
        assert fs.diff() == []
    assert (host / "x").read_bytes() == b"x"
    assert open(os.path.join(named, "y"), "rb").read() == b"y"
    with store.open("c1") as fs:
        assert fs.read_bytes("/data/hidden") == b"image data"


def test_a_directory_holding_a_volume_stays_and_nested_volumes_are_listed(
        image, host, tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "i").write_bytes(b"inner")
    with layerfs.open(image, upper=tmp_path / "upper",
                      volumes=[f"{host}:/var/lib", f"{inner}:/var/lib/sub/nested"]) as fs:
        assert errno_of(lambda: fs.rmdir("/var")) == errno.EBUSY
        assert errno_of(lambda: fs.rename("/var", "/var2")) == errno.EBUSY
        assert "nested" in fs.listdir("/var/lib/sub")
        assert fs.read_bytes("/var/lib/sub/nested/i") == b"inner"
        assert fs.read_bytes("/var/lib/sub/b") == b"host b"
        assert errno_of(lambda: fs.rename("/var/lib/a", "/var/lib/sub/nested/a")) == \
            errno.EXDEV


def test_bytes_paths_and_closed_filesystems(image, host):
    fs = layerfs.open(image, volumes=[f"{host}:/data"])
    assert sorted(fs.listdir(b"/data")) == [b"a", b"sub"]
    assert fs.readlink(b"/to-data") == b"/data"
    import pathlib
    assert fs.realpath(pathlib.PurePosixPath("/to-data")) == "/data"
    assert fs.realpath(b"/to-data/a") == b"/data/a"
    assert fs.realpath(pathlib.PurePosixPath("/d/f")) == "/d/f"
    fs.close()
    with pytest.raises(ValueError):
        fs.stat("/data/a")
    with pytest.raises(ValueError):
        fs.exists("/d/f")


def test_a_trailing_slash_on_a_non_directory_in_a_volume_is_enotdir(fs, host):
    os.symlink("a", host / "to-a")
    os.symlink("sub", host / "to-sub")
    for path in ("/data/a/", "/data/a/.", "/data/to-a/", "/data/sub/b/"):
        for call in (fs.stat, fs.lstat, fs.read_bytes, fs.listdir, fs.open):
            assert errno_of(lambda: call(path)) == errno.ENOTDIR, (call, path)
        assert not fs.exists(path) and not fs.is_file(path)
    # as for the image's paths
    assert errno_of(lambda: fs.stat("/etc/passwd/")) == errno.ENOTDIR
    # a directory, or a symlink to one, with a trailing slash is the directory
    assert fs.is_dir("/data/sub/") and fs.is_dir("/data/to-sub/")
    assert fs.listdir("/data/to-sub/") == ["b"]
    assert fs.lstat("/data/to-sub/").st_ino == os.stat(host / "sub").st_ino
    fs.mkdir("/data/made/")
    assert (host / "made").is_dir()


def test_what_the_upper_held_under_a_volume_is_out_of_diff_and_commit(image, host, tmp_path):
    with layerfs.open(image, upper=tmp_path / "upper") as before:
        before.write_bytes("/data/old", b"written before the volume")
        before.unlink("/data/hidden")
        before.rmdir("/var")
        before.mkdir("/var")            # an opaque directory, outside any volume
        before.write_bytes("/d/kept", b"k")
    with layerfs.open(image, upper=tmp_path / "upper", volumes=[f"{host}:/data"]) as fs:
        assert not fs.exists("/data/old")
        changed = {change.path: change.change for change in fs.diff()}
        assert changed == {"/d": "modified", "/d/kept": "added", "/var": "modified"}
        result = fs.commit(tmp_path / "committed", tag="t")
    import tarfile
    with tarfile.open(result.layer_path) as layer:
        names = sorted(layer.getnames())
    assert not [name for name in names if name.startswith("data")], names
    assert "var/.wh..wh..opq" in names and "d/kept" in names
    with layerfs.open(f"oci:{tmp_path / 'committed'}:t") as committed:
        assert committed.read_bytes("/data/hidden") == b"image data"
        assert not committed.exists("/data/old")
        assert committed.read_bytes("/d/kept") == b"k"


def test_export_and_extract_leave_volumes_out(image, host, tmp_path):
    import tarfile
    with layerfs.open(image, upper=tmp_path / "upper") as before:
        before.write_bytes("/data/old", b"written before the volume")
    with layerfs.open(image, upper=tmp_path / "upper", volumes=[f"{host}:/data"]) as fs:
        fs.write_bytes("/d/kept", b"k")
        fs.export(tmp_path / "out.tar")
        with tarfile.open(tmp_path / "out.tar") as tar:
            names = set(tar.getnames())
        assert {"d/kept", "etc/passwd", "data"} <= {name.lstrip("./") for name in names}
        assert not [name for name in names if "data/" in name], names
        copied = fs.extract("/", tmp_path / "copy")
        assert sorted(os.listdir(os.path.join(copied, "data"))) == []
        assert open(os.path.join(copied, "d", "kept"), "rb").read() == b"k"
        assert errno_of(lambda: fs.extract("/data/a", tmp_path / "a")) == errno.EXDEV


def test_lexists_and_lstat_of_a_missing_image_path(fs):
    # FileSystem.stat without following calls self.lstat: it once recursed.
    assert not fs.lexists("/missing")
    with pytest.raises(FileNotFoundError):
        fs.lstat("/etc/missing")
    assert fs.lexists("/to-data")
