"""The binding-neutral FUSE translation (layerfs.fusecore), without libfuse."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat

import pytest

from layerfs import caller, fusecore


class timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class linux_stat(ctypes.Structure):
    """x86-64 Linux's struct stat, as the bindings declare it."""
    _fields_ = [("st_dev", ctypes.c_ulong), ("st_ino", ctypes.c_ulong),
                ("st_nlink", ctypes.c_ulong), ("st_mode", ctypes.c_uint),
                ("st_uid", ctypes.c_uint), ("st_gid", ctypes.c_uint),
                ("__pad0", ctypes.c_int), ("st_rdev", ctypes.c_ulong),
                ("st_size", ctypes.c_long), ("st_blksize", ctypes.c_long),
                ("st_blocks", ctypes.c_long), ("st_atimespec", timespec),
                ("st_mtimespec", timespec), ("st_ctimespec", timespec),
                ("reserved", ctypes.c_long * 3)]


class aarch64_stat(ctypes.Structure):
    """Another order and widths (the generic layout of arm64)."""
    _fields_ = [("st_dev", ctypes.c_ulong), ("st_ino", ctypes.c_ulong),
                ("st_mode", ctypes.c_uint), ("st_nlink", ctypes.c_uint),
                ("st_uid", ctypes.c_uint), ("st_gid", ctypes.c_uint),
                ("st_rdev", ctypes.c_ulong), ("__pad1", ctypes.c_ulong),
                ("st_size", ctypes.c_long), ("st_blksize", ctypes.c_int),
                ("__pad2", ctypes.c_int), ("st_blocks", ctypes.c_long),
                ("st_atimespec", timespec), ("st_mtimespec", timespec),
                ("st_ctimespec", timespec), ("__unused", ctypes.c_uint * 2)]


class Exploding:
    """A filesystem whose every lookup fails as configured."""

    readonly = True

    def __init__(self, error):
        self.error = error

    def lstat(self, path):
        raise self.error


def test_oserror_answers_its_errno():
    operations = fusecore.Operations(Exploding(FileNotFoundError(errno.ENOENT, "x", "/a")))
    with pytest.raises(OSError) as caught:
        operations.call("getattr", "/a", None)
    assert caught.value.errno == errno.ENOENT


def test_unexpected_exception_is_logged_and_answers_eio(caplog):
    operations = fusecore.Operations(Exploding(ValueError("bug")))
    with caplog.at_level(logging.ERROR, logger="layerfs.fuse"):
        with pytest.raises(OSError) as caught:
            operations.call("getattr", "/a", None)
    assert caught.value.errno == errno.EIO
    record = next(r for r in caplog.records if r.name == "layerfs.fuse")
    assert record.exc_info is not None and "bug" in str(record.exc_info[1])


def test_oserror_without_errno_answers_eio(caplog):
    with caplog.at_level(logging.ERROR, logger="layerfs.fuse"):
        assert fusecore.errno_of(OSError("no errno"), "getattr", ("/a",)) == errno.EIO
    assert fusecore.errno_of(PermissionError(errno.EACCES, "x"), "open", ()) == errno.EACCES


@pytest.mark.parametrize("c_stat", [linux_stat, aarch64_stat])
def test_packed_stat_matches_the_struct(c_stat):
    packer = fusecore.StatPacker(c_stat)
    assert packer.size == ctypes.sizeof(c_stat)
    st = os.stat_result((0o100644, 2**63 - 1, 0, 7, 2**32 - 2, 5, 2**62, -1, 0, 0,
                         -1.5, 0.0, 0.0, -1_500_000_000, 0, 999_999_999, 4096, 2**53, 0x0803))
    packed = c_stat.from_buffer_copy(packer.stat(st))
    assert (packed.st_mode, packed.st_ino, packed.st_nlink, packed.st_uid, packed.st_gid) == \
        (0o100644, 2**63 - 1, 7, 2**32 - 2, 5)
    assert (packed.st_size, packed.st_blocks, packed.st_rdev, packed.st_dev) == (2**62, 2**53, 0x0803, 0)
    assert (packed.st_atimespec.tv_sec, packed.st_atimespec.tv_nsec) == (-2, 500_000_000)
    assert (packed.st_ctimespec.tv_sec, packed.st_ctimespec.tv_nsec) == (0, 999_999_999)


class FakeNode:
    def __init__(self, **fields):
        self.__dict__.update(fields)


