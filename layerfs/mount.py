"""Mounting an image with FUSE: checks, options, the daemon, unmounting.

Everything about a mount's lifecycle lives here; what each request does is
:mod:`layerfs.fusecore`'s business, served on libfuse 3's low-level API
(:mod:`layerfs.fusell` for read-only views, :mod:`layerfs.fusewrite` for
writable ones), or with ``LAYERFS_FUSE_API=high`` on its high-level API
(:mod:`layerfs.fuse`, which also loads the library).  The binding (and so
libfuse) is imported only when mounting, so ``import layerfs`` works where
FUSE is missing.

The background mount forks a daemon (new session, no terminal, standard
streams on ``/dev/null``) and returns only once the mount is ready: until
then the daemon's stderr is a pipe to the caller, which reads it to the end.
The daemon closes it when the kernel's ``INIT`` arrives; if it exits first,
what it wrote becomes the :class:`~layerfs.errors.MountError`.

Whoever serves a mount point (the daemon, ``mount -f``, or :func:`serve`)
holds an exclusive ``flock`` on a lock file of the runtime directory, named
after the mount point and holding the server's pid, until the filesystem is
flushed and closed.  :func:`umount` waits for that lock, so it returns only
once the server is done; the lock is released by the kernel whenever the
server dies, so a crashed one never makes it wait.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import logging
import logging.handlers
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterable, Optional

from .errors import MountError
from .reference import as_reference

# Kernel caching.  A read-only view never changes, so the kernel may keep
# names, attributes, listings' attributes (READDIRPLUS) and pages as long as
# it likes; ``open`` answers ENOSYS there, so the kernel keeps pages without
# asking (see layerfs.fusecore).  A writable one is only changed through the
# mount, but several names (hardlinks, renamed directories) share what one
# change affects, so nothing is cached: every lookup and getattr reaches the
# filesystem.
READONLY_OPTIONS = {"entry_timeout": "86400", "attr_timeout": "86400",
                    "negative_timeout": "86400", "kernel_cache": True}
# An unlinked or replaced file stays reachable while the kernel holds its
# inode (layerfs.fusewrite); with LAYERFS_FUSE_API=high, libfuse's
# high-level layer hides it as ``.fuse_hidden*`` instead (no ``hard_remove``,
# see layerfs.fuse).
WRITABLE_OPTIONS = {"entry_timeout": "0", "attr_timeout": "0", "negative_timeout": "0"}
# Device nodes of an image must never open host devices: always on, and
# ``dev`` is refused.  Set-id bits grant nothing (``nosuid``) unless root
# asks for ``suid`` (a container runtime's choice: see docs/mount.md).
FORCED_OPTIONS = {"nodev": True}
REFUSED_OPTIONS = {"dev"}
ROOT_ONLY_OPTIONS = {"suid"}
# max_threads: libfuse 3.14's own default is an invalid value it warns about
# on stderr at every mount; 10 is what later versions default to.
DEFAULT_OPTIONS = {"subtype": "layerfs", "default_permissions": True, "max_threads": "10"}
# Options layerfs itself handles, never passed to libfuse.
LAYERFS_OPTIONS = {"nonempty"}
# The options the kernel's mount takes (fusermount3 gets these for a user's
# mount), and all that libfuse 3 (3.14) accepts besides: anything else would
# fail inside libfuse with a bare status, so it is refused by name.
KERNEL_OPTIONS = {
    "allow_other", "allow_root", "auto_unmount", "default_permissions", "fsname",
    "subtype", "max_read", "blkdev", "blksize", "context", "fscontext", "defcontext",
    "rootcontext", "ro", "rw", "suid", "nosuid", "dev", "nodev", "exec", "noexec",
    "async", "sync", "dirsync", "atime", "noatime", "diratime", "nodiratime",
    "relatime", "norelatime", "strictatime", "nostrictatime", "lazytime", "nolazytime",
}
KNOWN_OPTIONS = KERNEL_OPTIONS | {
    # libfuse's high-level layer and its loop
    "debug", "kernel_cache", "auto_cache", "noauto_cache", "umask", "uid", "gid",
    "entry_timeout", "negative_timeout", "attr_timeout", "ac_attr_timeout",
    "noforget", "remember", "modules", "no_rofd_flush",
    "max_idle_threads", "max_threads", "clone_fd",
}

_ERROR_PREFIX = "layerfs-mount-error "
LOOP_ENDED_BY_SIGNAL = 8
# fuse_main's statuses for an end before it mounted (libfuse 3's helper.c:
# bad arguments, no mount point, fuse_new failed, the mount failed).
FUSE_MAIN_BEFORE_MOUNT = (1, 2, 3, 4)
_PROGRESS_PREFIX = "layerfs-mount-progress "
RUNTIME_DIR_VARIABLE = "LAYERFS_RUNTIME_DIR"
UMOUNT_TIMEOUT = 60.0


def mount(source, mountpoint, *, upper=None, foreground: bool = False,
          options: Iterable[str] = (), tag: Optional[str] = None,
          platform: Optional[str] = None, cache_dir=None, registry=None,
          progress: Optional[Callable[[int, int], None]] = None,
          log_file=None, log_level: str = "WARNING", volumes=()) -> None:
    """Mount the image *source* (what :func:`layerfs.open` takes) on *mountpoint*.

    Read-only, or copy-on-write into the directory *upper*.  *options* are
    FUSE ``-o`` options (``"allow_other"``, ``"ro,attr_timeout=5"``...),
    passed through; ``nodev`` is always set, ``nosuid`` unless root asks for
    ``suid``.  With *foreground*, serve in this process until unmounted (or
    SIGINT/SIGTERM); otherwise return once the mount is ready, served by a
    detached daemon.  *progress* is called as ``progress(done, total)``
    while the image is indexed; *log_file* receives the daemon's log (and
    libfuse's, with ``-o debug``) at *log_level*.  Raises
    :class:`~layerfs.errors.MountError` when mounting is impossible, and the
    image errors of :func:`layerfs.open`.  *volumes*
    (:class:`~layerfs.volume.Volume`) are served by the mount's own server
    (:mod:`layerfs.fusevolume`; they need *upper*), for a caller who cannot
    bind them with the kernel (:mod:`layerfs.volume`).
    """
    mountpoint = os.path.abspath(os.fspath(mountpoint))
    # The daemon works from "/": make every path absolute first.
    source = as_reference(source).absolute()
    upper, cache_dir = absolute(upper), absolute(cache_dir)
    log_file = absolute(log_file)
    user_options = parse_options(options)
    user_options.setdefault("fsname", source_name(source))
    load_fuse()
    check_device()
    check_mountpoint(mountpoint, allow_nonempty=bool(user_options.pop("nonempty", False)))
    if upper is not None:
        check_upper(upper, mountpoint)
    opener = functools.partial(open_fs, source=source, upper=upper, tag=tag,
                               platform=platform, cache_dir=cache_dir,
                               registry=registry, volumes=tuple(volumes))
    if foreground:
        _log_to(log_file, log_level)
        serve(opener(progress), mountpoint, user_options)
        return
    _mount_in_background(opener, mountpoint, user_options, progress, log_file, log_level)
    raise_readahead(mountpoint)


def umount(mountpoint, timeout: float = UMOUNT_TIMEOUT) -> None:
    """Unmount a layerfs (or any FUSE) mount.

    Returns once the layerfs process serving it (if any, as found through
    its lock file) has flushed and closed its filesystem and released the
    mount point; waits at most *timeout* seconds for that.  Raises
    :class:`~layerfs.errors.MountError` if *mountpoint* is not a FUSE mount,
    cannot be unmounted (busy, not yours), or its server is not done in time
    (``ETIMEDOUT``; the mount is gone by then).
    """
    mountpoint = os.path.abspath(os.fspath(mountpoint))
    fstype = mount_type(mountpoint)
    if fstype is None:
        raise MountError(f"{mountpoint}: not a mount point", errno.EINVAL)
    if not fstype.startswith("fuse"):
        raise MountError(f"{mountpoint}: not a FUSE mount ({fstype})", errno.EINVAL)
    # Opened before unmounting: the server may remove the file once done.
    lock_fd = _open_existing(lock_path(mountpoint))
    try:
        from .volume import unbind_beneath
        unbind_beneath(mountpoint)      # volumes bound into the view (layerfs/volume.py)
        _unmount(mountpoint)
        if lock_fd is not None:
            _wait_for_server(lock_fd, mountpoint, timeout)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def _unmount(mountpoint: str) -> None:
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


def lazy_unmount(mountpoint: str) -> None:
    """Detaches *mountpoint* even if busy (what libfuse does when a signal
    ends its loop); its users keep what they hold open."""
    tool = ["umount", "-l"] if os.geteuid() == 0 else ["fusermount3", "-u", "-z"]
    subprocess.run([*tool, mountpoint], stdin=subprocess.DEVNULL, capture_output=True,
                   check=False)


def _wait_for_server(lock_fd: int, mountpoint: str, timeout: float) -> None:
    """Poll the server's lock until it is released (flock has no timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        if time.monotonic() > deadline:
            pid = _read_pid(lock_fd)
            raise MountError(f"{mountpoint}: unmounted, but its layerfs server (pid {pid}) "
                             f"has not finished after {timeout:g} s", errno.ETIMEDOUT)
        time.sleep(0.01)


