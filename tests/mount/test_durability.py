"""One writer per upper, and acknowledged means durable, through a real mount.

The mount daemon is SIGKILLed after operations that returned success
(without fsync): reopening the upper finds every one of them, and the
killed daemon's lock is taken over.  While it runs, a second mount of the
same upper is refused, naming it; ``diff`` reads beside it.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import time

import pytest

import layerfs
from layerfs import mount as layerfs_mount
from layerfs.errors import MountError
from mount_helpers import force_unmount, requires_fuse, requires_upper

pytestmark = [pytest.mark.mount, requires_fuse, requires_upper]


def view(root: str) -> dict:
    """Everything a reopen must give back, read through *root* (a mount)
    or through the library (a FileSystem)."""
    out = {}
    fs = root if isinstance(root, layerfs.FileSystem) else None
    walk = fs.walk("/") if fs else os.walk(root)
    for top, dirs, files in walk:
        for name in dirs + files:
            path = os.path.join(top, name)
            relative = "/" + os.path.relpath(path, "/" if fs else root)
            st = fs.lstat(path) if fs else os.lstat(path)
            data = None
            if stat.S_ISREG(st.st_mode):
                data = fs.read_bytes(path) if fs else open(path, "rb").read()
            out[relative] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                             st.st_ctime_ns, data)
    return out


def daemon_pid(upper: str) -> int:
    with open(os.path.join(upper, "lock"), encoding="utf-8") as stream:
        return json.load(stream)["pid"]


def test_a_killed_daemon_loses_nothing_acknowledged_and_its_lock_is_taken_over(
        sample_layers, tmp_path):
    upper = str(tmp_path / "upper")
    mnt, other = str(tmp_path / "mnt"), str(tmp_path / "other")
    os.mkdir(mnt)
    os.mkdir(other)
    try:
        layerfs_mount.mount(sample_layers, mnt, upper=upper)
        pid = daemon_pid(upper)
        for number in range(200):               # many records: the journal's business
            with open(f"{mnt}/file{number}", "wb") as stream:
                stream.write(b"%d" % number)
            os.chmod(f"{mnt}/file{number}", 0o600 + number % 8)
        os.chmod(f"{mnt}/etc/passwd", 0o600)     # a lower file: a metacopy record
        os.utime(f"{mnt}/etc/passwd", ns=(1, 2))
        os.mkdir(f"{mnt}/dir")
        os.rename(f"{mnt}/file0", f"{mnt}/dir/moved")
        os.unlink(f"{mnt}/file1")
        os.setxattr(f"{mnt}/file2", "user.k", b"v")
        expected = view(mnt)
        with pytest.raises(MountError, match=f"in use by pid {pid}"):
            layerfs_mount.mount(sample_layers, other, upper=upper)
        with layerfs.open(sample_layers, upper=upper, readonly=True) as reader:
            assert view(reader) == expected
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        force_unmount(mnt)
    with layerfs.open(sample_layers, upper=upper) as fs:        # the lock is free again
        assert daemon_pid(upper) == os.getpid()
        assert view(fs) == expected
        assert fs.getxattr("/file2", "user.k") == b"v"
    assert os.path.getsize(os.path.join(upper, "lock")) == 0    # a clean close names nobody


def test_commit_is_refused_while_mounted_and_works_once_umount_returns(sample_layers,
                                                                      tmp_path):
    from mount_helpers import run_cli
    upper, mnt = str(tmp_path / "upper"), str(tmp_path / "mnt")
    os.mkdir(mnt)
    try:
        layerfs_mount.mount(sample_layers, mnt, upper=upper)
        with open(f"{mnt}/new", "wb") as stream:
            stream.write(b"n")
        layers = [argument for path in sample_layers for argument in ("--layer", path)]
        refused = run_cli("commit", *layers, upper, str(tmp_path / "out"))
        assert refused.returncode == 1 and "unmount it before committing" in refused.stderr
        assert f"pid {daemon_pid(upper)}" in refused.stderr
        layerfs_mount.umount(mnt)
        committed = run_cli("commit", *layers, upper, str(tmp_path / "out"))
        assert committed.returncode == 0, committed.stderr
    finally:
        force_unmount(mnt)
    with layerfs.open(str(tmp_path / "out")) as fs:
        assert fs.read_bytes("/new") == b"n"
