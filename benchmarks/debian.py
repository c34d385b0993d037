"""A realistic corpus: a Debian root filesystem split into layers by real
operations, as an image build would.

1. ``debootstrap --variant=minbase bookworm`` (the base layer);
2. ``apt-get install`` of a package inside a copy (the second layer: what
   changed, added or disappeared, as whiteouts);
3. deleting documentation, man pages and locales (the third layer: mostly
   whiteouts).

Each layer is the difference between two snapshots of the tree, written
with :mod:`tarfile`; hardlinks inside one layer stay hardlinks.  Needs root,
``debootstrap`` and a reachable Debian mirror: :func:`build` raises
:class:`~benchmarks.peers.Skip` with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tarfile

from benchmarks import corpus
from benchmarks.peers import Skip, run

MIRROR = "http://deb.debian.org/debian"
PACKAGE = "python3"
DOC_DIRS = ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info")


def _signature(path: str, st) -> tuple:
    target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
    return (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns, target)


def snapshot(root: str) -> dict:
    """Relative path -> signature of every entry under *root*."""
    out = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(top, name)
            out[os.path.relpath(path, root)] = _signature(path, os.lstat(path))
    return out


def write_diff_layer(old: dict, new_root: str, out_path: str) -> None:
    """The layer that turns the tree *old* describes into *new_root*."""
    new = snapshot(new_root)
    changed = sorted(p for p, sig in new.items() if old.get(p) != sig)
    needed = set(changed)
    for path in changed:
        parent = os.path.dirname(path)
        while parent and parent not in needed:
            needed.add(parent)
            parent = os.path.dirname(parent)
    # Only the topmost deleted path needs a whiteout.
    deleted = [p for p in old if p not in new
               and (os.path.dirname(p) == "" or os.path.dirname(p) in new)]
    with tarfile.open(out_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(needed):
            tar.add(os.path.join(new_root, path), arcname=path, recursive=False)
        for path in sorted(deleted):
            head, name = os.path.split(path)
            marker = tarfile.TarInfo(os.path.join(head, ".wh." + name))
            marker.mtime = corpus.MTIME
            tar.addfile(marker)


def _tar_tree(root: str, out_path: str) -> None:
    with tarfile.open(out_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(os.listdir(root)):
            tar.add(os.path.join(root, name), arcname=name)


def _debootstrap(rootfs: str) -> None:
    if shutil.which("debootstrap") is None:
        raise Skip("debootstrap is not installed (apt-get install debootstrap)")
    if os.geteuid() != 0:
        raise Skip("debootstrap needs root")
    shutil.rmtree(rootfs, ignore_errors=True)
    result = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", rootfs, MIRROR],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise Skip(f"debootstrap failed: {result.stdout.strip()[-300:]} {result.stderr.strip()[-300:]}")


def _install(root: str) -> None:
    shutil.copy("/etc/resolv.conf", os.path.join(root, "etc/resolv.conf"))
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"],
                 ["apt-get", "install", "-y", "-q", "--no-install-recommends", PACKAGE],
                 ["apt-get", "clean"]):
        result = subprocess.run(["chroot", root, *argv], capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise Skip(f"apt-get in the chroot failed: {result.stderr.strip()[-300:]}")
    shutil.rmtree(os.path.join(root, "var/lib/apt/lists"), ignore_errors=True)
    os.makedirs(os.path.join(root, "var/lib/apt/lists/partial"), exist_ok=True)


def _delete_docs(root: str) -> None:
    for relative in DOC_DIRS:
        where = os.path.join(root, relative)
        if os.path.isdir(where):
            for name in os.listdir(where):
                path = os.path.join(where, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)


def build(root: str, log=lambda message: None) -> corpus.Stack:
    """The three-layer Debian stack under *root*/layers (kept when done);
    the final tree is *root*/final."""
    layers_dir = os.path.join(root, "layers")
    stack = corpus.Stack(layers_dir, 3)
    if os.path.exists(os.path.join(layers_dir, "DONE")):
        return stack
    rootfs = os.path.join(root, "rootfs")
    if not os.path.exists(os.path.join(root, "debootstrap.ok")):
        log("debian: debootstrap --variant=minbase bookworm")
        _debootstrap(rootfs)
        open(os.path.join(root, "debootstrap.ok"), "w").close()
    shutil.rmtree(layers_dir, ignore_errors=True)
    os.makedirs(layers_dir)
    log("debian: base layer")
    _tar_tree(rootfs, os.path.join(layers_dir, "layer-000.tar"))
    work = os.path.join(root, "final")
    shutil.rmtree(work, ignore_errors=True)
    run("cp", "-a", rootfs, work)
    before = snapshot(work)
    log(f"debian: apt-get install {PACKAGE}")
    _install(work)
    write_diff_layer(before, work, os.path.join(layers_dir, "layer-001.tar"))
    before = snapshot(work)
    log("debian: delete docs")
    _delete_docs(work)
    write_diff_layer(before, work, os.path.join(layers_dir, "layer-002.tar"))
    for tar_path in stack.layer_files():
        corpus.compress_layer(tar_path)
    stack.write_oci()
    open(os.path.join(layers_dir, "DONE"), "w").close()
    return stack


def final_paths(final_root: str) -> dict:
    """The listing the mount workloads use, from the final tree."""
    dirs, files, every = [], [], []
    for top, subdirs, names in os.walk(final_root):
        relative = "/" + os.path.relpath(top, final_root).lstrip(".")
        relative = relative.rstrip("/") or "/"
        dirs.append(relative)
        for name in names:
            path = os.path.join(relative, name) if relative != "/" else "/" + name
            every.append(path)
            if stat.S_ISREG(os.lstat(os.path.join(top, name)).st_mode):
                files.append(path)
        every.extend(os.path.join(relative, d) for d in subdirs)
    return {"dirs": dirs, "files": files, "all": every}
