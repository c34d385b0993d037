"""A read-write mount (``--upper``): writes through the mount, never stale,
kept in the upper layer across remounts."""

from __future__ import annotations

import errno
import os
import stat

import pytest

import layerfs
from mount_helpers import stack, BIG, is_mounted, requires_fuse, requires_upper, run_cli

pytestmark = [pytest.mark.mount, requires_fuse, requires_upper]


@pytest.fixture
def upper_dir(tmp_path):
    return str(tmp_path / "upper")


@pytest.fixture
def rw_server(sample_layers, upper_dir, thread_mount):
    """The sample image mounted writable, served by a thread of this test."""
    return thread_mount(layerfs.open(sample_layers, upper=upper_dir))


@pytest.fixture
def rw(rw_server):
    return rw_server.mountpoint


def remount(sample_layers, upper_dir, server, thread_mount):
    """Unmount, wait until the server has flushed and closed, mount again."""
    server.stop()
    assert not is_mounted(server.mountpoint)
    return thread_mount(layerfs.open(sample_layers, upper=upper_dir)).mountpoint


def test_mount_is_writable_and_uncached(rw):
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        line = next(line for line in info if line.split()[4] == rw)
    options = line.split()[5].split(",")
    assert "rw" in options and "nodev" in options and "nosuid" in options


def test_create_write_read(rw):
    with open(f"{rw}/new.txt", "wb") as handle:
        handle.write(b"hello")
    with open(f"{rw}/new.txt", "rb") as handle:
        assert handle.read() == b"hello"
    assert os.stat(f"{rw}/new.txt").st_size == 5


def test_exclusive_create(rw):
    with pytest.raises(FileExistsError):
        os.open(f"{rw}/etc/passwd", os.O_CREAT | os.O_EXCL | os.O_WRONLY)


def test_copy_up_of_a_lower_file(rw):
    with open(f"{rw}/bin/tool", "r+b") as handle:
        handle.seek(100_000)
        handle.write(b"PATCH")
    with open(f"{rw}/bin/tool", "rb") as handle:
        data = handle.read()
    assert data == BIG[:100_000] + b"PATCH" + BIG[100_005:]


def test_hardlink_names_see_each_others_writes(rw):
    with open(f"{rw}/bin/tool", "ab") as handle:
        handle.write(b"tail")
    assert os.stat(f"{rw}/bin/tool-link").st_size == len(BIG) + 4
    with open(f"{rw}/bin/tool-link", "rb") as handle:
        assert handle.read()[-4:] == b"tail"


def test_hardlink_names_see_each_others_overwrites_after_caching(rw):
    with open(f"{rw}/bin/tool-link", "rb") as handle:
        assert handle.read() == BIG          # its pages are now in the page cache
    with open(f"{rw}/bin/tool", "r+b") as handle:
        handle.seek(10)
        handle.write(b"PATCH")
    with open(f"{rw}/bin/tool-link", "rb") as handle:
        assert handle.read(20) == BIG[:10] + b"PATCH" + BIG[15:20]


def test_append_and_truncate(rw):
    with open(f"{rw}/log", "ab") as handle:
        handle.write(b"one\n")
    with open(f"{rw}/log", "ab") as handle:
        handle.write(b"two\n")
    os.truncate(f"{rw}/log", 3)
    with open(f"{rw}/log", "rb") as handle:
        assert handle.read() == b"one"
    with open(f"{rw}/log", "r+b") as handle:
        handle.truncate(1)
    assert os.stat(f"{rw}/log").st_size == 1


def test_directories(rw):
    os.mkdir(f"{rw}/d", 0o750)
    assert stat.S_IMODE(os.stat(f"{rw}/d").st_mode) == 0o750 & ~current_umask()
    os.rmdir(f"{rw}/d")
    assert not os.path.exists(f"{rw}/d")
    with pytest.raises(OSError) as caught:
        os.rmdir(f"{rw}/etc")
    assert caught.value.errno == errno.ENOTEMPTY


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_rename_file_and_lower_directory(rw):
    os.rename(f"{rw}/etc/passwd", f"{rw}/etc/passwd.old")
    assert not os.path.exists(f"{rw}/etc/passwd")
    os.rename(f"{rw}/bin", f"{rw}/sbin")       # a lower directory: no EXDEV
    assert sorted(os.listdir(f"{rw}/sbin")) == ["suid", "tool", "tool-link"]
    with open(f"{rw}/sbin/tool", "rb") as handle:
        assert handle.read() == BIG
    assert not os.path.exists(f"{rw}/bin/tool")


def test_rename_replaces(rw):
    with open(f"{rw}/a", "wb") as handle:
        handle.write(b"A")
    os.rename(f"{rw}/a", f"{rw}/etc/passwd")
    with open(f"{rw}/etc/passwd", "rb") as handle:
        assert handle.read() == b"A"


