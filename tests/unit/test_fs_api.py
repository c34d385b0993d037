"""The Python API behaves as ``os``, ``open`` and ``glob`` do where it
mirrors them: directories, closed filesystems, patterns, helpers."""

import os

import pytest

import layerfs
from layerfs.example import build_example


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return build_example(str(tmp_path_factory.mktemp("api") / "image"))


def test_open_of_a_directory_is_is_a_directory_error(image):
    with layerfs.open(image) as fs:
        for mode in ("rb", "r"):
            with pytest.raises(IsADirectoryError):
                fs.open("/etc", mode)
        fs.open_handle("/etc", os.O_RDONLY).close()    # as os.open allows


@pytest.mark.parametrize("use", [
    lambda fs: fs.stat("/etc"), lambda fs: fs.lstat("/etc"), lambda fs: fs.listdir("/"),
    lambda fs: fs.read_bytes("/etc/motd"), lambda fs: fs.open("/etc/motd"),
    lambda fs: fs.exists("/etc"), lambda fs: list(fs.walk("/")), lambda fs: fs.glob("/*"),
    lambda fs: fs.realpath("/bin"), lambda fs: fs.export(os.devnull),
])
def test_a_closed_filesystem_raises_value_error(image, use):
    fs = layerfs.open(image)
    fs.stat("/etc")
    fs.close()
    assert fs.closed
    with pytest.raises(ValueError, match="closed"):
        use(fs)
    fs.close()        # closing again is harmless


def test_glob_and_iglob(image):
    with layerfs.open(image) as fs:
        assert fs.glob("/etc/*") == ["/etc/motd", "/etc/os-release"]
        assert fs.glob("/usr/*/h?") == ["/usr/bin/hi"]
        assert fs.glob("/*/[mo]*") == ["/etc/motd", "/etc/os-release"]
        assert fs.glob("/**/hello", recursive=True) == ["/usr/bin/hello"]
        assert fs.glob("/**", recursive=True) == [            # as the stdlib: files too
            "/", "/README", "/bin", "/etc", "/etc/motd", "/etc/os-release", "/usr",
            "/usr/bin", "/usr/bin/hello", "/usr/bin/hi", "/var", "/var/cache",
            "/var/cache/fresh"]
        assert fs.glob("/**/", recursive=True) == [
            "/", "/bin/", "/etc/", "/usr/", "/usr/bin/", "/var/", "/var/cache/"]
        assert fs.glob("/*/") == ["/bin/", "/etc/", "/usr/", "/var/"]
        assert fs.glob("/bin/h*") == ["/bin/hello", "/bin/hi"]     # through the symlink
        assert fs.glob("/nothing/*") == [] and fs.glob("/etc/motd") == ["/etc/motd"]
        assert list(fs.iglob(b"/etc/m*")) == ["/etc/motd"]
        with pytest.raises(ValueError):
            fs.glob("etc/*")


def test_glob_skips_dot_names_unless_the_pattern_has_one(tmp_path, image):
    with layerfs.open(image, upper=str(tmp_path / "up")) as fs:
        fs.write_text("/etc/.hidden", "x")
        assert "/etc/.hidden" not in fs.glob("/etc/*")
        assert fs.glob("/etc/.h*") == ["/etc/.hidden"]


def test_cache_takes_a_path(image, tmp_path):
    with layerfs.open(image, cache=tmp_path / "cache") as fs:
        assert fs.read_text("/etc/motd")
    assert sorted(os.listdir(tmp_path / "cache")) >= ["blobs", "index"]


def test_write_text_and_the_commit_method(image, tmp_path):
    with layerfs.open(image, upper=str(tmp_path / "up")) as fs:
        assert fs.write_text("/etc/motd", "héllo\n") == 6
        result = fs.commit(tmp_path / "out", tag="next", message="a greeting")
    with layerfs.open(f"oci:{tmp_path / 'out'}:next") as committed:
        assert committed.read_text("/etc/motd") == "héllo\n"
        assert committed.image.history[-1]["comment"] == "a greeting"
        assert committed.layers[-1].compression == "gzip"
        assert committed.image.manifest_digest == result.manifest_digest


def test_bytes_paths_are_taken_as_os_takes_them(image):
    with layerfs.open(image) as fs:
        assert fs.stat(b"/etc/motd") == fs.stat("/etc/motd")
        assert fs.lstat(b"/bin") == fs.lstat("/bin")
        assert sorted(fs.listdir(b"/etc")) == [b"motd", b"os-release"]
        assert fs.readlink(b"/bin") == b"usr/bin" and fs.realpath(b"/bin/hi") == b"/usr/bin/hi"
        assert fs.read_bytes(b"/etc/motd") == fs.read_bytes("/etc/motd")
        assert fs.exists(b"/etc") and not fs.exists(b"/nothing")
        assert [top for top, _, _ in fs.walk(b"/var")] == ["/var", "/var/cache"]
        with pytest.raises(FileNotFoundError) as missing:
            fs.stat(b"/nothing")
        assert os.fsdecode(missing.value.filename) == "/nothing"


def test_bytes_paths_for_writes(image, tmp_path):
    with layerfs.open(image, upper=str(tmp_path / "up")) as fs:
        fs.makedirs(b"/srv/app")
        fs.write_bytes(b"/srv/app/f", b"data")
        with fs.open(b"/srv/app/g", "wb") as stream:
            stream.write(b"more")
        fs.symlink(b"app/f", b"/srv/link")
        fs.rename(b"/srv/app/g", b"/srv/h")
        fs.chmod(b"/srv/h", 0o600)
        fs.link(b"/srv/h", b"/srv/h2")
        fs.unlink(b"/etc/motd")
        assert sorted(fs.listdir("/srv")) == ["app", "h", "h2", "link"]
        assert fs.read_bytes("/srv/link") == b"data" and fs.readlink("/srv/link") == "app/f"
        assert fs.stat("/srv/h").st_mode & 0o777 == 0o600 and fs.stat("/srv/h2").st_nlink == 2
        assert not fs.exists("/etc/motd")
