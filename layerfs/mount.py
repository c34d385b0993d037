"""Mounting an image with FUSE: checks, options, the daemon, unmounting.

Everything about a mount's lifecycle lives here; what each request does is
:mod:`layerfs.fuse`'s business.  fusepy (and so libfuse) is imported only
inside :func:`mount`, so ``import layerfs`` works where FUSE is missing.

The background mount forks a daemon (new session, no terminal, standard
streams on ``/dev/null``) and returns only once the mount is ready: until
then the daemon's stderr is a pipe to the caller, which reads it to the end.
The daemon closes it when the kernel's ``INIT`` arrives; if it exits first,
what it wrote becomes the :class:`~layerfs.errors.MountError`.
"""

from __future__ import annotations

import errno
import functools
import logging
import logging.handlers
import os
import shutil
import subprocess
import sys
from typing import Callable, Iterable, Optional

from .errors import MountError

# Kernel caching.  A read-only view never changes, so the kernel may keep
# names, attributes and pages as long as it likes.  A writable one is only
# changed through the mount, but several names (hardlinks, renamed
# directories) share what one change affects, so nothing is cached: every
# lookup and getattr reaches the filesystem, and pages are dropped on open.
READONLY_OPTIONS = {"entry_timeout": "86400", "attr_timeout": "86400",
                    "negative_timeout": "86400", "kernel_cache": True}
# No ``hard_remove``: libfuse 2 then answers fstat() of an unlinked open file
# with ENOENT; without it, such a file lives on as ``.fuse_hidden*`` until closed.
WRITABLE_OPTIONS = {"entry_timeout": "0", "attr_timeout": "0", "negative_timeout": "0",
                    "big_writes": True}
# Device nodes of an image must never open host devices, nor set-id bits
# grant anything: always on, and the options that undo them are refused.
FORCED_OPTIONS = {"nodev": True, "nosuid": True}
REFUSED_OPTIONS = {"dev", "suid"}
DEFAULT_OPTIONS = {"fsname": "layerfs", "subtype": "layerfs", "default_permissions": True}

_ERROR_PREFIX = "layerfs-mount-error "


def mount(source, mountpoint, *, upper=None, foreground: bool = False,
          options: Iterable[str] = (), tag: Optional[str] = None,
          platform: Optional[str] = None, cache_dir=None) -> None:
    """Mount the image *source* (what :func:`layerfs.open` takes) on *mountpoint*.

    Read-only, or copy-on-write into the directory *upper*.  *options* are
    FUSE ``-o`` options (``"allow_other"``, ``"ro,attr_timeout=5"``...),
    passed through; ``nodev`` and ``nosuid`` are always set.  With
    *foreground*, serve in this process until unmounted (or SIGINT/SIGTERM);
    otherwise return once the mount is ready, served by a detached daemon.
    Raises :class:`~layerfs.errors.MountError` when mounting is impossible,
    and the image errors of :func:`layerfs.open` in the foreground.
    """
    mountpoint = os.path.abspath(os.fspath(mountpoint))
    # The daemon works from "/": make every path absolute first.
    source = absolute(source)
    upper, cache_dir = absolute(upper), absolute(cache_dir)
    user_options = parse_options(options)
    load_fuse()
    check_device()
    check_mountpoint(mountpoint, allow_nonempty="nonempty" in user_options)
    opener = functools.partial(open_fs, source, upper=upper, tag=tag, platform=platform,
                               cache_dir=cache_dir)
    if foreground:
        serve(opener(), mountpoint, user_options)
        return
    _mount_in_background(opener, mountpoint, user_options)


def umount(mountpoint) -> None:
    """Unmount a layerfs (or any FUSE) mount.

    The daemon then flushes and closes its filesystem and exits; this does
    not wait for it.  Raises :class:`~layerfs.errors.MountError` if
    *mountpoint* is not a FUSE mount or cannot be unmounted (busy, not yours).
    """
    mountpoint = os.path.abspath(os.fspath(mountpoint))
    fstype = mount_type(mountpoint)
    if fstype is None:
        raise MountError(f"{mountpoint}: not a mount point", errno.EINVAL)
    if not fstype.startswith("fuse"):
        raise MountError(f"{mountpoint}: not a FUSE mount ({fstype})", errno.EINVAL)
    tools = [tool for tool in (["fusermount", "-u"], ["fusermount3", "-u"], ["umount"])
             if shutil.which(tool[0])]
    if not tools:
        raise MountError("cannot unmount: none of fusermount, fusermount3, umount "
                         "is installed", errno.ENOENT)
    messages = []
    for tool in tools:
        result = subprocess.run([*tool, mountpoint], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, check=False)
        if result.returncode == 0:
            return
        messages.append(last_line(result.stderr) or f"{tool[0]} failed")
        if mount_type(mountpoint) is None:
            return
    text = messages[0]
    code = errno.EBUSY if "busy" in text.lower() else errno.EPERM
    raise MountError(f"{mountpoint}: cannot unmount: {text}", code)


