"""One daemon per store, serving every mounted container of it.

``layerfs container mount`` (in the background) does not fork a daemon of
its own: it asks the store's daemon to serve the container, starting that
daemon first if the store has none.  The daemon opens each container over
the image's view, which is shared by every container of that image in the
process (:mod:`layerfs.lowerview`), and serves each on its own FUSE session
(one libfuse loop, in a thread of its own).  So N mounted containers of an
image cost one Python process and one image index plus what each container
has changed or looked at, instead of N of each (docs/containers.md).

In the runtime directory (:func:`layerfs.mount.runtime_dir`, 0700)::

    store-<key>.lock   held (exclusive flock) by the daemon for its whole life
    store-<key>.sock   its Unix socket: made once the lock is held, removed
                       before the lock is released

``<key>`` is a hash of the store's absolute path.  A client that finds no
socket (or a refused one) starts a daemon, which waits for the lock, so two
daemons of one store never serve at once; the loser of a race that finds
the lock's socket answering leaves.

Protocol: a connection carries one request line (JSON) and the daemon's
answer lines: ``{"progress": [done, total]}`` while the image is indexed,
then ``{"ok": true}`` once the mount is ready, or ``{"error": message,
"errno": n}``.  Only the daemon's own user may connect (``SO_PEERCRED``).

Each session holds its mount point's server lock and its container's upper
lock, as a daemon of one mount does, so ``umount`` waits for that session
alone and one writer per container still holds.  The daemon exits once it
has served nothing for :data:`IDLE_EXIT` seconds.  SIGTERM, SIGINT or SIGHUP
unmount every session (lazily, as libfuse does on a signal), flush them and
exit; a crash takes every container of the store down at once, and each
recovers on its next open as after any killed mount.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import select
import signal
import socket
import struct
import threading
import time
from typing import Callable, Optional

from .errors import MountError

log = logging.getLogger("layerfs.store")

IDLE_EXIT = 2.0           # seconds with nothing mounted before the daemon exits
START_TIMEOUT = 30.0      # seconds a client waits for a new daemon's socket
REQUEST_TIMEOUT = 10.0    # seconds the daemon waits for a request line
STOP_TIMEOUT = 10.0       # seconds a signalled daemon waits for each session
_READY = b"layerfs-store-daemon ready\n"
_OTHER = b"layerfs-store-daemon: another daemon serves this store\n"


def _paths(store_path: str) -> tuple[str, str]:
    from .mount import runtime_dir
    key = hashlib.sha256(os.fsencode(os.path.abspath(store_path))).hexdigest()[:32]
    base = os.path.join(runtime_dir(), f"store-{key}")
    return base + ".lock", base + ".sock"


# -- the client --------------------------------------------------------------

def mount_container(store, name: str, mountpoint, *, options=(), cache_dir=None,
                    registry=None, progress: Optional[Callable[[int, int], None]] = None,
                    log_file=None, log_level: str = "WARNING", volumes=()) -> None:
    """Has the daemon of *store* (a :class:`layerfs.Store`) serve its
    container *name* on *mountpoint*, starting the daemon if the store has
    none; returns once the mount is ready.  *options* as for
    :func:`layerfs.mount.mount`; *log_file* and *log_level* are the
    daemon's, taken by the one this call starts (if any).  *volumes*
    (:class:`~layerfs.volume.Volume`) are served by the daemon itself
    (:mod:`layerfs.fusevolume`).  Raises
    :class:`MountError`, with the daemon's own message when it refused."""
    import attrs
    from . import mount as m
    from .cache import default_cache_root
    container = store.get(name)
    mountpoint = os.path.abspath(os.fspath(mountpoint))
    user_options = m.parse_options(options)
    user_options.setdefault("fsname", m.source_name(container.reference))
    m.load_fuse()
    m.check_device()
    m.check_mountpoint(mountpoint, allow_nonempty=bool(user_options.pop("nonempty", False)))
    m.check_upper(container.upper, mountpoint)
    request = {"name": name, "mountpoint": mountpoint, "options": user_options,
               "cache_dir": os.path.abspath(cache_dir or default_cache_root()),
               "registry": attrs.asdict(registry) if registry is not None else {},
               "volumes": [attrs.astuple(volume) for volume in volumes]}
    _ask(store.path, request, progress, m.absolute(log_file), log_level)
    m.raise_readahead(mountpoint)


