"""HostDir: every host operation stays inside its directory."""

import errno
import os

import pytest

from layerfs.hostdir import HostDir, copy_fd


@pytest.fixture
def setup(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "d").mkdir()
    (root / "d" / "f").write_bytes(b"data")
    os.symlink(str(outside), root / "escape")
    os.symlink("d", root / "rel")
    host = HostDir(str(root))
    yield host, root, outside
    host.close()


def test_symlink_in_a_parent_is_an_error_not_a_detour(setup):
    host, root, outside = setup
    for call in (lambda: host.open_file("/escape/x", os.O_WRONLY | os.O_CREAT),
                 lambda: host.mkdir("/escape/x"),
                 lambda: host.symlink("t", "/escape/x"),
                 lambda: host.rename("/d/f", "/escape/f"),
                 lambda: host.link("/d/f", "/escape/f"),
                 lambda: host.open_file("/rel/f", os.O_RDONLY)):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert os.listdir(outside) == []
    assert (root / "d" / "f").read_bytes() == b"data"


def test_last_component_symlink_is_never_followed(setup):
    host, root, outside = setup
    with pytest.raises(OSError) as info:
        host.open_file("/escape", os.O_WRONLY)
    assert info.value.errno == errno.ELOOP
    os.chmod(outside, 0o755)
    host.chmod("/escape", 0o700)                 # skipped: symlinks have no mode
    assert os.stat(outside).st_mode & 0o777 == 0o755
    host.utime("/escape", 5, 5)
    assert os.lstat(root / "escape").st_mtime_ns == 5
    assert host.readlink("/escape") == str(outside)


def test_remove_tree_does_not_follow_symlinks(setup):
    host, root, outside = setup
    (outside / "precious").write_bytes(b"keep")
    os.symlink(str(outside), root / "d" / "link")
    host.remove_tree("/d")
    assert not (root / "d").exists()
    assert (outside / "precious").read_bytes() == b"keep"


def test_xattrs_through_the_parent_descriptor(setup):
    host, root, _ = setup
    host.setxattr("/d/f", "user.k", b"v")
    assert host.listxattr("/d/f") == {"user.k": b"v"}
    host.removexattr("/d/f", "user.k")
    assert host.listxattr("/d/f") == {}


def test_walk_lists_parents_first_and_does_not_enter_symlinks(setup):
    host, _, _ = setup
    assert [p for p, _ in host.walk("/")] == ["/d", "/d/f", "/escape", "/rel"]


def test_copy_fd_keeps_holes_and_size(tmp_path):
    data = b"a" + bytes(3 << 20) + b"z"
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        copy_fd(lambda offset, length: data[offset:offset + length], fd, len(data))
        assert os.pread(fd, len(data) + 1, 0) == data
    finally:
        os.close(fd)


def test_copy_fd_reports_short_source(tmp_path):
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as info:
            copy_fd(lambda offset, length: b"", fd, 10)
        assert info.value.errno == errno.EIO
    finally:
        os.close(fd)
