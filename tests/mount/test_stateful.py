"""Random sequences of file operations through a read-write mount, each one
done also on a plain local directory holding the extracted image: the same
errno (or success) every time, and the same whole tree after every step.

One mount per example (the image is small), unmounted in teardown.  A few
dozen steps for a few examples under the default profile; more with
``--hypothesis-profile=thorough``.
"""

from __future__ import annotations

import itertools
import os
import shutil
import stat

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

import layerfs
from layerfs import mount as layerfs_mount
from layerfs.testing.view import assert_views_equal, snapshot
from mount_helpers import comparable, extract_view, force_unmount, requires_fuse, requires_upper

pytestmark = [pytest.mark.mount, requires_fuse, requires_upper]

# Lower paths of every kind (no device nodes: the mount is nodev, the local
# copy is not) and new names, some inside lower directories.
PATHS = st.sampled_from([
    "etc", "etc/passwd", "bin", "bin/tool", "bin/tool-link", "lib", "lib/libx.so",
    "lib/libx.so.1", "usr", "usr/lib", "usr/lib/new", "attrs", "empty", "dangling",
    "absolute", "run/fifo", "a", "b", "etc/x", "bin/y", "d", "d/e", "usr/lib/z",
    "etc/" + "l" * 253, "m" * 256,        # a long whiteout's name; ENAMETOOLONG
])
OPEN_FLAGS = st.sampled_from([
    os.O_WRONLY | os.O_CREAT | os.O_EXCL, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    os.O_WRONLY | os.O_APPEND | os.O_CREAT, os.O_RDWR, os.O_WRONLY | os.O_APPEND,
    os.O_RDWR | os.O_TRUNC, os.O_RDONLY | os.O_DIRECTORY, os.O_RDONLY | os.O_NOFOLLOW,
])
MODES = st.sampled_from([0o600, 0o644, 0o755, 0o700, 0o444, 0o1777])
TIMES = st.sampled_from([0, 1_000_000_000_123, 1_500_000_000 * 10**9 + 7])
DATA = st.binary(max_size=64) | st.binary(min_size=4000, max_size=9000)


def outcome(call):
    """``None`` on success, else the errno: what both sides must agree on."""
    try:
        call()
    except OSError as error:
        return error.errno
    return None


class MountMachine(RuleBasedStateMachine):
    layers: list = []
    view: dict = {}
    base: str = ""
    counter = itertools.count()

    def __init__(self):
        super().__init__()
        work = os.path.join(self.base, f"example-{next(self.counter)}")
        self.local = extract_view(self.view, os.path.join(work, "local"))
        self.mnt = os.path.join(work, "mnt")
        os.mkdir(self.mnt)
        layerfs_mount.mount(self.layers, self.mnt, upper=os.path.join(work, "upper"))
        self.work = work

    def teardown(self):
        force_unmount(self.mnt)
        shutil.rmtree(self.work, ignore_errors=True)

    def both(self, operation, *paths, **kwargs):
        """Do *operation* on the mount and on the local copy, with *paths*
        relative to each root; they must fail (or not) alike."""
        results = [outcome(lambda: operation(*[f"{root}/{p}" for p in paths], **kwargs))
                   for root in (self.mnt, self.local)]
        assert results[0] == results[1], (
            f"{operation.__name__}{paths}: mount {describe(results[0])}, "
            f"local {describe(results[1])}")

    @rule(path=PATHS, flags=OPEN_FLAGS, data=DATA, offset=st.integers(0, 5000))
    def open_and_write(self, path, flags, data, offset):
        def write(host):
            fd = os.open(host, flags | os.O_NONBLOCK, 0o640)
            try:
                if flags & (os.O_WRONLY | os.O_RDWR):
                    os.write(fd, data)
                    if not flags & os.O_APPEND and os.path.isfile(host):
                        os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
        write.__name__ = "open+write"
        fifo = os.path.exists(f"{self.local}/{path}") and stat.S_ISFIFO(
            os.lstat(f"{self.local}/{path}").st_mode)
        before = os.lstat(f"{self.mnt}/{path}") if fifo else None
        self.both(write, path)
        if fifo:
            # A known kernel fact, not a difference to hunt: FUSE special
            # files are S_NOCMTIME, so I/O through the mount never changes a
            # fifo's times, where a local fifo's change (docs/mount.md).
            after = os.lstat(f"{self.mnt}/{path}")
            assert (after.st_mtime_ns, after.st_ctime_ns) == (before.st_mtime_ns,
                                                              before.st_ctime_ns)
            os.utime(f"{self.local}/{path}", ns=(after.st_atime_ns, after.st_mtime_ns),
                     follow_symlinks=False)

    @rule(path=PATHS, length=st.integers(0, 400_000))
    def truncate(self, path, length):
        self.both(lambda host: os.truncate(host, length), path)

    @rule(path=PATHS, mode=MODES)
    def mkdir(self, path, mode):
        self.both(lambda host: os.mkdir(host, mode), path)

    @rule(path=PATHS)
    def rmdir(self, path):
        self.both(os.rmdir, path)

    @rule(path=PATHS)
    def unlink(self, path):
        self.both(os.unlink, path)

    @rule(source=PATHS, destination=PATHS)
    def rename(self, source, destination):
        self.both(os.rename, source, destination)

    # Both sides are real directories: the kernel follows their symlinks on
    # the host, so targets stay relative and never climb ("/etc" or "../x"
    # would let a write land outside the test's directories).
    @rule(content=st.sampled_from(["etc/passwd", "bin", "nowhere", "a"]), path=PATHS)
    def symlink(self, content, path):
        self.both(lambda host: os.symlink(content, host), path)

    @rule(source=PATHS, destination=PATHS)
    def link(self, source, destination):
        self.both(os.link, source, destination)

    @rule(path=PATHS, mode=MODES)
    def chmod(self, path, mode):
        self.both(lambda host: os.chmod(host, mode), path)

    @rule(path=PATHS, atime=TIMES, mtime=TIMES)
    def utime(self, path, atime, mtime):
        self.both(lambda host: os.utime(host, ns=(atime, mtime), follow_symlinks=False), path)

    @rule(path=PATHS)
    def mkfifo(self, path):
        self.both(os.mkfifo, path)

    @rule(path=PATHS, name=st.sampled_from(["user.a", "user.comment"]),
          value=st.binary(max_size=20))
    def setxattr(self, path, name, value):
        self.both(lambda host: os.setxattr(host, name, value), path)

    @invariant()
    def trees_are_equal(self):
        assert_views_equal(comparable(snapshot(self.local)), comparable(snapshot(self.mnt)))


def describe(result) -> str:
    return "succeeded" if result is None else f"failed with {os.strerror(result)} ({result})"


def test_operations_through_the_mount_match_a_local_directory(sample_layers, tmp_path):
    MountMachine.layers = sample_layers
    with layerfs.open(sample_layers) as fs:
        MountMachine.view = snapshot(fs)
    MountMachine.base = str(tmp_path)
    examples = max(3, settings.default.max_examples // 20)
    run_state_machine_as_test(MountMachine, settings=settings(
        max_examples=examples, stateful_step_count=30, deadline=None))
