"""Volumes on a user's mounts (uid 65534, no CAP_SYS_ADMIN): served by the
mount's own FUSE server (layerfs/fusevolume.py), with the rules of a
kernel bind: host files, no copy-up, out of diff and commit, :ro EROFS,
EXDEV across the boundary, EBUSY for PATH, no escape, no stale cache."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import tarfile

import pytest

from mount_helpers import is_mounted, requires_fuse
from test_user import (USER, as_user, public_dir, user_fuse_unavailable,  # noqa: F401
                       user_python, user_pythonpath)

pytestmark = [pytest.mark.mount, requires_fuse,
              pytest.mark.skipif(bool(user_fuse_unavailable()) and os.environ.get("CI") != "true",
                                 reason=user_fuse_unavailable() or "-")]


def _image_layer(path: str) -> None:
    """/data (with a file the volume hides), /d, /etc and /tmp, all the
    user's, and /ln -> d."""
    with tarfile.open(path, "w") as tar:
        for name in ("data", "d", "etc", "tmp"):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, 0o755, USER, USER
            tar.addfile(info)
        for name, data in (("data/hidden", b"image data\n"), ("d/f", b"lower\n"),
                           ("etc/motd", b"motd\n")):
            info = tarfile.TarInfo(name)
            info.size, info.uid, info.gid = len(data), USER, USER
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("ln")
        info.type, info.linkname = tarfile.SYMTYPE, "d"
        tar.addfile(info)


@pytest.fixture
def user(public_dir):  # noqa: F811 (test_user's fixture)
    """Directories owned by the user, its environment and its CLI."""
    owned = {}
    for name in ("m1", "m2", "m3", "run", "cache", "home", "store", "layers", "host",
                 "outside", "upper"):
        owned[name] = os.path.join(public_dir, name)
        os.mkdir(owned[name])
        os.chown(owned[name], USER, USER)
    layer = os.path.join(owned["layers"], "image.tar")
    _image_layer(layer)
    os.chmod(layer, 0o644)
    owned["layer"] = layer
    env = dict(os.environ, PYTHONPATH=user_pythonpath(public_dir), HOME=owned["home"],
               LAYERFS_RUNTIME_DIR=owned["run"], LAYERFS_CACHE_DIR=owned["cache"],
               LAYERFS_STORE=owned["store"])
    env.pop("XDG_RUNTIME_DIR", None)
    cli = [user_python(env), "-m", "layerfs.cli"]

    def run(*command, check=True):
        return as_user(*command, env=env, check=check)

    yield owned, cli, run
    for name in ("m1", "m2", "m3"):
        if is_mounted(owned[name]):
            run(*cli, "umount", owned[name], check=False)


def _write_as(run, path: str, text: str = "x"):
    return run("sh", "-c", f'printf %s "{text}" > "{path}"', check=False)


def _host_write(path: str, text: str) -> None:
    with open(path, "w") as stream:
        stream.write(text)
    os.chown(path, USER, USER)


