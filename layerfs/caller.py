"""Who asks for a change: the owner and umask that new entries get.

A library user creates entries as the process does (its effective ids, its
umask), like ``os.mkdir``.  Through a mount the kernel sends the calling
process's ids with every request and has already applied that process's
umask to the mode, so the FUSE adapter runs each creating request inside
:func:`acting_as` with the request's ids and a umask of 0.  The upper store
reads :func:`current` when it creates an entry; nothing else needs to know
where the ids came from.

A context variable, not an argument: the facade's methods keep the ``os``
shape, and each libfuse worker thread has its own context, so concurrent
requests of different users never see each other's ids.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator, Optional

import attrs


@attrs.frozen
class Caller:
    """The ids a new entry gets and the umask its mode still needs."""

    uid: int
    gid: int
    umask: int


_current: contextvars.ContextVar[Optional[Caller]] = contextvars.ContextVar(
    "layerfs_caller", default=None)


def process_umask() -> int:
    """The process's umask (reading it means setting it: set it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def process_caller() -> Caller:
    return Caller(os.geteuid(), os.getegid(), process_umask())


def current() -> Caller:
    """The caller of the request being served, or the process itself."""
    return _current.get() or process_caller()


@contextlib.contextmanager
def acting_as(caller: Caller) -> Iterator[Caller]:
    """Run the body's changes on behalf of *caller*."""
    token = _current.set(caller)
    try:
        yield caller
    finally:
        _current.reset(token)
