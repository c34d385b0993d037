"""Containers and volumes through real mounts (issue 15): two containers of
one image mounted at once, rm while mounted, volumes as host directories
that stay out of diffs and commits, no escape through the image's symlinks;
one daemon per store serving every mounted container of it, its sessions
independent, leaving after the last, unmounting them all on a signal, and
started safely by racing mounts."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import time

import pytest

import layerfs
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
        subprocess.run(["umount", "-R", "-l", path], capture_output=True, check=False)
        force_unmount(path)


def cli(*arguments):
    result = run_cli(*arguments)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def two_mounted(env):
    """Containers a and b of the example image, mounted on m1 and m2."""
    image, mountpoint = env
    cli("container", "create", image, "a")
    cli("container", "create", image, "b")
    m1, m2 = mountpoint("m1"), mountpoint("m2")
    cli("container", "mount", "a", m1)
    cli("container", "mount", "b", m2)
    return m1, m2


def test_two_mounted_containers_of_one_image_are_isolated(two_mounted):
    m1, m2 = two_mounted
    with open(os.path.join(m1, "etc", "only-a"), "w") as stream:
        stream.write("a\n")
    os.unlink(os.path.join(m2, "README"))
    assert not os.path.exists(os.path.join(m2, "etc", "only-a"))
    assert os.path.exists(os.path.join(m1, "README"))
    # Read beside the writers: diff, and ls with sizes and mount points.
    assert cli("container", "diff", "a") == "C /etc\nA /etc/only-a\n"
    assert cli("container", "diff", "b") == "D /README\n"
    rows = {row["name"]: row for row in json.loads(cli("container", "ls", "--json"))}
    assert rows["a"]["mounted"] == m1 and rows["b"]["mounted"] == m2
    cli("umount", m1)
    rows = {row["name"]: row for row in json.loads(cli("container", "ls", "--json"))}
    assert rows["a"]["mounted"] is None
    # Remounted, the change is still there.
    cli("container", "mount", "a", m1)
    with open(os.path.join(m1, "etc", "only-a")) as stream:
        assert stream.read() == "a\n"


def test_rm_is_refused_while_mounted_unless_forced(env):
    image, mountpoint = env
    cli("container", "create", image, "web")
    m1 = mountpoint("m1")
    cli("container", "mount", "web", m1)
    result = run_cli("container", "rm", "web")
    assert result.returncode == 1
    assert result.stderr == f"layerfs: container 'web' is mounted on {m1}: unmount it, " \
                            "or use --force\n"
    result = run_cli("container", "commit", "web", os.path.join(os.path.dirname(m1), "o"))
    assert result.returncode == 1 and "unmount it before committing" in result.stderr
    result = run_cli("container", "mount", "web", mountpoint("m2"))
    assert result.returncode == 1 and f"mounted on {m1} already" in result.stderr
    cli("container", "rm", "--force", "web")
    assert not is_mounted(m1)
    assert json.loads(cli("container", "ls", "--json")) == []


def test_volumes_are_host_directories_left_out_of_diff_and_commit(env, tmp_path):
    image, mountpoint = env
    host = tmp_path / "host"
    host.mkdir()
    (host / "old").write_text("host file\n")
    cli("volume", "create", "named")
    cli("container", "create", image, "web")
    m1 = mountpoint("m1")
    cli("container", "mount", "web", m1, "--volume", f"{host}:/etc",
        "--volume", "named:/srv/data", "--volume", f"{host}:/ro:ro")
    # The image's /etc is hidden; the host directory shows, read and written.
    assert sorted(os.listdir(os.path.join(m1, "etc"))) == ["old"]
    with open(os.path.join(m1, "etc", "new"), "w") as stream:
        stream.write("written\n")
    assert (host / "new").read_text() == "written\n"
    (host / "behind").write_text("changed behind the mount\n")
    with open(os.path.join(m1, "etc", "behind")) as stream:
        assert stream.read() == "changed behind the mount\n"
    os.unlink(os.path.join(m1, "etc", "old"))
    assert not (host / "old").exists()
    with open(os.path.join(m1, "srv", "data", "x"), "w") as stream:
        stream.write("x")
    assert (tmp_path / "store" / "volumes" / "named" / "x").read_text() == "x"
    result = run_cli("volume", "rm", "named")
    assert result.returncode == 1 and "is bound in a mount" in result.stderr
    with pytest.raises(OSError) as caught:
        open(os.path.join(m1, "ro", "y"), "w").close()
    assert caught.value.errno == 30      # EROFS
    # No copy-up, no whiteouts: the upper has the mount points and nothing else.
    changed = cli("container", "diff", "web").splitlines()
    assert {"A /ro", "A /srv", "A /srv/data"} <= set(changed)
    assert not [line for line in changed if line.split()[1].startswith("/etc")]
    cli("umount", m1)
    assert not is_mounted(m1)
    out = tmp_path / "committed"
    cli("container", "commit", "web", str(out), "--tag", "v2")
    with layerfs.open(f"oci:{out}:v2") as fs:
        assert sorted(fs.listdir("/etc")) == ["motd", "os-release"]
        assert fs.listdir("/srv/data") == []
    cli("volume", "rm", "named")


def test_a_volume_cannot_be_bound_through_the_images_symlinks(env, tmp_path):
    image, mountpoint = env
    host = tmp_path / "host"
    host.mkdir()
    cli("container", "create", image, "web")
    m1 = mountpoint("m1")
    # /bin is a symlink in the image (bin -> usr/bin): binding there, or
    # beneath it, would follow it; refused, and nothing stays mounted.
    for path in ("/bin", "/bin/x"):
        result = run_cli("container", "mount", "web", m1, "--volume", f"{host}:{path}")
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert not is_mounted(m1)
    # A symlink in the upper pointing out of the view is no way out either.
    cli("container", "mount", "web", m1)
    os.symlink("/", os.path.join(m1, "out"))
    cli("umount", m1)
    result = run_cli("container", "mount", "web", m1, "--volume", f"{host}:/out/tmp")
    assert result.returncode == 1 and not is_mounted(m1)
    assert not any(line.split()[4] == "/tmp" for line in open("/proc/self/mountinfo")
                   if str(host) in line)


def test_a_symlink_inside_a_volume_resolves_inside_the_container(env, tmp_path):
    image, mountpoint = env
    host = tmp_path / "host"
    host.mkdir()
    os.symlink("/etc/passwd", host / "link")
    os.symlink("../../README", host / "up")
    cli("container", "create", image, "web")
    m1 = mountpoint("m1")
    cli("container", "mount", "web", m1, "--volume", f"{host}:/srv/v")
    # Resolved by the kernel from the caller's root: inside a chroot, the
    # container's own files (here read by a forked child that chroots).
    assert read_in_chroot(m1, "/srv/v/up") == read_in_chroot(m1, "/README")
    assert read_in_chroot(m1, "/srv/v/link") == "ENOENT"     # no /etc/passwd in the image
    assert os.readlink(os.path.join(m1, "srv", "v", "link")) == "/etc/passwd"


def read_in_chroot(root: str, path: str) -> str:
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(reader)
            os.chroot(root)
            os.chdir("/")
            try:
                with open(path, "rb") as stream:
                    data = stream.read()
            except FileNotFoundError:
                data = b"ENOENT"
            os.write(writer, data)
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as stream:
        data = stream.read()
    os.waitpid(pid, 0)
    return data.decode()


def test_mount_with_an_upper_takes_volumes_too(env, tmp_path):
    image, mountpoint = env
    host = tmp_path / "host"
    host.mkdir()
    m1 = mountpoint("m1")
    cli("mount", "--upper", str(tmp_path / "upper"), image, m1, "-v", f"{host}:/data:ro",
        "-v", f"{host}:/rw")
    with open(os.path.join(m1, "rw", "f"), "w") as stream:
        stream.write("through the volume\n")
    with open(os.path.join(m1, "data", "f")) as stream:
        assert stream.read() == "through the volume\n"
    with pytest.raises(OSError) as caught:
        os.unlink(os.path.join(m1, "data", "f"))
    assert caught.value.errno == 30      # EROFS
    cli("umount", m1)
    assert not is_mounted(m1) and (host / "f").exists()
    assert not any(str(host) in line for line in open("/proc/self/mountinfo"))


# -- one daemon per store (layerfs/storedaemon.py) -----------------------------

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


def test_a_signal_unmounts_every_session_and_keeps_what_was_written(two_mounted):
    m1, m2 = two_mounted
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
