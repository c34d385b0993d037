"""The writable view against a plain directory holding the extracted image.

A hypothesis state machine runs random sequences of every write operation
on a layerfs filesystem with an upper layer AND on a local directory where
the same image was extracted (by the small extractor below, from the
reference model).  After each step the two trees must be equal: names,
types, modes, owners, contents, link targets, xattrs, hardlink groups,
nlink, and mtimes (except those the kernel and layerfs each set to "now",
which cannot agree to the nanosecond); a failing operation must fail with
the same errno on both sides.  At the end the filesystem is closed and
reopened with the same upper directory, and must show the same tree.

The local side never lets the kernel follow a symlink: paths are resolved
inside the local root by :func:`resolve_local` (symlinks of the image point
at ``/etc`` and friends), and the last component is handled by the
no-follow form of each call, so nothing can touch the host outside tmp_path.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile

import attrs
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import layerfs
from layerfs.paths import join, split
from layerfs.testing import layers as L
from layerfs.testing.model import apply_stack
from layerfs.testing.strategies import layer_stacks
from layerfs.testing.view import diff_views, snapshot
from layerfs.testing.writers import write_image

# A 253-byte name: its whiteout needs the upper's long form (docs/upper-format.md);
# a 256-byte one is ENAMETOOLONG on both sides.
LONG = "l" * 253
NAMES = ("a", "b", "c", "é", LONG)
NEW_NAMES = ("a", "b", "n", "é", LONG, "m" * 256)   # reserved .wh. names: tests/unit/test_writable.py
DATA = st.sampled_from((b"", b"x", b"hello\n", b"y" * 5000))
MODES = st.sampled_from((0o644, 0o755, 0o600, 0o4755, 0o2775, 0o1777, 0o000, 0o777))
OWNERS = st.sampled_from((-1, 0, 1000, 54321))
XATTRS = st.sampled_from(("user.a", "user.b"))
SYMLINK_TARGETS = st.sampled_from(("a", "../b", "/a/b", "/evil", "nowhere", "/"))

# A fixed base under the random layers: every kind of thing copy-up must
# handle, and a symlink that must never let a write escape.
BASE = L.Layer([
    L.directory("d", mode=0o750, uid=7, gid=8, mtime=100, xattrs={"user.d": b"1"}),
    L.file("d/f", b"lower content", mode=0o640, uid=3, gid=4, mtime=200),
    L.directory("d/sub", mtime=300),
    L.file("d/sub/deep", b"deep", mtime=400),
    L.file("h1", b"linked", mtime=500),
    L.hardlink("d/h2", "h1"),
    L.symlink("evil", "/tmp/outside-of-the-image"),
    L.symlink("dl", "d"),
    L.directory("sg", mode=0o2775, gid=55, mtime=600),
])

needs_root = pytest.mark.skipif(os.geteuid() != 0 and os.environ.get("CI") != "true",
                                reason="chown and mode bits need root")   # CI runs as root


def host(root: str, path: str) -> str:
    return root if path == "/" else root + path


def resolve_local(root: str, path: str, follow: bool):
    """``(real_path, lstat or None)``: *path* resolved inside *root* as the
    kernel would in a chroot there; raises OSError like the kernel."""
    pending = [c for c in reversed(path.split("/")) if c and c != "."]
    current, hops = "/", 0
    while pending:
        name = pending.pop()
        if name == "..":
            current = split(current)[0]
            continue
        if not stat.S_ISDIR(os.lstat(host(root, current)).st_mode):
            raise OSError(errno.ENOTDIR, "not a directory", path)
        child = join(current, name)
        try:
            st_child = os.lstat(host(root, child))
        except FileNotFoundError:
            if pending:
                raise
            return child, None
        if stat.S_ISLNK(st_child.st_mode) and (pending or follow):
            hops += 1
            if hops > 40:
                raise OSError(errno.ELOOP, "too many links", path)
            target = os.readlink(host(root, child))
            if target.startswith("/"):
                current = "/"
            pending.extend(c for c in reversed(target.split("/")) if c and c != ".")
            continue
        current = child
    return current, os.lstat(host(root, current))


def as_extractable(layer: L.Layer) -> L.Layer:
    """Linux symlinks have mode 0o777 and no user.* xattrs, so an extracted
    directory cannot hold anything else (the view shows what the tar says)."""
    return L.Layer([attrs.evolve(m, xattrs=(), mode=0o777) if m.kind == L.SYMLINK else m
                    for m in layer])


def check_not_root(root: str, *local_paths: str) -> None:
    """In a chroot, renaming or removing "/" fails with EBUSY."""
    if root in local_paths:
        raise OSError(errno.EBUSY, "root", "/")


def extract(view: dict, root: str) -> None:
    """Write the model's view into the directory *root*."""
    done = {}
    for path in sorted(view, key=lambda p: (p.count("/"), p)):
        node, target = view[path], host(root, path)
        if node.kind == L.DIR:
            if path != "/":
                os.mkdir(target)
        elif node.link_group and min(node.link_group) in done:
            os.link(done[min(node.link_group)], target)
            continue
        elif node.kind == L.FILE:
            with open(target, "wb") as stream:
                stream.write(node.content)
        elif node.kind == L.SYMLINK:
            os.symlink(node.target, target)
        else:
            os.mknod(target, stat.S_IFIFO | 0o600)
        if node.link_group:
            done[min(node.link_group)] = target
        for name, value in node.xattrs:
            os.setxattr(target, name, value, follow_symlinks=False)
        os.chown(target, node.uid, node.gid, follow_symlinks=False)
        if node.kind != L.SYMLINK:
            os.chmod(target, node.mode)
    for path in sorted(view, key=lambda p: -p.count("/")):
        os.utime(host(root, path), ns=(view[path].mtime_ns, view[path].mtime_ns),
                 follow_symlinks=False)