def serve(fs, mountpoint, options=None, on_ready: Optional[Callable[[], None]] = None) -> None:
    """Serve the open filesystem *fs* on *mountpoint* in this process until it
    is unmounted; *fs* is closed (after ``sync`` if writable) before returning.

    *options* is a dict from :func:`parse_options`.  *on_ready* is called
    from a FUSE thread once the mount is usable.
    """
    from . import fuse as adapter
    fusepy = load_fuse()
    operations = adapter.Operations(fs, on_ready=on_ready)
    fuse_options = mount_options(operations.readonly, options or {})
    try:
        fusepy.FUSE(operations, os.fspath(mountpoint), foreground=True, nothreads=False,
                    raw_fi=True, encoding=adapter.PATH_ENCODING, use_ino=True,
                    **fuse_options)
    except RuntimeError as error:
        raise MountError(f"{mountpoint}: FUSE could not mount it (libfuse status "
                         f"{error.args[0] if error.args else '?'})", errno.EIO) from None
    finally:
        operations.shutdown()


# -- options -----------------------------------------------------------

def parse_options(options: Iterable[str]) -> dict:
    """``["ro,allow_other", "attr_timeout=5"]`` -> ``{"ro": True,
    "allow_other": True, "attr_timeout": "5"}``; refuses ``dev``/``suid``."""
    if isinstance(options, str):
        options = [options]
    parsed: dict = {}
    for group in options:
        for option in group.split(","):
            option = option.strip()
            if not option:
                continue
            name, equals, value = option.partition("=")
            if name in REFUSED_OPTIONS:
                raise MountError(f"mount option {name!r} is refused: layerfs always "
                                 f"mounts with nodev,nosuid", errno.EINVAL)
            parsed[name] = value if equals else True
    return parsed


def mount_options(readonly: bool, user_options: dict) -> dict:
    """The options given to libfuse: defaults, then the caller's, then the
    forced ones."""
    options = dict(DEFAULT_OPTIONS)
    options.update(READONLY_OPTIONS if readonly else WRITABLE_OPTIONS)
    if readonly:
        options["ro"] = True
    options.update(user_options)
    options.update(FORCED_OPTIONS)
    return options


# -- checks ------------------------------------------------------------

def load_fuse():
    """fusepy, or MountError: it raises ``OSError``/``EnvironmentError`` at
    import when ``libfuse.so.2`` cannot be found."""
    try:
        import fuse
    except ImportError:
        raise MountError("cannot mount: the fusepy package is not installed",
                         errno.ENOPKG) from None
    except OSError as error:
        raise MountError(f"cannot mount: libfuse (version 2) is not installed "
                         f"({error})", errno.ENOPKG) from None
    return fuse


def check_device(device: str = "/dev/fuse") -> None:
    try:
        fd = os.open(device, os.O_RDWR)
    except FileNotFoundError:
        raise MountError(f"cannot mount: {device} does not exist (is the fuse "
                         f"kernel module loaded?)", errno.ENODEV) from None
    except PermissionError:
        raise MountError(f"cannot mount: no permission to open {device}",
                         errno.EACCES) from None
    except OSError as error:
        raise MountError(f"cannot mount: {device}: {error.strerror}",
                         error.errno or errno.ENODEV) from None
    os.close(fd)
    if os.geteuid() != 0 and not (shutil.which("fusermount") or shutil.which("fusermount3")):
        raise MountError("cannot mount: fusermount is not installed (needed "
                         "without root)", errno.EPERM)


def check_mountpoint(mountpoint: str, allow_nonempty: bool) -> None:
    """Like other FUSE tools: the mount point must be an existing directory,
    writable by the caller, not already a mount point, and empty unless
    the ``nonempty`` option is given."""
    try:
        names = os.listdir(mountpoint)
    except FileNotFoundError:
        raise MountError(f"{mountpoint}: mount point does not exist", errno.ENOENT) from None
    except NotADirectoryError:
        raise MountError(f"{mountpoint}: mount point is not a directory",
                         errno.ENOTDIR) from None
    except PermissionError:
        raise MountError(f"{mountpoint}: no permission to use it as a mount point",
                         errno.EACCES) from None
    except OSError as error:
        # ENOTCONN: a dead FUSE mount still sits there.
        raise MountError(f"{mountpoint}: mount point is unusable ({error.strerror}); "
                         f"is it a dead mount? try: layerfs umount {mountpoint}",
                         errno.EBUSY) from None
    if mount_type(mountpoint) is not None:
        raise MountError(f"{mountpoint}: already a mount point", errno.EBUSY)
    if names and not allow_nonempty:
        raise MountError(f"{mountpoint}: mount point is not empty (use -o nonempty "
                         f"to mount over its contents)", errno.ENOTEMPTY)
    if os.geteuid() != 0 and not os.access(mountpoint, os.W_OK):
        raise MountError(f"{mountpoint}: no permission to use it as a mount point",
                         errno.EACCES)


