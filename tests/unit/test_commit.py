"""Committing an upper layer: round trip, determinism, and other tools' opinion."""

import json
import os
import shutil
import subprocess
import tarfile

import pytest

import layerfs
from layerfs.commit import commit
from layerfs.example import EXAMPLE_TAG, build_example
from layerfs.testing.view import diff_views, snapshot


@pytest.fixture
def image(tmp_path):
    return build_example(str(tmp_path / "image"))


def make_changes(fs):
    fs.write_bytes("/etc/motd", b"changed in the upper layer\n")
    fs.unlink("/etc/os-release")
    fs.makedirs("/srv/data")
    fs.write_bytes("/srv/data/blob", bytes(range(256)) * 40)
    fs.link("/usr/bin/hello", "/srv/hello-link")
    fs.symlink("../etc/motd", "/srv/motd")
    fs.chmod("/README", 0o600)
    fs.setxattr("/srv/data/blob", "user.note", b"kept")
    fs.rename("/var/cache", "/var/moved")
    fs.mkdir("/var/cache")              # recreated over a deleted lower directory
    fs.utime("/srv/data", ns=(1_000_000_123, 2_000_000_456))


def test_committed_image_shows_exactly_the_writable_view(image, tmp_path):
    with layerfs.open(image, upper=tmp_path / "up") as fs:
        make_changes(fs)
        expected = snapshot(fs)
        result = commit(fs, tmp_path / "out", tag="next")
    with layerfs.open(result.dest, tag="next") as committed:
        assert diff_views(expected, snapshot(committed)) == []
        assert len(committed.layers) == 4
        assert committed.layers[3].compression == "gzip"   # the default
        history = committed.image.config["history"]
        assert history[-1]["created_by"] == "layerfs commit"


def test_layer_holds_markers_and_hardlinks_and_no_lower_files(image, tmp_path):
    with layerfs.open(image, upper=tmp_path / "up") as fs:
        make_changes(fs)
        result = commit(fs, tmp_path / "out", compression=None)
    with tarfile.open(result.layer_path) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert "etc/.wh.os-release" in members
    assert "var/.wh.cache" in members or "var/cache/.wh..wh..opq" in members
    assert "var/moved/.wh..wh..opq" in members
    links = [m for m in members.values() if m.islnk()]
    assert {(m.name, m.linkname) for m in links} == {("usr/bin/hi", "srv/hello-link"),
                                                    ("usr/bin/hello", "srv/hello-link")} \
        or len(links) == 2
    assert "etc/motd" in members and "usr/bin/hello" in members    # copied up with the link
    assert "bin" not in members                                      # untouched lower entry
    assert members["srv/data/blob"].pax_headers["SCHILY.xattr.user.note"] == "kept"
    assert members["README"].mode == 0o600 and members["README"].size > 0  # metacopy, whole


def test_commit_is_deterministic(image, tmp_path):
    with layerfs.open(image, upper=tmp_path / "up") as fs:
        make_changes(fs)
        first = commit(fs, tmp_path / "a", tag="x")
        second = commit(fs, tmp_path / "b", tag="x")
    with open(first.layer_path, "rb") as a, open(second.layer_path, "rb") as b:
        assert a.read() == b.read()


def test_commit_shares_base_blobs_and_keeps_other_tags(image, tmp_path):
    with layerfs.open(image, upper=tmp_path / "up") as fs:
        fs.write_bytes("/new", b"1")
        commit(fs, image, tag="next")       # into the image's own layout
    with open(os.path.join(image, "index.json")) as stream:
        tags = {m["annotations"]["org.opencontainers.image.ref.name"]
                for m in json.load(stream)["manifests"]}
    assert tags == {EXAMPLE_TAG, "next"}
    with layerfs.open(image, tag="next") as fs:
        assert fs.read_bytes("/new") == b"1"


def test_commit_without_upper_is_erofs(image, tmp_path):
    with layerfs.open(image) as fs:
        with pytest.raises(OSError) as info:
            commit(fs, tmp_path / "out")
    assert info.value.errno == 30


@pytest.mark.skipif(shutil.which("umoci") is None and os.environ.get("CI") != "true",
                    reason="umoci is not installed")
def test_umoci_unpacks_the_committed_image_to_the_same_tree(tmp_path):
    image = build_example(str(tmp_path / "image"))   # gzip: umoci 0.4 reads no zstd
    with layerfs.open(image, upper=tmp_path / "up") as fs:
        make_changes(fs)
        expected = snapshot(fs)
        commit(fs, tmp_path / "out", tag="next", compression="gzip")
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{tmp_path / 'out'}:next", str(bundle)],
                   check=True, capture_output=True)
    unpacked = snapshot(str(bundle / "rootfs"))
    # umoci gives the root directory its own metadata; compare everything else.
    expected.pop("/"), unpacked.pop("/")
    assert diff_views(expected, unpacked) == []


def test_an_untagged_commit_never_joins_other_images(image, tmp_path):
    """commit without a tag into a layout that already holds an image would
    leave two images later commands could not tell apart: refused, before
    anything is written; with a tag, both stay reachable."""
    with layerfs.open(image, upper=tmp_path / "up") as fs:
        fs.write_bytes("/etc/motd", b"one\n")
        first = commit(fs, tmp_path / "out")
        before = sorted(os.listdir(tmp_path / "out" / "blobs" / "sha256"))
        with pytest.raises(layerfs.UnsupportedImageError, match="give the new one a tag"):
            commit(fs, tmp_path / "out")
        with pytest.raises(layerfs.UnsupportedImageError, match=EXAMPLE_TAG):
            commit(fs, image)
        assert sorted(os.listdir(tmp_path / "out" / "blobs" / "sha256")) == before
        fs.write_bytes("/etc/motd", b"two\n")
        commit(fs, tmp_path / "out", tag="two")
    with layerfs.open(f"oci:{tmp_path / 'out'}:two") as fs:
        assert fs.read_bytes("/etc/motd") == b"two\n"
    with layerfs.open(f"oci:{tmp_path / 'out'}:{first.manifest_digest}") as fs:
        assert fs.read_bytes("/etc/motd") == b"one\n"
