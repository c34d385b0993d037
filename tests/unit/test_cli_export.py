"""``layerfs export`` and ``commit`` as a user types them: stdout, compression
from the extension, refusing to overwrite an input layer, and an entry order
that lets GNU tar restore every directory's mtime."""

import gzip
import io
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import zstandard

import layerfs
from layerfs.example import build_example
from layerfs.imagewrite import write_oci_layout


def run(*args, check=True, **kwargs):
    result = subprocess.run([sys.executable, "-m", "layerfs.cli", *map(str, args)],
                            capture_output=True, **kwargs)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def layer_file(path, members):
    """members: (name, mtime, payload or None for a directory)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, mtime, payload in members:
            info = tarfile.TarInfo(name)
            info.mtime = mtime
            if payload is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(payload), 0o644
                tar.addfile(info, io.BytesIO(payload))
    return path


# ``d/``, ``d-x/`` and ``d/f`` sort by bytes as d, d-x, d/f ('-' < '/').
TRICKY = [("d/", 1_000_000_000, None), ("d-x/", 1_100_000_000, None),
          ("d-x/g", 1_200_000_000, b"g"), ("d/f", 1_300_000_000, b"f"),
          ("d/sub/", 1_400_000_000, None), ("d/sub.x", 1_500_000_000, b"x"),
          ("d/sub/h", 1_600_000_000, b"h"), ("a.b/", 1_700_000_000, None),
          ("a/", 1_710_000_000, None), ("a/c", 1_720_000_000, b"c")]


@pytest.fixture
def tricky(tmp_path):
    layer = layer_file(tmp_path / "layer.tar", TRICKY)
    image = tmp_path / "image"
    write_oci_layout(image, [layer])
    return image


def directory_mtimes(root):
    found = {}
    for directory, names, _ in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            found["/" + os.path.relpath(path, root)] = os.lstat(path).st_mtime_ns
    return found


def image_directory_mtimes(image):
    with layerfs.open(str(image)) as fs:
        return {path: fs.lstat(path).st_mtime_ns
                for path, names, _ in fs.walk("/") for path in
                [os.path.join(path, name) for name in names]}


@pytest.mark.skipif(shutil.which("tar") is None and os.environ.get("CI") != "true",
                    reason="GNU tar is not installed")
def test_gnu_tar_restores_every_directory_mtime(tricky, tmp_path):
    run("export", tricky, tmp_path / "flat.tar")
    with tarfile.open(tmp_path / "flat.tar") as tar:
        names = tar.getnames()
    assert names.index("d-x") > names.index("d/sub/h")       # d's subtree first
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "-xf", tmp_path / "flat.tar", "-C", out], check=True)
    expected = image_directory_mtimes(tricky)
    assert set(expected) == {"/a", "/a.b", "/d", "/d-x", "/d/sub"}
    assert directory_mtimes(out) == expected


def test_commit_orders_its_layer_by_path_components(tricky, tmp_path):
    upper = tmp_path / "upper"
    with layerfs.open(str(tricky), upper=upper) as fs:
        fs.write_bytes("/d-x/new", b"1")
        fs.write_bytes("/d/new", b"2")
        fs.write_bytes("/d/sub/new", b"3")
    run("commit", "--compression", "none", tricky, upper, tmp_path / "next")
    with layerfs.open(str(tmp_path / "next")) as fs:
        with tarfile.open(fs.layers[-1].path) as tar:
            names = tar.getnames()
    assert names == sorted(names, key=lambda name: name.split("/"))
    assert names.index("d-x") > names.index("d/sub/new")


def test_export_to_stdout_and_by_extension(tmp_path):
    image = build_example(str(tmp_path / "image"))
    plain = run("export", image, "-").stdout
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        assert "etc/motd" in tar.getnames()
    run("export", image, tmp_path / "flat.tar.gz")
    assert gzip.decompress((tmp_path / "flat.tar.gz").read_bytes()) == plain
    run("export", image, tmp_path / "flat.tgz")
    assert gzip.decompress((tmp_path / "flat.tgz").read_bytes()) == plain
    run("export", image, tmp_path / "flat.tar.zst")
    with zstandard.ZstdDecompressor().stream_reader(
            (tmp_path / "flat.tar.zst").read_bytes()) as reader:
        assert reader.read() == plain
    run("export", image, tmp_path / "flat.tar")
    assert (tmp_path / "flat.tar").read_bytes() == plain
    # --compression wins over the extension, and applies to stdout
    run("export", "--compression", "none", image, tmp_path / "forced.tar.gz")
    assert (tmp_path / "forced.tar.gz").read_bytes() == plain
    assert gzip.decompress(run("export", "--compression", "gzip", image, "-").stdout) == plain


def test_export_refuses_to_overwrite_an_input_layer(tmp_path):
    layer = layer_file(tmp_path / "layer.tar", TRICKY)
    image = tmp_path / "image"
    write_oci_layout(image, [layer])
    with layerfs.open(str(image)) as fs:
        blob = fs.layers[0].path
    before = open(blob, "rb").read()
    alias = tmp_path / "alias.tar"
    os.link(blob, alias)                     # another name: same device and inode
    for target in (blob, alias):
        result = run("export", image, target, check=False, text=True)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(target) in lines[0] and "layer 0" in lines[0]
    assert open(blob, "rb").read() == before
    assert [name for name in os.listdir(tmp_path) if name.endswith(".tmp")] == []


def manifest_and_config(layout, tag):
    with layerfs.open(str(layout), tag=tag) as fs:
        return fs.image.manifest_digest, fs.image.config, [l.compression for l in fs.layers]


def commit_one_change(image, tmp_path, name, *options, env=None):
    upper = tmp_path / f"upper-{name}"
    with layerfs.open(str(image), upper=upper) as fs:
        fs.write_bytes("/etc/motd", b"changed\n")
    out = tmp_path / name
    result = run("commit", *options, "--tag", "next", image, upper, out, text=True, env=env)
    return out, result.stdout.strip()


def test_commit_and_example_default_to_gzip_with_a_dated_history(tmp_path):
    image = tmp_path / "image"
    run("example", image)
    with layerfs.open(str(image)) as fs:
        assert [layer.compression for layer in fs.layers] == ["none", "none", "gzip"]
    out, digest = commit_one_change(image, tmp_path, "out", "-m", "motd")
    manifest_digest, config, compressions = manifest_and_config(out, "next")
    assert manifest_digest == digest and compressions[-1] == "gzip"
    assert config["created"] != "1970-01-01T00:00:00Z"
    assert config["history"][-1]["created"] == config["created"]
    assert config["history"][-1]["created_by"] == "layerfs commit"
    assert config["history"][-1]["comment"] == "motd"
    zstd_out, _ = commit_one_change(image, tmp_path, "zstd", "--compression", "zstd")
    assert manifest_and_config(zstd_out, "next")[2][-1] == "zstd"
    run("example", "--zstd", tmp_path / "zstd-example")
    with layerfs.open(str(tmp_path / "zstd-example")) as fs:
        assert fs.layers[-1].compression == "zstd"


def test_source_date_epoch_makes_commits_reproducible(tmp_path):
    image = tmp_path / "image"
    run("example", image)
    env = dict(os.environ, SOURCE_DATE_EPOCH="1700000123")
    first, one = commit_one_change(image, tmp_path, "a", env=env)
    second, two = commit_one_change(image, tmp_path, "b", env=env)
    assert one == two
    config = manifest_and_config(first, "next")[1]
    assert config["created"] == "2023-11-14T22:15:23Z"
    assert config["history"][-1]["created"] == "2023-11-14T22:15:23Z"
    bad = dict(os.environ, SOURCE_DATE_EPOCH="yesterday")
    upper = tmp_path / "upper-a"
    result = run("commit", image, upper, tmp_path / "c", check=False, text=True, env=bad)
    assert result.returncode == 1 and "internal" not in result.stderr
    assert "SOURCE_DATE_EPOCH" in result.stderr and len(result.stderr.splitlines()) == 1


@pytest.mark.skipif(shutil.which("umoci") is None and os.environ.get("CI") != "true",
                    reason="umoci is not installed")
def test_umoci_unpacks_a_default_commit(tmp_path):
    image = tmp_path / "image"
    run("example", image)
    out, _ = commit_one_change(image, tmp_path, "out")
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{out}:next", bundle],
                   check=True, capture_output=True)
    assert (bundle / "rootfs" / "etc" / "motd").read_bytes() == b"changed\n"
    assert (bundle / "rootfs" / "usr" / "bin" / "hi").read_bytes().startswith(b"#!/bin/sh")
    subprocess.run(["tar", "-xf", "-", "-C", tmp_path], check=True,
                   input=run("export", "--tag", "next", out, "-").stdout)
    assert (tmp_path / "etc" / "motd").read_bytes() == b"changed\n"
