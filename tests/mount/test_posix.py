"""POSIX details through a read-write mount: open flags, renames over files,
unlinked open files, inode numbers, a large directory, statfs, fsync."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from mount_helpers import requires_fuse, requires_upper

pytestmark = [pytest.mark.mount, requires_fuse, requires_upper]


def errno_of(call) -> int:
    with pytest.raises(OSError) as caught:
        call()
    return caught.value.errno


@pytest.mark.parametrize("path, flags, expected", [
    ("etc/passwd", os.O_RDONLY | os.O_DIRECTORY, errno.ENOTDIR),
    ("lib/libx.so", os.O_RDONLY | os.O_NOFOLLOW, errno.ELOOP),
    ("dangling", os.O_RDONLY | os.O_NOFOLLOW, errno.ELOOP),
    ("dangling", os.O_RDONLY, errno.ENOENT),
    ("etc", os.O_WRONLY, errno.EISDIR),
    ("etc/passwd/x", os.O_RDONLY, errno.ENOTDIR),
    ("etc/passwd", os.O_WRONLY | os.O_CREAT | os.O_EXCL, errno.EEXIST),
    ("dangling", os.O_WRONLY | os.O_CREAT | os.O_EXCL, errno.EEXIST),
])
def test_open_errnos_match_a_local_directory(rw_mounted, local_copy, path, flags, expected):
    for root in (rw_mounted, local_copy):
        assert errno_of(lambda: os.open(f"{root}/{path}", flags, 0o644)) == expected, root


def test_o_directory_and_o_nofollow_succeed_where_they_should(rw_mounted):
    os.close(os.open(f"{rw_mounted}/etc", os.O_RDONLY | os.O_DIRECTORY))
    os.close(os.open(f"{rw_mounted}/etc/passwd", os.O_RDONLY | os.O_NOFOLLOW))
    # Creating through a dangling symlink creates its target, as on Linux.
    os.close(os.open(f"{rw_mounted}/dangling", os.O_WRONLY | os.O_CREAT, 0o644))
    assert os.path.isfile(f"{rw_mounted}/nowhere")


def test_rename_over_an_existing_file(rw_mounted):
    with open(f"{rw_mounted}/new", "wb") as handle:
        handle.write(b"new")
    reader = os.open(f"{rw_mounted}/etc/passwd", os.O_RDONLY)
    try:
        os.rename(f"{rw_mounted}/new", f"{rw_mounted}/etc/passwd")
        # The replaced file stays readable through the descriptor opened before.
        assert os.pread(reader, 100, 0) == b"root:x:0:0::/root:/bin/bash\n"
    finally:
        os.close(reader)
    with open(f"{rw_mounted}/etc/passwd", "rb") as handle:
        assert handle.read() == b"new"
    assert not os.path.exists(f"{rw_mounted}/new")


@pytest.mark.parametrize("source, destination", [
    ("etc/passwd", "etc"), ("etc/passwd", "bin"), ("etc", "bin"), ("etc", "etc/passwd"),
    ("etc", "etc/sub"), ("missing", "x"), ("etc/passwd", "etc/passwd/x"),
])
def test_rename_errnos_match_a_local_directory(rw_mounted, local_copy, source, destination):
    found = [errno_of(lambda: os.rename(f"{root}/{source}", f"{root}/{destination}"))
             for root in (rw_mounted, local_copy)]
    assert found[0] == found[1]


@pytest.mark.parametrize("path", ["fresh", "etc/passwd"])
def test_unlinked_open_file_stays_readable_and_writable(rw_mounted, path):
    full = f"{rw_mounted}/{path}"
    fd = os.open(full, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"HEAD", 0)
        os.unlink(full)
        assert not os.path.exists(full)
        os.pwrite(fd, b"-after-unlink", 4)
        assert os.pread(fd, 17, 0) == b"HEAD-after-unlink"
        assert os.fstat(fd).st_size >= 17
        os.ftruncate(fd, 4)
        assert os.fstat(fd).st_size == 4
        os.fsync(fd)
    finally:
        os.close(fd)
    assert not os.path.exists(full)
    assert not [name for name in os.listdir(os.path.dirname(full))
                if name.startswith(".fuse_hidden")]


def test_inode_numbers_are_stable_and_shared_by_hardlinks(rw_mounted):
    tool, link = f"{rw_mounted}/bin/tool", f"{rw_mounted}/bin/tool-link"
    before = os.stat(tool).st_ino
    assert os.stat(tool).st_ino == before == os.stat(link).st_ino
    with open(link, "ab") as handle:          # copies the file up
        handle.write(b"!")
    after = {os.stat(tool).st_ino, os.stat(link).st_ino, os.stat(tool).st_ino}
    assert len(after) == 1
    assert os.stat(tool).st_nlink == 2
    os.link(tool, f"{rw_mounted}/third")
    assert os.stat(f"{rw_mounted}/third").st_ino == os.stat(tool).st_ino
    assert os.stat(tool).st_nlink == 3
    os.rename(f"{rw_mounted}/third", f"{rw_mounted}/etc/third")
    assert os.stat(f"{rw_mounted}/etc/third").st_ino == os.stat(link).st_ino
    inodes = {os.lstat(os.path.join(top, name)).st_ino
              for top, dirs, files in os.walk(rw_mounted) for name in dirs + files}
    paths = sum(len(dirs) + len(files) for _, dirs, files in os.walk(rw_mounted))
    assert len(inodes) == paths - 2           # tool-link and etc/third share tool's


def test_large_directory_listing(rw_mounted):
    big = f"{rw_mounted}/big"
    os.mkdir(big)
    names = set()
    for number in range(5000):
        name = f"entry-{number:05d}"
        if number % 3 == 0:
            os.mkdir(f"{big}/{name}")
        elif number % 3 == 1:
            os.close(os.open(f"{big}/{name}", os.O_CREAT | os.O_WRONLY, 0o644))
        else:
            os.symlink("target", f"{big}/{name}")
        names.add(name)
    with os.scandir(big) as scan:
        entries = [(entry.name, entry.is_dir(follow_symlinks=False),
                    entry.is_symlink(), entry.inode()) for entry in scan]
    assert len(entries) == 5000 and {entry[0] for entry in entries} == names
    for name, is_dir, is_symlink, inode in entries:
        number = int(name.split("-")[1])
        assert (is_dir, is_symlink) == (number % 3 == 0, number % 3 == 2), name
        assert inode == os.lstat(f"{big}/{name}").st_ino
    assert len({entry[3] for entry in entries}) == 5000


def test_statfs(rw_mounted, tmp_path):
    mounted, upper = os.statvfs(rw_mounted), os.statvfs(tmp_path / "upper")
    assert mounted.f_bsize == upper.f_bsize and mounted.f_blocks == upper.f_blocks
    assert mounted.f_namemax >= 255
    assert not mounted.f_flag & os.ST_RDONLY


def test_fsync_and_fdatasync(rw_mounted, tmp_path):
    fd = os.open(f"{rw_mounted}/synced", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"durable")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    directory = os.open(rw_mounted, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    with open(f"{rw_mounted}/synced", "rb") as handle:
        assert handle.read() == b"durable"
    # What fsync promised is in the upper directory, whatever the daemon does next.
    found = [os.path.join(top, name) for top, _, files in os.walk(tmp_path / "upper")
             for name in files if name == "synced"]
    assert found and open(found[0], "rb").read() == b"durable"


# An inode the kernel holds stays reachable whatever happens to its names,
# as on ext4.  libfuse's high-level layer (which served writable mounts
# before layerfs.fusewrite) keyed each inode to a path and forgot it when the
# name was removed or replaced: fstat() of a descriptor held on the old file
# (even O_PATH, which holds the inode without an OPEN) answered ESTALE.
@pytest.mark.parametrize("replace", ["rename", "unlink"])
def test_a_replaced_file_stays_reachable_through_a_held_descriptor(rw_mounted, tmp_path,
                                                                   replace):
    for root in (str(tmp_path / "local"), rw_mounted):   # the local directory first
        os.makedirs(root, exist_ok=True)
        with open(f"{root}/current", "wb") as current:
            current.write(b"old")
        held = os.open(f"{root}/current", os.O_PATH)
        try:
            if replace == "rename":
                with open(f"{root}/next", "wb") as following:
                    following.write(b"new")
                os.rename(f"{root}/next", f"{root}/current")
            else:
                os.unlink(f"{root}/current")
            assert os.fstat(held).st_nlink == 0
            reopened = os.open(f"/proc/self/fd/{held}", os.O_RDONLY)
            try:
                assert os.read(reopened, 10) == b"old"
            finally:
                os.close(reopened)
        finally:
            os.close(held)


def test_an_unlinked_file_takes_changes_through_its_descriptors(rw_mounted, tmp_path):
    # fchmod, futimens, fsetxattr and truncate of an unlinked file (through
    # an open descriptor, and through /proc for an O_PATH one) name no path:
    # the kernel sends them for the inode, which must still take them.
    found = []
    for root in (str(tmp_path / "local"), rw_mounted):
        os.makedirs(root, exist_ok=True)
        fd = os.open(f"{root}/gone", os.O_RDWR | os.O_CREAT, 0o644)
        held = os.open(f"{root}/gone", os.O_PATH)
        try:
            os.write(fd, b"content")
            os.unlink(f"{root}/gone")
            os.fchmod(fd, 0o600)
            os.setxattr(fd, "user.kept", b"yes")
            os.truncate(f"/proc/self/fd/{held}", 4)
            os.utime(fd, ns=(1_000_000_000, 2_000_000_000))
            st = os.fstat(held)
            found.append((stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_size, st.st_nlink,
                          os.getxattr(fd, "user.kept"), os.pread(fd, 10, 0)))
        finally:
            os.close(held)
            os.close(fd)
    assert found[0] == found[1] == (0o600, 2_000_000_000, 4, 0, b"yes", b"cont")


READER = """
import os, sys
path, count = sys.argv[1], int(sys.argv[2])
failures, contents = {}, set()
for _ in range(count):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as error:
        failures[error.errno] = failures.get(error.errno, 0) + 1
        continue
    try:
        contents.add(os.read(fd, 64))
    except OSError as error:
        failures[error.errno] = failures.get(error.errno, 0) + 1
    finally:
        os.close(fd)