def test_symlink_link_mknod(rw):
    os.symlink("etc/passwd", f"{rw}/s")
    assert os.readlink(f"{rw}/s") == "etc/passwd"
    os.link(f"{rw}/etc/passwd", f"{rw}/p2")
    assert os.stat(f"{rw}/p2").st_ino == os.stat(f"{rw}/etc/passwd").st_ino
    assert os.stat(f"{rw}/p2").st_nlink == 2
    os.mkfifo(f"{rw}/fifo")
    assert stat.S_ISFIFO(os.stat(f"{rw}/fifo").st_mode)


def test_unlink_while_open(rw, upper_dir):
    with open(f"{rw}/tmp-file", "w+b") as handle:
        handle.write(b"still here")
        os.unlink(f"{rw}/tmp-file")
        assert not os.path.exists(f"{rw}/tmp-file")
        handle.seek(0)
        assert handle.read() == b"still here"
        assert os.fstat(handle.fileno()).st_size == 10
        # Gone at once, in the view and in the upper: no hidden name (the
        # upper keeps the data as a descriptor only).
        assert not [name for name in os.listdir(rw) if name.startswith(".fuse_hidden")]
        assert "tmp-file" not in os.listdir(f"{upper_dir}/diff")
        assert os.listdir(f"{upper_dir}/work") == []


def test_temporary_files_work(rw):
    import tempfile
    with tempfile.TemporaryFile(dir=rw) as handle:
        handle.write(b"scratch")
        handle.seek(0)
        assert handle.read() == b"scratch"


def test_metadata_changes(rw):
    os.chmod(f"{rw}/etc/passwd", 0o600)
    os.chown(f"{rw}/etc/passwd", 12, 34)
    os.utime(f"{rw}/etc/passwd", ns=(1_000_000_001, 2_000_000_002))
    st = os.stat(f"{rw}/etc/passwd")
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (12, 34)
    assert st.st_mtime_ns == 2_000_000_002
    os.chown(f"{rw}/absolute", 5, 6, follow_symlinks=False)
    assert os.lstat(f"{rw}/absolute").st_uid == 5


def test_xattr_changes(rw):
    os.setxattr(f"{rw}/attrs", "user.new", b"v")
    assert os.getxattr(f"{rw}/attrs", "user.new") == b"v"
    os.removexattr(f"{rw}/attrs", "user.comment")
    assert "user.comment" not in os.listxattr(f"{rw}/attrs")
    with pytest.raises(OSError) as caught:
        os.removexattr(f"{rw}/attrs", "user.comment")
    assert caught.value.errno == errno.ENODATA


def test_statfs_is_the_uppers(rw, upper_dir):
    assert os.statvfs(rw).f_bsize == os.statvfs(upper_dir).f_bsize
    assert not os.statvfs(rw).f_flag & os.ST_RDONLY


def test_no_stale_results_after_writes(rw):
    # Each check follows a change made through the mount; a cached entry,
    # attribute or page would show the old answer.
    assert os.path.exists(f"{rw}/etc/passwd")
    os.unlink(f"{rw}/etc/passwd")
    assert not os.path.exists(f"{rw}/etc/passwd")
    with open(f"{rw}/etc/passwd", "wb") as handle:
        handle.write(b"x" * 10)
    assert os.stat(f"{rw}/etc/passwd").st_size == 10
    os.rename(f"{rw}/etc", f"{rw}/etc2")
    assert os.stat(f"{rw}/etc2/passwd").st_size == 10
    assert not os.path.exists(f"{rw}/etc/passwd")
    os.mkdir(f"{rw}/etc")
    assert os.listdir(f"{rw}/etc") == []


def test_stat_of_an_open_file_follows_its_writes(rw):
    # fstat() reaches the adapter's fgetattr with the file handle, stat() its
    # getattr by path: both must show every change at once.
    path = f"{rw}/etc/passwd"
    with open(path, "r+b", buffering=0) as stream:
        size = os.fstat(stream.fileno()).st_size
        stream.seek(0, os.SEEK_END)
        stream.write(b"x" * 5000)
        assert os.fstat(stream.fileno()).st_size == size + 5000
        assert os.stat(path).st_size == size + 5000
        assert os.stat(path).st_blocks == (size + 5000 + 511) // 512
        stream.truncate(3)
        assert os.fstat(stream.fileno()).st_size == 3
        assert os.stat(path).st_size == 3
    os.chmod(path, 0o600)
    os.utime(path, ns=(7_000_000_001, -86_400_000_000_000 + 5))
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_mtime_ns == -86_400_000_000_000 + 5
    assert st.st_atime_ns == 7_000_000_001


def listing(directory):
    with os.scandir(directory) as scan:
        return {entry.name: (entry.is_dir(follow_symlinks=False), entry.inode())
                for entry in scan}


