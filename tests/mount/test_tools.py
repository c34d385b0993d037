"""Ordinary tools working inside a read-write mount, each compared with the
same commands run on a plain local directory holding the extracted image.

(find, tar -c, cp -a out of and sha256sum on a read-only mount are in
test_readonly.py.)  Needs rsync and git: the tests skip without them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from mount_helpers import MTIME, assert_same_tree, requires_fuse, requires_upper

pytestmark = [pytest.mark.mount, requires_fuse, requires_upper]


def requires_tool(name: str):
    return pytest.mark.skipif(shutil.which(name) is None and os.environ.get("CI") != "true",
                              reason=f"{name} is not installed")


def run(argv, cwd, **kwargs) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, errors="surrogateescape",
                            stdin=subprocess.DEVNULL, timeout=120, **kwargs)
    assert result.returncode == 0, f"{argv} in {cwd}: {result.stderr}"
    return result.stdout


def on_both(rw_mounted, local_copy, argv, **kwargs) -> tuple:
    """Run *argv* in the mount, then in the local copy; their outputs."""
    return run(argv, rw_mounted, **kwargs), run(argv, local_copy, **kwargs)


@pytest.fixture
def source_tree(tmp_path):
    """A tree to copy in: files, a big one, nested dirs, a symlink, a
    hardlink, modes, an xattr, old mtimes."""
    root = tmp_path / "src"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha\n")
    (root / "big.bin").write_bytes(os.urandom(1_000_000))
    (root / "sub" / "b.txt").write_bytes(b"beta\n")
    (root / "sub" / "deeper" / "c").write_bytes(b"")
    os.symlink("../a.txt", root / "sub" / "to-a")
    os.link(root / "a.txt", root / "sub" / "a-again")
    os.chmod(root / "sub" / "b.txt", 0o640)
    os.setxattr(root / "a.txt", "user.tag", b"rsync")
    for top, dirs, files in os.walk(root, topdown=False):
        for name in files + dirs:
            os.utime(os.path.join(top, name), ns=(MTIME * 10**9, MTIME * 10**9),
                     follow_symlinks=False)
    return str(root)


@requires_tool("rsync")
def test_rsync_into_the_mount(rw_mounted, local_copy, source_tree):
    # Into a new directory, and over lower content (etc/passwd is replaced:
    # rsync writes a temporary file and renames it over the old one).
    for target in ("data/", "etc/"):
        outputs = on_both(rw_mounted, local_copy, ["rsync", "-aHX", f"{source_tree}/", target])
        assert outputs[0] == outputs[1]
    run(["rsync", "-aHX", f"{source_tree}/a.txt", "etc/passwd"], rw_mounted)
    run(["rsync", "-aHX", f"{source_tree}/a.txt", "etc/passwd"], local_copy)
    assert_same_tree(local_copy, rw_mounted)
    # A second run finds nothing to do: sizes and mtimes read back exactly.
    again = run(["rsync", "-aHX", "--itemize-changes", f"{source_tree}/", "data/"], rw_mounted)
    assert again == ""
    # And rsync's own check of every byte agrees.
    checked = run(["rsync", "-aHX", "--checksum", "--itemize-changes",
                   f"{source_tree}/", "data/"], rw_mounted)
    assert checked == ""


@requires_tool("git")
def test_git_init_add_commit(rw_mounted, local_copy, source_tree):
    identity = ["-c", "user.name=layerfs", "-c", "user.email=layerfs@example.invalid",
                "-c", "init.defaultBranch=main", "-c", "core.fsync=all"]
    env = dict(os.environ, GIT_AUTHOR_DATE="2020-09-13T12:26:40Z",
               GIT_COMMITTER_DATE="2020-09-13T12:26:40Z", GIT_CONFIG_NOSYSTEM="1",
               HOME=os.path.dirname(source_tree))
    steps = [
        ["mkdir", "repo"],
        ["cp", "-a", "etc", "bin", "lib", f"{source_tree}/sub", "repo/"],
        ["git", *identity, "init", "-q", "repo"],
        ["git", *identity, "-C", "repo", "add", "-A"],
        ["git", *identity, "-C", "repo", "commit", "-q", "-m", "first"],
        ["git", *identity, "-C", "repo", "mv", "etc/passwd", "etc/passwd.moved"],
        ["git", *identity, "-C", "repo", "rm", "-q", "bin/suid"],
        ["git", *identity, "-C", "repo", "commit", "-q", "-m", "second"],
        ["git", *identity, "-C", "repo", "gc", "-q"],
        ["git", *identity, "-C", "repo", "fsck", "--strict", "--no-progress"],
    ]
    for step in steps:
        on_both(rw_mounted, local_copy, step, env=env)
    show = ["git", "-C", "repo", "log", "--format=%H %T %s"]
    mounted_log, local_log = on_both(rw_mounted, local_copy, show, env=env)
    assert mounted_log == local_log and len(mounted_log.splitlines()) == 2
    assert run(["git", "-C", "repo", "status", "--porcelain"], rw_mounted, env=env) == ""


def test_python_compileall(rw_mounted, local_copy):
    for root in (rw_mounted, local_copy):
        os.makedirs(f"{root}/pkg/sub")
        with open(f"{root}/pkg/__init__.py", "w", encoding="utf-8") as handle:
            handle.write("from .sub.mod import answer\n")
        with open(f"{root}/pkg/sub/__init__.py", "w", encoding="utf-8"):
            pass
        with open(f"{root}/pkg/sub/mod.py", "w", encoding="utf-8") as handle:
            handle.write("def answer():\n    return 42\n")
    mounted, local = on_both(rw_mounted, local_copy,
                             [sys.executable, "-m", "compileall", "-q", "pkg"])
    assert mounted == local
    # The same .pyc names; the mount's are used by an import (checked-hash
    # pycs are not needed: size and mtime in the header match the source).
    probe = ("import importlib.util, os, pkg.sub.mod as m; "
             "print(m.answer(), os.path.exists(importlib.util.cache_from_source(m.__file__)), "
             "m.__spec__.cached is not None)")
    mounted, local = on_both(rw_mounted, local_copy, [sys.executable, "-c", probe],
                             env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert mounted == local == "42 True True\n"
    names = lambda root: sorted(os.path.relpath(os.path.join(top, n), root)  # noqa: E731
                                for top, _, files in os.walk(f"{root}/pkg") for n in files)
    assert names(rw_mounted) == names(local_copy)
    assert any(name.endswith(".pyc") for name in names(rw_mounted))


def test_setting_only_one_time(rw_mounted, local_copy):
    # What `tar -x` (atime UTIME_OMIT) and `touch -m`/`-a` do.
    on_both(rw_mounted, local_copy, ["touch", "-m", "-d", "@1000000000", "etc/passwd"])
    on_both(rw_mounted, local_copy, ["touch", "-a", "-d", "@1200000000", "etc/passwd"])
    on_both(rw_mounted, local_copy, ["touch", "-m", "-d", "@1100000000", "new"])
    mounted, local = os.stat(f"{rw_mounted}/etc/passwd"), os.stat(f"{local_copy}/etc/passwd")
    assert (mounted.st_atime_ns, mounted.st_mtime_ns) == (local.st_atime_ns, local.st_mtime_ns)
    assert mounted.st_mtime_ns == 1_000_000_000 * 10**9
    # A new file: created "now", then only its mtime set.
    assert os.stat(f"{rw_mounted}/new").st_mtime_ns == 1_100_000_000 * 10**9


def test_sha256sum_after_changes(rw_mounted, local_copy, source_tree):
    script = (f"cp -a {source_tree}/. copied/ && cat etc/passwd >> bin/tool && "
              f"mv lib lib64 && tar -cf - -C copied . | tar -xf - -C lib64")
    for root in (rw_mounted, local_copy):
        os.mkdir(f"{root}/copied")
    on_both(rw_mounted, local_copy, ["sh", "-c", script])
    listing = ["sh", "-c", "find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum"]
    mounted, local = on_both(rw_mounted, local_copy, listing)
    assert mounted == local and len(mounted.splitlines()) > 10
    assert_same_tree(local_copy, rw_mounted)


def test_find_and_tar_of_a_changed_view(rw_mounted, local_copy, tmp_path):
    for root in (rw_mounted, local_copy):
        os.unlink(f"{root}/etc/passwd")
        os.rename(f"{root}/bin", f"{root}/sbin")
        os.symlink("sbin", f"{root}/bin")
    # Directory sizes differ (0 on the mount): not listed.
    listing = ["find", ".", "-type", "d", "-printf", "%y %m %u %g %n %P\\n", "-o",
               "-type", "l", "-printf", "%y %m %u %g %s %n %P -> %l\\n", "-o",
               "-printf", "%y %m %u %g %s %n %P\\n"]
    mounted, local = on_both(rw_mounted, local_copy, listing)
    assert sorted(mounted.splitlines()) == sorted(local.splitlines())
    for root, name in ((rw_mounted, "m.tar"), (local_copy, "l.tar")):
        run(["tar", "--sort=name", "--xattrs", "-cf", str(tmp_path / name), "."], root)
    listing = ["tar", "--xattrs", "--numeric-owner", "-tvf"]
    mounted = run([*listing, str(tmp_path / "m.tar")], tmp_path)
    local = run([*listing, str(tmp_path / "l.tar")], tmp_path)
    assert mounted.splitlines() == local.splitlines()