# -- the server's lock file ----------------------------------------------

def runtime_dir() -> str:
    """Where servers keep their lock files: ``$LAYERFS_RUNTIME_DIR``, else
    ``$XDG_RUNTIME_DIR/layerfs``, else ``/run/layerfs`` for root, else
    ``layerfs-UID`` in the temporary directory."""
    if os.environ.get(RUNTIME_DIR_VARIABLE):
        return os.environ[RUNTIME_DIR_VARIABLE]
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "layerfs")
    if os.geteuid() == 0 and os.path.isdir("/run"):
        return "/run/layerfs"
    return os.path.join(tempfile.gettempdir(), f"layerfs-{os.geteuid()}")


def lock_path(mountpoint) -> str:
    """The lock file of the server of *mountpoint* (an absolute path)."""
    digest = hashlib.sha256(os.fsencode(os.path.abspath(mountpoint))).hexdigest()
    return os.path.join(runtime_dir(), f"mount-{digest[:32]}.lock")


def server_pid(mountpoint) -> Optional[int]:
    """The pid of the process serving *mountpoint*, or None when no layerfs
    process serves it (as seen from this runtime directory)."""
    fd = _open_existing(lock_path(mountpoint))
    if fd is None:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None              # nobody holds it: a leftover
        except BlockingIOError:
            return _read_pid(fd)
    finally:
        os.close(fd)


