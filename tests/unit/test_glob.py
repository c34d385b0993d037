"""fs.glob/iglob checked against the standard library's glob on the same
tree, exported by the CLI to a pipe and extracted by GNU tar."""

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
            "/**/.hidden", "/**/*.conf", "/**/", "/srv/**"]


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
    if recursive and pattern.endswith("/**"):
        # the stdlib gives the zero-directory match of ``/srv/**`` as ``/srv/``
        expected = [path if path == "/" else path.rstrip("/") for path in expected]
    if recursive and "**" in pattern:
        # layerfs's ** does not descend through a symlink (bin -> usr/bin);
        # the stdlib's does
        expected = [path for path in expected
                    if not (path.startswith("/bin/") and path != "/bin/")]
    with layerfs.open(image, tag="next") as fs:
        assert sorted(fs.glob(pattern, recursive=recursive)) == expected
        assert sorted(fs.iglob(pattern.encode(), recursive=recursive)) == expected

