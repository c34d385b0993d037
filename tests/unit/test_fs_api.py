"""The Python API additions of issue 14: glob/iglob (checked against the
standard library's glob on the same tree extracted by the CLI and GNU tar),
write_text, and commit as a method."""

import glob as stdlib_glob
import os
import shutil
import subprocess
import sys

import pytest

import layerfs
from layerfs.example import build_example

PATTERNS = ["/*", "/etc/*", "/*/*", "/usr/bin/h*", "/etc/[mo]*", "/etc/?otd",
            "/**", "/**/*", "/**/h*", "/var/**/", "/*/", "/.*", "/etc/.*",
            "/nothing/*", "/etc/motd/*", "/bin/*", "/etc", "/usr/../etc/motd",
            "/**/.hidden", "/**/*.conf"]


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    root = tmp_path_factory.mktemp("glob")
    image = build_example(str(root / "image"))
    upper = root / "upper"
    with layerfs.open(image, upper=upper) as fs:
        fs.write_text("/etc/.hidden", "dot\n")
        fs.makedirs("/srv/a/b")
        fs.write_text("/srv/a/b/x.conf", "x")
        fs.commit(root / "next", tag="next", message="for glob")
    out = root / "out"
    out.mkdir()
    flat = subprocess.run([sys.executable, "-m", "layerfs.cli", "export", "--tag", "next",
                           root / "next", "-"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-xf", "-", "-C", out], input=flat, check=True)
    return str(root / "next"), str(out)


@pytest.mark.skipif(shutil.which("tar") is None and os.environ.get("CI") != "true",
                    reason="GNU tar is not installed")
@pytest.mark.parametrize("recursive", [False, True])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_glob_matches_the_standard_library(trees, pattern, recursive):
    image, out = trees
    expected = sorted(path[len(out):] for path in
                      stdlib_glob.glob(out + pattern, recursive=recursive))
    with layerfs.open(image, tag="next") as fs:
        assert sorted(fs.glob(pattern, recursive=recursive)) == expected
        assert sorted(fs.iglob(pattern.encode(), recursive=recursive)) == expected


def test_write_text_and_commit_method(tmp_path):
    image = build_example(str(tmp_path / "image"))
    with layerfs.open(image, upper=tmp_path / "up") as fs:
        assert fs.write_text("/etc/greeting", "héllo\n") == 6
        assert fs.read_text("/etc/greeting") == "héllo\n"
        result = fs.commit(tmp_path / "out", tag="v2", compression="zstd", message="hi")
    with layerfs.open(result.dest, tag="v2") as fs:
        assert fs.read_text("/etc/greeting") == "héllo\n"
        assert fs.layers[-1].compression == "zstd"
        assert fs.image.config["history"][-1]["comment"] == "hi"


def test_cache_takes_a_path(tmp_path):
    image = build_example(str(tmp_path / "image"))
    for cache in (tmp_path / "c1", str(tmp_path / "c2"), os.fsencode(tmp_path / "c3")):
        with layerfs.open(image, cache=cache) as fs:
            assert fs.read_text("/etc/motd").startswith("Welcome")
        root = os.fsdecode(cache)
        assert os.listdir(os.path.join(root, "index", "sha256"))
    # the CLI's --cache-dir fills the same layout
    subprocess.run([sys.executable, "-m", "layerfs.cli", "cat", "--cache-dir",
                    tmp_path / "c4", image, "/etc/motd"], check=True, capture_output=True)
    assert sorted(os.listdir(tmp_path / "c4" / "index" / "sha256")) == \
        sorted(os.listdir(tmp_path / "c1" / "index" / "sha256"))