def outcome(call):
    """The errno a call failed with, or None."""
    try:
        call()
    except OSError as error:
        assert error.errno is not None, error
        return error.errno
    return None


OPEN_FLAGS = {"wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
              "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
              "r+b": os.O_RDWR, "xb": os.O_WRONLY | os.O_CREAT | os.O_EXCL}


@needs_root
class WritableMachine(RuleBasedStateMachine):
    """layerfs with an upper layer versus the extracted image."""

    @initialize(stack=layer_stacks(min_layers=1, max_layers=3, names=NAMES, max_members=6,
                                   special_files=False))
    def start(self, stack):
        self.tmp = tempfile.mkdtemp(prefix="layerfs-model-")
        stack = [BASE, *map(as_extractable, stack)]
        self.source = write_image(stack, os.path.join(self.tmp, "image"), kind="layers",
                                  compression="none")
        self.upper = os.path.join(self.tmp, "upper")
        self.local = os.path.join(self.tmp, "local")
        os.mkdir(self.local)
        extract(apply_stack(stack), self.local)
        self.fs = layerfs.open(self.source, upper=self.upper)
        # The image's view, shared with the writer's tree: it never changes.
        self.image_view = layerfs.open(self.source)
        self.image_snapshot = snapshot(self.image_view)
        self.volatile: set[int] = set()      # local inodes whose mtime is "now"
        self.check()

    def teardown(self):
        try:
            fs = getattr(self, "fs", None)
            if fs is not None:
                before = snapshot(fs)
                fs.close()
                with layerfs.open(self.source, upper=self.upper) as again:
                    lines = diff_views(before, snapshot(again))
                    assert not lines, "reopen changed the view:\n" + "\n".join(lines)
                    self.fs = again
                    self.check()
                self.fs = None
        finally:        # also after a failing example: hypothesis tries hundreds
            if getattr(self, "image_view", None) is not None:
                self.image_view.close()
            if getattr(self, "tmp", None):
                shutil.rmtree(self.tmp)

    # -- helpers ----------------------------------------------------------

    def pick(self, data, new: bool = True) -> str:
        """An existing path, a new name in an existing directory, or a path
        through a symlink."""
        paths = sorted(self.fs.tree.nodes)
        choices = [st.sampled_from(paths)]
        if new:
            dirs = [p for p in paths if self.fs.tree.nodes[p].children is not None]
            choices.append(st.builds(join, st.sampled_from(dirs), st.sampled_from(NEW_NAMES)))
        links = [p for p in paths if self.fs.tree.nodes[p].is_symlink]
        if links:
            choices.append(st.builds(join, st.sampled_from(links), st.sampled_from(NAMES)))
        return data.draw(st.one_of(choices))

    def local_path(self, path: str, follow: bool) -> str:
        return host(self.local, resolve_local(self.local, path, follow)[0])

    def mark(self, *local_paths: str) -> None:
        """These local entries now carry the kernel's "now" as mtime."""
        for path in local_paths:
            try:
                self.volatile.add(os.lstat(path).st_ino)
            except FileNotFoundError:
                pass

    def parent_of(self, path: str, follow: bool = False) -> str:
        real = resolve_local(self.local, path, follow)[0]
        return host(self.local, split(real)[0])

    def same(self, local_call, layer_call) -> None:
        expected = outcome(local_call)
        got = outcome(layer_call)
        assert got == expected, f"errno: local {expected}, layerfs {got}"
        assert got != errno.EXDEV

    def is_special(self, path: str) -> bool:
        try:
            st_ = resolve_local(self.local, path, True)[1]
        except OSError:
            return False
        return st_ is not None and stat.S_ISFIFO(st_.st_mode)

    @invariant()
    def check(self) -> None:
        if getattr(self, "fs", None) is None:
            return
        with layerfs.open(self.source) as view:     # a new one: stats are memoized
            assert view.tree is self.image_view.tree is self.fs.lower.tree
            assert not diff_views(self.image_snapshot, snapshot(view))
        expected, actual = snapshot(self.local), snapshot(self.fs)
        for path, node in list(expected.items()):
            st_ = os.lstat(host(self.local, path))
            if st_.st_ino in self.volatile and path in actual:
                expected[path] = attrs.evolve(node, mtime_ns=actual[path].mtime_ns)
        lines = diff_views(expected, actual)
        assert not lines, "views differ:\n  " + "\n  ".join(lines)
        for path in expected:
            want = os.lstat(host(self.local, path))
            got = self.fs.lstat(path)
            assert (got.st_nlink, got.st_size) == (want.st_nlink, want.st_size) or \
                stat.S_ISDIR(want.st_mode) and got.st_nlink == want.st_nlink, path

    # -- rules ---------------------------------------------------------------

    @rule(data=st.data(), mode=st.sampled_from(sorted(OPEN_FLAGS)), content=DATA,
          offset=st.sampled_from((0, 3, 7000)))
    def write(self, data, mode, content, offset):
        path = self.pick(data)
        if self.is_special(path):
            return
        flags = OPEN_FLAGS[mode]

        def local():
            real = self.local_path(path, follow=not flags & os.O_EXCL)
            fd = os.open(real, flags | os.O_NOFOLLOW, 0o666)
            try:
                if mode != "ab":
                    os.lseek(fd, offset, os.SEEK_SET)
                os.write(fd, content)
            finally:
                os.close(fd)
            self.mark(real, os.path.dirname(real))

        def layer():
            with self.fs.open(path, mode) as stream:
                if mode != "ab":
                    stream.seek(offset)
                stream.write(content)
        self.same(local, layer)

    @rule(data=st.data(), length=st.sampled_from((0, 2, 100, -1)))
    def truncate(self, data, length):
        path = self.pick(data, new=False)
        if self.is_special(path):
            return

        def local():
            if length < 0:      # truncate(2) checks it before the path
                raise OSError(errno.EINVAL, "negative length", path)
            real = self.local_path(path, follow=True)
            os.truncate(real, length)
            self.mark(real)
        self.same(local, lambda: self.fs.truncate(path, length))

    @rule(data=st.data(), mode=MODES)
    def mkdir(self, data, mode):
        path = self.pick(data)

        def local():
            real = self.local_path(path, follow=False)
            os.mkdir(real, mode)
            self.mark(real, os.path.dirname(real))
        self.same(local, lambda: self.fs.mkdir(path, mode))

    @rule(data=st.data(), names=st.lists(st.sampled_from(NEW_NAMES[:4]), min_size=1, max_size=3))
    def makedirs(self, data, names):
        base = self.pick(data, new=False)
        path = base.rstrip("/") + "/" + "/".join(names)
        parts = path.split("/")

        def local():
            for i in range(2, len(parts) + 1):
                prefix = "/".join(parts[:i])
                real, found = resolve_local(self.local, prefix, follow=False)
                if found is not None and i < len(parts):
                    continue
                os.mkdir(host(self.local, real), 0o777)
                self.mark(host(self.local, real), os.path.dirname(host(self.local, real)))
        self.same(local, lambda: self.fs.makedirs(path))

    @rule(data=st.data())
    def rmdir(self, data):
        path = self.pick(data, new=False)

        def local():
            real = self.local_path(path, follow=False)
            check_not_root(self.local, real)
            os.rmdir(real)
            self.mark(os.path.dirname(real))
        self.same(local, lambda: self.fs.rmdir(path))

    @rule(data=st.data())
    def unlink(self, data):
        path = self.pick(data, new=False)

        def local():
            real = self.local_path(path, follow=False)
            os.unlink(real)
            self.mark(os.path.dirname(real))
        self.same(local, lambda: self.fs.unlink(path))

    @rule(data=st.data())
    def rename(self, data):
        source, destination = self.pick(data, new=False), self.pick(data)

        def local():
            a = self.local_path(source, follow=False)
            b = self.local_path(destination, follow=False)
            check_not_root(self.local, a, b)
            os.rename(a, b)
            self.mark(os.path.dirname(a), os.path.dirname(b))
        self.same(local, lambda: self.fs.rename(source, destination))

    @rule(data=st.data(), link_target=SYMLINK_TARGETS)
    def symlink(self, data, link_target):
        path = self.pick(data)

        def local():
            real = self.local_path(path, follow=False)
            os.symlink(link_target, real)
            self.mark(real, os.path.dirname(real))
        self.same(local, lambda: self.fs.symlink(link_target, path))

    @rule(data=st.data())
    def link(self, data):
        source, destination = self.pick(data, new=False), self.pick(data)

        def local():
            a = self.local_path(source, follow=False)
            os.lstat(a)     # link(2) looks the source up in full first
            b = self.local_path(destination, follow=False)
            os.link(a, b, follow_symlinks=False)
            self.mark(os.path.dirname(b))
        self.same(local, lambda: self.fs.link(source, destination))

    @rule(data=st.data())
    def mkfifo(self, data):
        path = self.pick(data)

        def local():
            real = self.local_path(path, follow=False)
            os.mknod(real, stat.S_IFIFO | 0o640)
            self.mark(real, os.path.dirname(real))
        self.same(local, lambda: self.fs.mknod(path, stat.S_IFIFO | 0o640))

    @rule(data=st.data(), mode=MODES)
    def chmod(self, data, mode):
        path = self.pick(data, new=False)
        self.same(lambda: os.chmod(self.local_path(path, follow=True), mode),
                  lambda: self.fs.chmod(path, mode))

    @rule(data=st.data(), uid=OWNERS, gid=OWNERS, follow=st.booleans())
    def chown(self, data, uid, gid, follow):
        path = self.pick(data, new=False)
        self.same(lambda: os.chown(self.local_path(path, follow), uid, gid,
                                   follow_symlinks=False),
                  lambda: self.fs.chown(path, uid, gid, follow_symlinks=follow))

    @rule(data=st.data(), when=st.sampled_from((None, 0, 1_600_000_000_123_456_789)),
          follow=st.booleans())
    def utime(self, data, when, follow):
        path = self.pick(data, new=False)
        ns = None if when is None else (when, when)

        def local():
            real = self.local_path(path, follow)
            os.utime(real, ns=ns, follow_symlinks=False) if ns else \
                os.utime(real, follow_symlinks=False)
            if ns is None:
                self.mark(real)
            else:
                self.volatile.discard(os.lstat(real).st_ino)
        if ns is None:
            self.same(local, lambda: self.fs.utime(path, follow_symlinks=follow))
        else:
            self.same(local, lambda: self.fs.utime(path, ns=ns, follow_symlinks=follow))

    @rule(data=st.data(), name=XATTRS, value=st.sampled_from((b"", b"v", b"w" * 30)),
          flags=st.sampled_from((0, os.XATTR_CREATE, os.XATTR_REPLACE)))
    def setxattr(self, data, name, value, flags):
        path = self.pick(data, new=False)
        self.same(lambda: os.setxattr(self.local_path(path, True), name, value, flags,
                                      follow_symlinks=False),
                  lambda: self.fs.setxattr(path, name, value, flags))

    @rule(data=st.data(), name=XATTRS)
    def removexattr(self, data, name):
        path = self.pick(data, new=False)
        self.same(lambda: os.removexattr(self.local_path(path, True), name,
                                         follow_symlinks=False),
                  lambda: self.fs.removexattr(path, name))

    @rule()
    def reopen(self):
        before = snapshot(self.fs)
        self.fs.close()
        self.fs = layerfs.open(self.source, upper=self.upper)
        lines = diff_views(before, snapshot(self.fs))
        assert not lines, "reopen changed the view:\n" + "\n".join(lines)


WritableMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much])
test_writable_model = WritableMachine.TestCase
