"""The os-shaped write operations: edge cases, errnos, escapes, handles."""

import errno
import os
import stat
import subprocess
import threading

import pytest

import layerfs
from layerfs.testing import layers as L
from layerfs.testing.view import diff_views, snapshot
from layerfs.testing.writers import write_image

IMAGE = [
    L.Layer([L.directory("d", mode=0o750), L.file("d/f", b"lower", mode=0o640),
             L.directory("d/sub"), L.file("d/sub/deep", b"deep"),
             L.file("h1", b"linked"), L.hardlink("d/h2", "h1"),
             L.symlink("evil", "/tmp/layerfs-test-outside"), L.symlink("ln", "d/f"),
             L.directory("tmp"), L.directory("sg", mode=0o2775, gid=55)]),
    L.Layer([L.whiteout("d/sub/deep"), L.file("d/sub/new", b"new")]),
]
needs_root = pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                                reason="needs root")   # CI runs as root


@pytest.fixture
def image(tmp_path):
    return write_image(IMAGE, tmp_path / "image", kind="layers", compression="none")


@pytest.fixture
def fs(image, tmp_path):
    with layerfs.open(image, upper=tmp_path / "upper") as fs:
        yield fs


def reopen(fs, image, tmp_path):
    fs.close()
    return layerfs.open(image, upper=tmp_path / "upper")


def errno_of(call):
    with pytest.raises(OSError) as info:
        call()
    return info.value.errno


def test_without_upper_every_write_is_erofs(image):
    with layerfs.open(image) as fs:
        for call in (lambda: fs.mkdir("/x"), lambda: fs.unlink("/d/f"),
                     lambda: fs.rename("/d/f", "/g"), lambda: fs.chmod("/d/f", 0),
                     lambda: fs.open("/d/f", "wb"), lambda: fs.open("/new", "xb"),
                     lambda: fs.setxattr("/d/f", "user.a", b""),
                     lambda: fs.truncate("/d/f", 0), lambda: fs.symlink("a", "/s")):
            assert errno_of(call) == errno.EROFS
        assert fs.read_bytes("/d/f") == b"lower"


def test_reserved_names_are_refused_with_einval(fs):
    for call in (lambda: fs.mkdir("/.wh.x"), lambda: fs.open("/d/.wh.f", "wb"),
                 lambda: fs.symlink("a", "/.wh..wh..opq"), lambda: fs.link("/h1", "/.wh.h"),
                 lambda: fs.rename("/h1", "/d/.wh.h1"), lambda: fs.mknod("/.wh.p", stat.S_IFIFO)):
        assert errno_of(call) == errno.EINVAL
    assert fs.read_bytes("/h1") == b"linked"


def test_errnos_match_linux(fs):
    assert errno_of(lambda: fs.mkdir("/d")) == errno.EEXIST
    assert errno_of(lambda: fs.mkdir("/missing/x")) == errno.ENOENT
    assert errno_of(lambda: fs.mkdir("/d/f/x")) == errno.ENOTDIR
    assert errno_of(lambda: fs.unlink("/d")) == errno.EISDIR
    assert errno_of(lambda: fs.rmdir("/d/f")) == errno.ENOTDIR
    assert errno_of(lambda: fs.rmdir("/d")) == errno.ENOTEMPTY
    assert errno_of(lambda: fs.rmdir("/")) == errno.EBUSY
    assert errno_of(lambda: fs.rename("/d", "/d/sub/x")) == errno.EINVAL
    assert errno_of(lambda: fs.rename("/d/sub/new", "/d")) == errno.ENOTEMPTY
    assert errno_of(lambda: fs.rename("/d/f", "/d/sub")) == errno.EISDIR
    assert errno_of(lambda: fs.rename("/d/sub", "/d/f")) == errno.ENOTDIR
    assert errno_of(lambda: fs.rename("/missing", "/")) == errno.EBUSY
    assert errno_of(lambda: fs.link("/d", "/dd")) == errno.EPERM
    assert errno_of(lambda: fs.link("/d", "/h1")) == errno.EEXIST
    assert errno_of(lambda: fs.open("/d", "wb")) == errno.EISDIR
    assert errno_of(lambda: fs.truncate("/missing", -1)) == errno.EINVAL
    assert errno_of(lambda: fs.removexattr("/d/f", "user.none")) == errno.ENODATA
    fs.mknod("/fifo", stat.S_IFIFO | 0o600)
    assert errno_of(lambda: fs.setxattr("/fifo", "user.a", b"")) == errno.EPERM