def acquire_server_lock(mountpoint: str, upper: Optional[str] = None) -> int:
    """Take the lock of *mountpoint*'s server and write our pid in it (and
    on a second line the *upper* directory served, if any: one process may
    serve several mounts, see :mod:`layerfs.storedaemon`); returns its
    descriptor.  ``EBUSY`` if another process holds it (an
    earlier server still flushing).  A file removed by the previous holder
    between our ``open`` and ``flock`` is not the lock any more: try again."""
    path = lock_path(mountpoint)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MountError(f"{mountpoint}: another layerfs process still serves it",
                             errno.EBUSY) from None
        if _same_file(fd, path):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode()
                     + (os.fsencode(upper) + b"\n" if upper is not None else b""))
            return fd
        os.close(fd)


def release_server_lock(mountpoint: str, fd: int) -> None:
    """Remove the lock file, then release the lock by closing it."""
    try:
        _remove_lock_file(mountpoint, fd)
    finally:
        os.close(fd)


def _remove_lock_file(mountpoint: str, fd: int) -> None:
    if _same_file(fd, lock_path(mountpoint)):
        os.unlink(lock_path(mountpoint))


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def _open_existing(path: str) -> Optional[int]:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


def _read_pid(fd: int) -> Optional[int]:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").partition("\n")[0]
    return int(text) if text.isdigit() else None


