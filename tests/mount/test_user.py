"""Mounting as a user who is not root (fusermount3), and a writable mount
used as a chroot root, as docs/mount.md describes them."""

from __future__ import annotations

import contextlib
import io
import os
import pwd
import shutil
import subprocess
import sys
import tarfile
import tempfile

import pytest

import layerfs
from layerfs import mount as layerfs_mount
from mount_helpers import ROOT, force_unmount, is_mounted, requires_fuse, stack

pytestmark = [pytest.mark.mount, requires_fuse]

# fusermount3 wants a user it can name: the one every Debian system has.
USER = pwd.getpwnam("nobody").pw_uid


@pytest.fixture
def public_dir():
    """A directory every uid can reach (pytest's tmp_path is root's alone)."""
    path = tempfile.mkdtemp(prefix="layerfs-user-test-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    for entry in os.listdir(path):
        force_unmount(os.path.join(path, entry))
    shutil.rmtree(path, ignore_errors=True)


def as_user(*command, env=None, check=True):
    result = subprocess.run(["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups",
                             *command], env=env, capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def user_python(env) -> str:
    """A Python interpreter of this version that USER may run: this one, or
    the system's (this one may live in root's home, closed to others)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        if os.path.exists(candidate) and as_user(
                candidate, "-c", "import layerfs.cli, mfusepy", env=env, check=False).returncode == 0:
            return candidate
    raise AssertionError(f"no {version} that uid {USER} can run with layerfs's packages")


def user_pythonpath(public_dir: str) -> str:
    """A copy of layerfs and of the installed packages a mount imports, where
    USER can read them (this checkout and its virtualenv may be in root's
    home)."""
    code = ("import os, site, sys, layerfs.cli, layerfs.fuse, layerfs.mount, layerfs.fs\n"
            "roots = site.getsitepackages()\n"
            "for module in list(sys.modules.values()):\n"
            "    path = getattr(module, '__file__', None) or ''\n"
            "    for root in roots:\n"
            "        if path.startswith(root + os.sep):\n"
            "            print(os.path.join(root, path[len(root) + 1:].split(os.sep)[0]))\n")
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env=dict(os.environ, PYTHONPATH=ROOT)).stdout.split()
    target = os.path.join(public_dir, "python")
    shutil.copytree(os.path.join(ROOT, "layerfs"), os.path.join(target, "layerfs"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    for path in sorted(set(found)):
        name = os.path.basename(path)
        if name.startswith("__editable__") or name == "_distutils_hack":
            continue
        if os.path.isdir(path):
            shutil.copytree(path, os.path.join(target, name),
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(path, os.path.join(target, name))
    subprocess.run(["chmod", "-R", "a+rX", target], check=True)
    return target


def user_fuse_unavailable() -> str:
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    if shutil.which("fusermount3") is None:
        return "fusermount3 (fuse3) is not installed"
    # fusermount3 opens the device with the user's own rights: Debian's udev
    # makes it 0666, containers often leave it 0600 (.ci/run sets 0666).
    if os.stat("/dev/fuse").st_mode & 0o006 != 0o006:
        return "/dev/fuse is not open to other users (chmod 0666 /dev/fuse, as udev does)"
    return ""


@pytest.mark.skipif(bool(user_fuse_unavailable()) and os.environ.get("CI") != "true",
                    reason=user_fuse_unavailable() or "-")
def test_a_user_mounts_lists_and_unmounts_through_fusermount3(sample_layers, public_dir):
    layers = []
    for path in sample_layers:
        copy = os.path.join(public_dir, os.path.basename(path))
        shutil.copyfile(path, copy)
        os.chmod(copy, 0o644)
        layers.append(copy)
    owned = {}
    for name in ("mnt", "run", "cache", "home"):
        owned[name] = os.path.join(public_dir, name)
        os.mkdir(owned[name])
        os.chown(owned[name], USER, USER)
    # This checkout and the packages it needs, for a Python the user can run.
    env = dict(os.environ, PYTHONPATH=user_pythonpath(public_dir),
               HOME=owned["home"], LAYERFS_RUNTIME_DIR=owned["run"],
               LAYERFS_CACHE_DIR=owned["cache"])
    env.pop("XDG_RUNTIME_DIR", None)
    cli = [user_python(env), "-m", "layerfs.cli"]
    mnt = owned["mnt"]

    as_user(*cli, "mount", *stack(layers), mnt, env=env)
    assert is_mounted(mnt)
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        line = next(line for line in info if line.split()[4] == mnt)
    assert f"user_id={USER}" in line and "fuse.layerfs" in line
    # Without allow_other only the user who mounted it may look inside.
    assert as_user("cat", f"{mnt}/etc/passwd", env=env).stdout == \
        "root:x:0:0::/root:/bin/bash\n"
    listed = as_user(*cli, "mounts", env=env).stdout
    assert any(row.split("\t")[0] == mnt for row in listed.splitlines())
    as_user(*cli, "umount", mnt, env=env)
    assert not is_mounted(mnt)


@pytest.mark.skipif(bool(user_fuse_unavailable()) and os.environ.get("CI") != "true",
                    reason=user_fuse_unavailable() or "-")
def user_store(public_dir: str, sample_layers, *more: str) -> tuple:
    """USER's own store, cache and runtime directories (and *more*, say mount
    points) under *public_dir*, the sample layers plus a /tmp USER may
    write in, the environment and the command line of USER's layerfs:
    ``(owned, layers, env, cli)``."""
    owned = {}
    for name in ("run", "cache", "home", "store", "layers", *more):
        owned[name] = os.path.join(public_dir, name)
        os.mkdir(owned[name])
        os.chown(owned[name], USER, USER)
    layers = [shutil.copy(path, owned["layers"]) for path in sample_layers]
    layers.append(os.path.join(owned["layers"], "tmp.tar"))
    with tarfile.open(layers[-1], "w") as tar:
        info = tarfile.TarInfo("tmp")
        info.type, info.mode = tarfile.DIRTYPE, 0o1777
        tar.addfile(info)
    env = dict(os.environ, PYTHONPATH=user_pythonpath(public_dir), HOME=owned["home"],
               LAYERFS_RUNTIME_DIR=owned["run"], LAYERFS_CACHE_DIR=owned["cache"],
               LAYERFS_STORE=owned["store"])
    env.pop("XDG_RUNTIME_DIR", None)
    return owned, layers, env, [user_python(env), "-m", "layerfs.cli"]


def test_a_user_mounts_containers_through_the_stores_daemon(sample_layers, public_dir,
                                                            monkeypatch):
    owned, layers, env, cli = user_store(public_dir, sample_layers, "m1", "m2")
    for name, point in (("a", owned["m1"]), ("b", owned["m2"])):
        as_user(*cli, "container", "create", *stack(layers), name, env=env)
        as_user(*cli, "container", "mount", name, point, env=env)
    as_user("sh", "-c", f"echo mine > {owned['m1']}/tmp/new", env=env)
    listed = {point: as_user("ls", f"{owned[point]}/tmp", env=env).stdout.split()
              for point in ("m1", "m2")}
    assert listed == {"m1": ["new"], "m2": []}
    monkeypatch.setenv(layerfs_mount.RUNTIME_DIR_VARIABLE, owned["run"])
    pids = {layerfs_mount.server_pid(owned[p]) for p in ("m1", "m2")}
    assert len(pids) == 1 and None not in pids
    assert as_user(*cli, "container", "diff", "a", env=env).stdout == "C /tmp\nA /tmp/new\n"
    assert as_user(*cli, "container", "diff", "b", env=env).stdout == ""
    for point in ("m1", "m2"):
        as_user(*cli, "umount", owned[point], env=env)
        assert not is_mounted(owned[point])


def _chroot_root(tmp_path):
    layer = str(tmp_path / "busybox.tar")
    _busybox_layer(layer)
    root, upper = str(tmp_path / "root"), str(tmp_path / "upper")
    os.mkdir(root)
    return layer, root, upper


@contextlib.contextmanager
def chroot_mounted(layer, root, upper):
    """The recipe: a writable mount with allow_other, /dev and /proc bound."""
    layerfs_mount.mount(layer, root, upper=upper, options=["allow_other"])
    binds = []
    try:
        subprocess.run(["mount", "--rbind", "/dev", f"{root}/dev"], check=True)
        binds.append(f"{root}/dev")
        subprocess.run(["mount", "-t", "proc", "proc", f"{root}/proc"], check=True)
        binds.append(f"{root}/proc")
        yield root
    finally:
        for path in reversed(binds):
            subprocess.run(["umount", "-R", path], check=False)
        layerfs_mount.umount(root)


def _busybox_layer(path: str) -> None:
    """One layer: a static busybox as /bin/sh and friends, /dev, /proc,
    /tmp and a home owned by user 1000."""
    busybox = shutil.which("busybox")
    with tarfile.open(path, "w") as tar:
        for name, mode in [("bin", 0o755), ("dev", 0o755), ("proc", 0o555),
                           ("tmp", 0o1777), ("home", 0o755)]:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
        info = tarfile.TarInfo("home/user")
        info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, 0o755, 1000, 1000
        tar.addfile(info)
        tar.add(busybox, arcname="bin/busybox")
        for tool in ("sh", "ls", "cat", "id", "mkdir", "echo"):
            info = tarfile.TarInfo(f"bin/{tool}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
        info = tarfile.TarInfo("etc/motd")
        data = b"inside the image\n"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


@pytest.mark.skipif(shutil.which("busybox") is None and os.environ.get("CI") != "true",
                    reason="busybox-static is not installed")
def test_the_chroot_recipe_of_the_docs(tmp_path):
    # docs/mount.md, "A writable mount as a chroot root", step by step.
    layer, root, upper = _chroot_root(tmp_path)
    with chroot_mounted(layer, root, upper):
        result = subprocess.run(
            ["chroot", root, "/bin/sh", "-c",
             "cat /etc/motd && echo written > /tmp/note && ls /proc/self/fd >/dev/null "
             "&& echo ok > /dev/null && cat /tmp/note"],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "inside the image\nwritten\n"
    assert not is_mounted(root)
    with open(os.path.join(upper, "diff", "tmp", "note")) as note:
        assert note.read() == "written\n"


@pytest.mark.skipif(shutil.which("busybox") is None and os.environ.get("CI") != "true",
                    reason="busybox-static is not installed")
def test_a_user_in_the_chroot_owns_what_it_creates(tmp_path):
    layer, root, upper = _chroot_root(tmp_path)
    with chroot_mounted(layer, root, upper):
        result = subprocess.run(
            ["chroot", "--userspec=1000:1000", root, "/bin/sh", "-c",
             "mkdir /home/user/made && echo mine > /home/user/made/file "
             "&& cat /home/user/made/file"],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout == "mine\n"
        st = os.stat(f"{root}/home/user/made/file")
        assert (st.st_uid, st.st_gid) == (1000, 1000)


def test_a_user_commits_a_container_right_after_unmounting_it(sample_layers, public_dir):
    """The session closes its filesystem (and releases the upper) before
    ``umount`` returns: it used to stop at closing /dev/fd/N a second time
    (libfuse had closed it), which left the upper locked in the store's
    daemon and its last changes unflushed."""
    owned, layers, env, cli = user_store(public_dir, sample_layers, "m", "out")
    as_user(*cli, "container", "create", *stack(layers), "c", env=env)
    for attempt in range(3):
        as_user(*cli, "container", "mount", "c", owned["m"], env=env)
        as_user("sh", "-c", f"echo {attempt} > {owned['m']}/tmp/f{attempt}", env=env)
        as_user(*cli, "umount", owned["m"], env=env)
        out = os.path.join(owned["out"], str(attempt))
        as_user(*cli, "container", "commit", "c", out, env=env)
        with layerfs.open(out) as committed:
            assert committed.read_bytes(f"/tmp/f{attempt}") == f"{attempt}\n".encode()
