"""Shell-style globbing over any tree given as a ``listdir`` and an ``is_dir``.

The rules are the standard library's ``glob``: ``*``, ``?`` and ``[...]``
match within one path component; a name beginning with ``.`` matches only a
pattern component beginning with ``.``; ``**`` with *recursive* matches zero
or more directories.  No I/O of its own, so the facade, the fsspec module or
a test can feed it any tree.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Callable, Iterator

ListDir = Callable[[str], list]
IsDir = Callable[[str], bool]

_MAGIC = re.compile(r"[*?[]")


def has_magic(component: str) -> bool:
    return _MAGIC.search(component) is not None


def iglob(pattern: str, listdir: ListDir, is_dir: IsDir, *,
          recursive: bool = False) -> Iterator[str]:
    """Absolute paths matching the absolute *pattern*, each directory's
    names in sorted order.  A trailing ``/`` keeps only directories."""
    if not pattern.startswith("/"):
        raise ValueError(f"glob pattern must be absolute: {pattern!r}")
    directories_only = pattern.endswith("/") and pattern != "/"
    parts = [part for part in pattern.split("/") if part]
    for path in _walk("/", parts, listdir, is_dir, recursive):
        if not directories_only or is_dir(path):
            yield path + "/" if directories_only else path


def _join(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name


def _names(directory: str, listdir: ListDir) -> list:
    try:
        return sorted(listdir(directory))
    except OSError:           # not a directory, gone, unreadable: no match
        return []


def _walk(directory: str, parts: list, listdir: ListDir, is_dir: IsDir,
          recursive: bool) -> Iterator[str]:
    if not parts:
        yield directory
        return
    head, rest = parts[0], parts[1:]
    if recursive and head == "**":
        # zero directories, then each visible subdirectory, recursively; a
        # last ``**`` also matches every visible file on the way
        yield from _walk(directory, rest, listdir, is_dir, recursive)
        for name in _names(directory, listdir):
            if name.startswith("."):
                continue
            child = _join(directory, name)
            if is_dir(child):
                yield from _walk(child, parts, listdir, is_dir, recursive)
            elif not rest:
                yield child
        return
    if not has_magic(head):
        # kept as written (``/usr/../etc`` stays so), as the stdlib does
        if head in (".", "..") or head in _names(directory, listdir):
            yield from _walk(_join(directory, head), rest, listdir, is_dir, recursive)
        return
    hidden_ok = head.startswith(".")
    for name in _names(directory, listdir):
        if name.startswith(".") and not hidden_ok:
            continue
        if fnmatch.fnmatchcase(name, head):
            yield from _walk(_join(directory, name), rest, listdir, is_dir, recursive)