def _ask(store_path: str, request: dict, progress, log_file, log_level: str) -> None:
    """Sends *request* to the store's daemon (started if none listens) and
    waits for its answer."""
    _, socket_path = _paths(store_path)
    line = (json.dumps(request) + "\n").encode()
    for _attempt in range(5):
        connection = _connect(socket_path)
        if connection is None:
            _start_daemon(store_path, log_file, log_level)
            continue
        try:
            with connection:
                connection.sendall(line)
                answer = _read_answer(connection, progress)
        except OSError:
            answer = None
        if answer is None:
            continue             # the daemon was leaving as we came: ask the next one
        if "error" in answer:
            raise MountError(answer["error"], int(answer.get("errno") or errno.EIO))
        return
    raise MountError(f"the store daemon of {store_path} does not answer", errno.EIO)


def _connect(path: str) -> Optional[socket.socket]:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with _short(path) as address:
            connection.connect(address)
    except (FileNotFoundError, ConnectionRefusedError):
        connection.close()
        return None
    return connection


@contextlib.contextmanager
def _short(path: str):
    """*path* as a socket address shorter than the 108 bytes ``AF_UNIX``
    takes: through an open descriptor of its directory."""
    directory = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{directory}/{os.path.basename(path)}"
    finally:
        os.close(directory)


def _read_answer(connection: socket.socket, progress) -> Optional[dict]:
    """The daemon's final answer, or None if it closed without one (it was
    exiting: nothing of the request was done)."""
    for raw in connection.makefile("rb"):
        message = json.loads(raw)
        if "progress" in message:
            if progress is not None:
                progress(*message["progress"])
            continue
        return message
    return None


def _start_daemon(store_path: str, log_file, log_level: str) -> None:
    """Starts a daemon for the store (forked and detached, as a mount's
    daemon is) and waits until it listens, or finds that another does."""
    from .mount import start_daemon
    arguments = (os.path.abspath(store_path), log_file, log_level)
    with start_daemon(lambda report_fd: _detach_and_run(arguments, report_fd)) as pipe:
        output = _read_until_ready(pipe)
    if output.endswith((_READY, _OTHER)):
        return
    lines = [line for line in output.decode("utf-8", "replace").splitlines() if line.strip()]
    raise MountError(f"the store daemon of {store_path} did not start: "
                     f"{lines[-1] if lines else 'it exited'}", errno.EIO)


def _detach_and_run(arguments: tuple, report_fd: int) -> None:
    """In the forked child: detached (:func:`layerfs.mount.detach`), stderr
    the report pipe until ready; then :func:`main`.  Never returns."""
    from .mount import detach
    status = 1
    try:
        detach(report_fd)
        status = main(*arguments)
    except BaseException as error:
        try:
            os.write(2, f"{error}\n".encode("utf-8", "replace"))
        except OSError:
            pass
    finally:
        os._exit(status)


def _read_until_ready(pipe) -> bytes:
    """What the new daemon writes on its stderr until it is ready or gone."""
    output = b""
    deadline = time.monotonic() + START_TIMEOUT
    while not output.endswith((_READY, _OTHER)):
        if time.monotonic() > deadline:
            raise MountError("the store daemon did not start in time", errno.ETIMEDOUT)
        readable, _, _ = select.select([pipe], [], [], 0.5)
        if readable:
            chunk = os.read(pipe.fileno(), 4096)
            if not chunk:
                break
            output += chunk
    return output


# -- the daemon ----------------------------------------------------------------

