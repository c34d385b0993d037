"""Kernel overlayfs as a differential oracle.

Each layer of a stack is extracted into its own directory in overlayfs's own
format, the directories are mounted read-only as the lower layers of an
overlay, and the mount is snapshotted.  The kernel then decides the union;
the extraction of one layer only decides that layer's own directory.  It
works the way container runtimes do: a layer is applied on top of the lower
layers seen through an overlay mount, so

* a directory the layer only implies gets the attributes of the directory
  below it (what copy-up does), or the defaults when there is none;
* a whiteout ``.wh.X`` and every path the layer replaces become a 0/0
  character device, or, when the layer puts a directory there, the xattr
  ``trusted.overlay.opaque=y`` on it; an opaque marker becomes that xattr.

What overlayfs cannot express is listed in :func:`expected_overlay_view`
and documented in docs/testing.md.  Needs root, overlayfs and tmpfs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import stat
import subprocess
import tempfile

import attrs

from layerfs.paths import join, normalize_member_name, parents, split
from layerfs.testing import layers as L
from layerfs.testing.view import diff_views, snapshot

OPAQUE_XATTR = "trusted.overlay.opaque"
_DEFAULT_DIR = (0o755, 0, 0, 0, ())


@functools.lru_cache(maxsize=None)
def overlay_available() -> tuple:
    """``(True, "")`` if :func:`overlay_view` can run here, else
    ``(False, reason)``.  Tries a real tmpfs + overlay mount."""
    if os.geteuid() != 0:
        return False, "mounting overlayfs needs root"
    work = tempfile.mkdtemp(prefix="layerfs-overlay-probe-")
    try:
        with _tmpfs(work) as base:
            for name in ("a", "b", "m"):
                os.mkdir(os.path.join(base, name))
            with _overlay([os.path.join(base, "a"), os.path.join(base, "b")],
                          os.path.join(base, "m")):
                pass
        return True, ""
    except OSError as exc:
        return False, f"cannot mount tmpfs + overlayfs here: {exc}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


@attrs.frozen
class OverlayResult:
    view: dict          # {path: ModelNode}, as snapshot() gives it
    copies: int         # hardlinks to lower files, extracted as copies


def overlay_view(stack, workdir) -> OverlayResult:
    """Extract *stack*, mount it with overlayfs below *workdir*, snapshot it
    and unmount.  *stack* must be valid (see the model)."""
    work = tempfile.mkdtemp(prefix="ovl-", dir=os.fspath(workdir))
    try:
        with _tmpfs(work) as base:
            dirs, copies = [], 0
            for index, layer in enumerate(stack):
                layer_dir = os.path.join(base, f"l{index}")
                os.mkdir(layer_dir)
                with _lower_mount(dirs, os.path.join(base, "lower")) as lower:
                    copies += _Extractor(layer_dir, lower, os.path.join(base, f"k{index}")).run(layer)
                dirs.append(layer_dir)
            with _lower_mount(dirs, os.path.join(base, "merged")) as merged:
                view = snapshot(merged) if merged else {"/": _default_root()}
            return OverlayResult(view, copies)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def expected_overlay_view(model_view: dict, result: OverlayResult):
    """``(expected, actual)``: the model's view as overlayfs can show it,
    and the overlay's view, ready for :func:`~layerfs.testing.view.diff_views`.

    Deliberate differences: symlinks, fifos and devices carry no ``user.*``
    xattrs on Linux.  A
    hardlink to a file of a lower layer is a copy in overlayfs, so when the
    extraction made copies, each overlay link group must lie inside one model
    group (checked here; a violation is reported as a ``link_group`` line)
    and the groups are then not compared further.
    """
    expected, actual = {}, dict(result.view)
    for path, node in model_view.items():
        if node.kind == L.SYMLINK:
            node = attrs.evolve(node, xattrs=())
        elif node.kind in (L.FIFO, *L.DEVICE_KINDS):
            node = attrs.evolve(node, xattrs=())
        expected[path] = node
    if result.copies:
        for path, node in actual.items():
            want = expected.get(path)
            if want is not None and node.link_group <= want.link_group:
                actual[path] = attrs.evolve(node, link_group=want.link_group)
    return expected, actual


def overlay_differences(model_view: dict, result: OverlayResult) -> list:
    return diff_views(*expected_overlay_view(model_view, result))


# -- mounting -------------------------------------------------------------------

def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode:
        raise OSError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")


@contextlib.contextmanager
def _tmpfs(where: str):
    """A fresh tmpfs (it holds trusted.* and user.* xattrs and device nodes,
    which the host filesystem may not)."""
    _run("mount", "-t", "tmpfs", "-o", "size=256m,mode=0755", "tmpfs", where)
    try:
        yield where
    finally:
        _run("umount", where)


@contextlib.contextmanager
def _overlay(lower_dirs: list, target: str):
    """Mount *lower_dirs* (base first) read-only at *target*."""
    option = "ro,lowerdir=" + ":".join(reversed(lower_dirs))
    _run("mount", "-t", "overlay", "overlay", "-o", option, target)
    try:
        yield target
    finally:
        _run("umount", target)


@contextlib.contextmanager
def _lower_mount(layer_dirs: list, target: str):
    """The union of *layer_dirs* at *target*, or None when there is none.
    overlayfs wants two lower directories at least: an empty one pads."""
    if not layer_dirs:
        yield None
        return
    os.makedirs(target, exist_ok=True)
    pad = target + "-pad"
    os.makedirs(pad, exist_ok=True)
    dirs = [pad, *layer_dirs] if len(layer_dirs) == 1 else layer_dirs
    with _overlay(dirs, target):
        yield target


def _default_root():
    from layerfs.testing.model import ModelNode
    return ModelNode(L.DIR, 0o755)


# -- extracting one layer -------------------------------------------------------

def _marker(path: str):
    """``("opaque", dir)``, ``("whiteout", path)`` or None (the layer is valid)."""
    parent, base = split(path)
    if base == L.OPAQUE_MARKER:
        return "opaque", parent
    if base.startswith(L.WHITEOUT_PREFIX):
        return "whiteout", join(parent, base[len(L.WHITEOUT_PREFIX):])
    return None


def _lexical_lstat(base: str, path: str):
    """``(stat or None, blocked)``: lstat of *path* under *base* without
    following any symlink; *blocked* if an ancestor is not a directory."""
    for ancestor in parents(path):
        try:
            st = os.lstat(base + ancestor)
        except FileNotFoundError:
            return None, False
        if not stat.S_ISDIR(st.st_mode):
            return None, True
    try:
        return os.lstat(base + path if path != "/" else base), False
    except FileNotFoundError:
        return None, False


def _is_whiteout(st) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


class _Extractor:
    """Applies one layer to its own directory, consulting the lower layers
    through an overlay mount of them (*lower*, or None for the base)."""

    def __init__(self, root: str, lower, keep: str):
        self.root, self.lower, self.keep = root, lower, keep
        os.mkdir(keep)
        self.deleted: set = set()     # paths whose lower content this layer hides
        self.opaque: set = set()      # directories whose lower children are hidden
        self.dir_meta: dict = {}      # path -> (mode, uid, gid, mtime_ns, xattrs)
        self.copies: dict = {}        # (st_dev, st_ino) in lower -> keeper path
        self.serial = 0

    def host(self, path: str) -> str:
        return self.root if path == "/" else self.root + path

    def run(self, layer) -> int:
        entries = [(normalize_member_name(m.name), m) for m in layer]
        for path, _ in entries:
            marker = _marker(path)
            if marker:
                (self.opaque if marker[0] == "opaque" else self.deleted).add(marker[1])
        for path, member in entries:
            self.apply(path, member)
        self.finish()
        return len(self.copies)

    # What the tree holds at *path* right now: this layer first, then below.
    def lookup(self, path: str):
        st, blocked = _lexical_lstat(self.root, path)
        if st is not None:
            return self.host(path), st
        if blocked or self.lower is None or self.hidden(path):
            return None
        st, _ = _lexical_lstat(self.lower, path)
        if st is None or _is_whiteout(st):
            return None
        return ("lower", self.lower + path if path != "/" else self.lower), st

    def below(self, path: str) -> bool:
        """True if the lower layers show something at *path*.  Only then
        is a whiteout made: overlayfs lists a whiteout that hides nothing in
        a directory no lower layer has (it does not filter such listings)."""
        return self.lower is not None and _lexical_lstat(self.lower, path)[0] is not None

    def hidden(self, path: str) -> bool:
        for top in self.deleted:
            if path == top or path.startswith(top + "/"):
                return True
        return any(path.startswith(d.rstrip("/") + "/") and path != d for d in self.opaque)

    def apply(self, path: str, member) -> None:
        source = self.link_source(member) if member.kind == L.HARDLINK else None
        for ancestor in parents(path):
            self.ensure_dir(ancestor)
        if _marker(path) and path != "/":
            return
        meta = (member.mode & 0o7777, member.uid, member.gid, member.mtime * 10**9,
                member.xattrs)
        if path == "/":
            self.dir_meta["/"] = meta
            return
        found = self.lookup(path)
        if member.kind == L.DIR and found and stat.S_ISDIR(found[1].st_mode):
            if isinstance(found[0], tuple):
                os.mkdir(self.host(path))
            self.dir_meta[path] = meta
            return
        if found:
            self.remove(path)
        self.create(path, member, meta, source)

    def remove(self, path: str) -> None:
        host = self.host(path)
        st, _ = _lexical_lstat(self.root, path)
        if st is not None:
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(host)
                self.dir_meta = {p: m for p, m in self.dir_meta.items()
                                 if not (p == path or p.startswith(path + "/"))}
            else:
                os.unlink(host)
        self.deleted.add(path)

    def ensure_dir(self, path: str) -> None:
        found = self.lookup(path)
        if found and stat.S_ISDIR(found[1].st_mode):
            if isinstance(found[0], tuple):      # a lower directory: copy it up
                os.mkdir(self.host(path))
                self.dir_meta[path] = _meta_of(found[0][1], found[1])
            return
        if found:
            self.remove(path)
        os.mkdir(self.host(path))
        self.dir_meta[path] = _DEFAULT_DIR

    def link_source(self, member) -> str:
        """A keeper name for the hardlink target's file, made before the
        entry changes anything: a second name of a file of this layer, or a
        copy of a lower file (overlayfs cannot link across layers)."""
        found = self.lookup(normalize_member_name(member.target))
        assert found and not stat.S_ISDIR(found[1].st_mode), "stack must be valid"
        where, st = found
        self.serial += 1
        keeper = os.path.join(self.keep, str(self.serial))
        if not isinstance(where, tuple):
            os.link(where, keeper, follow_symlinks=False)
            return keeper
        key = (st.st_dev, st.st_ino)
        if key not in self.copies:
            _copy_node(where[1], keeper, st)
            self.copies[key] = keeper
        return self.copies[key]

    def create(self, path: str, member, meta, source) -> None:
        host = self.host(path)
        kind = member.kind
        if kind == L.HARDLINK:
            os.link(source, host, follow_symlinks=False)
            return
        if kind == L.DIR:
            os.mkdir(host)
            self.dir_meta[path] = meta
            return
        if kind == L.FILE:
            with open(host, "wb") as f:
                f.write(member.content)
        elif kind == L.SYMLINK:
            os.symlink(member.target, host)
        elif kind == L.FIFO:
            os.mkfifo(host)
        else:
            kind_bits = stat.S_IFCHR if kind == L.CHARDEV else stat.S_IFBLK
            os.mknod(host, kind_bits | 0o600, os.makedev(member.devmajor, member.devminor))
        _set_meta(host, meta, kind)

    def finish(self) -> None:
        def is_dir_here(path):
            st, blocked = _lexical_lstat(self.root, path)
            return st is not None and stat.S_ISDIR(st.st_mode)

        opaque = {p for p in self.opaque | self.deleted if is_dir_here(p)}
        whiteouts = set()
        for path in sorted(self.deleted, key=len):
            st, blocked = _lexical_lstat(self.root, path)
            covered = any(a in opaque or a in whiteouts for a in parents(path))
            if st is not None or blocked or covered or not self.below(path):
                continue
            os.mknod(self.host(path), stat.S_IFCHR | 0o600, 0)
            whiteouts.add(path)
        for path in opaque:
            os.setxattr(self.host(path), OPAQUE_XATTR, b"y")
        if "/" not in self.dir_meta:
            self.dir_meta["/"] = _meta_of(self.lower, os.lstat(self.lower)) if self.lower \
                else _DEFAULT_DIR
        for path, meta in self.dir_meta.items():
            _set_meta(self.host(path), meta, L.DIR)


def _meta_of(host: str, st) -> tuple:
    names = [n for n in os.listxattr(host, follow_symlinks=False) if n.startswith("user.")]
    xattrs = tuple(sorted((n, os.getxattr(host, n, follow_symlinks=False)) for n in names))
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, xattrs


def _set_meta(host: str, meta: tuple, kind: str) -> None:
    mode, uid, gid, mtime_ns, xattrs = meta
    os.chown(host, uid, gid, follow_symlinks=False)
    if kind != L.SYMLINK:
        os.chmod(host, mode)          # after chown, which clears set-id bits
    if kind in (L.FILE, L.DIR):       # user.* xattrs: regular files and dirs only
        for name, value in xattrs:
            os.setxattr(host, name, value, follow_symlinks=False)
    os.utime(host, ns=(mtime_ns, mtime_ns), follow_symlinks=False)


def _copy_node(source: str, dest: str, st) -> None:
    """A copy of the lower file at *source* (any non-directory)."""
    fmt = stat.S_IFMT(st.st_mode)
    if fmt == stat.S_IFREG:
        shutil.copyfile(source, dest)
        kind = L.FILE
    elif fmt == stat.S_IFLNK:
        os.symlink(os.readlink(source), dest)
        kind = L.SYMLINK
    elif fmt == stat.S_IFIFO:
        os.mkfifo(dest)
        kind = L.FIFO
    else:
        os.mknod(dest, fmt | 0o600, st.st_rdev)
        kind = L.CHARDEV
    _set_meta(dest, _meta_of(source, st), kind)