def served_upper(mountpoint) -> Optional[str]:
    """The upper directory the server of *mountpoint* writes, as its lock
    file says (None for a read-only mount, or no layerfs server)."""
    fd = _open_existing(lock_path(mountpoint))
    if fd is None:
        return None
    try:
        lines = os.pread(fd, 8192, 0).split(b"\n")
    finally:
        os.close(fd)
    return os.fsdecode(lines[1]) if len(lines) > 2 and lines[1] else None


def serve(fs, mountpoint, options=None, on_ready: Optional[Callable[[], None]] = None) -> None:
    """Serve the open filesystem *fs* on *mountpoint* in this process until it
    is unmounted; *fs* is closed (after ``sync`` if writable) before returning.

    *options* is a dict from :func:`parse_options`.  *on_ready* is called
    from a FUSE thread once the mount is usable.  The server's lock (see
    :func:`umount`) is held from before mounting until *fs* is closed.
    """
    mountpoint = os.path.abspath(os.fspath(mountpoint))
    upper = getattr(fs, "upper", None)
    try:
        lock_fd = acquire_server_lock(mountpoint, upper.directory if upper else None)
    except BaseException:
        fs.close()
        raise
    try:
        _serve_unlocked(fs, mountpoint, options, on_ready)
    finally:
        release_server_lock(mountpoint, lock_fd)


def _serve_unlocked(fs, mountpoint: str, options, on_ready) -> None:
    try:
        adapter = load_fuse()
    except BaseException:
        fs.close()
        raise
    from .fusecore import Operations
    low_level = os.environ.get("LAYERFS_FUSE_API") != "high"
    if low_level and not fs.readonly:
        from .fusewrite import request_context
        context = request_context
    else:
        context = adapter.context
    operations = Operations(fs, on_ready=on_ready, context=context)
    device_fd = None
    # libfuse's session owns /dev/fd/N once it has mounted it, and closes it
    # at its end: closing it again could close whatever took the number
    # since (another session's descriptor, in the store's daemon).
    device_taken = False
    try:
        if not low_level and has_volumes(fs):
            raise MountError(f"{mountpoint}: volumes served by layerfs need the low-level "
                             "server (LAYERFS_FUSE_API=high has none)", errno.EINVAL)
        options = dict(options or {})
        options.pop("nonempty", None)
        options.setdefault("fsname", "layerfs")
        fuse_options = mount_options(operations.readonly, options)
        target = mountpoint
        if os.geteuid() != 0:
            # Mounted by fusermount3, which hands back the open /dev/fuse;
            # libfuse serves it as /dev/fd/N (it would otherwise open
            # /dev/fuse itself first, and stop there where it is 0600).
            device_fd = fusermount(mountpoint, fuse_options)
            target = f"/dev/fd/{device_fd}"
        # libfuse's threads serve every mount.  One thread alone halves cold
        # lookups when both CPUs are busy, but on an idle 2-core machine it
        # was 10-33% slower (10k entries x 10 layers, cold find and stats,
        # alternated), and it would queue every reader behind one slow read.
        logging.getLogger("layerfs.mount").info(
            "serving %s on %s (%s, libfuse %d.%d)", fuse_options["fsname"], mountpoint,
            "read-only" if operations.readonly else "writable",
            adapter.binding.fuse_version_major, adapter.binding.fuse_version_minor)
        if low_level:
            # Read-only: the kernel keeps listings; writable: inodes the
            # kernel holds stay reachable (layerfs.fusewrite).
            if operations.readonly:
                from .fusell import Server
                server = Server(fs, target, fuse_options, on_ready)
            else:
                server = writable_server(fs)(operations, target, fuse_options, on_ready)
            try:
                status = server.serve()
            finally:
                device_taken = server.session_mounted
            if status < 0:
                raise MountError(f"{mountpoint}: the FUSE loop failed ({os.strerror(-status)})",
                                 -status)
            return
        try:
            adapter.FUSE(operations, target, foreground=True, nothreads=False,
                         readdirplus=operations.readonly, **fuse_options)
        finally:
            error = sys.exc_info()[1]
            device_taken = not (isinstance(error, RuntimeError) and error.args
                                and error.args[0] in FUSE_MAIN_BEFORE_MOUNT)
    except RuntimeError as error:
        # libfuse 3's fuse_main answers 8 whenever its loop ended other than
        # by an unmount, and a signal (SIGTERM, SIGINT: the ordinary way to
        # stop -f) is such an end; it has unmounted by then.  A loop that
        # failed reads the same: libfuse has said why on stderr (the log).
        if error.args and error.args[0] == LOOP_ENDED_BY_SIGNAL:
            return
        raise MountError(f"{mountpoint}: FUSE could not mount it (libfuse status "
                         f"{error.args[0] if error.args else '?'}; libfuse's own "
                         f"message is above or in the log)", errno.EIO) from None
    finally:
        try:
            if device_fd is not None:
                # libfuse does not unmount what it did not mount (a signal, or
                # an error, ended the loop while still mounted).
                if mount_type(mountpoint) is not None:
                    subprocess.run(["fusermount3", "-u", "-z", mountpoint], check=False,
                                   stdin=subprocess.DEVNULL, capture_output=True)
                if not device_taken:
                    os.close(device_fd)
        finally:
            operations.shutdown()