class Daemon:
    """Serves the containers of one store, each on its own FUSE session."""

    def __init__(self, store_path: str, listener: socket.socket):
        self.store_path = store_path
        self.listener = listener
        self.sessions: dict[str, threading.Thread] = {}   # mount point -> its loop
        self.pending = 0            # requests being answered
        self.lock = threading.Lock()
        self.idle_since = time.monotonic()
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            readable, _, _ = select.select([self.listener], [], [], 0.2)
            if readable:
                self._accept()
            with self.lock:
                idle = not self.sessions and not self.pending
                if idle and time.monotonic() - self.idle_since > IDLE_EXIT:
                    return
        self._stop_sessions()

    def _accept(self) -> None:
        try:
            connection, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        uid = struct.unpack("3i", connection.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[1]
        if uid != os.geteuid():
            log.warning("refused a request from uid %d", uid)
            connection.close()
            return
        with self.lock:
            self.pending += 1
        threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        from .mount import describe
        try:
            with connection:
                connection.settimeout(REQUEST_TIMEOUT)
                line = connection.makefile("rb").readline()
                if not line:
                    return           # a probe (a new daemon checking for us)
                request = json.loads(line)
                connection.settimeout(None)
                try:
                    self._open_session(request, connection)
                    reply = {"ok": True}
                except OSError as error:
                    reply = {"error": " ".join(describe(error).split()),
                             "errno": error.errno or errno.EIO}
                except Exception as error:
                    log.exception("a mount request failed")
                    reply = {"error": f"internal error in the store daemon: {error}",
                             "errno": errno.EIO}
                connection.sendall((json.dumps(reply) + "\n").encode())
        except (OSError, ValueError) as error:
            log.warning("a client went away: %s", error)
        finally:
            with self.lock:
                self.pending -= 1
                self.idle_since = time.monotonic()

    def _open_session(self, request: dict, connection: socket.socket) -> None:
        """Opens the container *request* names and serves it on its mount
        point; returns once the mount is ready.  The request's fields: the
        container ``name``, ``mountpoint``, FUSE ``options`` (a dict from
        :func:`layerfs.mount.parse_options`), ``cache_dir``, ``registry``
        (:class:`layerfs.registry.Options` fields), ``volumes`` (fields of
        :class:`layerfs.volume.Volume`)."""
        from .mount import open_fs
        from .registry import Options
        from .store import Store
        from .volume import Volume
        mountpoint = request["mountpoint"]
        container = Store(self.store_path).get(request["name"])

        def progress(done: int, total: int) -> None:
            message = json.dumps({"progress": [done, total]}) + "\n"
            try:
                connection.sendall(message.encode())
            except OSError:
                pass

        fs = open_fs(progress, source=container.reference, upper=container.upper,
                     tag=container.tag, platform=container.platform,
                     cache_dir=request.get("cache_dir"),
                     registry=Options(**request.get("registry", {})), share_view=True,
                     volumes=[Volume(*fields) for fields in request.get("volumes", ())])
        ready = threading.Event()
        failure: list = []
        thread = threading.Thread(target=self._serve, daemon=True,
                                  args=(fs, mountpoint, request.get("options", {}),
                                        ready, failure))
        with self.lock:
            if mountpoint in self.sessions:
                fs.close()
                raise MountError(f"{mountpoint}: this daemon serves it already", errno.EBUSY)
            self.sessions[mountpoint] = thread
        thread.start()
        ready.wait()
        if failure:
            raise failure[0]

    def _serve(self, fs, mountpoint: str, options: dict, ready: threading.Event,
               failure: list) -> None:
        from .mount import describe, serve
        try:
            serve(fs, mountpoint, options, on_ready=ready.set)
        except OSError as error:
            if ready.is_set():      # the mount was answered for: only the log hears
                log.error("serving %s ended: %s", mountpoint, describe(error))
            failure.append(error)
        except BaseException as error:
            log.exception("serving %s failed", mountpoint)
            failure.append(MountError(f"{mountpoint}: internal error in the store daemon "
                                      f"({error})", errno.EIO))
        finally:
            with self.lock:
                del self.sessions[mountpoint]
                self.idle_since = time.monotonic()
            ready.set()
            log.info("no longer serving %s", mountpoint)

    def _stop_sessions(self) -> None:
        """Unmounts every session (lazily) and waits for each to close."""
        from .mount import lazy_unmount
        with self.lock:
            sessions = dict(self.sessions)
        for mountpoint in sessions:
            lazy_unmount(mountpoint)
        for thread in sessions.values():
            # A session whose mount is still in use (a lazy unmount waits for
            # its users) is left: every reply it gave is on disk already.
            thread.join(STOP_TIMEOUT)


def _take_lock(lock_fd: int, socket_path: str) -> bool:
    """Takes the store's daemon lock: False if a live daemon holds it (its
    socket answers); else waits for a leaving one to go."""
    while True:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        probe = _connect(socket_path)
        if probe is not None:
            probe.close()
            return False
        time.sleep(0.02)


def main(store_path: str, log_file: Optional[str], log_level: str) -> int:
    """The daemon: takes the store's lock, listens, tells the starter (on
    stderr) it is ready, serves until idle or signalled."""
    from .mount import _log_to
    lock_file, socket_path = _paths(store_path)
    os.makedirs(os.path.dirname(lock_file), mode=0o700, exist_ok=True)
    lock_fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if not _take_lock(lock_fd, socket_path):
        os.write(2, _OTHER)
        return 0
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        os.unlink(socket_path)                # a crashed daemon's
    except FileNotFoundError:
        pass
    with _short(socket_path) as address:
        listener.bind(address)
    os.chmod(socket_path, 0o600)
    listener.listen(16)
    listener.setblocking(False)
    _log_to(log_file, log_level)
    daemon = Daemon(store_path, listener)
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, lambda *_: daemon.stopping.set())
    os.write(2, _READY)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)                       # the starter stops reading here
    os.close(devnull)
    log.info("serving the containers of %s", store_path)
    try:
        daemon.run()
    finally:
        os.unlink(socket_path)                # before the lock goes: no client waits on us
        listener.close()
        os.close(lock_fd)
    return 0