def mount_type(path: str) -> Optional[str]:
    """The filesystem type mounted exactly on *path* (``fuse.layerfs``...),
    or None.  Read from mountinfo, so a dead FUSE mount still counts."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
            lines = info.read().splitlines()
    except FileNotFoundError:
        return "unknown" if os.path.ismount(path) else None
    found = None
    for line in lines:
        fields = line.split(" ")
        separator = fields.index("-")
        if unescape_mountinfo(fields[4]) == path:
            found = fields[separator + 1]      # the last mount on top wins
    return found


def unescape_mountinfo(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as ``\\ooo``."""
    if "\\" not in text:
        return text
    out, index = [], 0
    while index < len(text):
        if text[index] == "\\" and text[index + 1:index + 4].isdigit():
            out.append(chr(int(text[index + 1:index + 4], 8)))
            index += 4
        else:
            out.append(text[index])
            index += 1
    return "".join(out)


def open_fs(source, *, upper=None, tag=None, platform=None, cache_dir=None):
    from . import fs as layerfs_fs
    cache = None
    if cache_dir is not None:
        from .layer import IndexCache
        cache = IndexCache(cache_dir)
    return layerfs_fs.open(source, tag=tag, platform=platform, cache=cache, upper=upper)


def absolute(source):
    """*source* (None, a path or a list of paths) with absolute paths."""
    if source is None:
        return None
    if isinstance(source, (str, bytes, os.PathLike)):
        return os.path.abspath(source)
    return [os.path.abspath(path) for path in source]


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# -- the daemon --------------------------------------------------------

def _mount_in_background(opener, mountpoint: str, user_options: dict) -> None:
    device_before = os.stat(mountpoint).st_dev
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        _daemon(opener, mountpoint, user_options, write_end)   # never returns
    os.close(write_end)
    os.waitpid(pid, 0)           # the intermediate child exits at once
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read().decode("utf-8", "replace")
    if _is_mounted(mountpoint, device_before):
        return
    raise _daemon_error(report, mountpoint)


def _is_mounted(mountpoint: str, device_before: int) -> bool:
    try:
        return os.stat(mountpoint).st_dev != device_before
    except OSError:
        return False


def _daemon_error(report: str, mountpoint: str) -> MountError:
    for line in reversed(report.splitlines()):
        if line.startswith(_ERROR_PREFIX):
            code, _, message = line[len(_ERROR_PREFIX):].partition(" ")
            return MountError(message, int(code))
    detail = last_line(report) or "the mount process exited"
    return MountError(f"{mountpoint}: cannot mount: {detail}", errno.EIO)


def _daemon(opener, mountpoint: str, user_options: dict, report_fd: int) -> None:
    """The forked child: detach, then serve; stderr reports to the parent
    until the mount is ready.  Never returns."""
    status = 1
    try:
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.dup2(report_fd, 2)
        os.close(report_fd)
        _log_to_syslog()

        def ready() -> None:
            os.dup2(devnull, 2)      # closes the report pipe: the parent returns

        serve(opener(), mountpoint, user_options, on_ready=ready)
        status = 0
    except OSError as error:
        _report(error)
    except BaseException:
        logging.getLogger("layerfs.fuse").exception("the mount daemon failed")
        _report(OSError(errno.EIO, "internal error in the mount daemon (see the log)"))
    finally:
        os._exit(status)


def _report(error: OSError) -> None:
    line = f"{_ERROR_PREFIX}{error.errno or errno.EIO} {' '.join(describe(error).split())}\n"
    os.write(2, line.encode("utf-8", "replace"))


def describe(error: OSError) -> str:
    """One line: layerfs's own errors as they are, builtin ones as
    ``path: reason`` rather than ``[Errno 2] ...``."""
    if type(error).__str__ is not OSError.__str__ or error.strerror is None:
        return str(error)
    return f"{error.filename}: {error.strerror}" if error.filename else error.strerror


def _log_to_syslog() -> None:
    """The daemon has no terminal: its errors go to syslog, if there is one."""
    if not os.path.exists("/dev/log"):
        return
    handler = logging.handlers.SysLogHandler(address="/dev/log")
    handler.setFormatter(logging.Formatter("layerfs[%(process)d]: %(name)s: %(message)s"))
    logging.getLogger("layerfs").addHandler(handler)
