"""The adapter's translations, called directly (no mount), and the option rules."""

from __future__ import annotations

import errno
import logging
import os

import pytest

from layerfs import mount as layerfs_mount
from layerfs.errors import MountError
from mount_helpers import requires_fuse

pytestmark = [pytest.mark.mount, requires_fuse]


@pytest.fixture
def adapter():
    from layerfs import fuse as adapter
    return adapter


class Exploding:
    """A filesystem whose every lookup fails as configured."""

    readonly = True

    def __init__(self, error):
        self.error = error

    def lstat(self, path):
        raise self.error


def test_oserror_answers_its_errno(adapter):
    operations = adapter.Operations(Exploding(FileNotFoundError(errno.ENOENT, "x", "/a")))
    with pytest.raises(adapter.fusepy.FuseOSError) as caught:
        operations("getattr", "/a", None)
    assert caught.value.errno == errno.ENOENT


def test_unexpected_exception_is_logged_and_answers_eio(adapter, caplog):
    operations = adapter.Operations(Exploding(ValueError("bug")))
    with caplog.at_level(logging.ERROR, logger="layerfs.fuse"):
        with pytest.raises(adapter.fusepy.FuseOSError) as caught:
            operations("getattr", "/a", None)
    assert caught.value.errno == errno.EIO
    record = next(r for r in caplog.records if r.name == "layerfs.fuse")
    assert record.exc_info is not None and "bug" in str(record.exc_info[1])


def test_oserror_without_errno_answers_eio(adapter, caplog):
    operations = adapter.Operations(Exploding(OSError("no errno")))
    with caplog.at_level(logging.ERROR, logger="layerfs.fuse"):
        with pytest.raises(adapter.fusepy.FuseOSError) as caught:
            operations("getattr", "/a", None)
    assert caught.value.errno == errno.EIO


def test_read_only_facade_answers_erofs_and_enodata(adapter, sample_fs):
    operations = adapter.Operations(sample_fs)
    for op, args in [("setxattr", ("/attrs", "user.x", b"v", 0)),
                     ("removexattr", ("/attrs", "user.comment")),
                     ("mkdir", ("/new", 0o755)), ("unlink", ("/etc/passwd",))]:
        with pytest.raises(adapter.fusepy.FuseOSError) as caught:
            operations(op, *args)
        assert caught.value.errno == errno.EROFS, op
    with pytest.raises(adapter.fusepy.FuseOSError) as caught:
        operations("getxattr", "/attrs", "user.missing")
    assert caught.value.errno == errno.ENODATA


def test_every_xattr_operation_is_defined(adapter):
    # An undefined one would answer ENOSYS and the kernel would stop asking.
    for name in ("getxattr", "setxattr", "listxattr", "removexattr"):
        assert getattr(adapter.Operations, name) is not getattr(adapter.fusepy.Operations, name)


def test_requests_with_nothing_to_do_are_left_undefined(adapter, sample_fs):
    # Undefined, libfuse answers opendir/releasedir itself and the kernel
    # stops sending FLUSH: valid only while a handle has nothing to flush.
    for name in ("opendir", "releasedir", "flush"):
        assert getattr(adapter.Operations, name) is None, name
    handle = sample_fs.open_handle("/etc/passwd", os.O_RDONLY)
    try:
        assert handle.flush() is None
    finally:
        handle.close()


def test_stat_attrs_are_nanoseconds(adapter, sample_fs):
    attrs = adapter.stat_to_attrs(sample_fs.lstat("/bin/tool"))
    assert attrs["st_mtime"] == sample_fs.lstat("/bin/tool").st_mtime_ns
    assert attrs["st_ino"] == sample_fs.lstat("/bin/tool-link").st_ino
    assert attrs["st_blocks"] == (attrs["st_size"] + 511) // 512


def unpack_stat(adapter, data):
    ctypes = adapter.ctypes
    padded = data + bytes(ctypes.sizeof(adapter.fusepy.c_stat) - len(data))
    return adapter.fusepy.c_stat.from_buffer_copy(padded)


@pytest.mark.parametrize("path", ["/bin/tool", "/etc", "/lib/libx.so", "/dev/sda"])
def test_packed_stat_is_fusepys_struct(adapter, sample_fs, path):
    st = sample_fs.lstat(path)
    packed = unpack_stat(adapter, adapter.pack_stat(st))
    expected = adapter.fusepy.c_stat()
    adapter.fusepy.set_st_attrs(expected, adapter.stat_to_attrs(st), use_ns=True)
    assert bytes(packed) == bytes(expected)


def test_packed_stat_of_extreme_values(adapter):
    st = os.stat_result((0o100644, 2**63 - 1, 0, 2**32, 2**32 - 2, 0, 2**62, -1, 0, 0,
                         -1.5, 0.0, 0.0, -1_500_000_000, 0, 999_999_999, 4096, 2**53, 0))
    packed = unpack_stat(adapter, adapter.pack_stat(st))
    assert (packed.st_ino, packed.st_nlink, packed.st_size) == (2**63 - 1, 2**32, 2**62)
    assert (packed.st_atimespec.tv_sec, packed.st_atimespec.tv_nsec) == (-2, 500_000_000)
    assert (packed.st_ctimespec.tv_sec, packed.st_ctimespec.tv_nsec) == (0, 999_999_999)


def bare_fuse(adapter, fs):
    """The adapter's FUSE class without mounting: its request methods only."""
    fuse = object.__new__(adapter.FUSE)
    fuse._fs = fs
    fuse._handles = {}
    fuse._listings = {}
    fuse._listings_version = None
    return fuse