def test_a_users_containers_share_a_named_volume_out_of_the_upper(user):
    owned, cli, run = user
    host, m1, m2 = owned["host"], owned["m1"], owned["m2"]
    _host_write(os.path.join(host, "from-host"), "host\n")
    run(*cli, "volume", "create", "shared")
    for name, point in (("a", m1), ("b", m2)):
        run(*cli, "container", "create", owned["layer"], name)
        run(*cli, "container", "mount", name, point, "--volume", "shared:/srv/shared",
            "--volume", f"{host}:/data", "--volume", f"{host}:/etc/ro:ro")
    shared = os.path.join(owned["store"], "volumes", "shared")
    # Writes go to the host directory, and the other container sees them.
    assert _write_as(run, f"{m1}/srv/shared/note", "one").returncode == 0
    assert open(os.path.join(shared, "note")).read() == "one"
    assert run("cat", f"{m2}/srv/shared/note").stdout == "one"
    assert _write_as(run, f"{m1}/data/new", "new").returncode == 0
    assert open(os.path.join(host, "new")).read() == "new"
    # A PATH the image lacks is listed in its parent; types show in listings.
    assert run("ls", f"{m1}/srv").stdout.split() == ["shared"]
    run("mkdir", f"{m1}/data/dir")
    assert run("find", f"{m1}/data", "-mindepth", "1", "-type", "d").stdout.split() == \
        [f"{m1}/data/dir"]
    run("rmdir", f"{m1}/data/dir")
    # The image's content beneath PATH is hidden.
    assert sorted(run("ls", f"{m1}/data").stdout.split()) == ["from-host", "new"]
    assert run("cat", f"{m1}/data/hidden", check=False).returncode != 0
    # :ro refuses writes with EROFS.
    result = _write_as(run, f"{m1}/etc/ro/x")
    assert result.returncode != 0 and "Read-only file system" in result.stderr
    assert not os.path.exists(os.path.join(host, "x"))
    # The same host directory at /data and at /etc/ro: a descriptor held on
    # /etc/ro stays read-only however /data is reached meanwhile.
    answer = run(cli[0], "-c", "import os\n"
                 f"fd = os.open('{m1}/etc/ro', os.O_RDONLY | os.O_DIRECTORY)\n"
                 f"os.listdir('{m1}/data')\n"
                 "try:\n"
                 "    os.close(os.open('y', os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))\n"
                 "except OSError as error:\n"
                 "    print(error.errno)\n").stdout
    assert answer.strip() == str(errno.EROFS)
    assert not os.path.exists(os.path.join(host, "y"))
    # Nothing of the volumes is in the upper (but /srv, made for the named
    # volume's PATH as for a bind's): diff and commit leave them out.
    assert run(*cli, "container", "diff", "a").stdout == "A /srv\n"
    for point in (m1, m2):
        run(*cli, "umount", point)
        assert not is_mounted(point)
    # (commit right after a user's umount is refused while the store's
    # daemon lives on, volumes or not: the upper's lock names its pid;
    # commit leaving volumes out is test_volume_library's and test_containers'.)


def test_rename_exdev_path_ebusy_and_host_changes_show_at_once(user):
    owned, cli, run = user
    host, m1 = owned["host"], owned["m1"]
    _host_write(os.path.join(host, "file"), "first")
    run(*cli, "container", "create", owned["layer"], "c")
    run(*cli, "container", "mount", "c", m1, "--volume", f"{host}:/d/v")
    code = "import os, sys\ntry:\n    os.{}\nexcept OSError as e:\n    print(e.errno)\n"

    def errno_of(call: str) -> int:
        return int(run(cli[0], "-c", code.format(call)).stdout)

    # (The volume's PATH in /d: the image's / is root's, closed to the user.)
    assert errno_of(f"rename('{m1}/d/v/file', '{m1}/d/file')") == errno.EXDEV
    assert errno_of(f"rename('{m1}/d/f', '{m1}/d/v/f')") == errno.EXDEV
    assert errno_of(f"link('{m1}/d/f', '{m1}/d/v/f')") == errno.EXDEV
    assert errno_of(f"rename('{m1}/d/v', '{m1}/d/w')") == errno.EBUSY
    assert errno_of(f"rmdir('{m1}/d/v')") == errno.EBUSY
    # mv falls back to copying on EXDEV, and stops at EBUSY: the host keeps all.
    assert run("mv", f"{m1}/d/v", f"{m1}/d/moved", check=False).returncode != 0
    assert sorted(os.listdir(host)) == ["file"]
    # Inside the volume a rename is the host's.
    run("mv", f"{m1}/d/v/file", f"{m1}/d/v/renamed")
    assert sorted(os.listdir(host)) == ["renamed"]
    # Changes made behind the mount show at once: contents, sizes, names.
    assert run("cat", f"{m1}/d/v/renamed").stdout == "first"
    _host_write(os.path.join(host, "renamed"), "second, longer")
    assert run("cat", f"{m1}/d/v/renamed").stdout == "second, longer"
    assert run("stat", "-c", "%s", f"{m1}/d/v/renamed").stdout.strip() == "14"
    os.unlink(os.path.join(host, "renamed"))
    _host_write(os.path.join(host, "appeared"), "new")
    assert run("ls", f"{m1}/d/v").stdout.split() == ["appeared"]
    assert run("cat", f"{m1}/d/v/renamed", check=False).returncode != 0
    assert run(*cli, "container", "diff", "c").stdout == ""