print(repr((failures, sorted(contents))))
"""


# A rename over a file that another process holds open replaces it in one
# step: a reader opening the name meanwhile finds the old file or the new
# one, never no file (the high-level layer first renamed an open file to
# .fuse_hidden*, so a reader could get ENOENT) nor a stale one (ESTALE).
def test_a_rename_over_an_open_file_is_atomic_for_readers(rw_mounted):
    import ast
    import subprocess
    import sys
    current = f"{rw_mounted}/current"
    with open(current, "wb") as stream:
        stream.write(b"version 0")
    reader = subprocess.Popen([sys.executable, "-c", READER, current, "3000"],
                              stdout=subprocess.PIPE, text=True)
    try:
        for version in range(1, 1001):
            with open(f"{rw_mounted}/next", "wb") as stream:
                stream.write(b"version %d" % version)
            held = os.open(current, os.O_RDONLY)       # the file replaced is open
            try:
                os.rename(f"{rw_mounted}/next", current)
            finally:
                os.close(held)
            if reader.poll() is not None:
                break
    finally:
        out, _ = reader.communicate(timeout=120)
    failures, contents = ast.literal_eval(out)
    assert failures == {}
    assert all(content.startswith(b"version ") for content in contents)


# unionmount-testsuite's open-trunc: O_RDONLY | O_TRUNC truncates on Linux
# (the kernel checks write permission); layerfs answered EINVAL.
@pytest.mark.parametrize("path", ["etc/passwd", "fresh"])
@pytest.mark.parametrize("extra", [0, os.O_CREAT])
def test_read_only_open_with_o_trunc_truncates(rw_mounted, local_copy, path, extra):
    found = []
    for root in (rw_mounted, local_copy):
        with open(f"{root}/{path}", "ab") as existing:
            existing.write(b"data")
        fd = os.open(f"{root}/{path}", os.O_RDONLY | os.O_TRUNC | extra, 0o644)
        try:
            found.append((os.read(fd, 10), os.fstat(fd).st_size))
        finally:
            os.close(fd)
    assert found == [(b"", 0), (b"", 0)]


FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


# fsx found fallocate missing (overlayfs has it): every mode FUSE passes on,
# on a lower file (copied up by the open) and a new one, as in a local directory.
@pytest.mark.parametrize("path", ["bin/tool", "fresh"])
def test_fallocate_modes_match_a_local_directory(rw_mounted, local_copy, path):
    found = []
    for root in (rw_mounted, local_copy):
        fd = os.open(f"{root}/{path}", os.O_RDWR | os.O_CREAT, 0o755)
        try:
            os.pwrite(fd, b"x" * 20000, 0)
            steps = []
            for mode, offset, length in [(0, 0, 30000), (FALLOC_FL_KEEP_SIZE, 25000, 20000),
                                         (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192),
                                         (FALLOC_FL_ZERO_RANGE, 28000, 10000)]:
                fallocate(fd, mode, offset, length)
                steps.append((os.fstat(fd).st_size, os.pread(fd, 50000, 0)))
            found.append(steps)
        finally:
            os.close(fd)
    assert found[0] == found[1]
    with pytest.raises(OSError) as caught:           # a read-only descriptor
        fd = os.open(f"{rw_mounted}/{path}", os.O_RDONLY)
        try:
            fallocate(fd, 0, 0, 10)
        finally:
            os.close(fd)
    assert caught.value.errno == errno.EBADF


def renameat2(source: str, destination: str, flags: int) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, source.encode(), at_fdcwd, destination.encode(), flags):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def test_renameat2_noreplace_and_exchange(rw_mounted):
    noreplace, exchange = 1, 2
    for name in ("a", "b"):
        with open(f"{rw_mounted}/{name}", "wb") as stream:
            stream.write(name.encode())
    assert errno_of(lambda: renameat2(f"{rw_mounted}/a", f"{rw_mounted}/b",
                                      noreplace)) == errno.EEXIST
    renameat2(f"{rw_mounted}/a", f"{rw_mounted}/c", noreplace)
    assert sorted(os.listdir(rw_mounted)).count("c") == 1
    # Not supported (docs/mount.md): refused, nothing changes.
    assert errno_of(lambda: renameat2(f"{rw_mounted}/b", f"{rw_mounted}/c",
                                      exchange)) == errno.EINVAL
    with open(f"{rw_mounted}/c", "rb") as stream:
        assert stream.read() == b"a"
