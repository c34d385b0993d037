"""One daemon per store serves every mounted container of it (issue 15,
layerfs/storedaemon.py): sessions are independent, the daemon exits when
the last one ends, a signal unmounts them all, and starting it races
safely."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import time

import pytest

from layerfs import mount as layerfs_mount
from layerfs.example import build_example
from mount_helpers import force_unmount, is_mounted, requires_fuse, run_cli

pytestmark = [pytest.mark.mount, requires_fuse]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERFS_STORE", str(tmp_path / "store"))
    image = build_example(str(tmp_path / "image"))
    mounts = []

    def mountpoint(name):
        path = tmp_path / name
        path.mkdir()
        mounts.append(str(path))
        return str(path)

    yield image, mountpoint
    for path in reversed(mounts):
        force_unmount(path)


def cli(*arguments):
    result = run_cli(*arguments)
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_gone(pid: int, seconds: float = 30.0) -> bool:
    """Whether process *pid* has exited within *seconds* (a bound, not a
    measurement: the daemon leaves 2 s after its last session)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def daemon_pid(mountpoint: str) -> int:
    pid = layerfs_mount.server_pid(mountpoint)
    assert pid is not None
    return pid


def test_one_daemon_serves_every_container_of_a_store(env):
    image, mountpoint = env
    for name in ("a", "b", "c"):
        cli("container", "create", image, name)
    points = {name: mountpoint(f"m-{name}") for name in ("a", "b", "c")}
    for name, point in points.items():
        cli("container", "mount", name, point)
    pids = {daemon_pid(point) for point in points.values()}
    assert len(pids) == 1
    (pid,) = pids
    for name, point in points.items():
        with open(os.path.join(point, "mine"), "w") as stream:
            stream.write(name)
    rows = {row["name"]: row["mounted"] for row in json.loads(cli("container", "ls", "--json"))}
    assert rows == points
    # Unmounting one session leaves the others served.
    cli("umount", points["b"])
    assert not is_mounted(points["b"])
    for name in ("a", "c"):
        with open(os.path.join(points[name], "mine")) as stream:
            assert stream.read() == name
    rows = {row["name"]: row["mounted"] for row in json.loads(cli("container", "ls", "--json"))}
    assert rows == {"a": points["a"], "b": None, "c": points["c"]}
    assert cli("container", "diff", "b") == "A /mine\n"
    # Mounted again, by the same daemon.
    cli("container", "mount", "b", points["b"])
    assert daemon_pid(points["b"]) == pid
    cli("container", "rm", "--force", "c")
    assert not is_mounted(points["c"]) and is_mounted(points["a"])
    cli("umount", points["a"])
    cli("umount", points["b"])
    assert wait_gone(pid)


def test_a_refused_mount_leaves_the_daemon_serving_the_others(env, tmp_path):
    image, mountpoint = env
    cli("container", "create", image, "a")
    cli("container", "create", image, "b")
    m1 = mountpoint("m1")
    cli("container", "mount", "a", m1)
    result = run_cli("container", "mount", "b", m1)     # a mount point in use
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("layerfs: ")
    result = run_cli("container", "mount", "a", mountpoint("m2"))   # mounted already
    assert result.returncode == 1 and "mounted on" in result.stderr
    assert os.listdir(m1)
    cli("umount", m1)


def test_a_signal_unmounts_every_session_and_keeps_what_was_written(env):
    image, mountpoint = env
    cli("container", "create", image, "a")
    cli("container", "create", image, "b")
    m1, m2 = mountpoint("m1"), mountpoint("m2")
    cli("container", "mount", "a", m1)
    cli("container", "mount", "b", m2)
    with open(os.path.join(m2, "kept"), "w") as stream:
        stream.write("b")
    pid = daemon_pid(m1)
    os.kill(pid, signal.SIGTERM)
    assert wait_gone(pid)
    assert not is_mounted(m1) and not is_mounted(m2)
    assert cli("container", "diff", "b") == "A /kept\n"


def test_mounts_racing_to_start_the_daemon_share_one(env):
    image, mountpoint = env
    names = [f"c{number}" for number in range(4)]
    for name in names:
        cli("container", "create", image, name)
    points = [mountpoint(f"m-{name}") for name in names]
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(lambda pair: run_cli("container", "mount", *pair),
                                zip(names, points)))
    assert [r.stderr for r in results] == [""] * len(names)
    assert len({daemon_pid(point) for point in points}) == 1
    for point in points:
        subprocess.run(["umount", point], check=True)