def test_getattr_fills_libfuses_buffer(adapter, sample_fs):
    buffer = adapter.fusepy.c_stat()
    fuse = bare_fuse(adapter, sample_fs)
    assert fuse.getattr(b"/bin/tool", adapter.ctypes.pointer(buffer)) == 0
    st = sample_fs.lstat("/bin/tool")
    assert (buffer.st_ino, buffer.st_mode, buffer.st_size) == (st.st_ino, st.st_mode, st.st_size)
    assert fuse.getattr(b"/missing", adapter.ctypes.pointer(buffer)) == -errno.ENOENT


def test_fast_paths_log_bugs_and_answer_eio(adapter, caplog):
    fuse = bare_fuse(adapter, Exploding(ValueError("bug")))
    buffer = adapter.fusepy.c_stat()
    with caplog.at_level(logging.ERROR, logger="layerfs.fuse"):
        assert fuse.getattr(b"/a", adapter.ctypes.pointer(buffer)) == -errno.EIO
    assert any("bug" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


def test_readdir_gives_type_and_inode(adapter, sample_fs):
    fuse = bare_fuse(adapter, sample_fs)
    listed = []

    def filler(buf, name, st, offset):
        listed.append((name, st and (st.st_mode, st.st_ino)))
        return 0

    assert fuse.readdir(b"/bin", None, filler, 0, None) == 0
    assert listed[:2] == [(b".", None), (b"..", None)]
    assert sorted(listed[2:]) == sorted(
        (name.encode(), (sample_fs.lstat(f"/bin/{name}").st_mode, sample_fs.lstat(f"/bin/{name}").st_ino))
        for name in sample_fs.listdir("/bin"))
    assert fuse.readdir(b"/etc/passwd", None, filler, 0, None) == -errno.ENOTDIR


def test_paths_codec_round_trips_undecodable_bytes(adapter):
    raw = b"caf\xe9/\xff"
    assert raw.decode(adapter.PATH_ENCODING).encode(adapter.PATH_ENCODING) == raw
    assert raw.decode(adapter.PATH_ENCODING) == os.fsdecode(raw)


# -- options -------------------------------------------------------------

def test_options_are_parsed_and_forced():
    parsed = layerfs_mount.parse_options(["ro,allow_other", "attr_timeout=5", ""])
    assert parsed == {"ro": True, "allow_other": True, "attr_timeout": "5"}
    options = layerfs_mount.mount_options(readonly=False, user_options={"nodev": False})
    assert options["nodev"] is True and options["nosuid"] is True
    assert options["fsname"] == "layerfs" and options["subtype"] == "layerfs"


def test_caching_depends_on_writability():
    readonly = layerfs_mount.mount_options(True, {})
    writable = layerfs_mount.mount_options(False, {})
    assert readonly["kernel_cache"] and readonly["ro"]
    assert int(readonly["attr_timeout"]) > 0
    assert "kernel_cache" not in writable and "ro" not in writable
    for key in ("entry_timeout", "attr_timeout", "negative_timeout"):
        assert writable[key] == "0"
    assert layerfs_mount.mount_options(True, {"attr_timeout": "1"})["attr_timeout"] == "1"


@pytest.mark.parametrize("option", ["dev", "suid", "rw,suid"])
def test_refused_options(option):
    with pytest.raises(MountError) as caught:
        layerfs_mount.parse_options([option])
    assert caught.value.errno == errno.EINVAL


def test_mountinfo_escapes():
    assert layerfs_mount.unescape_mountinfo(r"/mnt/a\040b\134c") == "/mnt/a b\\c"


def test_missing_device_is_a_mount_error(tmp_path):
    with pytest.raises(MountError) as caught:
        layerfs_mount.check_device(str(tmp_path / "fuse"))
    assert caught.value.errno == errno.ENODEV
    assert "fuse" in str(caught.value)


def test_missing_libfuse_is_a_mount_error(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "fuse":
            raise OSError("Unable to find libfuse")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    with pytest.raises(MountError) as caught:
        layerfs_mount.load_fuse()
    assert caught.value.errno == errno.ENOPKG
    assert "libfuse" in str(caught.value)


@pytest.mark.parametrize("name", ["system.posix_acl_access", "system.posix_acl_default"])
def test_acl_xattrs_are_refused_so_callers_chmod(adapter, sample_fs, name):
    # Stored as plain xattrs they would "succeed" and leave the mode alone
    # (cp -a made 0600 files that way); ENOTSUP makes cp and tar chmod.
    operations = adapter.Operations(sample_fs)
    for call in (lambda: operations("setxattr", "/etc/passwd", name, b"\2\0\0\0", 0),
                 lambda: operations("removexattr", "/etc/passwd", name)):
        with pytest.raises(OSError) as caught:
            call()
        assert caught.value.errno == errno.ENOTSUP


def test_utimens_omit_and_now(adapter):
    calls = []

    class Recording:
        readonly = False

        def lstat(self, path):
            return os.stat_result((0o100644, 1, 0, 1, 0, 0, 0, 0, 0, 0,
                                   0, 0, 0, 111, 222, 0))

        def utime(self, path, ns, follow_symlinks):
            calls.append(ns)

    operations = adapter.Operations(Recording())
    operations("utimens", "/f", (adapter.UTIME_OMIT, 5))
    operations("utimens", "/f", (7, adapter.UTIME_OMIT))
    assert calls == [(111, 5), (7, 222)]
    operations("utimens", "/f", (adapter.UTIME_NOW, 9))
    assert calls[-1][1] == 9 and calls[-1][0] > 10**18
    assert adapter.Operations.flag_utime_omit_ok == 1
