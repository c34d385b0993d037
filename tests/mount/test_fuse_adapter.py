"""The libfuse 3 binding's request methods, called directly (no mount)."""

from __future__ import annotations

import builtins
import errno
import logging
import os
import sys

import pytest

from layerfs.errors import MountError
from mount_helpers import requires_fuse

pytestmark = [pytest.mark.mount, requires_fuse]


@pytest.fixture
def adapter():
    from layerfs import fuse as adapter
    return adapter


def test_libfuse_3_is_loaded(adapter):
    assert adapter.binding.fuse_version_major == 3
    assert "fuse3" in adapter.binding._libfuse._name


def test_every_xattr_operation_is_defined(adapter):
    # An undefined one would answer ENOSYS and the kernel would stop asking.
    for name in ("getxattr", "setxattr", "listxattr", "removexattr"):
        assert getattr(adapter.Operations, name) is not getattr(adapter.binding.Operations, name)


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


@pytest.mark.parametrize("path", ["/bin/tool", "/etc", "/lib/libx.so", "/dev/sda"])
def test_packed_stat_is_the_bindings_struct(adapter, sample_fs, path):
    from layerfs.fusecore import stat_to_attrs
    st = sample_fs.lstat(path)
    packed = adapter.c_stat.from_buffer_copy(adapter.PACKER.node(sample_fs.node(path, False)))
    expected = adapter.c_stat()
    adapter.binding.set_st_attrs(expected, stat_to_attrs(st), use_ns=True)
    expected.st_dev = 0
    assert bytes(packed) == bytes(expected)


def bare_fuse(adapter, fs, plus=False):
    """The binding's FUSE class without mounting: its request methods only."""
    fuse = object.__new__(adapter.FUSE)
    fuse._fs = fs
    fuse._handles = {}
    fuse._readonly = fs.readonly
    fuse._plus = plus
    fuse._listings = adapter.Listings(fs)
    return fuse


def test_getattr_fills_libfuses_buffer(adapter, sample_fs):
    buffer = adapter.c_stat()
    fuse = bare_fuse(adapter, sample_fs)
    pointer = adapter.ctypes.pointer(buffer)
    assert fuse._wrapper(fuse.getattr_fuse_3, b"/bin/tool", pointer, None) == 0
    st = sample_fs.lstat("/bin/tool")
    assert (buffer.st_ino, buffer.st_mode, buffer.st_size) == (st.st_ino, st.st_mode, st.st_size)
    assert fuse._wrapper(fuse.getattr_fuse_3, b"/missing", pointer, None) == -errno.ENOENT


class Exploding:
    readonly = True

    def node(self, path, follow_symlinks=True):
        raise ValueError("bug")