def test_rename_of_lower_directory_never_exdev_and_survives_reopen(fs, image, tmp_path):
    fs.rename("/d", "/moved")
    assert sorted(fs.listdir("/moved")) == ["f", "h2", "sub"]
    assert not fs.lexists("/d")
    before = snapshot(fs)
    fs = reopen(fs, image, tmp_path)
    assert not diff_views(before, snapshot(fs))
    fs.mkdir("/d")                       # the old name is free, and empty
    assert fs.listdir("/d") == []
    fs.close()


def test_rename_over_existing_file_and_empty_directory(fs, image, tmp_path):
    fs.rename("/h1", "/d/f")
    assert fs.read_bytes("/d/f") == b"linked" and fs.lstat("/d/h2").st_nlink == 2
    fs.unlink("/d/sub/new")
    fs.mkdir("/e")
    fs.write_bytes("/e/x", b"x")
    fs.rename("/e", "/d/sub")
    assert fs.listdir("/d/sub") == ["x"]
    before = snapshot(fs)
    fs = reopen(fs, image, tmp_path)
    assert not diff_views(before, snapshot(fs))
    fs.close()


def test_hardlink_copy_up_keeps_the_link(fs, image, tmp_path):
    with fs.open("/h1", "ab") as stream:
        stream.write(b"+")
    assert fs.read_bytes("/d/h2") == b"linked+"
    assert fs.lstat("/h1").st_nlink == 2 and fs.lstat("/h1").st_ino == fs.lstat("/d/h2").st_ino
    fs = reopen(fs, image, tmp_path)
    assert fs.lstat("/d/h2").st_nlink == 2 and fs.read_bytes("/d/h2") == b"linked+"
    fs.close()


def test_metadata_change_does_not_copy_data(fs, tmp_path):
    fs.chmod("/d/f", 0o600)
    fs.setxattr("/d/f", "user.k", b"v")
    assert not (tmp_path / "upper" / "diff" / "d" / "f").exists()
    assert fs.read_bytes("/d/f") == b"lower"
    assert fs.stat("/d/f").st_mode & 0o7777 == 0o600


def test_metacopy_of_a_hardlink_through_either_name_survives_reopen(fs, image, tmp_path):
    fs.chmod("/h1", 0o700)
    fs.chmod("/d/h2", 0o711)          # later change through the other name wins
    fs = reopen(fs, image, tmp_path)
    assert fs.stat("/h1").st_mode & 0o777 == 0o711
    fs.unlink("/d/h2")                # the surviving name keeps the record
    fs = reopen(fs, image, tmp_path)
    assert fs.stat("/h1").st_mode & 0o777 == 0o711
    fs.close()


def test_hardlinked_symlink_survives_reopen(fs, image, tmp_path):
    fs.link("/ln", "/ln2")
    fs = reopen(fs, image, tmp_path)
    assert fs.lstat("/ln2").st_nlink == 2 and fs.readlink("/ln2") == "d/f"
    fs.close()


def test_root_times_survive_reopen_after_changes_below_copied_up_dirs(fs, image, tmp_path):
    fs.chmod("/d/sub", 0o700)             # /d copied up
    fs = reopen(fs, image, tmp_path)
    fs.rename("/d", "/dd")                # root changes; /d was already upper
    mtime = fs.stat("/").st_mtime_ns
    fs = reopen(fs, image, tmp_path)
    assert fs.stat("/").st_mtime_ns == mtime
    fs.close()


@needs_root
def test_setgid_directory_gives_its_group_and_chown_drops_setuid(fs):
    fs.mkdir("/sg/new")
    fs.write_bytes("/sg/file", b"")
    assert fs.stat("/sg/new").st_gid == 55 and fs.stat("/sg/new").st_mode & stat.S_ISGID
    assert fs.stat("/sg/file").st_gid == 55
    fs.chmod("/d/f", 0o6755)
    fs.chown("/d/f", 1000, -1)
    assert fs.stat("/d/f").st_mode & 0o7777 == 0o755


def test_unlinked_open_file_stays_usable_through_its_handles(fs):
    fs.write_bytes("/n", b"upper file")
    reader = fs.open_handle("/n", os.O_RDONLY)
    writer = fs.open_handle("/d/f", os.O_RDWR)
    fs.unlink("/n")
    fs.unlink("/d/f")
    assert reader.pread(100, 0) == b"upper file"
    writer.pwrite(b"L", 0)
    assert writer.pread(100, 0) == b"Lower"
    assert writer.fstat().st_nlink == 0
    reader.close()
    writer.close()
    assert not fs.lexists("/n") and not fs.lexists("/d/f")


