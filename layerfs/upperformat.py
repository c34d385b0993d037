"""An upper directory on disk: its layout, format version, lock and image.

Everything about what an upper directory *is* lives here (the changes made
in it are :mod:`layerfs.upper`'s business); ``docs/upper-format.md`` is the
description.  Format 2::

    UPPER/layerfs-upper.json  {"format": 2, "image": {"chain_id", "manifest_digest"}}
    UPPER/lock                flock(2)ed by the one writer; says who it is
    UPPER/diff/               the changes, an OCI changeset (see whiteout names below)
    UPPER/work/               scratch space; emptied when a writer opens
    UPPER/attrs.json          the sidecar's snapshot (layerfs.sidecar)
    UPPER/attrs.log           the sidecar's journal

A whiteout of NAME is the empty file ``.wh.NAME``, which the host can hold
only while NAME has at most 251 bytes.  A longer NAME (252 to 255 bytes) is
whited out by ``.wh..wh.long.`` + the SHA-256 of NAME in hex, a file that
holds NAME.  To a tool that reads ``diff/`` as a plain OCI layer that file is
a whiteout of a name no view can hold, so it hides nothing there; layerfs
reads it as the whiteout of NAME and commits it as ``.wh.NAME``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
from typing import Optional

import attrs

from . import whiteout
from .errors import UpperError
from .hostdir import HostDir, write_file_atomically
from .paths import NAME_MAX, encode_name, decode_name

FORMAT_VERSION = 2
UPGRADABLE = {1}
MARKER_FILE = "layerfs-upper.json"
LOCK_FILE = "lock"
LONG_WHITEOUT_PREFIX = whiteout.PREFIX + whiteout.PREFIX + "long."
MAX_PLAIN_WHITEOUT = NAME_MAX - len(whiteout.PREFIX)      # 251 bytes

log = logging.getLogger("layerfs.upper")


# -- whiteout names on the host -------------------------------------------------

def host_whiteout_name(name: str) -> str:
    """The name of the host file that whites out the view name *name*."""
    raw = encode_name(name)
    if len(raw) <= MAX_PLAIN_WHITEOUT:
        return whiteout.PREFIX + name
    return LONG_WHITEOUT_PREFIX + hashlib.sha256(raw).hexdigest()


def is_long_whiteout(host_name: str) -> bool:
    return host_name.startswith(LONG_WHITEOUT_PREFIX)


def long_whiteout_content(name: str) -> bytes:
    return encode_name(name)


def long_whiteout_target(host_name: str, content: bytes) -> str:
    """The view name a long whiteout file hides; checked against its name."""
    target = decode_name(content)
    if (not content or b"/" in content or b"\0" in content or len(content) > NAME_MAX
            or host_whiteout_name(target) != host_name):
        raise ValueError(f"long whiteout {host_name!r} does not hold the name it hides")
    return target


# -- the image an upper belongs to ------------------------------------------

@attrs.frozen
class Binding:
    """Which image an upper's changes apply to: the ChainID of its layers
    (what decides the view) and the manifest digest where there is one."""

    chain_id: Optional[str]
    manifest_digest: Optional[str] = None

    def to_json(self) -> dict:
        return {"chain_id": self.chain_id, "manifest_digest": self.manifest_digest}

    @classmethod
    def from_json(cls, value) -> "Binding":
        if not isinstance(value, dict):
            raise ValueError("image binding is not an object")
        return cls(value.get("chain_id"), value.get("manifest_digest"))


# -- opening -------------------------------------------------------------------

@attrs.define
class Opened:
    """An upper directory opened for reading or writing."""

    host: HostDir
    version: int
    lock_fd: Optional[int]

    def close(self) -> None:
        if self.lock_fd is not None:
            os.ftruncate(self.lock_fd, 0)    # a clean exit: nobody to name
            os.close(self.lock_fd)           # releases the flock
            self.lock_fd = None
        self.host.close()


def check_upper(directory: str) -> int:
    """The format of the existing upper *directory*; raises
    :class:`UpperError` if it is missing or not a layerfs upper."""
    if not os.path.isdir(directory):
        raise UpperError(errno.ENOENT, f"{directory}: no such upper directory")
    version = read_version(directory)
    if version is None:
        raise UpperError(errno.EINVAL, f"{directory}: not a layerfs upper directory "
                                       f"(no {MARKER_FILE})")
    check_version(directory, version)
    return version


def open_for_reading(directory: str, binding: Binding) -> Opened:
    """An existing upper, read as it is: nothing is created, changed or
    locked (a writer may be at work meanwhile)."""
    version = check_upper(directory)
    host = HostDir(directory)
    try:
        check_binding(directory, read_marker(directory), binding)
    except BaseException:
        host.close()
        raise
    return Opened(host, version, None)


def open_for_writing(directory: str, binding: Binding) -> Opened:
    """Create or open an upper for writing: take its lock (refused, naming
    the holder, if another process has it), upgrade an older format, check
    or record the image, empty ``work/``."""
    os.makedirs(directory, exist_ok=True)
    version = read_version(directory)
    if version is None and not is_fresh(directory):
        raise UpperError(errno.EINVAL, f"{directory}: directory is not empty and has no "
                                       f"{MARKER_FILE}: refusing to use it as an upper layer")
    if version is not None:
        check_version(directory, version)
    host = HostDir(directory)
    try:
        lock_fd = take_lock(host, directory)
    except BaseException:
        host.close()
        raise
    opened = Opened(host, version or FORMAT_VERSION, lock_fd)
    try:
        prepare(opened, directory, binding, new=version is None)
    except BaseException:
        opened.close()
        raise
    return opened


def is_fresh(directory: str) -> bool:
    """Empty, or holding only what an initialisation that was interrupted
    before writing the marker leaves: the lock, ``work/``, an empty ``diff/``."""
    names = set(os.listdir(directory)) - {LOCK_FILE}
    if not names <= {"diff", "work"}:
        return False
    diff = os.path.join(directory, "diff")
    return "diff" not in names or (os.path.isdir(diff) and not os.path.islink(diff)
                                   and not os.listdir(diff))


def prepare(opened: Opened, directory: str, binding: Binding, new: bool) -> None:
    host = opened.host
    marker = {} if new else read_marker(directory)
    if not new:
        check_binding(directory, marker, binding)
    for name in ("diff", "work"):
        if not host.exists("/" + name):
            host.mkdir("/" + name, 0o755)
    for name, _ in host.listdir("/work"):
        host.remove_tree("/work/" + name)
    if new or opened.version != FORMAT_VERSION or "image" not in marker:
        if opened.version != FORMAT_VERSION:
            log.info("upgrading upper %s from format %s to %s", directory,
                     opened.version, FORMAT_VERSION)
            upgrade(host, opened.version)
        marker = {"format": FORMAT_VERSION, "image": binding.to_json()}
        write_file_atomically(host, "/" + MARKER_FILE,
                              json.dumps(marker, sort_keys=True).encode(), "/work")
        opened.version = FORMAT_VERSION


def upgrade(host: HostDir, version: int) -> None:
    """Bring a format-1 upper to format 2.  Format 1 differs in what it
    lacks (no lock, no image, no journal, no long whiteouts, ctimes not
    kept): its sidecar, records alone, is read as a snapshot of sequence 0,
    so nothing on disk needs rewriting but the marker, written last."""
    assert version in UPGRADABLE


def read_marker(directory: str) -> dict:
    try:
        with open(os.path.join(directory, MARKER_FILE), "rb") as stream:
            marker = json.load(stream)
    except (OSError, ValueError) as error:
        raise UpperError(errno.EINVAL, f"{directory}: unreadable {MARKER_FILE}: "
                                       f"{error}") from None
    if not isinstance(marker, dict):
        raise UpperError(errno.EINVAL, f"{directory}: {MARKER_FILE} is not an object")
    return marker


def read_version(directory: str):
    """The format an upper's marker names, or None if there is no marker."""
    if not os.path.lexists(os.path.join(directory, MARKER_FILE)):
        return None
    return read_marker(directory).get("format")


