"""A read-only mount answers every read exactly like the facade."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import stat
import subprocess
import tarfile

import pytest

from layerfs import mount as layerfs_mount
from mount_helpers import ABSOLUTE_TARGET, BIG, NON_UTF8_NAME, requires_fuse

pytestmark = [pytest.mark.mount, requires_fuse]


def host(mnt: str, path: str) -> str:
    return mnt + path if path != "/" else mnt


def facade_paths(fs) -> set:
    return set(fs.tree.nodes)


def mounted_paths(mnt: str) -> set:
    paths = {"/"}
    for top, dirs, files in os.walk(mnt):
        for name in dirs + files:
            paths.add(os.path.join(top, name)[len(mnt):])
    return paths


# -- stat, readdir, readlink, read ---------------------------------------

def test_every_path_has_the_facade_metadata(mounted, sample_fs):
    assert mounted_paths(mounted) == facade_paths(sample_fs)
    for path in facade_paths(sample_fs):
        expected = sample_fs.lstat(path)
        actual = os.lstat(host(mounted, path))
        for field in ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size",
                      "st_mtime_ns", "st_rdev"):
            assert getattr(actual, field) == getattr(expected, field), (path, field)


def test_whiteout_and_opaque_are_applied(mounted):
    assert not os.path.lexists(f"{mounted}/etc/shadow")
    assert os.listdir(f"{mounted}/usr/lib") == ["new"]
    with open(f"{mounted}/etc/passwd", "rb") as handle:
        assert handle.read() == b"root:x:0:0::/root:/bin/bash\n"


def test_contents_match(mounted, sample_fs):
    for path, node in sample_fs.tree.nodes.items():
        if stat.S_ISREG(node.mode):
            with open(host(mounted, path), "rb") as handle:
                assert handle.read() == sample_fs.read_bytes(path), path


def test_reads_at_any_offset(mounted):
    with open(f"{mounted}/bin/tool", "rb", buffering=0) as handle:
        for offset, size in [(0, 1), (4095, 2), (131_071, 70_000), (299_990, 100),
                             (300_000, 10), (400_000, 10)]:
            assert os.pread(handle.fileno(), size, offset) == BIG[offset:offset + size]


def readdir_types(path: str) -> dict:
    """name -> (d_type, d_ino) straight from readdir(3), which os.scandir
    hides behind a stat fallback."""
    class Dirent(ctypes.Structure):
        _fields_ = [("d_ino", ctypes.c_uint64), ("d_off", ctypes.c_int64),
                    ("d_reclen", ctypes.c_ushort), ("d_type", ctypes.c_ubyte),
                    ("d_name", ctypes.c_char * 256)]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.readdir64.restype = ctypes.POINTER(Dirent)
    libc.readdir64.argtypes = [ctypes.c_void_p]
    libc.closedir.argtypes = [ctypes.c_void_p]
    directory = libc.opendir(os.fsencode(path))
    assert directory, os.strerror(ctypes.get_errno())
    found = {}
    try:
        while True:
            entry = libc.readdir64(directory)
            if not entry:
                break
            found[os.fsdecode(entry.contents.d_name)] = (entry.contents.d_type,
                                                        entry.contents.d_ino)
    finally:
        libc.closedir(directory)
    return found


def test_readdir_gives_types_and_inodes(mounted, sample_fs):
    d_types = {stat.S_IFREG: 8, stat.S_IFDIR: 4, stat.S_IFLNK: 10, stat.S_IFCHR: 2,
               stat.S_IFBLK: 6, stat.S_IFIFO: 1}
    for path, node in sample_fs.tree.nodes.items():
        if node.children is None:
            continue
        found = readdir_types(host(mounted, path))
        assert set(found) == {".", ".."} | set(node.children), path
        for name, child in node.children.items():
            assert found[name] == (d_types[stat.S_IFMT(child.mode)], child.ino), (path, name)


def test_readlink(mounted, sample_fs):
    assert os.readlink(f"{mounted}/lib/libx.so") == "libx.so.1"
    assert os.readlink(f"{mounted}/absolute") == ABSOLUTE_TARGET
    assert os.readlink(f"{mounted}/dangling") == "nowhere"
    assert os.readlink(f"{mounted}/lib/libx.so") == sample_fs.readlink("/lib/libx.so")


def test_hardlinks_share_the_inode(mounted, sample_fs):
    tool = os.stat(f"{mounted}/bin/tool")
    link = os.stat(f"{mounted}/bin/tool-link")
    assert tool.st_ino == link.st_ino == sample_fs.stat("/bin/tool").st_ino
    assert tool.st_nlink == link.st_nlink == 2
    assert os.path.samefile(f"{mounted}/bin/tool", f"{mounted}/bin/tool-link")


def test_non_utf8_names_cross_the_mount(mounted):
    assert b"caf\xe9" in os.listdir(os.fsencode(mounted))
    with open(os.fsencode(mounted) + b"/caf\xe9", "rb") as handle:
        assert handle.read() == b"latin-1 name"
    assert os.path.exists(f"{mounted}/{NON_UTF8_NAME}")


def test_missing_paths_are_enoent(mounted):
    with pytest.raises(FileNotFoundError):
        os.stat(f"{mounted}/no/such")
    with pytest.raises(NotADirectoryError):
        os.listdir(f"{mounted}/etc/passwd")


# -- xattrs, statfs ------------------------------------------------------

def test_xattrs(mounted, sample_fs):
    path = f"{mounted}/attrs"
    assert sorted(os.listxattr(path)) == sorted(sample_fs.listxattr("/attrs"))
    assert sorted(os.listxattr(path)) == ["user.comment", "user.other"]
    assert os.getxattr(path, "user.comment") == b"hello"
    assert os.getxattr(path, "user.other") == sample_fs.getxattr("/attrs", "user.other")
    assert os.listxattr(f"{mounted}/etc/passwd") == []
    with pytest.raises(OSError) as caught:
        os.getxattr(path, "user.missing")
    assert caught.value.errno == errno.ENODATA


def test_xattrs_of_a_symlink_itself(mounted):
    assert os.listxattr(f"{mounted}/lib/libx.so", follow_symlinks=False) == []


def test_statfs(mounted, sample_fs):
    result = os.statvfs(mounted)
    expected = sample_fs.statvfs()
    for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                  "f_ffree", "f_namemax"):
        assert getattr(result, field) == getattr(expected, field), field
    assert result.f_flag & os.ST_RDONLY
    assert result.f_flag & os.ST_NODEV
    assert result.f_flag & os.ST_NOSUID


# -- what a read-only mount refuses --------------------------------------

@pytest.mark.parametrize("change", [
    lambda m: open(f"{m}/new", "wb"),
    lambda m: open(f"{m}/etc/passwd", "r+b"),
    lambda m: os.mkdir(f"{m}/dir"),
    lambda m: os.unlink(f"{m}/etc/passwd"),
    lambda m: os.rename(f"{m}/etc/passwd", f"{m}/etc/p"),
    lambda m: os.chmod(f"{m}/etc/passwd", 0o600),
    lambda m: os.setxattr(f"{m}/attrs", "user.new", b"x"),
    lambda m: os.removexattr(f"{m}/attrs", "user.comment"),
    lambda m: os.symlink("x", f"{m}/s"),
])
def test_writes_are_erofs(mounted, change):
    with pytest.raises(OSError) as caught:
        change(mounted)
    assert caught.value.errno == errno.EROFS


def test_device_nodes_never_open_host_devices(mounted):
    st = os.stat(f"{mounted}/dev/null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    with pytest.raises(PermissionError):
        open(f"{mounted}/dev/null", "rb")
    assert stat.S_ISBLK(os.stat(f"{mounted}/dev/sda").st_mode)
    assert stat.S_ISFIFO(os.stat(f"{mounted}/run/fifo").st_mode)


def test_setuid_bit_is_shown_but_mount_is_nosuid(mounted):
    assert os.stat(f"{mounted}/bin/suid").st_mode & 0o7777 == 0o4755
    assert "nosuid" in mount_options(mounted)


def mount_options(mnt: str) -> list:
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        for line in info:
            fields = line.split()
            if fields[4] == mnt:
                return fields[5].split(",")
    raise AssertionError(f"{mnt} is not mounted")


def test_mount_is_registered_as_layerfs(mounted):
    assert layerfs_mount.mount_type(mounted) == "fuse.layerfs"
    options = mount_options(mounted)
    assert {"ro", "nodev", "nosuid"} <= set(options)


# -- ordinary tools ------------------------------------------------------

def test_find_lists_the_view(mounted, sample_fs):
    listing = subprocess.run(["find", ".", "-printf", "%y %P\\0"], cwd=mounted, check=True,
                             capture_output=True).stdout
    found = {}
    for record in listing.split(b"\0")[:-1]:
        kind, _, name = record.partition(b" ")
        found["/" + os.fsdecode(name) if name else "/"] = kind.decode()
    kinds = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFCHR: "c",
             stat.S_IFBLK: "b", stat.S_IFIFO: "p"}
    assert found == {path: kinds[stat.S_IFMT(node.mode)]
                     for path, node in sample_fs.tree.nodes.items()}


def test_sha256sum(mounted):
    output = subprocess.run(["sha256sum", "bin/tool", "etc/passwd"], cwd=mounted, check=True,
                            capture_output=True, text=True).stdout.split()
    assert output[0] == hashlib.sha256(BIG).hexdigest()
    assert output[2] == hashlib.sha256(b"root:x:0:0::/root:/bin/bash\n").hexdigest()


def test_tar_c_archives_the_view(mounted, sample_fs, tmp_path):
    archive = tmp_path / "out.tar"
    subprocess.run(["tar", "-c", "-f", str(archive), "-C", mounted, "."], check=True,
                   capture_output=True)
    with tarfile.open(archive, encoding="utf-8", errors="surrogateescape") as tar:
        members = {"/" + os.path.normpath(m.name).lstrip("./") if m.name not in (".", "./")
                   else "/": m for m in tar.getmembers()}
        assert set(members) == set(sample_fs.tree.nodes)
        assert members["/bin/tool-link"].islnk() or members["/bin/tool"].islnk()
        tool = members["/bin/tool"] if members["/bin/tool"].isfile() else members["/bin/tool-link"]
        assert tar.extractfile(tool).read() == BIG


def test_cp_a_copies_the_view_out(mounted, sample_fs, tmp_path):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", f"{mounted}/.", str(copy)], check=True, capture_output=True)
    copy = str(copy)
    assert mounted_paths(copy) == facade_paths(sample_fs)
    for path, node in sample_fs.tree.nodes.items():
        st = os.lstat(host(copy, path))
        assert stat.S_IFMT(st.st_mode) == stat.S_IFMT(node.mode), path
        assert stat.S_IMODE(st.st_mode) == stat.S_IMODE(node.mode) or stat.S_ISLNK(st.st_mode)
        assert (st.st_uid, st.st_gid) == (node.uid, node.gid), path
        if stat.S_ISREG(node.mode):
            with open(host(copy, path), "rb") as handle:
                assert handle.read() == sample_fs.read_bytes(path)
        if stat.S_ISLNK(node.mode):
            assert os.readlink(host(copy, path)) == node.target
    assert os.path.samefile(f"{copy}/bin/tool", f"{copy}/bin/tool-link")
    assert os.getxattr(f"{copy}/attrs", "user.comment") == b"hello"


def test_the_kernel_keeps_listings_and_pages_of_a_read_only_mount(sample_layers, mountpoint,
                                                                   tmp_path):
    # The low-level server answers opendir and open with ENOSYS: the kernel
    # then caches listings and pages itself, so repeating them reaches the
    # daemon not at all (counted in libfuse's -o debug trace).
    from mount_helpers import stack, run_cli
    log = tmp_path / "trace.log"
    run_cli("mount", "--log", str(log), "-o", "debug", *stack(sample_layers), mountpoint,
            check=True)
    try:
        for _ in range(3):
            assert sorted(os.listdir(f"{mountpoint}/etc")) == ["passwd"]
            with open(f"{mountpoint}/bin/tool", "rb") as tool:
                assert tool.read() == BIG
    finally:
        run_cli("umount", mountpoint, check=True)
    text = log.read_text()
    assert text.count("opcode: READDIRPLUS") + text.count("opcode: READDIR ") == 2   # data, end
    # One OPENDIR and one OPEN, each answered ENOSYS, then never again.
    assert text.count("opcode: OPENDIR ") == 1 and "opcode: RELEASEDIR" not in text
    assert text.count("opcode: OPEN ") == 1 and "opcode: RELEASE " not in text
    assert text.count("error: -38 (Function not implemented)") >= 2


def test_the_high_level_layer_still_serves_a_read_only_mount(sample_layers, mountpoint,
                                                             monkeypatch, sample_fs):
    # LAYERFS_FUSE_API=high: libfuse's high-level layer (READDIRPLUS in
    # offset mode, ENOSYS open), kept for comparison.
    from mount_helpers import stack, run_cli
    monkeypatch.setenv("LAYERFS_FUSE_API", "high")
    run_cli("mount", *stack(sample_layers), mountpoint, check=True)
    try:
        assert sorted(os.listdir(mountpoint)) == sorted(sample_fs.listdir("/"))
        st = os.lstat(f"{mountpoint}/bin/tool")
        assert (st.st_ino, st.st_size) == (sample_fs.lstat("/bin/tool").st_ino, len(BIG))
        with open(f"{mountpoint}/bin/tool", "rb") as tool:
            assert tool.read() == BIG
    finally:
        run_cli("umount", mountpoint, check=True)
