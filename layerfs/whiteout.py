"""The one place that decides what a marker file name means.

OCI layers delete with marker files: ``.wh.NAME`` hides ``NAME`` (and all
beneath it) in lower layers, and ``.wh..wh..opq`` hides every lower child of
its directory.  Other tools went wrong by checking the ``.wh.`` prefix before
the opaque name (so opaque markers became whiteouts of ``.wh..opq``), by
accepting look-alikes such as ``.wh..wh..opqX`` as opaque, or by letting a bare
``.wh.`` delete the parent.  So: the opaque name is matched first and exactly;
``.wh.`` alone and whiteouts of ``.`` or ``..`` (``.wh..``, ``.wh...``) are
:data:`MALFORMED`, which the caller reports as an error.
"""

from __future__ import annotations

PREFIX = ".wh."
OPAQUE_NAME = ".wh..wh..opq"

NOT_A_MARKER = 0
WHITEOUT = 1
OPAQUE = 2
MALFORMED = 3


def classify(name: str) -> tuple[int, str]:
    """Classify a base name: ``(kind, target)``.

    *target* is the hidden name for :data:`WHITEOUT` and ``""`` otherwise.
    Every other name beginning with ``.wh.`` is a whiteout of the rest,
    including ``.wh..wh.x`` (a whiteout of ``.wh.x``, which can never exist in
    a view, so it hides nothing).
    """
    if not name.startswith(PREFIX):
        return NOT_A_MARKER, ""
    if name == OPAQUE_NAME:
        return OPAQUE, ""
    target = name[len(PREFIX):]
    if target in ("", ".", ".."):
        return MALFORMED, ""
    return WHITEOUT, target


def is_marker_name(name: str) -> bool:
    """True for any name a view must never show (it begins with ``.wh.``)."""
    return name.startswith(PREFIX)


def whiteout_name(name: str) -> str:
    """The marker that hides *name* in lower layers."""
    return PREFIX + name