def check_version(directory: str, version) -> None:
    if version != FORMAT_VERSION and version not in UPGRADABLE:
        raise UpperError(errno.EINVAL, f"{directory}: not a layerfs upper directory of "
                                       f"format {FORMAT_VERSION} ({MARKER_FILE} says "
                                       f"{version!r})")


def check_binding(directory: str, marker: dict, binding: Binding) -> None:
    """Refuse an upper recorded for another image (one of format 1 has no
    record: it is bound to the image it is opened with for writing)."""
    if "image" not in marker:
        return
    try:
        recorded = Binding.from_json(marker["image"])
    except ValueError as error:
        raise UpperError(errno.EINVAL, f"{directory}: {MARKER_FILE}: {error}") from None
    if recorded.chain_id != binding.chain_id:
        raise UpperError(errno.EINVAL, f"{directory}: this upper belongs to another image "
                                       f"(ChainID {recorded.chain_id}, manifest "
                                       f"{recorded.manifest_digest}); this image's ChainID "
                                       f"is {binding.chain_id}")


# -- the writer's lock -----------------------------------------------------------

def holder_description() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "command": " ".join(os.path.basename(a) if n == 0 else a
                                for n, a in enumerate(sys.argv))[:200]}


def describe_holder(content: bytes) -> str:
    try:
        holder = json.loads(content)
        text = f"pid {holder['pid']}"
        if holder.get("host") != socket.gethostname():
            text += f" on {holder.get('host')}"
        if holder.get("command"):
            text += f" ({holder['command']})"
        return text
    except (ValueError, TypeError, KeyError):
        return "another process"


def take_lock(host: HostDir, directory: str) -> int:
    """The writer's exclusive ``flock`` on ``UPPER/lock``, which then names
    this process.  The kernel drops a flock when its holder dies, so a lock
    left by a killed writer is free: it is taken over, and said so."""
    fd = host.open_file("/" + LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = describe_holder(os.pread(fd, 4096, 0))
        os.close(fd)
        raise UpperError(errno.EBUSY, f"{directory}: upper is in use by {holder}: "
                                      f"one writer at a time") from None
    except BaseException:
        os.close(fd)
        raise
    previous = os.pread(fd, 4096, 0)
    if previous:
        log.info("upper %s: took over the lock left by %s, which is gone", directory,
                 describe_holder(previous))
    data = json.dumps(holder_description()).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    return fd


def _held_lock_record(directory: str) -> Optional[bytes]:
    """The record in the writer's lock of *directory* while a writer holds
    it; None if nobody does."""
    try:
        fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDONLY | os.O_NOFOLLOW
                     | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 4096, 0)
        return None
    finally:
        os.close(fd)


def lock_holder(directory: str) -> Optional[str]:
    """Who holds the writer's lock of *directory*, or None if nobody does."""
    record = _held_lock_record(directory)
    return None if record is None else describe_holder(record)


def lock_holder_pid(directory: str) -> Optional[int]:
    """The pid of the process holding the writer's lock of *directory*
    (on this host), or None if nobody does."""
    record = _held_lock_record(directory)
    if record is None:
        return None
    try:
        holder = json.loads(record)
    except ValueError:
        return None
    if not isinstance(holder, dict) or holder.get("host") != socket.gethostname():
        return None
    return holder.get("pid") if isinstance(holder.get("pid"), int) else None
