"""layerfs through fsspec, with fsspec's own derived operations, as pandas
or dask would call them: registered by entry point, read-only."""

import fsspec
import pytest

from layerfs.example import build_example
from layerfs.spec import LayerFileSystem


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return build_example(str(tmp_path_factory.mktemp("spec") / "image"))


@pytest.fixture
def fs(image):
    return fsspec.filesystem("layerfs", image=image)


def test_the_protocol_is_registered_by_entry_point(fs):
    assert isinstance(fs, LayerFileSystem)
    assert fsspec.get_filesystem_class("layerfs") is LayerFileSystem


def test_ls_and_info(fs):
    assert fs.ls("/etc", detail=False) == ["/etc/motd", "/etc/os-release"]
    entries = {e["name"]: e for e in fs.ls("/")}
    assert entries["/etc"]["type"] == "directory"
    assert entries["/bin"]["islink"] and entries["/bin"]["destination"] == "usr/bin"
    info = fs.info("layerfs:///etc/os-release")
    assert (info["type"], info["size"]) == ("file", len(fs.cat("/etc/os-release")))
    with pytest.raises(FileNotFoundError):
        fs.info("/nothing")


def test_open_cat_and_ranges(fs):
    with fs.open("/etc/os-release", "rt") as text:
        assert text.readline() == 'NAME="layerfs example"\n'
    whole = fs.cat("/etc/motd")
    assert fs.cat_file("/etc/motd", start=2, end=6) == whole[2:6]
    assert fs.cat_file("/etc/motd", start=-4) == whole[-4:]


def test_find_glob_walk_and_du(fs):
    assert fs.find("/usr") == ["/usr/bin/hello", "/usr/bin/hi"]
    assert fs.glob("/etc/*") == ["/etc/motd", "/etc/os-release"]
    assert fs.glob("/**/hi") == ["/bin/hi", "/usr/bin/hi"]   # links followed, as fsspec's local fs
    walked = {top: (sorted(dirs), sorted(files)) for top, dirs, files in fs.walk("/var")}
    assert walked == {"/var": (["cache"], []), "/var/cache": ([], ["fresh"])}
    assert fs.du("/etc") == sum(fs.info(p)["size"] for p in fs.find("/etc"))


def test_fsspec_open_with_the_url_and_the_image(image):
    with fsspec.open("layerfs:///etc/motd", image=image) as stream:
        assert stream.read().startswith(b"Welcome")


def test_read_only(fs):
    for attempt in (lambda: fs.open("/etc/new", "wb"), lambda: fs.mkdir("/x"),
                    lambda: fs.rm("/etc/motd"), lambda: fs.touch("/etc/t")):
        with pytest.raises(OSError):
            attempt()
    assert fs.exists("/etc/motd") and not fs.exists("/etc/new")


def test_layers_in_place_of_an_image(image, tmp_path):
    import tarfile, io
    with tarfile.open(tmp_path / "l.tar", "w") as tar:
        info = tarfile.TarInfo("data.csv")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"a,b\n1\n"))
    fs = fsspec.filesystem("layerfs", layers=[str(tmp_path / "l.tar")])
    assert fs.cat("/data.csv") == b"a,b\n1\n"
    with pytest.raises(ValueError):
        LayerFileSystem()