def has_volumes(fs) -> bool:
    from .volumefs import VolumeFileSystem
    return isinstance(fs, VolumeFileSystem)


def writable_server(fs):
    """The low-level server class for the writable *fs*: one that serves
    volumes if *fs* has them (:mod:`layerfs.fusevolume`)."""
    if has_volumes(fs):
        from .fusevolume import VolumeServer
        return VolumeServer
    from .fusewrite import WritableServer
    return WritableServer


def fusermount(mountpoint: str, options: dict) -> int:
    """Mount *mountpoint* through the set-uid ``fusermount3`` with the
    kernel's share of *options*; returns the open ``/dev/fuse`` descriptor
    it passes back (over a socket named by ``_FUSE_COMMFD``, as libfuse
    does it)."""
    import socket
    tool = shutil.which("fusermount3")
    if tool is None:
        raise MountError("cannot mount: fusermount3 is not installed (needed without "
                         "root; Debian: apt-get install fuse3)", errno.ENOPKG)
    kernel = ",".join(name if value is True else f"{name}={value}"
                      for name, value in options.items()
                      if name in KERNEL_OPTIONS and value is not False)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        result = subprocess.run([tool, "-o", kernel, "--", mountpoint],
                                env=dict(os.environ, _FUSE_COMMFD=str(theirs.fileno())),
                                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, check=False)
        theirs.close()
        if result.returncode != 0:
            raise MountError(f"{mountpoint}: fusermount3 refused: "
                             f"{last_line(result.stderr) or result.returncode}", errno.EPERM)
        _, fds, _, _ = socket.recv_fds(ours, 1, 1)
        if not fds:
            raise MountError(f"{mountpoint}: fusermount3 gave no /dev/fuse descriptor",
                             errno.EIO)
        return fds[0]
    finally:
        theirs.close()
        ours.close()


# -- options -----------------------------------------------------------

