"""A writable mount used by other users, as a container's root is.

Mounted as a container runtime would (``allow_other``, and
``default_permissions`` so that the kernel checks permissions), by a daemon
started under ``umask 077``; processes then run as another uid and gid
(``setpriv``, or ``chroot --userspec``) and create, change and remove their
own files.  Owners and modes must be theirs, exactly as on a local
filesystem, and survive a remount.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile

import pytest

from layerfs import mount as layerfs_mount
from mount_helpers import force_unmount, requires_fuse

pytestmark = [pytest.mark.mount, requires_fuse]

USER, GROUP = 4321, 4322            # no such user on the host: ids alone
SETGID_GROUP = 55
BUSYBOX = "/bin/busybox"


def _add(tar, name, kind=tarfile.REGTYPE, data=b"", **fields):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mtime = 1_600_000_000
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def write_image(path: str, with_shell: bool = False) -> str:
    """A small root filesystem: a world-writable /tmp, a set-gid /shared, a
    home owned by the user, a root-owned file; with a busybox shell if asked."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "tmp", tarfile.DIRTYPE, mode=0o1777)
        _add(tar, "shared", tarfile.DIRTYPE, mode=0o2777, gid=SETGID_GROUP)
        _add(tar, "home", tarfile.DIRTYPE, mode=0o755)
        _add(tar, "home/user", tarfile.DIRTYPE, mode=0o755, uid=USER, gid=GROUP)
        _add(tar, "home/user/lower.txt", data=b"mine", mode=0o644, uid=USER, gid=GROUP)
        _add(tar, "etc", tarfile.DIRTYPE, mode=0o755)
        _add(tar, "etc/root-only", data=b"root", mode=0o644)
        if with_shell:
            with open(BUSYBOX, "rb") as stream:
                _add(tar, "bin", tarfile.DIRTYPE, mode=0o755)
                _add(tar, "bin/busybox", data=stream.read(), mode=0o755)
            for tool in ("sh", "mkdir", "chmod", "stat", "ls", "touch", "rm", "id"):
                _add(tar, f"bin/{tool}", tarfile.SYMTYPE, linkname="busybox", mode=0o777)
    return path


@pytest.fixture
def open_mountpoint():
    """A mount point other users can reach (pytest's tmp_path is 0700)."""
    directory = tempfile.mkdtemp(prefix="layerfs-users-")
    os.chmod(directory, 0o755)
    mountpoint = os.path.join(directory, "mnt")
    os.mkdir(mountpoint)
    yield mountpoint
    force_unmount(mountpoint)
    shutil.rmtree(directory)


def mount_as_container_root(image: str, upper: str, mountpoint: str) -> None:
    """Mounted by a daemon whose own umask is 077: it must not matter."""
    old = os.umask(0o077)
    try:
        layerfs_mount.mount([image], mountpoint, upper=upper,
                            options=["allow_other", "default_permissions"])
    finally:
        os.umask(old)


def as_user(script: str, cwd: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["setpriv", f"--reuid={USER}", f"--regid={GROUP}", "--clear-groups",
                             "sh", "-c", script], cwd=cwd, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def owner_and_mode(path: str) -> tuple:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


@pytest.fixture
def container(tmp_path, open_mountpoint):
    image = write_image(str(tmp_path / "image.tar"))
    upper = str(tmp_path / "upper")
    mount_as_container_root(image, upper, open_mountpoint)
    return image, upper, open_mountpoint


def test_entries_belong_to_their_creator_with_the_mode_asked(container):
    image, upper, mnt = container
    as_user("umask 0; mkdir -m 0777 tmp/dir && touch tmp/file && mkfifo -m 0660 tmp/fifo"
            " && ln -s file tmp/link && umask 027 && mkdir tmp/masked && touch tmp/masked/f",
            cwd=mnt)
    expected = {"tmp/dir": (USER, GROUP, 0o777), "tmp/file": (USER, GROUP, 0o666),
                "tmp/fifo": (USER, GROUP, 0o660), "tmp/link": (USER, GROUP, 0o777),
                "tmp/masked": (USER, GROUP, 0o750), "tmp/masked/f": (USER, GROUP, 0o640)}
    assert {path: owner_and_mode(f"{mnt}/{path}") for path in expected} == expected
    layerfs_mount.umount(mnt)
    mount_as_container_root(image, upper, mnt)                  # kept across a remount
    assert {path: owner_and_mode(f"{mnt}/{path}") for path in expected} == expected


def test_a_user_changes_and_removes_its_own_files_only(container):
    _, _, mnt = container
    as_user("umask 022; mkdir tmp/own && echo data > tmp/own/f && chmod 0700 tmp/own"
            " && chmod 0600 tmp/own/f && chgrp {g} tmp/own/f && touch -d @1234567890 tmp/own/f"
            " && chmod 0600 home/user/lower.txt && rm tmp/own/f && touch tmp/own/g"
            .format(g=GROUP), cwd=mnt)
    assert owner_and_mode(f"{mnt}/tmp/own") == (USER, GROUP, 0o700)
    assert owner_and_mode(f"{mnt}/home/user/lower.txt") == (USER, GROUP, 0o600)
    assert sorted(os.listdir(f"{mnt}/tmp/own")) == ["g"]
    refused = as_user("chmod 0777 etc/root-only", cwd=mnt, check=False)
    assert refused.returncode != 0 and "Operation not permitted" in refused.stderr
    refused = as_user("echo x > etc/root-only", cwd=mnt, check=False)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr
    refused = as_user("rm -f etc/root-only", cwd=mnt, check=False)
    assert refused.returncode != 0 and os.path.exists(f"{mnt}/etc/root-only")
    st = os.stat(f"{mnt}/tmp/own/g")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (USER, 0o644)


def test_set_group_id_directories_give_their_group(container):
    _, _, mnt = container
    as_user("umask 0; mkdir shared/sub && touch shared/file && mkdir shared/sub/deeper", cwd=mnt)
    assert owner_and_mode(f"{mnt}/shared/file") == (USER, SETGID_GROUP, 0o666)
    assert owner_and_mode(f"{mnt}/shared/sub") == (USER, SETGID_GROUP, 0o2777)
    assert owner_and_mode(f"{mnt}/shared/sub/deeper") == (USER, SETGID_GROUP, 0o2777)


@pytest.mark.skipif(not os.path.exists(BUSYBOX) and os.environ.get("CI") != "true",
                    reason="busybox-static is not installed")
def test_chroot_into_the_mount_and_work_as_another_user(tmp_path, open_mountpoint):
    """The _apt case: a user inside the container's root makes a directory
    and changes its mode."""
    image = write_image(str(tmp_path / "image.tar"), with_shell=True)
    mount_as_container_root(image, str(tmp_path / "upper"), open_mountpoint)
    result = subprocess.run(
        ["chroot", f"--userspec={USER}:{GROUP}", f"--groups={GROUP}", open_mountpoint,
         "/bin/sh", "-c", "umask 022 && mkdir /tmp/partial && chmod 0700 /tmp/partial"
                          " && touch /tmp/partial/list && stat -c '%u %g %a' /tmp/partial"
                          " /tmp/partial/list && id -u"],
        capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == [f"{USER} {GROUP} 700", f"{USER} {GROUP} 644",
                                            str(USER)]
    assert owner_and_mode(f"{open_mountpoint}/tmp/partial") == (USER, GROUP, 0o700)
