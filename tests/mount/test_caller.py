"""Creating requests through a writable mount are made as the calling
process: its ids, and its mode with its umask applied by the kernel, never
the daemon's umask (issue 10, items 1 and 2; the adapter's half is tested in
tests/unit/test_fusecore.py, the upper store's half here, end to end)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

from layerfs import mount as layerfs_mount
from mount_helpers import force_unmount, requires_fuse, requires_upper

pytestmark = [pytest.mark.mount, requires_fuse, requires_upper]

@pytest.fixture
def strict_daemon(sample_layers, mountpoint, tmp_path):
    """A writable mount whose daemon was started under umask 077."""
    old = os.umask(0o077)
    try:
        layerfs_mount.mount(sample_layers, mountpoint, upper=str(tmp_path / "upper"),
                            options=["allow_other"])
    finally:
        os.umask(old)
    return mountpoint


def run_shell(command: str, uid: int = 0, umask: int = 0):
    prefix = [] if uid == 0 else ["setpriv", f"--reuid={uid}", f"--regid={uid}",
                                  "--clear-groups"]
    return subprocess.run([*prefix, "sh", "-c", f"umask {umask:03o} && {command}"],
                          capture_output=True, text=True, timeout=30, check=True)


def test_mkdir_mode_is_the_callers_not_the_daemons(strict_daemon):
    run_shell(f"mkdir -m 0777 {strict_daemon}/open && mkdir {strict_daemon}/plain")
    assert os.stat(f"{strict_daemon}/open").st_mode & 0o7777 == 0o777
    assert os.stat(f"{strict_daemon}/plain").st_mode & 0o7777 == 0o777
    run_shell(f"mkdir {strict_daemon}/masked", umask=0o027)
    assert os.stat(f"{strict_daemon}/masked").st_mode & 0o7777 == 0o750


def test_created_file_mode_is_the_callers_not_the_daemons(strict_daemon):
    run_shell(f"touch {strict_daemon}/file")
    assert os.stat(f"{strict_daemon}/file").st_mode & 0o7777 == 0o666


@pytest.fixture
def reachable_daemon(sample_layers, tmp_path):
    """As strict_daemon, on a mount point other users can reach (pytest's
    tmp_path is inside a 0700 directory)."""
    directory = tempfile.mkdtemp(prefix="layerfs-caller-")
    os.chmod(directory, 0o755)
    mountpoint = os.path.join(directory, "mnt")
    os.mkdir(mountpoint)
    old = os.umask(0o077)
    try:
        layerfs_mount.mount(sample_layers, mountpoint, upper=str(tmp_path / "upper"),
                            options=["allow_other"])
    finally:
        os.umask(old)
    yield mountpoint
    force_unmount(mountpoint)
    shutil.rmtree(directory)


def test_entries_belong_to_the_calling_user(reachable_daemon):
    strict_daemon = reachable_daemon
    os.chmod(strict_daemon, 0o1777)
    user = 65534
    run_shell(f"mkdir {strict_daemon}/d && touch {strict_daemon}/f && "
              f"ln -s f {strict_daemon}/l && mkfifo {strict_daemon}/p", uid=user)
    for name in ("d", "f", "l", "p"):
        st = os.lstat(f"{strict_daemon}/{name}")
        assert (st.st_uid, st.st_gid) == (user, user), name
