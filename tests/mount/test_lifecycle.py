"""The daemon's life: umount returns once it has flushed and exited,
SIGTERM unmounts and flushes, one server per mount point."""

from __future__ import annotations

import errno
import os
import signal
import stat

import pytest

import layerfs
from layerfs import fuse as adapter
from layerfs import mount as layerfs_mount
from layerfs.errors import MountError
from mount_helpers import is_mounted, requires_fuse, requires_upper, wait_until

pytestmark = [pytest.mark.mount, requires_fuse]


def process_gone(pid: int) -> bool:
    """No such process, or only its zombie is left."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as info:
            return info.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.fixture
def upper_dir(tmp_path):
    return str(tmp_path / "upper")


@pytest.fixture
def slow_shutdown(monkeypatch, tmp_path):
    """Make the daemons forked after this (they inherit the patch) block in
    shutdown until the test writes to a FIFO, then leave a marker file once
    the filesystem is closed."""
    gate = str(tmp_path / "gate")
    marker = str(tmp_path / "closed")
    os.mkfifo(gate)
    original = adapter.Operations.shutdown

    def shutdown(self):
        if self._closed:                      # it is called twice: destroy, then serve
            return
        with open(gate, "rb") as fifo:        # blocks until the test opens it
            fifo.read()
        original(self)
        with open(marker, "wb"):
            pass

    monkeypatch.setattr(adapter.Operations, "shutdown", shutdown)

    def release():
        with open(gate, "wb") as fifo:
            fifo.write(b"go")
    return release, marker


def test_server_pid_names_the_daemon(sample_layers, mountpoint):
    assert layerfs_mount.server_pid(mountpoint) is None
    layerfs_mount.mount(sample_layers, mountpoint)
    pid = layerfs_mount.server_pid(mountpoint)
    assert pid is not None and pid != os.getpid()
    assert os.path.exists(layerfs_mount.lock_path(mountpoint))
    layerfs_mount.umount(mountpoint)
    assert layerfs_mount.server_pid(mountpoint) is None
    assert not os.path.exists(layerfs_mount.lock_path(mountpoint))
    assert wait_until(lambda: process_gone(pid))


def test_a_thread_server_holds_the_lock_too(sample_fs, thread_mount, mountpoint):
    server = thread_mount(sample_fs)
    assert layerfs_mount.server_pid(mountpoint) == os.getpid()
    server.stop()
    assert layerfs_mount.server_pid(mountpoint) is None


def test_servers_in_threads_leave_the_signal_handlers_alone(sample_layers, tmp_path,
                                                            thread_mount, mountpoint):
    # One low-level server per thread, a read-only and a writable one at once:
    # neither installs libfuse's handlers (which would take the process's
    # SIGINT, SIGTERM and SIGHUP from Python), both serve, both stop.
    from mount_helpers import ThreadMount, force_unmount

    def caught() -> int:
        """The standard signals this process catches, as the kernel sees
        them (libfuse's handlers are C's, unknown to the signal module; the
        C library's own real-time ones come and go)."""
        with open("/proc/self/status", encoding="ascii") as status:
            line = next(line for line in status if line.startswith("SigCgt:"))
        return int(line.split()[1], 16) & 0x7FFFFFFF

    before = caught()
    other = tmp_path / "other"
    other.mkdir()
    readonly = thread_mount(layerfs.open(sample_layers))
    writable = ThreadMount(layerfs.open(sample_layers, upper=str(tmp_path / "upper")),
                           str(other))
    try:
        assert caught() == before
        with open(f"{other}/made", "wb") as stream:
            stream.write(b"made")
        assert os.listdir(mountpoint) == [name for name in os.listdir(other)
                                          if name != "made"]
    finally:
        try:
            writable.stop()
        finally:
            force_unmount(str(other))
    readonly.stop()
    assert caught() == before


@requires_upper
def test_umount_returns_only_once_the_daemon_is_done(sample_layers, mountpoint, upper_dir,
                                                     slow_shutdown):
    release, marker = slow_shutdown
    layerfs_mount.mount(sample_layers, mountpoint, upper=upper_dir)
    pid = layerfs_mount.server_pid(mountpoint)
    with open(f"{mountpoint}/kept", "wb") as handle:
        handle.write(b"kept")
    # The daemon blocks in shutdown until released: umount must time out.
    with pytest.raises(MountError) as caught:
        layerfs_mount.umount(mountpoint, timeout=0.3)
    assert caught.value.errno == errno.ETIMEDOUT
    assert str(pid) in str(caught.value)
    assert not is_mounted(mountpoint)
    assert not os.path.exists(marker)
    release()
    # The mount is gone; wait for the server the way umount does.
    fd = os.open(layerfs_mount.lock_path(mountpoint), os.O_RDONLY)
    try:
        layerfs_mount._wait_for_server(fd, mountpoint, 30)
    finally:
        os.close(fd)
    assert os.path.exists(marker)
    with layerfs.open(sample_layers, upper=upper_dir) as fs:
        assert fs.read_bytes("/kept") == b"kept"


@requires_upper
def test_umount_waits_for_the_flush(sample_layers, mountpoint, upper_dir, slow_shutdown):
    release, marker = slow_shutdown
    layerfs_mount.mount(sample_layers, mountpoint, upper=upper_dir)
    pid = layerfs_mount.server_pid(mountpoint)
    release_early = os.fork()
    if release_early == 0:            # unblocks the daemon while umount waits
        try:
            release()
        finally:
            os._exit(0)
    try:
        layerfs_mount.umount(mountpoint, timeout=30)
    finally:
        os.waitpid(release_early, 0)
    assert os.path.exists(marker)
    assert wait_until(lambda: process_gone(pid))


@requires_upper
def test_sigterm_unmounts_and_flushes(sample_layers, mountpoint, upper_dir):
    layerfs_mount.mount(sample_layers, mountpoint, upper=upper_dir)
    pid = layerfs_mount.server_pid(mountpoint)
    with open(f"{mountpoint}/etc/passwd", "ab") as handle:
        handle.write(b"added\n")
    os.mkdir(f"{mountpoint}/made")
    os.kill(pid, signal.SIGTERM)
    assert wait_until(lambda: process_gone(pid))
    assert not is_mounted(mountpoint)
    assert layerfs_mount.server_pid(mountpoint) is None
    with layerfs.open(sample_layers, upper=upper_dir) as fs:
        assert fs.read_bytes("/etc/passwd").endswith(b"/bin/bash\nadded\n")
        assert stat.S_ISDIR(fs.lstat("/made").st_mode)


def test_a_second_server_for_the_same_mount_point_is_refused(sample_layers, mountpoint):
    holder = layerfs_mount.acquire_server_lock(os.path.abspath(mountpoint))
    try:
        with pytest.raises(MountError) as caught:
            layerfs_mount.mount(sample_layers, mountpoint)
        assert caught.value.errno == errno.EBUSY
        assert "still serves it" in str(caught.value)
        assert not is_mounted(mountpoint)
    finally:
        layerfs_mount.release_server_lock(os.path.abspath(mountpoint), holder)


def test_a_leftover_lock_file_is_ignored(sample_layers, mountpoint):
    path = layerfs_mount.lock_path(mountpoint)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="ascii") as stale:
        stale.write("999999\n")          # a server that died without cleaning up
    assert layerfs_mount.server_pid(mountpoint) is None
    layerfs_mount.mount(sample_layers, mountpoint)
    assert layerfs_mount.server_pid(mountpoint) not in (None, 999999)
    layerfs_mount.umount(mountpoint)
    assert not is_mounted(mountpoint)


def test_the_daemon_keeps_none_of_the_callers_descriptors(sample_layers, mountpoint):
    read_end, write_end = os.pipe()
    try:
        layerfs_mount.mount(sample_layers, mountpoint)
        os.close(write_end)
        write_end = None
        os.set_blocking(read_end, False)
        # EOF at once: no writer is left, so the daemon did not keep it
        # (a kept one would make this read raise BlockingIOError).
        assert os.read(read_end, 1) == b""
    finally:
        os.close(read_end)
        if write_end is not None:
            os.close(write_end)


def test_indexing_progress_reaches_the_caller_of_a_background_mount(sample_layers, mountpoint,
                                                                    tmp_path):
    seen = []
    layerfs_mount.mount(sample_layers, mountpoint, cache_dir=str(tmp_path / "fresh-cache"),
                        progress=lambda done, total: seen.append((done, total)))
    try:
        # What layerfs.open reports, relayed: (bytes done, bytes in all)
        # while each layer is indexed, ending with one done.
        assert seen, "no progress from the daemon"
        assert all(0 <= done <= total for done, total in seen)
        assert seen[-1][0] == seen[-1][1] > 0
    finally:
        layerfs_mount.umount(mountpoint)
