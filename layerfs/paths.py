"""How layerfs spells paths, and how a tar member name becomes one.

Inside layerfs every path in an image is *canonical*: absolute, ``/``-separated,
with no empty, ``.`` or ``..`` component and no trailing slash; the root is
``"/"``.  This is also how FUSE hands paths over, so the adapter passes them
through untouched.  Names are ``str``; bytes that are not UTF-8 are kept with
``surrogateescape``, as :func:`os.fsdecode` does on Linux.
"""

from __future__ import annotations

PATH_MAX = 4096   # bytes, including the terminating NUL (Linux)
NAME_MAX = 255    # bytes in one component (Linux)


class BadMemberName(ValueError):
    """A member name that cannot be placed inside the image root."""


def decode_name(raw: bytes) -> str:
    """Bytes of a tar name to ``str``, keeping undecodable bytes."""
    return raw.decode("utf-8", "surrogateescape")


def encode_name(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def normalize_member_name(name: str) -> str:
    """The canonical path of a tar member name.

    Leading ``/`` and ``./`` are dropped (as tar does), ``.`` and empty
    components vanish and ``..`` is resolved lexically.  A name that climbs
    above the root, holds a NUL, or is longer than Linux allows (but for a
    whiteout of a long name) raises :class:`BadMemberName`.
    """
    if "\x00" in name:
        raise BadMemberName("name contains a NUL byte")
    parts: list[str] = []
    for part in name.split("/"):
        if part == "" or part == ".":
            continue
        if part == "..":
            if not parts:
                raise BadMemberName("name climbs out of the image root with '..'")
            parts.pop()
            continue
        if len(encode_name(part)) > NAME_MAX and not is_long_whiteout(part):
            raise BadMemberName(f"a component is longer than {NAME_MAX} bytes")
        parts.append(part)
    path = "/" + "/".join(parts)
    if len(encode_name(path)) >= PATH_MAX:
        raise BadMemberName(f"path is longer than {PATH_MAX - 1} bytes")
    return path


def is_long_whiteout(part: str) -> bool:
    """A whiteout of a name of 252 to 255 bytes is longer than a name can
    be (``.wh.`` + NAME), yet a valid tar member: what it hides fits."""
    return part.startswith(".wh.") and len(encode_name(part)) - 4 <= NAME_MAX


def is_canonical(path: str) -> bool:
    """True if *path* needs no normalisation (the common, fast case)."""
    if path == "/":
        return True
    return (path.startswith("/") and not path.endswith("/")
            and "//" not in path and "/./" not in path and "/../" not in path
            and not path.endswith("/.") and not path.endswith("/.."))


def split(path: str) -> tuple[str, str]:
    """``"/a/b"`` -> ``("/a", "b")``; ``"/a"`` -> ``("/", "a")``."""
    head, _, name = path.rpartition("/")
    return (head or "/"), name


def join(parent: str, name: str) -> str:
    return parent + name if parent == "/" else parent + "/" + name


def parents(path: str) -> list[str]:
    """The proper ancestors of *path*, root first, root excluded."""
    out = []
    i = path.find("/", 1)
    while i != -1:
        out.append(path[:i])
        i = path.find("/", i + 1)
    return out


def order_key(path: str) -> list[bytes]:
    """The key that sorts paths component by component, in bytes: every
    directory comes right before its whole subtree, so ``/d``, ``/d/f``,
    ``/d-x`` (a plain string sort gives ``/d``, ``/d-x``, ``/d/f``).  A tar
    written in this order lets ``tar -x`` restore each directory's mtime,
    since nothing is added to a directory after tar has left it."""
    return encode_name(path).split(b"/")


def is_within(path: str, top: str) -> bool:
    """True if *path* is *top* or lies beneath it."""
    return top == "/" or path == top or path.startswith(top + "/")

