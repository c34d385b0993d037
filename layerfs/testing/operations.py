"""Random sequences of filesystem operations, for writable-layer tools.

An :class:`Operation` is a name and arguments, applied by :func:`apply` to
anything with ``os``-shaped methods (a writable layerfs filesystem, or
:class:`LocalDirectory` for a directory on disk), so the same sequence can be
run on your tool and on a reference and the results compared.  Paths are
drawn from a small set of names so that operations collide with each other
and with the image's own paths.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Optional

import attrs
from hypothesis import strategies as st

NAMES = ("a", "b", "c", "d", "é")
CONTENTS = (b"", b"x", b"hello\n", b"z" * 5000)
MODES = (0o644, 0o600, 0o755, 0o700, 0o4755)


@attrs.frozen
class Operation:
    name: str
    args: tuple

    def __repr__(self) -> str:
        return f"{self.name}{self.args!r}"


def paths(names=NAMES, max_depth: int = 3):
    return st.lists(st.sampled_from(names), min_size=1, max_size=max_depth).map(
        lambda parts: "/" + "/".join(parts))


def operations(names=NAMES):
    """One operation on paths made of *names*."""
    path = paths(names)
    return st.one_of(
        st.builds(lambda p, d: Operation("write", (p, d)), path, st.sampled_from(CONTENTS)),
        st.builds(lambda p, d: Operation("append", (p, d)), path, st.sampled_from(CONTENTS)),
        st.builds(lambda p, n: Operation("truncate", (p, n)), path, st.integers(0, 6000)),
        st.builds(lambda p: Operation("mkdir", (p,)), path),
        st.builds(lambda p: Operation("rmdir", (p,)), path),
        st.builds(lambda p: Operation("unlink", (p,)), path),
        st.builds(lambda a, b: Operation("rename", (a, b)), path, path),
        st.builds(lambda t, p: Operation("symlink", (t, p)), st.sampled_from(names), path),
        st.builds(lambda a, b: Operation("link", (a, b)), path, path),
        st.builds(lambda p, m: Operation("chmod", (p, m)), path, st.sampled_from(MODES)),
        st.builds(lambda p, t: Operation("utime", (p, t)), path,
                  st.integers(0, 2**32).map(lambda s: s * 1_000_000_000 + 7)),
    )


def operation_lists(names=NAMES, max_size: int = 12):
    return st.lists(operations(names), max_size=max_size)


def apply(target, operation: Operation) -> Optional[int]:
    """Run *operation* on *target*; the errno it failed with, or None."""
    name, args = operation.name, operation.args
    try:
        if name == "write":
            with target.open(args[0], "wb") as stream:
                stream.write(args[1])
        elif name == "append":
            with target.open(args[0], "ab") as stream:
                stream.write(args[1])
        elif name == "utime":
            target.utime(args[0], ns=(args[1], args[1]), follow_symlinks=False)
        elif name == "chmod":
            target.chmod(args[0], args[1], follow_symlinks=False)
        else:
            getattr(target, name)(*args)
    except OSError as error:
        return error.errno or _errno.EIO
    return None


class LocalDirectory:
    """A directory on disk with the methods :func:`apply` calls, paths taken
    inside it.  For trusted trees only: symlinks in the middle of a path are
    followed by the host kernel (an image's absolute symlinks would leave
    the directory), so keep image symlinks out of the paths you drive."""

    def __init__(self, root: str):
        self.root = root

    def _host(self, path: str) -> str:
        return self.root + path

    def open(self, path, mode):
        return open(self._host(path), mode)

    def truncate(self, path, length):
        os.truncate(self._host(path), length)

    def mkdir(self, path):
        os.mkdir(self._host(path))

    def rmdir(self, path):
        os.rmdir(self._host(path))

    def unlink(self, path):
        os.unlink(self._host(path))

    def rename(self, source, destination):
        os.replace(self._host(source), self._host(destination))

    def symlink(self, target, path):
        os.symlink(target, self._host(path))

    def link(self, source, destination):
        os.link(self._host(source), self._host(destination), follow_symlinks=False)

    def chmod(self, path, mode, follow_symlinks=True):
        if os.path.islink(self._host(path)) and not follow_symlinks:
            raise OSError(_errno.EOPNOTSUPP, os.strerror(_errno.EOPNOTSUPP), path)
        os.chmod(self._host(path), mode)

    def utime(self, path, ns, follow_symlinks=True):
        os.utime(self._host(path), ns=ns, follow_symlinks=follow_symlinks)