def test_packed_node_equals_packed_stat_of_the_same_inode():
    packer = fusecore.StatPacker(linux_stat)
    node = FakeNode(ino=12, nlink=2, mode=0o100755, uid=1000, gid=100, rdev=0, size=5000,
                    atime_ns=1_600_000_000_123_456_789, mtime_ns=1_600_000_001_000_000_001,
                    ctime_ns=1_600_000_002_999_999_999)
    st = os.stat_result((node.mode, node.ino, 0, node.nlink, node.uid, node.gid, node.size,
                         0, 0, 0, 0.0, 0.0, 0.0, node.atime_ns, node.mtime_ns, node.ctime_ns,
                         fusecore.BLOCK_SIZE, (node.size + 511) // 512, 0))
    assert packer.node(node) == packer.stat(st)


def test_times_omit_and_now():
    current = lambda: os.stat_result((0o100644, 1, 0, 1, 0, 0, 0, 0, 0, 0,  # noqa: E731
                                      0, 0, 0, 111, 222, 0))
    assert fusecore.resolve_times((fusecore.UTIME_OMIT, 5), current) == (111, 5)
    assert fusecore.resolve_times((7, fusecore.UTIME_OMIT), current) == (7, 222)
    atime, mtime = fusecore.resolve_times((fusecore.UTIME_NOW, 9), current)
    assert mtime == 9 and atime > 10**18
    atime, mtime = fusecore.resolve_times(None, current)
    assert atime == mtime and atime > 10**18


@pytest.mark.parametrize("name", sorted(fusecore.ACL_XATTRS))
def test_acl_xattrs_are_refused_so_callers_chmod(name):
    with pytest.raises(OSError) as caught:
        fusecore.refuse_acl(name)
    assert caught.value.errno == errno.ENOTSUP
    fusecore.refuse_acl("user.comment")


class Recording:
    """A writable filesystem that records what it is asked and by whom."""

    readonly = False

    def __init__(self):
        self.calls = []

    def _record(self, op, *args):
        self.calls.append((op, args, caller.current()))

    def mkdir(self, path, mode):
        self._record("mkdir", path, mode)

    def mknod(self, path, mode, dev):
        self._record("mknod", path, mode, dev)

    def symlink(self, source, target):
        self._record("symlink", source, target)

    def open_handle(self, path, flags, mode=0o666):
        self._record("open_handle", path, flags, mode)
        return FakeNode(node=FakeNode(nlink=1), close=lambda: None)


class FileInfo:
    flags = os.O_WRONLY
    fh = 0
    keep_cache = 0


def test_creating_requests_run_as_the_requests_caller():
    fs = Recording()
    operations = fusecore.Operations(fs, context=lambda: (1234, 5678, 42))
    operations.mkdir("/d", 0o777)
    operations.mknod("/n", stat.S_IFIFO | 0o644, 0)
    operations.symlink("/l", "target")
    operations.create("/f", 0o600, FileInfo())
    assert [op for op, _, _ in fs.calls] == ["mkdir", "mknod", "symlink", "open_handle"]
    for _op, _args, who in fs.calls:
        assert who == caller.Caller(1234, 5678, umask=0)
    assert fs.calls[2][1] == ("target", "/l")
    # Outside a request, the process itself again.
    assert caller.current() == caller.process_caller()


def test_read_only_open_answers_enosys_so_the_kernel_stops_asking():
    class ReadOnly:
        readonly = True
    with pytest.raises(OSError) as caught:
        fusecore.Operations(ReadOnly()).open("/f", FileInfo())
    assert caught.value.errno == errno.ENOSYS


class Versioned:
    """scandir over a dict, with a tree version the test bumps."""

    class tree:
        version = 0

    def __init__(self, listing):
        self.listing = listing
        self.scans = 0

    def scandir(self, path):
        self.scans += 1

        class Entry:
            def __init__(self, name, node):
                self.name, self._node = name, node
        return [Entry(name, node) for name, node in self.listing[path].items()]


def test_listings_are_kept_until_the_version_changes():
    node = FakeNode(ino=5)
    fs = Versioned({"/": {"a": node, "caf\udce9": node}})
    listings = fusecore.Listings(fs, limit=1)
    names, nodes = listings.get("/")
    assert names == (b"a", b"caf\xe9")
    assert nodes == (node, node)
    listings.get("/")
    assert fs.scans == 1
    fs.tree.version += 1
    listings.get("/")
    assert fs.scans == 2
    fs.listing["/other"] = {}
    assert listings.get("/other") == ((), ())
    listings.get("/")                        # limit 1: "/" was dropped
    assert fs.scans == 4