def test_symlinks_in_a_volume_never_let_a_write_escape(user):
    owned, cli, run = user
    host, outside, m1 = owned["host"], owned["outside"], owned["m1"]
    _host_write(os.path.join(outside, "secret"), "secret")
    os.symlink("/etc", os.path.join(host, "to-etc"))
    os.symlink("../../..", os.path.join(host, "up"))
    os.mkdir(os.path.join(host, "sub"))
    os.chown(os.path.join(host, "sub"), USER, USER)
    etc_before = sorted(os.listdir("/etc"))
    run(*cli, "container", "create", owned["layer"], "s")
    run(*cli, "container", "mount", "s", m1, "--volume", f"{host}:/data")
    # Symlinks are given to the caller's kernel as symlinks, as over a bind.
    assert run("readlink", f"{m1}/data/to-etc").stdout.strip() == "/etc"
    assert run("readlink", f"{m1}/data/up").stdout.strip() == "../../.."
    _write_as(run, f"{m1}/data/to-etc/escaped")
    _write_as(run, f"{m1}/data/up/escaped")
    assert sorted(os.listdir("/etc")) == etc_before
    # A directory the kernel holds (a process's descriptor on it), swapped
    # on the host for a symlink to a directory outside: a file created
    # through that descriptor is not created through the symlink.
    holder = subprocess.Popen(
        ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups", cli[0], "-c",
         "import os, sys\n"
         f"fd = os.open('{m1}/data/sub', os.O_RDONLY | os.O_DIRECTORY)\n"
         "print('held', flush=True)\n"
         "sys.stdin.readline()\n"
         "try:\n"
         "    os.close(os.open('escaped', os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))\n"
         "    print('created')\n"
         "except OSError as error:\n"
         "    print(error.errno)\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    os.rmdir(os.path.join(host, "sub"))
    os.symlink(outside, os.path.join(host, "sub"))
    answer, _ = holder.communicate("go\n", timeout=60)
    assert answer.strip() != "created"
    assert sorted(os.listdir(outside)) == ["secret"]
    assert sorted(os.listdir(host)) == ["sub", "to-etc", "up"]
    assert open(os.path.join(outside, "secret")).read() == "secret"


def test_a_users_mount_with_an_upper_serves_volumes_and_one_without_is_refused(user):
    owned, cli, run = user
    host, m3, upper = owned["host"], owned["m3"], owned["upper"]
    run(*cli, "mount", owned["layer"], m3, "--upper", upper, "--volume", f"{host}:/data")
    assert _write_as(run, f"{m3}/data/through", "through").returncode == 0
    assert open(os.path.join(host, "through")).read() == "through"
    assert _write_as(run, f"{m3}/d/elsewhere").returncode == 0
    in_upper = [os.path.relpath(os.path.join(root, name), os.path.join(upper, "diff"))
                for root, dirs, files in os.walk(os.path.join(upper, "diff"))
                for name in dirs + files]
    assert in_upper == ["d", "d/elsewhere"]
    run(*cli, "umount", m3)
    result = run(*cli, "mount", owned["layer"], m3, "--volume", f"{host}:/data", check=False)
    assert result.returncode != 0 and "needs a writable mount" in result.stderr
    assert not is_mounted(m3)
    # A PATH reached through the image's symlink is refused, and nothing mounted.
    result = run(*cli, "mount", owned["layer"], m3, "--upper", upper, "--volume",
                 f"{host}:/ln/v", check=False)
    assert result.returncode != 0 and "/ln is not a directory of the view" in result.stderr
    assert not is_mounted(m3)