def test_concurrent_writers_copy_up_once(fs):
    errors = []

    def append(index):
        try:
            handle = fs.open_handle("/d/sub/new", os.O_WRONLY | os.O_APPEND)
            try:
                handle.pwrite(bytes([65 + index]), 0)
            finally:
                handle.close()
        except Exception as error:       # reported below, in the main thread
            errors.append(error)
    threads = [threading.Thread(target=append, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    data = fs.read_bytes("/d/sub/new")
    assert data[:3] == b"new" and sorted(data[3:]) == sorted(b"ABCDEFGH")


def test_nothing_escapes_through_image_symlinks(fs, tmp_path):
    outside = "/tmp/layerfs-test-outside"
    assert not os.path.lexists(outside), "leftover from another run"
    with pytest.raises(FileNotFoundError):
        fs.write_bytes("/evil/x", b"x")       # /tmp/layerfs-test-outside in the image
    fs.mkdir("/tmp/layerfs-test-outside")
    fs.write_bytes("/evil/x", b"inside")
    fs.mkdir("/evil/dir")
    fs.rename("/d/f", "/evil/moved")
    fs.link("/h1", "/evil/link")
    fs.symlink("/etc", "/evil/etc")
    fs.makedirs("/evil/a/b")
    assert not os.path.lexists(outside)
    assert fs.read_bytes("/tmp/layerfs-test-outside/x") == b"inside"
    # the symlink copied up into the upper is not followed either
    fs.chown("/evil", 0, 0, follow_symlinks=False)
    fs.write_bytes("/evil/y", b"y")
    assert not os.path.lexists(outside)
    assert os.path.islink(tmp_path / "upper" / "diff" / "evil")


@needs_root
def test_enospc_reports_the_errno_and_leaves_the_upper_loadable(image, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("cannot mount a tmpfs here (CI runs as root)")
        pytest.skip("cannot mount a tmpfs here")
    try:
        with layerfs.open(image, upper=small / "upper") as fs:
            fs.write_bytes("/ok", b"fine")
            with pytest.raises(OSError) as info:
                fs.write_bytes("/big", b"x" * (1 << 20))
            assert info.value.errno == errno.ENOSPC
            fs.unlink("/big")
            before = snapshot(fs)
        with layerfs.open(image, upper=small / "upper") as fs:
            assert not diff_views(before, snapshot(fs))
            assert fs.read_bytes("/ok") == b"fine"
    finally:
        subprocess.run(["umount", str(small)], check=True)


# -- who creates: layerfs.caller ---------------------------------------------------

def test_the_library_creates_as_the_process_with_its_umask(fs):
    old = os.umask(0o027)
    try:
        fs.mkdir("/m", 0o777)
        fs.write_bytes("/f", b"")
        fs.mknod("/fifo", stat.S_IFIFO | 0o666)
        fs.symlink("target", "/s")
    finally:
        os.umask(old)
    assert fs.stat("/m").st_mode & 0o7777 == 0o750
    assert fs.stat("/f").st_mode & 0o7777 == 0o640
    assert fs.lstat("/fifo").st_mode & 0o7777 == 0o640
    assert fs.lstat("/s").st_mode & 0o7777 == 0o777
    for path in ("/m", "/f", "/fifo", "/s"):
        assert (fs.lstat(path).st_uid, fs.lstat(path).st_gid) == (os.geteuid(), os.getegid())


def test_a_request_creates_as_its_caller_with_its_umask_applied_once(fs, image, tmp_path):
    from layerfs.caller import Caller, acting_as
    old = os.umask(0o077)                 # the daemon's own umask must not matter
    try:
        with acting_as(Caller(1234, 5678, umask=0)):
            fs.mkdir("/m", 0o777)
            fs.open_handle("/f", os.O_CREAT | os.O_WRONLY, 0o666).close()
            fs.mknod("/fifo", stat.S_IFIFO | 0o606)
            fs.symlink("target", "/s")
            fs.mkdir("/sg/sub", 0o755)
            fs.write_bytes("/sg/file", b"")
        with acting_as(Caller(1, 2, umask=0o022)):
            fs.mkdir("/masked", 0o777)
    finally:
        os.umask(old)
    expected = {"/m": (0o777, 1234, 5678), "/f": (0o666, 1234, 5678),
                "/fifo": (0o606, 1234, 5678), "/s": (0o777, 1234, 5678),
                "/sg/sub": (0o2755, 1234, 55), "/sg/file": (0o666, 1234, 55),
                "/masked": (0o755, 1, 2)}

    def owners(fs):
        return {path: (fs.lstat(path).st_mode & 0o7777, fs.lstat(path).st_uid,
                       fs.lstat(path).st_gid) for path in expected}

    assert owners(fs) == expected
    with reopen(fs, image, tmp_path) as again:        # recorded as the format says
        assert owners(again) == expected
        from layerfs.commit import commit
        commit(again, tmp_path / "committed")
    with layerfs.open(str(tmp_path / "committed")) as committed:     # and committed
        assert owners(committed) == expected