def parse_options(options: Iterable[str], euid: Optional[int] = None) -> dict:
    """``["ro,allow_other", "attr_timeout=5"]`` -> ``{"ro": True,
    "allow_other": True, "attr_timeout": "5"}``.  Refuses, naming it, an
    option libfuse 3 does not know, ``dev``, and ``suid`` unless the caller
    (*euid*, default this process) is root."""
    if isinstance(options, str):
        options = [options]
    euid = os.geteuid() if euid is None else euid
    parsed: dict = {}
    for group in options:
        for option in group.split(","):
            option = option.strip()
            if not option:
                continue
            name, equals, value = option.partition("=")
            if name in REFUSED_OPTIONS:
                raise MountError(f"mount option {name!r} is refused: device nodes of an "
                                 f"image never open host devices (always nodev)",
                                 errno.EINVAL)
            if name in ROOT_ONLY_OPTIONS and euid != 0:
                raise MountError(f"mount option {name!r} is refused: only root may mount "
                                 f"with set-id bits honoured", errno.EPERM)
            if name not in KNOWN_OPTIONS and name not in LAYERFS_OPTIONS \
                    and not name.startswith("x-"):
                raise MountError(f"unknown mount option {name!r} (see docs/mount.md, "
                                 f"\"Options\")", errno.EINVAL)
            parsed[name] = value if equals else True
    return parsed


def mount_options(readonly: bool, user_options: dict) -> dict:
    """The options given to libfuse: defaults, then the caller's, then the
    forced ones (``nodev``; ``nosuid`` unless ``suid`` was asked, which
    :func:`parse_options` allows only to root)."""
    options = dict(DEFAULT_OPTIONS)
    options.update(READONLY_OPTIONS if readonly else WRITABLE_OPTIONS)
    if readonly:
        options["ro"] = True
    options.update(user_options)
    options.update(FORCED_OPTIONS)
    if not options.get("suid"):
        options.pop("suid", None)
        options["nosuid"] = True
    else:
        options.pop("nosuid", None)
    return options


def source_name(source) -> str:
    """The mount's source as ``findmnt`` shows it: the image reference (the
    first and last layer file for a stack), made safe for libfuse's option
    string."""
    if source is None:
        return "layerfs"
    reference = as_reference(source)
    if reference.transport == "layers":
        layers = reference.layers
        text = layers[0] if len(layers) == 1 else f"{layers[0]}..{os.path.basename(layers[-1])}"
    else:
        text = str(reference)
    # libfuse splits options at commas (a backslash escapes one); mountinfo
    # escapes blanks itself.
    return text.replace("\\", "\\\\").replace(",", "\\,")


# -- checks ------------------------------------------------------------

def load_fuse():
    """The libfuse 3 binding (:mod:`layerfs.fuse`), or :class:`MountError`
    saying what is missing (mfusepy, or libfuse 3)."""
    from . import fuse
    return fuse


def check_upper(upper: str, mountpoint: str) -> None:
    """An upper directory must not be a file, nor the mount point or inside
    it (the mount would hide it from its own daemon)."""
    real_upper = os.path.realpath(upper)
    real_mountpoint = os.path.realpath(mountpoint)
    if os.path.exists(upper) and not os.path.isdir(upper):
        raise MountError(f"{upper}: the upper must be a directory, and this is a file "
                         f"(give a new or existing directory)", errno.ENOTDIR)
    if real_upper == real_mountpoint or real_upper.startswith(real_mountpoint.rstrip("/") + "/"):
        raise MountError(f"{upper}: the upper cannot be the mount point or inside it "
                         f"(the mount would hide it; choose a directory outside "
                         f"{mountpoint})", errno.EINVAL)


def raise_readahead(mountpoint: str, kib: int = 1024) -> None:
    """Let the kernel read ahead *kib* KiB in sequential reads of the mount
    (libfuse can only lower the kernel's 128 KiB; the mount's bdi setting
    in sysfs raises it, for root).  Best effort: nothing fails without it."""
    try:
        device = os.stat(mountpoint).st_dev
        path = f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb"
        with open(path, "w") as setting:
            setting.write(str(kib))
    except OSError:
        pass


