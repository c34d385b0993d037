"""The on-disk upper directory: layout, markers, sidecar, reopen, repair."""

import json
import os
import stat

import pytest

import layerfs
from layerfs.errors import InvalidLayerError
from layerfs.testing import layers as L
from layerfs.testing.view import diff_views, snapshot
from layerfs.testing.writers import write_image

IMAGE = [L.Layer([L.directory("d"), L.file("d/f", b"lower"), L.file("d/g", b"g"),
                  L.directory("e"), L.file("e/x", b"x"), L.file("top", b"t", uid=5, gid=6),
                  L.device("null", 1, 3)])]


@pytest.fixture
def image(tmp_path):
    return write_image(IMAGE, tmp_path / "image", kind="layers", compression="none")


def test_layout_whiteouts_and_opaque_directories(image, tmp_path):
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        fs.unlink("/d/f")
        fs.unlink("/e/x")
        fs.rmdir("/e")
        fs.mkdir("/e")                         # recreated over a deleted lower dir
        fs.write_bytes("/new", b"n")
    assert json.loads((upper / "layerfs-upper.json").read_text()) == {"format": 1}
    assert sorted(os.listdir(upper / "diff")) == ["d", "e", "new"]
    assert os.listdir(upper / "diff" / "d") == [".wh.f"]
    assert os.listdir(upper / "diff" / "e") == [".wh..wh..opq"]
    assert os.listdir(upper / "work") == []


def test_metacopy_lives_in_the_sidecar(image, tmp_path):
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        fs.chmod("/d/f", 0o600)
    records = json.loads((upper / "attrs.json").read_text())
    assert records["/d/f"]["metacopy"] is True and records["/d/f"]["mode"] == 0o600
    assert not (upper / "diff" / "d" / "f").exists()
    with layerfs.open(image, upper=upper) as fs:
        assert fs.stat("/d/f").st_mode & 0o7777 == 0o600
        assert fs.read_bytes("/d/f") == b"lower"
        fs.write_bytes("/d/f", b"data now")     # the data copy-up replaces the record
    assert "/d/f" not in json.loads((upper / "attrs.json").read_text())


def test_repair_removes_whiteouts_beside_their_entries(image, tmp_path):
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        fs.write_bytes("/d/f", b"upper")
        fs.mkdir("/n")
    # what a crash between two steps can leave
    (upper / "diff" / "d" / ".wh.f").write_bytes(b"")
    (upper / "diff" / ".wh.n").write_bytes(b"")
    (upper / "diff" / "e").mkdir()
    (upper / "diff" / ".wh.e").write_bytes(b"")
    (upper / "work" / "tmp1-0").write_bytes(b"half a copy-up")
    with layerfs.open(image, upper=upper) as fs:
        assert fs.read_bytes("/d/f") == b"upper"
        assert fs.listdir("/n") == [] and fs.listdir("/e") == []   # .wh.e hid lower e
    assert sorted(os.listdir(upper / "diff")) == ["d", "e", "n"]
    assert os.listdir(upper / "diff" / "e") == [".wh..wh..opq"]
    assert os.listdir(upper / "work") == []


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"/d/f": {"mode": "x"}}'])
def test_corrupt_sidecar_is_a_clear_error(image, tmp_path, content):
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        fs.write_bytes("/d/f", b"x")
    (upper / "attrs.json").write_bytes(content)
    with pytest.raises(InvalidLayerError, match="sidecar"):
        layerfs.open(image, upper=upper)


def test_foreign_or_unknown_directories_are_refused(image, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "something").write_bytes(b"")
    with pytest.raises(InvalidLayerError, match="not empty"):
        layerfs.open(image, upper=foreign)
    future = tmp_path / "future"
    future.mkdir()
    (future / "layerfs-upper.json").write_text('{"format": 99}')
    with pytest.raises(InvalidLayerError, match="format"):
        layerfs.open(image, upper=future)


def test_malformed_marker_in_diff_is_a_clear_error(image, tmp_path):
    upper = tmp_path / "upper"
    layerfs.open(image, upper=upper).close()
    (upper / "diff" / ".wh.").write_bytes(b"")
    with pytest.raises(InvalidLayerError, match="malformed"):
        layerfs.open(image, upper=upper)


def test_without_root_owner_and_devices_are_kept_in_the_sidecar(image, tmp_path):
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        fs.upper.is_root = False                 # act as an unprivileged user
        fs.write_bytes("/top", b"changed")
        fs.chmod("/null", 0o644)
        fs.chown("/d/g", 77, 88)
        before = snapshot(fs)
    assert stat.S_ISREG(os.lstat(upper / "diff" / "null").st_mode)
    with layerfs.open(image, upper=upper) as fs:
        assert not diff_views(before, snapshot(fs))
        assert (fs.stat("/top").st_uid, fs.stat("/top").st_gid) == (5, 6)
        assert stat.S_ISCHR(fs.lstat("/null").st_mode)
        assert fs.lstat("/null").st_rdev == os.makedev(1, 3)
        assert fs.stat("/d/g").st_uid == 77


def test_without_root_xattrs_outside_user_are_kept_in_the_sidecar(image, tmp_path):
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        fs.upper.is_root = False                 # act as an unprivileged user
        fs.write_bytes("/top", b"changed")
        fs.setxattr("/top", "trusted.overlay.x", b"t")
        fs.setxattr("/top", "user.kept", b"u")
    assert os.getxattr(upper / "diff" / "top", "user.kept") == b"u"
    assert "trusted.overlay.x" not in os.listxattr(upper / "diff" / "top")
    with layerfs.open(image, upper=upper) as fs:
        assert fs.getxattr("/top", "trusted.overlay.x") == b"t"
        assert fs.getxattr("/top", "user.kept") == b"u"


def test_directory_recreated_over_a_deleted_one_keeps_its_mtime(image, tmp_path):
    upper = tmp_path / "upper"
    with layerfs.open(image, upper=upper) as fs:
        fs.unlink("/e/x")
        fs.rmdir("/e")
        fs.mkdir("/e")                 # gets an opaque marker after its metadata
        mtime = fs.stat("/e").st_mtime_ns
    with layerfs.open(image, upper=upper) as fs:
        assert fs.stat("/e").st_mtime_ns == mtime