def test_the_boundary_logs_bugs_and_answers_eio(adapter, caplog):
    fuse = bare_fuse(adapter, Exploding())
    buffer = adapter.c_stat()
    with caplog.at_level(logging.ERROR, logger="layerfs.fuse"):
        assert fuse._wrapper(fuse.getattr_fuse_3, b"/a", adapter.ctypes.pointer(buffer),
                             None) == -errno.EIO
    assert any("bug" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


def expected_listing(fs, path):
    return sorted((name.encode("utf-8", "surrogateescape"),
                   (fs.lstat(f"{path}/{name}").st_mode, fs.lstat(f"{path}/{name}").st_ino))
                  for name in fs.listdir(path))


def test_plain_readdir_gives_type_and_inode_at_offset_zero(adapter, sample_fs):
    fuse = bare_fuse(adapter, sample_fs)
    listed = []

    def filler(buf, name, st, offset, flags):
        listed.append((name, st and (st.st_mode, st.st_ino), offset, flags))
        return 0

    assert fuse._wrapper(fuse.readdir_fuse_3, b"/bin", None, filler, 0, None, 0) == 0
    assert listed[:2] == [(b".", None, 0, 0), (b"..", None, 0, 0)]
    assert {(o, f) for _, _, o, f in listed} == {(0, 0)}
    assert sorted((n, s) for n, s, _, _ in listed[2:]) == expected_listing(sample_fs, "/bin")
    assert fuse._wrapper(fuse.readdir_fuse_3, b"/etc/passwd", None, filler, 0, None, 0) \
        == -errno.ENOTDIR


def test_readdirplus_gives_full_stats_with_offsets_and_resumes(adapter, sample_fs):
    # libfuse 3.14 passes READDIRPLUS attributes only in offset mode.
    fuse = bare_fuse(adapter, sample_fs, plus=True)
    listed = []
    room = [3]

    def filler(buf, name, st, offset, flags):
        if room[0] == 0:
            return 1                      # the kernel's buffer is full
        room[0] -= 1
        listed.append((name, st and adapter.c_stat.from_buffer_copy(st), offset, flags))
        return 0

    offset = 0
    while True:
        before = len(listed)
        room[0] = 3
        assert fuse.readdir_fuse_3(b"/", None, filler, offset, None, 1) == 0
        if len(listed) == before:
            break
        offset = listed[-1][2]
    names = [name for name, _, _, _ in listed]
    assert names[:2] == [b".", b".."]
    assert sorted(names[2:]) == sorted(n.encode("utf-8", "surrogateescape")
                                       for n in sample_fs.listdir("/"))
    assert [offset for _, _, offset, _ in listed] == list(range(1, len(listed) + 1))
    for name, st, _offset, flags in listed[2:]:
        path = "/" + name.decode("utf-8", "surrogateescape")
        assert flags == adapter.FILL_DIR_PLUS
        expected = sample_fs.lstat(path)
        assert (st.st_ino, st.st_mode, st.st_size, st.st_mtimespec.tv_sec) == \
            (expected.st_ino, expected.st_mode, expected.st_size, int(expected.st_mtime))


def test_read_only_reads_arrive_without_a_handle(adapter, sample_fs):
    fuse = bare_fuse(adapter, sample_fs)
    buffer = adapter.ctypes.create_string_buffer(100)
    count = fuse._wrapper(fuse.read, b"/etc/passwd", buffer, 100, 5, None)
    assert buffer.raw[:count] == sample_fs.read_bytes("/etc/passwd")[5:]


def test_missing_libfuse_3_is_a_mount_error(adapter, monkeypatch):
    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "mfusepy":
            raise OSError("Unable to find libfuse")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "mfusepy")
    monkeypatch.setattr(builtins, "__import__", failing_import)
    with pytest.raises(MountError) as caught:
        adapter.load_binding()
    assert caught.value.errno == errno.ENOPKG
    assert "libfuse 3" in str(caught.value)


def read_with_buffer(adapter, fuse, path, size, offset, fip=None):
    """Call read_buf as libfuse does; returns (kind, bytes) and frees it."""
    pointer = adapter.ctypes.c_void_p()
    code = fuse._wrapper(fuse.read_buf, path, adapter.ctypes.pointer(pointer), size, offset, fip)
    if code:
        return code, None
    bufvec = adapter.fuse_bufvec.from_address(pointer.value)
    assert (bufvec.count, bufvec.idx, bufvec.off) == (1, 0, 0)
    buffer = bufvec.buf[0]
    try:
        if buffer.flags & 2:
            return "fd", os.pread(buffer.fd, buffer.size, buffer.pos)
        return "memory", adapter.ctypes.string_at(buffer.mem, buffer.size)
    finally:
        if not buffer.flags & 2:
            adapter._libc.free(adapter.ctypes.c_void_p(buffer.mem))
        adapter._libc.free(pointer)


def test_read_buf_hands_libfuse_the_layers_descriptor(adapter, sample_fs):
    fuse = bare_fuse(adapter, sample_fs)
    big = sample_fs.read_bytes("/bin/tool")
    assert read_with_buffer(adapter, fuse, b"/bin/tool", 4096, 1000) == ("fd", big[1000:5096])
    assert read_with_buffer(adapter, fuse, b"/bin/tool", 1 << 20, len(big) - 10) == \
        ("fd", big[-10:])
    assert read_with_buffer(adapter, fuse, b"/bin/tool", 100, len(big) + 5) == ("fd", b"")
    assert read_with_buffer(adapter, fuse, b"/missing", 10, 0) == (-errno.ENOENT, None)


def test_read_buf_of_upper_data_without_a_handle_copies_it(adapter, sample_layers, tmp_path):
    import layerfs
    with layerfs.open(sample_layers, upper=str(tmp_path / "upper")) as fs:
        with fs.open("/new", "wb") as out:
            out.write(b"upper bytes")
        fuse = bare_fuse(adapter, fs)
        fuse._readonly = True          # as if read by path, without a handle
        assert read_with_buffer(adapter, fuse, b"/new", 100, 6) == ("memory", b"bytes")