def check_device(device: str = "/dev/fuse") -> None:
    """FUSE must be usable: root opens *device* itself; any other user mounts
    through the set-uid ``fusermount3``, which opens it on their behalf (so
    the device may well be closed to them, as it is where it is 0600)."""
    if not os.path.exists(device):
        raise MountError(f"cannot mount: {device} does not exist (is the fuse "
                         f"kernel module loaded?)", errno.ENODEV)
    if os.geteuid() != 0:
        if not (shutil.which("fusermount3") or shutil.which("fusermount")):
            raise MountError("cannot mount: fusermount3 is not installed (needed "
                             "without root; Debian: apt-get install fuse3)", errno.EPERM)
        return
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


def list_mounts(every: bool = False) -> list:
    """The layerfs mounts served from this runtime directory (see
    :func:`runtime_dir`: yours, live or crashed), oldest first, as
    ``(mountpoint, source)`` (source as ``findmnt`` shows it); with *every*,
    all the layerfs mounts this process can see."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as info:
            lines = info.read().splitlines()
    except FileNotFoundError:
        return []
    found = []
    for line in lines:
        fields = line.split(" ")
        separator = fields.index("-")
        if fields[separator + 1] != "fuse.layerfs":
            continue
        mountpoint = unescape_mountinfo(fields[4])
        if every or os.path.exists(lock_path(mountpoint)):
            found.append((mountpoint, unescape_mountinfo(fields[separator + 2])))
    return found


def umount_all(timeout: float = UMOUNT_TIMEOUT) -> list:
    """Unmount every layerfs mount of this runtime directory (the newest
    first, so nested ones go before their parents); returns the mount
    points unmounted.  Raises the first :class:`~layerfs.errors.MountError`
    after trying them all."""
    done, failures = [], []
    for mountpoint, _source in reversed(list_mounts()):
        try:
            umount(mountpoint, timeout)
            done.append(mountpoint)
        except MountError as error:
            failures.append(error)
    if failures:
        raise failures[0]
    return done


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


def open_fs(progress=None, *, source, upper=None, tag=None, platform=None, cache_dir=None,
            registry=None, share_view: bool = False, volumes=()):
    from . import fs as layerfs_fs
    cache = None
    if cache_dir is not None:
        from .layer import IndexCache
        cache = IndexCache(cache_dir)
    # One container per daemon: a private tree costs less than the shared
    # view plus lazy copies once a walk has reached everything (docs/benchmarks.md);
    # a store's daemon serves several, and shares the view (layerfs.storedaemon).
    opener = functools.partial(layerfs_fs.open, source, tag=tag, platform=platform,
                               cache=cache, upper=upper, registry=registry,
                               share_view=share_view)
    if not volumes:
        return opener(progress=progress)
    from .volume import make_volume_parents
    with opener(progress=progress) as fs:
        make_volume_parents(fs, volumes)
    try:
        return opener(volumes=volumes)
    except ValueError as error:
        raise MountError(str(error), errno.EINVAL) from None


def absolute(path):
    """*path* (None or a path) made absolute."""
    if path is None:
        return None
    return os.path.abspath(path)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# -- the daemon --------------------------------------------------------

def _mount_in_background(opener, mountpoint: str, user_options: dict, progress=None,
                         log_file=None, log_level: str = "WARNING") -> None:
    device_before = os.stat(mountpoint).st_dev
    report = []
    with start_daemon(functools.partial(_daemon, opener, mountpoint, user_options,
                                        log_file=log_file, log_level=log_level)) as pipe:
        for raw in pipe:
            line = raw.decode("utf-8", "replace")
            if line.startswith(_PROGRESS_PREFIX):
                if progress is not None:
                    done, _, total = line[len(_PROGRESS_PREFIX):].partition(" ")
                    progress(int(done), int(total))
                continue
            report.append(line)
    if _is_mounted(mountpoint, device_before):
        return
    raise _daemon_error("".join(report), mountpoint)


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


def _daemon(opener, mountpoint: str, user_options: dict, report_fd: int,
            log_file=None, log_level: str = "WARNING") -> None:
    """The forked child: detach, then serve; stderr reports to the parent
    until the mount is ready (then it is the log file, or /dev/null).
    Never returns."""
    status = 1
    try:
        detach(report_fd)
        # After ready, stderr (libfuse's own messages, -o debug's trace)
        # goes where the log goes.
        after_ready = 0
        if log_file is not None:
            after_ready = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT
                                  | os.O_CLOEXEC, 0o644)
        _log_to(log_file, log_level)

        def ready() -> None:
            os.dup2(after_ready, 2)   # closes the report pipe: the parent returns

        def progress(done: int, total: int) -> None:
            os.write(2, f"{_PROGRESS_PREFIX}{done} {total}\n".encode())

        # Held until exit, so umount returns once this process is done.
        lock_fd = acquire_server_lock(mountpoint, opener.keywords.get("upper"))
        try:
            _serve_unlocked(opener(progress), mountpoint, user_options, ready)
        finally:
            _remove_lock_file(mountpoint, lock_fd)
        status = 0
    except OSError as error:
        _report(error)
    except BaseException:
        logging.getLogger("layerfs.fuse").exception("the mount daemon failed")
        _report(OSError(errno.EIO, "internal error in the mount daemon (see the log)"))
    finally:
        os._exit(status)


def start_daemon(child: Callable[[int], None]):
    """Forks a daemon that runs *child(report_fd)* (which detaches with
    :func:`detach` and never returns); returns the read end of its report
    pipe, as a binary file, once the intermediate child has exited."""
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        child(write_end)
    os.close(write_end)
    os.waitpid(pid, 0)           # the intermediate child exits at once
    return os.fdopen(read_end, "rb")


def detach(report_fd: int) -> None:
    """In a forked child, becoming a daemon: a new session, a second fork
    (the daemon is nobody's child; the first child exits at once), ``/`` as
    working directory, /dev/null as stdin and stdout, *report_fd* as stderr.
    Without exec, every descriptor of the caller was inherited: none is
    kept, or a caller's pipe (``$(layerfs mount ...)``) would never end."""
    os.setsid()
    if os.fork() != 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.dup2(report_fd, 2)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    limit_malloc_arenas()


M_ARENA_MAX = -8        # malloc.h's mallopt parameter
DAEMON_MALLOC_ARENAS = 2


def limit_malloc_arenas() -> None:
    """A daemon serves from many threads (libfuse's workers, a session per
    mount in the store's daemon).  glibc gives a thread that finds the
    arenas busy one of its own, up to 8 per core, and what one arena frees
    the others do not reuse: five mounted containers of a 100,000-entry
    image took 172.5 MiB of PSS in the store's daemon, 132.1 with two
    arenas (docs/benchmarks.md, "Containers").  Python allocates under its
    GIL, so two cost no waiting that shows: two processes each running
    100,000 ``lstat`` through one such mount took 27.2 and 28.9 s with
    two arenas, 28.6 and 47.7 s without the limit.  Nothing is done on a C
    library without ``mallopt``."""
    import ctypes
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_ARENA_MAX, DAEMON_MALLOC_ARENAS)


def _report(error: OSError) -> None:
    line = f"{_ERROR_PREFIX}{error.errno or errno.EIO} {' '.join(describe(error).split())}\n"
    os.write(2, line.encode("utf-8", "replace"))


def describe(error: OSError) -> str:
    """One line: layerfs's own errors as they are, builtin ones as
    ``path: reason`` rather than ``[Errno 2] ...``."""
    if type(error).__str__ is not OSError.__str__ or error.strerror is None:
        return str(error)
    return f"{error.filename}: {error.strerror}" if error.filename else error.strerror


def _log_to(log_file, level: str = "WARNING") -> None:
    """The server's log: *log_file* if given, else syslog for a daemon (it
    has no terminal), if there is one."""
    logger = logging.getLogger("layerfs")
    logger.setLevel(getattr(logging, str(level).upper(), logging.WARNING))
    if log_file is not None:
        handler: logging.Handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s layerfs[%(process)d] %(levelname)s %(name)s: %(message)s"))
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("layerfs[%(process)d]: %(name)s: %(message)s"))
    else:
        return
    logger.addHandler(handler)