def test_listing_follows_changes(rw):
    # The adapter keeps listings until a name changes: list before and after
    # each kind of change.
    assert set(listing(f"{rw}/etc")) == {"passwd"}
    os.mkdir(f"{rw}/etc/sub")
    assert set(listing(f"{rw}/etc")) == {"passwd", "sub"}
    with open(f"{rw}/etc/new", "wb") as stream:
        stream.write(b"new")
    assert set(listing(f"{rw}/etc")) == {"passwd", "sub", "new"}
    os.unlink(f"{rw}/etc/passwd")
    os.rename(f"{rw}/etc/sub", f"{rw}/etc/sub2")
    os.rename(f"{rw}/bin/tool", f"{rw}/etc/tool")
    assert listing(f"{rw}/etc") == {name: (stat.S_ISDIR(os.lstat(f"{rw}/etc/{name}").st_mode),
                                           os.lstat(f"{rw}/etc/{name}").st_ino)
                                    for name in ("sub2", "new", "tool")}
    assert "tool" not in listing(f"{rw}/bin")
    os.rmdir(f"{rw}/etc/sub2")
    os.mkdir(f"{rw}/etc/sub2")
    assert listing(f"{rw}/etc/sub2") == {}


def test_changes_survive_remount(sample_layers, upper_dir, rw_server, thread_mount):
    rw = rw_server.mountpoint
    with open(f"{rw}/kept", "wb") as handle:
        handle.write(b"kept")
    os.unlink(f"{rw}/etc/passwd")
    os.rename(f"{rw}/lib", f"{rw}/lib64")
    mnt = remount(sample_layers, upper_dir, rw_server, thread_mount)
    with open(f"{mnt}/kept", "rb") as handle:
        assert handle.read() == b"kept"
    assert not os.path.exists(f"{mnt}/etc/passwd")
    assert os.readlink(f"{mnt}/lib64/libx.so") == "libx.so.1"
    assert not os.path.exists(f"{mnt}/lib")


def test_cli_mount_with_upper(sample_layers, mountpoint, upper_dir):
    result = run_cli("mount", "--upper", upper_dir, *stack(sample_layers), mountpoint)
    assert result.returncode == 0, result.stderr
    with open(f"{mountpoint}/from-cli", "wb") as handle:
        handle.write(b"cli")
    run_cli("umount", mountpoint, check=True)
    assert not is_mounted(mountpoint)
    with layerfs.open(sample_layers, upper=upper_dir) as fs:
        assert fs.read_bytes("/from-cli") == b"cli"


def test_fifo_times_do_not_follow_io_through_fuse(rw, tmp_path):
    """The kernel marks the inodes of FUSE special files S_NOCMTIME: I/O on
    a fifo through the mount leaves its times alone (a local fifo's change);
    setting them still works.  Asserted, as documented in
    docs/mount.md, so that no comparison with a local directory trips on it."""
    local = str(tmp_path / "local-fifo")
    for fifo in (f"{rw}/fifo", local):
        os.mkfifo(fifo)
        os.utime(fifo, ns=(10**18, 10**18))
        fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        try:
            os.write(fd, b"data")
            os.read(fd, 4)
        finally:
            os.close(fd)
    assert os.stat(f"{rw}/fifo").st_mtime_ns == 10**18
    assert os.stat(local).st_mtime_ns != 10**18
    before = os.stat(f"{rw}/fifo").st_ctime_ns
    os.utime(f"{rw}/fifo", ns=(2 * 10**18, 2 * 10**18))       # metadata changes do show
    after = os.stat(f"{rw}/fifo")
    assert after.st_mtime_ns == 2 * 10**18 and after.st_ctime_ns >= before


def test_the_high_level_layer_still_serves_a_writable_mount(sample_layers, upper_dir,
                                                            mountpoint, monkeypatch):
    # LAYERFS_FUSE_API=high: libfuse's high-level layer, kept for comparison.
    monkeypatch.setenv("LAYERFS_FUSE_API", "high")
    run_cli("mount", *stack(sample_layers), mountpoint, "--upper", upper_dir, check=True)
    try:
        with open(f"{mountpoint}/made", "wb") as handle:
            handle.write(b"made")
        os.rename(f"{mountpoint}/made", f"{mountpoint}/moved")
        with open(f"{mountpoint}/moved", "rb") as handle:
            assert handle.read() == b"made"
        os.mkdir(f"{mountpoint}/dir")
        assert {"moved", "dir"} <= set(os.listdir(mountpoint))
    finally:
        run_cli("umount", mountpoint, check=True)
    with layerfs.open(sample_layers, upper=upper_dir) as fs:
        assert fs.read_bytes("/moved") == b"made" and fs.is_dir("/dir")


def test_a_bug_answers_eio_and_the_server_goes_on(sample_layers, upper_dir, thread_mount,
                                                  caplog):
    # Anything but an OSError from the facade is a bug: the request answers
    # EIO (logged with its traceback), and the next request is served.
    fs = layerfs.open(sample_layers, upper=upper_dir)
    rw = thread_mount(fs).mountpoint

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    fs.chmod = broken
    with caplog.at_level("ERROR", logger="layerfs.fuse"):
        with pytest.raises(OSError) as caught:
            os.chmod(f"{rw}/etc/passwd", 0o600)
    assert caught.value.errno == errno.EIO
    assert "ZeroDivisionError" in caplog.text
    with open(f"{rw}/after", "wb") as handle:
        handle.write(b"served")
    assert os.stat(f"{rw}/after").st_size == 6
